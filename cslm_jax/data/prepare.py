"""Preparation of CSLM examples, shared by the in-process path and `cslm-jax prepare-data` (Beam):
JSONL lines -> records -> chat examples -> token rows (ids, loss mask) -> serialized
tf.train.Examples, written in the SeqIO cache layout per task:

    <cache>/<task>/{split}.tfrecord-XXXXX-of-NNNNN    examples (features targets, loss_weights)
    <cache>/<task>/info.{split}.json                  features, num_shards, seqio_version, key
    <cache>/<task>/stats.{split}.json                 examples, tokens per feature, truncated,
                                                      skipped (with the first messages)
    <cache>/<task>/COMPLETED                          written last: the cache is whole; the
                                                      settings (`task_key`) and `inputs`, each
                                                      file's size, time and lines (`input_record`)

Both paths call the same `Preparer` and assign each example to the shard `shard_of(file, line)`;
a shard holds its examples in (file, line) order. So the Beam output and the in-process output
are the same bytes, and training reads either with identical batches.

This module is the exact path, top to bottom: the lines of a file (`numbered_lines`), each
parsed and validated (`formats.parse_line`, `formats.validate_record`), its chat examples
(`formats.examples`), each rendered by the tokenizer's chat template and tokenized
(`formats.ChatRenderer`), EOS, truncation and the loss mask (`ChatRenderer.finish_ids`), each
serialized (`serialize`) and written (`RecordWriter`), then the cache's JSON files. `Preparer`
names these steps. With `fast=True` (the default) three of them are replaced by fast paths that
give the same bytes, each in its own module whose docstring says what it replaces, when it is
on, how it is proven equal and when it could go: cslm_jax/data/fast_parse.py (orjson),
cslm_jax/data/fast_chat.py (templates rendered once per role sequence, contents tokenized alone,
speech spans as ids, header positions from the template), cslm_jax/data/fast_serialize.py
(tf.train.Example bytes from varint tables). Records are written a batch at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import fsspec
import google_crc32c

from cslm_jax.data.fast_chat import fast_chat_for, fast_examples
from cslm_jax.data.fast_parse import fast_parse_line
from cslm_jax.data.fast_serialize import serialize_batch
from cslm_jax.data.formats import (
    RECORD_KIND_OF_TASK,
    ChatRenderer,
    DataConfig,
    RecordError,
    TaskSpec,
    examples,
    parse_line,
    validate_record,
)
from cslm_jax.data.sources import task_records, task_splits, tfds_cache_key
from cslm_jax.errors import DataError
from cslm_jax.model.vocab import load_tokenizer
from cslm_jax.storage import fs

PREPARE_VERSION = 2
FEATURES = ("targets", "loss_weights")
SHARD_STRIDE = 104729  # a prime: consecutive lines of a file go round-robin over shards
MAX_SKIP_MESSAGES = 20
SCAN_BYTES = 8 << 20  # what `plan_ranges` reads at a time
HEADS_KEPT_BELOW = 1 << 16  # record lengths whose TFRecord heads are kept (`RecordWriter`)


class CacheError(DataError):
    """A prepared cache is missing, incomplete or was prepared for other data; says what to do."""


def shard_of(file_index: int, line_no: int, num_shards: int) -> int:
    """The shard an example of line `line_no` (1-based) of the split's file `file_index` goes to."""
    return (file_index * SHARD_STRIDE + line_no - 1) % num_shards


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}"


def splits_of(spec: TaskSpec) -> dict[str, tuple]:
    """{split: files}; a TFDS task's splits have no files (its records come from the dataset)."""
    if spec.tfds is not None:
        return {s: () for s in task_splits(spec)}
    return {
        s: files for s, files in (("train", spec.train), ("validation", spec.validation)) if files
    }


def _is_url(path) -> bool:
    return "://" in str(path)


_DIGESTS: dict = {}


def _folder_stamp(path: str) -> tuple:
    return tuple(
        sorted(
            (e.name, e.stat().st_mtime_ns, e.stat().st_size)
            for e in os.scandir(path)
            if e.is_file()
        )
    )


def tokenizer_digest(tokenizer_dir: str | Path) -> str:
    """A digest of every file of the tokenizer folder (vocabulary, config and the chat template);
    a local folder's is kept while its files' names, sizes and times are unchanged."""
    if _is_url(tokenizer_dir):
        return _tokenizer_digest(tokenizer_dir)
    stamp = _folder_stamp(str(tokenizer_dir))
    hit = _DIGESTS.get(str(tokenizer_dir))
    if hit is None or hit[0] != stamp:
        hit = _DIGESTS[str(tokenizer_dir)] = (stamp, _tokenizer_digest(tokenizer_dir))
    return hit[1]


def _tokenizer_digest(tokenizer_dir: str | Path) -> str:
    h = hashlib.sha256()  # every file: vocabulary, config and the chat template (.jinja)
    if _is_url(tokenizer_dir):  # file:// or gs:// (dot files included, as locally)
        files = fs.glob(f"{str(tokenizer_dir).rstrip('/')}/*")
        local = fs.local_file(tokenizer_dir)
        isdir = os.path.isdir if local is not None else (lambda f: fs.path(f).is_dir())
        opener = fs.open_file
        if local is not None:
            files = [fs.local_file(f) for f in files]
    else:
        files = [os.path.join(str(tokenizer_dir), n) for n in os.listdir(tokenizer_dir)]
        isdir, opener = os.path.isdir, open
    for f in sorted(files):
        if isdir(f):
            continue
        h.update(os.path.basename(f).encode())
        with opener(f, "rb") as g:
            h.update(g.read())
    return h.hexdigest()[:16]


_LOCAL_TOKENIZERS: dict = {}


def local_tokenizer_dir(tokenizer_dir: str | Path) -> str:
    """A tokenizer folder on a URL (gs://...) copied to a local temporary folder, once per
    process (workers of a cluster job); a local folder as it is."""
    if not _is_url(tokenizer_dir):
        return str(tokenizer_dir)
    local = fs.local_file(tokenizer_dir)  # a file:// URL names a local folder
    if local is not None:
        return local
    if str(tokenizer_dir) not in _LOCAL_TOKENIZERS:
        _LOCAL_TOKENIZERS[str(tokenizer_dir)] = str(fs.local_dir(tokenizer_dir, "tokenizer folder"))
    return _LOCAL_TOKENIZERS[str(tokenizer_dir)]


def format_key(fmt) -> dict:
    """The format settings prepared examples depend on: all but `speech_rate` (synthesis only),
    so setting it keeps a prepared cache valid."""
    key = json.loads(json.dumps(dataclasses.asdict(fmt), default=str))
    key.pop("speech_rate", None)
    return key


def task_key(spec: TaskSpec, cfg: DataConfig, tokenizer_dir: str | Path, num_shards: int) -> dict:
    """What a task's prepared examples depend on (besides the files' contents): checked when
    training reads a prepared cache, so a cache made with another tokenizer, template, length or
    set of files is refused instead of silently trained on."""
    key = {
        "version": PREPARE_VERSION,
        "task": spec.name,
        "kind": spec.kind,
        "lang": spec.lang,
        "files": {s: [os.path.basename(f) for f in fs] for s, fs in splits_of(spec).items()},
        "format": format_key(cfg.format),
        "max_length": cfg.max_length,
        "skip_bad": cfg.skip_bad,
        "num_shards": num_shards,
        "tokenizer": tokenizer_digest(tokenizer_dir),
    }
    if spec.tfds is not None:
        key["tfds"] = {s: tfds_cache_key(spec, s) for s in splits_of(spec)}
    return key


# -- input: the lines of a file ------------------------------------------------------------------


def numbered_lines(
    path: str,
    start: int = 0,
    end: int | None = None,
    first_line: int = 1,
    tally: dict | None = None,
):
    """(line number, raw bytes) of the lines of `path` that start in [start, end) (`start` is a
    line start, `first_line` its number), as iterating the file in binary mode gives them.
    `tally`: given, its "lines" is set to the number of lines read once they are all read (what
    the cache records of each input, `input_record`)."""
    opener = fs.open_file if _is_url(path) else open  # gs:// through the one GCS client
    try:
        f = opener(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        f.seek(start)
        pos, n = start, first_line
        while end is None or pos < end:
            raw = f.readline()
            if not raw:
                break
            yield n, raw
            pos += len(raw)
            n += 1
    if tally is not None:
        tally["lines"] = n - first_line


def plan_ranges(path: str, range_bytes: int) -> list[tuple[int, int, int]]:
    """(start byte, end byte, number of the first line) of ranges of about `range_bytes`, each
    starting at a line start: one sequential pass counting newlines."""
    opener = open
    if _is_url(path):
        size, opener = fs.file_size(path), fs.open_file
    else:
        size = os.path.getsize(path)
    starts = [(0, 1)]
    if size > range_bytes:
        with opener(path, "rb") as f:
            pos, lines, want = 0, 0, range_bytes
            while True:
                chunk = f.read(SCAN_BYTES)
                if not chunk:
                    break
                while want <= pos + len(chunk):
                    i = chunk.find(b"\n", max(want - 1 - pos, 0))
                    if i < 0:
                        break
                    start = pos + i + 1
                    if start >= size:
                        want = size + 1
                        break
                    starts.append((start, 1 + lines + chunk.count(b"\n", 0, i + 1)))
                    want = start + range_bytes
                lines += chunk.count(b"\n")
                pos += len(chunk)
    return [
        (s, starts[k + 1][0] if k + 1 < len(starts) else size, line)
        for k, (s, line) in enumerate(starts)
    ]


# -- records -> examples -> token rows -> serialized examples ------------------------------------


def new_counts() -> dict:
    return {
        "records": 0,
        "examples": 0,
        "truncated": 0,
        "skipped": 0,
        "targets_tokens": 0,
        "targets_max_tokens": 0,
        "loss_weights_tokens": 0,
        "loss_weights_max_tokens": 0,
        "trained_tokens": 0,
        "skipped_messages": [],
    }


def merge_counts(a: dict, b: dict) -> dict:
    """Sum of two counts dicts; skipped messages kept in (file, line) order, the first 20."""
    out = {}
    for k in a:
        if k == "skipped_messages":
            out[k] = sorted(a[k] + b[k])[:MAX_SKIP_MESSAGES]
        elif k.endswith("_max_tokens"):
            out[k] = max(a[k], b[k])
        else:
            out[k] = a[k] + b[k]
    return out


_TOKENIZERS: dict = {}  # folder -> (its files' names, sizes and times; the tokenizer)


def _load_tokenizer(path: str):
    """load_tokenizer(path), once per process while the folder's files are unchanged (the
    Preparers of a job's tasks share it, and with it the fast path's chat plans)."""
    stamp = _folder_stamp(path)
    hit = _TOKENIZERS.get(path)
    if hit is None or hit[0] != stamp:
        hit = _TOKENIZERS[path] = (stamp, load_tokenizer(path))
    return hit[1]


class Preparer:
    """Lines of a task's JSONL file -> (shard, serialized example), a batch at a time, in these
    steps (the exact path, `fast=False`):

        parse          a line -> a record                     formats.parse_line
        validate       the record's fields (file, line, field) formats.validate_record
        examples       the record -> chat examples            formats.examples
        token_ids      each example rendered by the tokenizer's chat template and tokenized
        finish         EOS, truncation, the loss mask         ChatRenderer.finish_ids
        serialize      tf.train.Example bytes                 serialize

    `fast=True` (the default) replaces parse, examples + token_ids and serialize by their fast
    paths, which give the same bytes (fast_parse.py, fast_chat.py, fast_serialize.py; each says
    how that is proven). Strict: the first bad record raises RecordError (file, line, field);
    with `cfg.skip_bad` bad records are counted in `counts` (and the first messages kept)
    instead."""

    def __init__(
        self,
        spec: TaskSpec,
        cfg: DataConfig,
        tokenizer_dir: str | Path,
        fast: bool = True,
        batch_size: int = 64,
        tokenizer=None,
    ):
        self.spec, self.cfg = spec, cfg
        tok = (
            tokenizer
            if tokenizer is not None
            else _load_tokenizer(local_tokenizer_dir(tokenizer_dir))
        )
        self.renderer = ChatRenderer(tok, cfg.max_length, mask=cfg.format.loss_mask)
        self.batch_size = batch_size
        self.record_kind = RECORD_KIND_OF_TASK[spec.kind]
        self.counts = new_counts()
        if fast:
            self.parse, self.examples = fast_parse_line, fast_examples
            # validated records: units below the codebook size; ids: the tokenizer's
            self.token_ids = functools.partial(
                fast_chat_for(self.renderer).ids, units_below=cfg.format.unit_count
            )
            self.serialize = functools.partial(serialize_batch, vocab_size=len(tok))
        else:
            self.parse, self.examples = parse_line, examples
            self.token_ids, self.serialize = self.rendered_ids, serialize_each

    def rendered_ids(self, batch: list, found: list) -> list[list[int]]:
        """The exact `token_ids`: each example rendered by the tokenizer's Jinja template and
        the text tokenized whole (`found` stays None: the loss mask searches the headers)."""
        r = self.renderer
        return [r.encode(r.render_text(messages)) for messages in batch]

    def _skip(self, counts: dict, file_index: int, line_no: int, err: Exception) -> None:
        if not self.cfg.skip_bad:
            raise err
        counts["skipped"] += 1
        if len(counts["skipped_messages"]) < MAX_SKIP_MESSAGES:
            counts["skipped_messages"].append((file_index, line_no, str(err)))

    def line_batches(
        self, path: str, file_index: int, numbered, num_shards: int, counts: dict | None = None
    ):
        """Lists of (shard, serialized example) for the examples of `numbered` ((line number,
        raw bytes) of `path`, the split's file number `file_index`), in line order; counted in
        `counts` (default: `self.counts`; several threads may share a Preparer, each with its
        counts)."""
        counts = self.counts if counts is None else counts
        pending = []  # (line number, messages)
        spec, fmt = self.spec, self.cfg.format
        parse = self.parse
        for n, raw in numbered:
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                    f"line); JSONL corpora must be UTF-8"
                ) from None
            if not line or line.isspace():
                self._skip(counts, file_index, n, RecordError(where, "<json>", "empty line"))
                continue
            try:
                try:
                    record = parse(line, where)
                    validate_record(self.record_kind, record, fmt, where)
                except RecordError:
                    if parse is parse_line:
                        raise
                    record = parse_line(line, where)  # json's reading decides, in its words
                    validate_record(self.record_kind, record, fmt, where)
            except RecordError as e:
                self._skip(counts, file_index, n, e)
                continue
            if spec.kind in ("asr", "tts") and record["lang"] != spec.lang:
                self._skip(
                    counts,
                    file_index,
                    n,
                    RecordError(
                        where,
                        "lang",
                        f"is {record['lang']!r} but task {spec.name} is for {spec.lang!r}",
                    ),
                )
                continue
            counts["records"] += 1
            for messages in self.examples(spec.kind, record, fmt, where):
                pending.append((n, messages))
            if len(pending) >= self.batch_size:
                yield self._flush(pending, file_index, num_shards, counts)
                pending = []
        if pending:
            yield self._flush(pending, file_index, num_shards, counts)

    def tfds_batches(self, split: str, num_shards: int, counts: dict | None = None):
        """Lists of (shard, serialized example) for a TFDS task's split: its examples
        (`sources`), mapped to records and validated as JSONL lines are, then prepared as
        `line_batches` prepares them (example i takes the place of line i of file 0)."""
        counts = self.counts if counts is None else counts
        spec, fmt = self.spec, self.cfg.format
        skipped: list = []
        pending = []
        n = 0
        for n, (where, record) in enumerate(
            task_records(spec, split, fmt, self.cfg.skip_bad, skipped), start=1
        ):
            for err in skipped:
                self._skip(counts, 0, n, err)
            skipped.clear()
            counts["records"] += 1
            for messages in self.examples(spec.kind, record, fmt, where):
                pending.append((n, messages))
            if len(pending) >= self.batch_size:
                yield self._flush(pending, 0, num_shards, counts)
                pending = []
        for err in skipped:
            self._skip(counts, 0, n + 1, err)
        if pending:
            yield self._flush(pending, 0, num_shards, counts)

    def _flush(self, pending, file_index: int, num_shards: int, c: dict) -> list:
        """token_ids, finish and serialize a batch of (line number, messages), counted in `c`:
        [(shard, serialized example)]."""
        msgs = [m for _, m in pending]
        found: list = [None] * len(msgs)
        rows = self.token_ids(msgs, found)
        done_ids, done_masks, truncated = zip(*map(self.renderer.finish_ids, rows, found))
        lengths, mask_lengths = list(map(len, done_ids)), list(map(len, done_masks))
        c["examples"] += len(done_ids)
        c["truncated"] += sum(truncated)
        c["targets_tokens"] += sum(lengths)
        c["loss_weights_tokens"] += sum(mask_lengths)
        c["targets_max_tokens"] = max(c["targets_max_tokens"], *lengths)
        c["loss_weights_max_tokens"] = max(c["loss_weights_max_tokens"], *mask_lengths)
        c["trained_tokens"] += sum(map(sum, done_masks))
        data = self.serialize(done_ids, done_masks)
        return [
            (shard_of(file_index, n, num_shards), example) for (n, _), example in zip(pending, data)
        ]


def serialize(ids: list[int], mask: list[int]) -> bytes:
    """The tf.train.Example {targets: ids, loss_weights: mask} (int64 lists), serialized as
    `SerializeToString(deterministic=True)` does (map keys sorted): `serialize_batch` builds the
    same bytes without a protobuf object per example."""
    import tensorflow as tf  # heavy: TensorFlow

    feature = {
        "targets": tf.train.Feature(int64_list=tf.train.Int64List(value=ids)),
        "loss_weights": tf.train.Feature(int64_list=tf.train.Int64List(value=mask)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(
        deterministic=True
    )


def serialize_each(ids: list, masks: list) -> list[bytes]:
    """`serialize` of each (ids, mask) pair (the exact path's serialize step)."""
    return [serialize(i, m) for i, m in zip(ids, masks)]


# -- output: TFRecord files ----------------------------------------------------------------------

_RECORD_HEADS: dict = {}  # record length -> its 8 bytes and their masked CRC-32C


class RecordWriter:
    """A TFRecord file written without TensorFlow (the bytes tf.io.TFRecordWriter writes:
    length, masked CRC-32C of the length, data, masked CRC-32C of the data), so Beam workers
    need not import TensorFlow. Local paths on `open`; URLs (file://, gs://) through
    cslm_jax.storage.fs."""

    def __init__(self, path: str):
        self._crc = google_crc32c.value
        self._f = fs.open_file(path, "wb") if _is_url(path) else open(path, "wb")

    def _masked(self, data: bytes) -> bytes:
        crc = self._crc(data)
        return ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF).to_bytes(4, "little")

    def write(self, data: bytes) -> None:
        self.write_many((data,))

    def write_many(self, records) -> None:
        """`write` each of `records`, in one write (the length and its CRC from a table)."""
        masked, heads = self._masked, _RECORD_HEADS
        out = []
        for data in records:
            n = len(data)
            head = heads.get(n)
            if head is None:
                length = n.to_bytes(8, "little")
                head = length + masked(length)
                if n < HEADS_KEPT_BELOW:
                    heads[n] = head
            out += (head, data, masked(data))
        self._f.write(b"".join(out))

    def close(self) -> None:
        self._f.close()


def write_batch(writers, batch: list, open_writer=None) -> None:
    """Write a batch of (shard, record) to `writers` (a list or dict by shard; a missing one is
    `open_writer(shard)`), each shard's records in one write where the writer can."""
    by_shard: dict = {}
    for shard, data in batch:
        by_shard.setdefault(shard, []).append(data)
    for shard, records in by_shard.items():
        w = writers[shard] if open_writer is None or shard in writers else None
        if w is None:
            w = writers[shard] = open_writer(shard)
        many = getattr(w, "write_many", None)
        if many is not None:
            many(records)
        else:
            for data in records:
                w.write(data)


def record_writer(path: str):
    return RecordWriter(path)


# -- the cache layout --------------------------------------------------------------------------------


def seqio_version() -> str:
    """seqio.__version__, without importing seqio (and TensorFlow) where it is not imported yet:
    the installed distribution's version (tests/test_prepare_data.py checks they agree)."""
    if "seqio" in sys.modules:
        return sys.modules["seqio"].__version__
    return _installed_version("seqio")


@functools.cache
def _installed_version(distribution: str) -> str:
    return importlib.metadata.version(distribution)


def info_json(num_shards: int, key: dict) -> dict:
    return {
        "features": {f: {"dtype": "int32", "shape": [None]} for f in FEATURES},
        "num_shards": num_shards,
        "seqio_version": seqio_version(),
        "cslm": key,
    }


def stats_json(counts: dict) -> dict:
    out = {k: v for k, v in counts.items() if k != "skipped_messages"}
    out["skipped_messages"] = [m for _, _, m in sorted(counts["skipped_messages"])]
    return out


def write_json(path: str, data: dict) -> None:
    """Whole or absent (`fs.write_text_atomic`: a synced temporary file renamed into place; one
    object upload on gs://)."""
    fs.write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=1))


def completed_key(task_dir: str | Path) -> dict | None:
    """The key a complete cache was prepared with; None when the cache is not complete."""
    path = os.path.join(str(task_dir), "COMPLETED")
    if _is_url(path):
        if not fs.exists(path):
            return None
        with fs.open_file(path, "r") as f:
            text = f.read()
    else:
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def key_differences(found: dict, key: dict, ignore=()) -> list[tuple[str, str]]:
    """(field, "X in the cache, Y here") for each setting of `key` a cache's record `found`
    differs in (`inputs` and `ignore` left out); a mapping's differing entries are named one by
    one (format.loss_mask, files.train)."""

    def show(v):
        if isinstance(v, str):
            return repr(v)
        return "(none)" if v is None else json.dumps(v, ensure_ascii=False)

    out = []
    for k in sorted(set(key) | set(found)):
        if k in ignore or k == "inputs" or found.get(k) == key.get(k):
            continue
        a, b = found.get(k), key.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            parts = [
                f"{k}.{sub} {show(a.get(sub))} in the cache, {show(b.get(sub))} here"
                for sub in sorted(set(a) | set(b))
                if a.get(sub) != b.get(sub)
            ]
        elif k == "tokenizer":
            parts = [f"tokenizer files digest {a} in the cache, {b} here"]
        else:
            parts = [f"{k} {show(a)} in the cache, {show(b)} here"]
        out.append((k, "; ".join(parts)))
    return out


def input_stamp(path: str) -> dict:
    """What tells a changed input file without reading it: its size and modification time (ns);
    a gs:// object's generation and md5 (or crc32c) from its metadata instead of the time."""
    s = str(path)
    if s.startswith("gs://"):
        fs.path(s)  # the one GCS set-up (emulator, caches)
        info = fsspec.filesystem("gs").info(s)
        out = {"size": int(info["size"])}
        for field, name in (("generation", "generation"), ("md5Hash", "md5"), ("crc32c", "crc32c")):
            if info.get(field):
                out[name] = str(info[field])
        return out
    if _is_url(s):  # file://: a local file, its time in whole seconds as
        st = os.stat(fs.local_file(s))  # tf.io.gfile.stat gave it (caches prepared before)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns // 10**9 * 10**9}
    st = os.stat(s)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def input_record(files, stamps, lines) -> list[dict]:
    """A split's entry of COMPLETED's `inputs`: per file its name, `input_stamp` (taken before
    it was read) and line count."""
    return [
        {"file": os.path.basename(str(f)), **st, "lines": int(n)}
        for f, st, n in zip(files, stamps, lines)
    ]


COUNT_LINES_UP_TO = 256 << 20  # an input's lines are counted again for a message up to this size


def _time(ns: int, other: int) -> str:
    def fmt(v, spec):
        return datetime.datetime.fromtimestamp(v / 1e9).isoformat(" ", spec)

    a, b = fmt(ns, "seconds"), fmt(other, "seconds")
    return (
        a
        if a != b
        else fmt(ns, "microseconds")
        if fmt(ns, "microseconds") != fmt(other, "microseconds")
        else f"{ns} ns"
    )


def _stamp_difference(path: str, then: dict, now: dict) -> str | None:
    """How an input changed since `then` ("120 lines (5,000 bytes), now 30 lines (1,250
    bytes)"), or None. A content hash both sides have decides alone; else the object generation,
    else the modification time."""
    if then.get("size") != now["size"]:
        lines = None
        if not _is_url(path) and now["size"] <= COUNT_LINES_UP_TO:
            with open(path, "rb") as f:
                data = f.read()
            lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        if "lines" in then and lines is not None:
            return (
                f"{then['lines']} lines ({then.get('size'):,} bytes), now {lines} lines "
                f"({now['size']:,} bytes)"
            )
        was = f"{then['lines']} lines, " if "lines" in then else ""
        return f"{was}{then.get('size'):,} bytes, now {now['size']:,} bytes"
    for name in ("md5", "crc32c"):
        if name in then and name in now:
            return (
                None
                if then[name] == now[name]
                else f"{name} {then[name]}, now {now[name]} (same size, {now['size']:,} bytes)"
            )
    if "generation" in then and "generation" in now:
        return (
            None
            if then["generation"] == now["generation"]
            else f"object generation {then['generation']}, now {now['generation']} (same size)"
        )
    if "mtime_ns" in then and "mtime_ns" in now and then["mtime_ns"] != now["mtime_ns"]:
        return (
            f"modified {_time(then['mtime_ns'], now['mtime_ns'])}, now "
            f"{_time(now['mtime_ns'], then['mtime_ns'])} (same size, {now['size']:,} bytes)"
        )
    return None


def inputs_changed(found: dict, spec: TaskSpec) -> str | None:
    """Why a cache's record `found` no longer matches the task's input files ("prepared from an
    older x.jsonl: 120 lines (...), now 30 lines (...)"), or None. A file absent here (training
    hosts need not hold the corpus) is not checked."""
    if "inputs" not in found:
        return (
            "prepared by an older cslm-jax, which did not record its input files' sizes and "
            "times (a changed corpus cannot be told)"
        )
    for split, files in splits_of(spec).items():
        for path, then in zip(files, found["inputs"].get(split, [])):
            try:
                now = input_stamp(path)
            except Exception as e:  # noqa: BLE001 - only a missing file is skipped
                if isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError":
                    continue
                raise
            what = _stamp_difference(str(path), then, now)
            if what is not None:
                name = then.get("file", os.path.basename(str(path)))
                return f"prepared from an older {name}: {what}"
    return None


def check_cache(task_dir: str | Path, key: dict, spec: TaskSpec | None = None) -> None:
    """Raise CacheError unless `task_dir` holds a complete cache prepared with `key` (the shard
    count excepted: any prepared count is read) and, given `spec`, from its input files as they
    are now (`inputs_changed`)."""
    found = completed_key(task_dir)
    if found is None:
        raise CacheError(
            f"{task_dir}: no prepared cache (COMPLETED missing); prepare it with "
            f"`cslm-jax prepare-data --out {os.path.dirname(str(task_dir))} ...` (an "
            f"interrupted preparation is completed by running it again)"
        )
    diff = key_differences(found, key, ignore=("num_shards",))
    if diff:
        raise CacheError(
            f"{task_dir}: prepared with different {', '.join(k for k, _ in diff)} "
            f"than this data config and tokenizer ({'; '.join(d for _, d in diff)}); "
            f"prepare again into a new --out (or the same with --force)"
        )
    why = inputs_changed(found, spec) if spec is not None else None
    if why is not None:
        raise CacheError(
            f"{task_dir}: {why}; prepare it again: `cslm-jax prepare-data --out "
            f"{os.path.dirname(str(task_dir))} --force ...`"
        )


def prepare_task_local(
    spec: TaskSpec,
    cfg: DataConfig,
    tokenizer_dir: str | Path,
    task_dir: str | Path,
    num_shards: int = 1,
    fast: bool = True,
    tokenizer=None,
) -> dict:
    """Prepare every split of a task in this process into `task_dir` (the SeqIO cache layout,
    the same bytes `cslm-jax prepare-data` writes for the same shard count). Written in a
    folder of its own (unique per process) and renamed into place whole, COMPLETED inside; a
    failure leaves nothing. `tokenizer`: the tokenizer of `tokenizer_dir`, already loaded.
    Returns {split: counts}."""
    task_dir = Path(task_dir)
    key = task_key(spec, cfg, tokenizer_dir, num_shards)
    tmp = task_dir.with_name(task_dir.name + f".tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    out, inputs = {}, {}
    try:
        prep = Preparer(spec, cfg, tokenizer_dir, fast=fast, tokenizer=tokenizer)
        for split, files in splits_of(spec).items():
            prep.counts = new_counts()
            writers = [
                record_writer(str(tmp / shard_name(split, s, num_shards)))
                for s in range(num_shards)
            ]
            stamps = [input_stamp(f) for f in files]
            tallies = [{} for _ in files]
            try:
                if spec.tfds is not None:
                    for batch in prep.tfds_batches(split, num_shards):
                        write_batch(writers, batch)
                for file_index, path in enumerate(files):
                    for batch in prep.line_batches(
                        path,
                        file_index,
                        numbered_lines(path, tally=tallies[file_index]),
                        num_shards,
                    ):
                        write_batch(writers, batch)
            finally:
                for w in writers:
                    w.close()
            out[split] = prep.counts
            inputs[split] = input_record(files, stamps, [t["lines"] for t in tallies])
            (tmp / f"info.{split}.json").write_text(
                json.dumps(info_json(num_shards, key), indent=1)
            )
            (tmp / f"stats.{split}.json").write_text(
                json.dumps(stats_json(prep.counts), ensure_ascii=False, indent=1)
            )
        (tmp / "COMPLETED").write_text(json.dumps(dict(key, inputs=inputs), indent=1))
        try:
            os.rename(tmp, task_dir)
        except OSError:  # another process prepared it first: the same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_stats(task_dir: str | Path, split: str) -> dict:
    with fs.open_file(os.path.join(str(task_dir), f"stats.{split}.json"), "r") as f:
        return json.load(f)
