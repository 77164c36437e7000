"""The fast path of reading a JSONL line: `fast_parse_line(line, where)` == `formats.parse_line`
(json) for every record the preparation keeps, through orjson (several times faster).

What it replaces. `formats.parse_line`, Python's json, for each line a `Preparer` reads.

When it is on. `Preparer(fast=True)`, the default (`prepare-data --no-fast-render` turns it
off). What orjson rejects (NaN/Infinity and lone surrogates, which json accepts; bad JSON, for
json's message) and non-object records go to `parse_line`; and `Preparer` re-reads with
`parse_line` every record that fails validation, so its error message and the decision to keep
or skip it are json's.

How it is proven equal. Floats are read to the same correctly rounded values and duplicate keys
keep the last, as json does. The one value orjson reads differently is an integer beyond 64 bits
(a float, json an int), which makes a record invalid either way (unit ids must be integers below
the codebook size, times are read through float(), the other checked fields are strings), and
such a record is re-read by json. The prepared caches of the fast and the exact path are
compared byte for byte (tests/test_prepare_fast.py, tests/test_prepare_data.py), bad records'
messages in tests/test_prepare_guards.py and tests/test_formats.py.

When it could be deleted. When json.loads is within a few percent of orjson on these records, or
the corpus is read in another format (the records as arrays): `Preparer` then calls
`parse_line` alone.
"""

from __future__ import annotations

import orjson

from cslm_jax.data.formats import parse_line


def fast_parse_line(line: str, where: str) -> dict:
    """`parse_line(line, where)` through orjson (see the module docstring)."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:  # json decides, in its words
        return parse_line(line, where)
    if type(record) is not dict:
        return parse_line(line, where)
    return record
