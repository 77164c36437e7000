"""The project's one error type.

`CslmError` means: the input is wrong, not the program. Bad input (files, flags, records), bad
configuration, bad data, a missing or inconsistent checkpoint, an environment that cannot do what
was asked. Its message is written for the user: it names the file, field, flag or path and says
what to do. `cslm-jax` prints it on one line and exits with code 2. Every other exception is a
bug and keeps its traceback (exit code 1).

Each part of the package raises its own subclass (ConfigError, RecordError, CheckpointError, ...),
defined next to the code that raises it.
"""
from __future__ import annotations

from pathlib import Path


class CslmError(Exception):
    """Bad input, configuration, data or checkpoint; the message names what and where."""


class DataError(CslmError):
    """A data file cannot be read, the input pipeline stopped, or a saved position does not fit
    it; the message says where."""


class OutputExistsError(CslmError):
    """An output folder exists and is not empty, and replacing it was not asked for."""


def check_output_dir(path: str | Path, force: bool, hint: str = "pass --force to replace it") -> None:
    """Refuse a non-empty `path` unless `force`, and a file there always (`force` replaces
    folders only: a file is not an output this command wrote)."""
    from cslm_jax.storage.fs import path as storage_path

    from cslm_jax.storage.fs import check_bucket

    path = storage_path(path)           # local or gs://; a mangled or unsupported URL is refused
    check_bucket(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} is a file, not a folder; give a folder path (--force "
                                f"replaces folders only)")
    if path.exists() and any(path.iterdir()) and not force:
        raise OutputExistsError(f"{path} exists and is not empty; {hint}")
