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


class CslmError(Exception):
    """Bad input, configuration, data or checkpoint; the message names what and where."""


class DataError(CslmError):
    """A data file cannot be read, the input pipeline stopped, or a saved position does not fit
    it; the message says where."""


class OutputExistsError(CslmError):
    """An output folder exists and is not empty, and replacing it was not asked for."""


def json_error(e, line: str) -> str:
    """`invalid JSON: ...` for a `json.JSONDecodeError` `e` raised by one line of a JSONL file:
    the column within that line, or that the line ends before the record does (a record cut
    short; the line's own newline would otherwise be reported as line 2 column 1)."""
    text = line.rstrip("\r\n")
    msg = e.msg.removesuffix(" at")  # "Unterminated string starting at": the column follows
    if e.pos >= len(text) or msg.startswith("Unterminated string"):
        return "invalid JSON: the line ends before the record does; is it cut short?"
    return f"invalid JSON: {msg} at column {e.pos + 1}"
