"""The fast path of serialization: `serialize_batch(ids, masks)` == [serialize(i, m) for ...]
(cslm_jax/data/prepare.py), the bytes of the tf.train.Example {targets: ids, loss_weights: mask}
as `SerializeToString(deterministic=True)` writes them.

What it replaces. `prepare.serialize` builds a protobuf object per example through TensorFlow.
Here the bytes are written directly: each id's varint from a table, each 0/1 weight one byte,
the lengths and field tags of the Example's nesting around them. No protobuf object per example,
and no TensorFlow import (so Beam workers need none).

When it is on. `Preparer(fast=True)`, the default (`prepare-data --no-fast-render` turns it off),
for every batch. Ids below `VARINT_TABLE_MAX` come from the table (built up to the tokenizer's
vocabulary size, or to the largest id met, a power of two); otherwise a batch is encoded by numpy
(`packed_varints`), which refuses ids outside [0, 2**35); loss weights other than 0 and 1 are
refused (ValueError).

How it is proven equal. tests/test_prepare_data.py::test_serialize_batch_is_tensorflows_
deterministic_encoding (ids of every varint length through both the table and numpy, empty and
over-16-KiB examples, refused ids); the prepared caches of the fast and the exact path compared
byte for byte (tests/test_prepare_fast.py::test_templates_changed_in_the_config_are_followed_by_
the_fast_path, tests/test_prepare_data.py).

When it could be deleted. When the cache is written in a format a library writes at this speed
(the feature lists as arrays), or protobuf's own serializer is within a few percent of this; then
`Preparer` keeps `serialize` and this module goes with its test.
"""

from __future__ import annotations

import itertools

import numpy as np

VARINT_TABLE_MIN = 1 << 14  # the smallest table: every varint of one or two bytes
VARINT_TABLE_MAX = 1 << 21  # ids at or above go to numpy (a full table holds 2**21 varints)
SMALL_LENGTH = 1 << 14  # lengths below it have a varint of at most two bytes
FRAMING_BYTES = 64  # what the Example's nesting adds around its two payloads (<= 55)
_WEIGHT_VALUES = b"\x00\x01"


def varint(n: int) -> bytes:
    """The protobuf varint of a non-negative integer: 7 bits a byte, low first, high bit set on
    every byte but the last."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS: list[bytes] = []  # _VARINTS[n] == varint(n); grown to a power of two as ids come
_SMALL_VARINTS = [varint(n) for n in range(SMALL_LENGTH)]


def _varint_table(largest: int) -> list[bytes] | None:
    """The table of varints covering 0..largest (grown to the next power of two when it does not
    yet); None when `largest` is `VARINT_TABLE_MAX` or more."""
    if largest >= VARINT_TABLE_MAX:
        return None
    if largest >= len(_VARINTS):
        size = max(VARINT_TABLE_MIN, 1 << largest.bit_length())
        _VARINTS.extend(varint(n) for n in range(len(_VARINTS), size))
    return _VARINTS


def _length_varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < SMALL_LENGTH else varint(n)


def packed_varints(values: list) -> list[bytes]:
    """Per list of non-negative ints (< 2**35): its values as concatenated protobuf varints,
    computed for the whole batch at once with numpy; ValueError for a value outside."""
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    flat = np.fromiter(itertools.chain.from_iterable(values), np.int64, int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << 35):
        raise ValueError("token ids must lie in [0, 2**35)")
    nbytes = np.ones_like(flat)
    for k in range(1, 5):
        nbytes += flat >= (1 << (7 * k))
    out = np.zeros((flat.size, 5), np.uint8)
    for k in range(5):
        byte = (flat >> (7 * k)) & 0x7F
        more = nbytes > k + 1
        out[:, k] = byte | (more << 7)
    keep = np.arange(5)[None, :] < nbytes[:, None]
    data = out[keep].tobytes()  # row-major: each value's bytes in order
    ends = np.cumsum(
        np.bincount(
            np.repeat(np.arange(len(values)), lengths), weights=nbytes, minlength=len(values)
        ).astype(np.int64)
    )
    starts = np.concatenate([[0], ends[:-1]])
    return [data[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def _packed_ids(ids: list, vocab_size: int | None) -> list[bytes]:
    """Each id list as its packed varints: from the table when every id lies in
    [0, VARINT_TABLE_MAX) (known from `vocab_size`, else looked over), else by numpy (which
    refuses ids outside [0, 2**35))."""
    table = None
    if vocab_size is not None:
        table = _varint_table(vocab_size - 1)
    else:
        nonempty = [i for i in ids if i]
        if not nonempty:
            return [b""] * len(ids)
        if min(map(min, nonempty)) >= 0:
            table = _varint_table(max(map(max, nonempty)))
    if table is None:
        return packed_varints(ids)
    get = table.__getitem__
    return [b"".join(map(get, i)) for i in ids]


def _weight_bytes(masks: list) -> list[bytes]:
    """Each mask as bytes, one per weight; ValueError unless every weight is 0 or 1."""
    try:
        weights = list(map(bytes, masks))
    except ValueError:  # a weight outside 0..255
        raise ValueError("loss weights must be 0 or 1") from None
    if b"".join(weights).translate(None, _WEIGHT_VALUES):
        raise ValueError("loss weights must be 0 or 1")
    return weights


def serialize_batch(ids: list, masks: list, vocab_size: int | None = None) -> list[bytes]:
    """`prepare.serialize` of each (ids, mask) pair, byte for byte (see the module docstring).
    `vocab_size`: the ids are a tokenizer's, so they lie in [0, vocab_size) (not looked over)."""
    out = []
    weights = _weight_bytes(masks)
    small = _SMALL_VARINTS.__getitem__
    for t, w in zip(_packed_ids(ids, vocab_size), weights):
        # every length below is at most the payloads' plus the framing: below SMALL_LENGTH,
        # a lookup in the table of small varints
        v = small if len(t) + len(w) < SMALL_LENGTH - FRAMING_BYTES else _length_varint
        # Features{feature: {"loss_weights": Feature{int64_list{packed w}}, "targets": ...}}
        lw = (b"\x0a" + v(len(w)) + w) if w else b""
        lw = b"\x1a" + v(len(lw)) + lw
        lw = b"\x0a\x0closs_weights\x12" + v(len(lw)) + lw
        tg = (b"\x0a" + v(len(t)) + t) if t else b""
        tg = b"\x1a" + v(len(tg)) + tg
        tg = b"\x0a\x07targets\x12" + v(len(tg)) + tg
        features = b"\x0a" + v(len(lw)) + lw + b"\x0a" + v(len(tg)) + tg
        out.append(b"\x0a" + v(len(features)) + features)
    return out
