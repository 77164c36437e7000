"""A MOS predictor as a plug-in (`--mos module:function`, issue 26): any callable
`function(wave, rate) -> float` (a mono float32 numpy wave at the synthesiser's rate, 22,050 Hz
for token2wav v1 and 24,000 Hz for v2; it resamples if its model needs another rate), e.g.
UTMOS22, the predictor the paper reports. cslm_jax ships no predictor: the user installs one.

UTMOS22 through SpeechMOS (github.com/tarepan/SpeechMOS, fetched by `torch.hub` on first use;
it needs torch and torchaudio; `utmos22_strong` takes a [batch, samples] tensor and its rate and
resamples to 16 kHz itself), in a file `my_mos.py` on PYTHONPATH::

    import functools

    import torch


    @functools.cache
    def _predictor():
        return torch.hub.load("tarepan/SpeechMOS:v1.2.0", "utmos22_strong", trust_repo=True)


    def utmos22(wave, rate):
        with torch.no_grad():
            return float(_predictor()(torch.from_numpy(wave)[None], rate)[0])

then `cslm-jax evaluate ... --mos my_mos:utmos22`. The function is checked when loaded (it
must accept (wave, rate)); each value it returns must be a finite number.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np

from cslm_jax.eval.metrics import EvaluationError
from cslm_jax.eval.plugins import import_callable


@dataclasses.dataclass(frozen=True)
class MosPredictor:
    """A loaded `--mos` plug-in: its spec (reported with the scores) and the function."""

    spec: str
    fn: Callable

    def __call__(self, wave: np.ndarray, rate: int):
        return self.fn(wave, rate)


def load_mos(spec: str, flag: str = "--mos") -> MosPredictor:
    """The predictor `spec` (`module:function`) names, checked to accept (wave, rate)."""
    fn = import_callable(spec, flag)
    try:
        sig = inspect.signature(fn)
    except ValueError:
        sig = None  # no signature to inspect (a builtin): called as it is
    if sig is not None:
        try:
            sig.bind(np.zeros(1, np.float32), 16000)
        except TypeError as e:
            raise EvaluationError(
                f"{flag} {spec!r}: it must take (wave, rate), but its signature {sig} "
                f"does not ({e})"
            ) from None
    return MosPredictor(spec, fn)


def predict_mos(predictor: MosPredictor, waves: Sequence[np.ndarray], rate: int) -> dict:
    """{"scores": one per wave (None for an empty wave), "mean": over the scored waves,
    "predictor": its spec}; a value that is not a finite number is an error naming the wave."""
    scores: list[float | None] = []
    for i, w in enumerate(waves):
        w = np.asarray(w, dtype=np.float32)
        if w.size == 0:
            scores.append(None)
            continue
        raw = predictor(w, int(rate))
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise EvaluationError(
                f"--mos {predictor.spec!r}: returned {raw!r} for wave {i}; expected a finite number"
            )
        scores.append(value)
    ok = [s for s in scores if s is not None]
    return {
        "scores": scores,
        "mean": sum(ok) / len(ok) if ok else None,
        "predictor": predictor.spec,
    }
