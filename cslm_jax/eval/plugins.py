"""Plug-ins named on the command line as `module:callable` (an ASR backend's factory for
`--asr`, a MOS predictor for `--mos`): the module imported, the attribute (dotted for a
nested one) looked up and checked to be callable, every failure an `EvaluationError` that
names the flag and the spec."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from cslm_jax.eval.metrics import EvaluationError


def import_callable(spec: str, flag: str) -> Callable:
    """The callable `spec` = `package.module:name` (or `module:Class.method`) names; `flag`
    (e.g. `--mos`) is named in the errors."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise EvaluationError(
            f"{flag} {spec!r}: expected module:callable (e.g. my_package.scorers:utmos22)"
        )
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise EvaluationError(
            f"{flag} {spec!r}: cannot import module {module!r} ({e}); is it installed, or on "
            f"PYTHONPATH?"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EvaluationError(f"{flag} {spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EvaluationError(
            f"{flag} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable"
        )
    return obj
