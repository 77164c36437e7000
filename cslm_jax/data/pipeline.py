"""SeqIO for CSLM: the vocabulary, JSONL sources with file/line provenance, the tokenizing
preprocessor (templates + loss mask, in the pipeline), a packing feature converter that carries
the loss mask and task ids, and a batch iterator whose position can be saved and restored.

Pipeline per task: JSONL records -> validate + format + render + tokenize + mask, once, into a
cached TFRecord (Python; strict errors name file, line and field; `skip_bad` counts) -> read
(pure TensorFlow from here on) -> shard by host (`seqio.ShardInfo`) -> shuffle (seeded) ->
mixture sampling (seeded rates) -> pack to `max_length` -> batch. Every stage is deterministic for a seed, and the tf.data iterator
state (shuffle buffers included) is checkpointed, so a resume continues with exactly the batch an
uninterrupted run would have seen.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from cslm_jax.config import ConfigError
from cslm_jax.data.formats import ChatRenderer, DataConfig, RecordError, TaskSpec, examples
from cslm_jax.data.sources import task_records, task_splits, tfds_cache_key
from cslm_jax.errors import DataError
from cslm_jax.storage import fs


class QuietUncachedWarning(logging.Filter):
    """seqio advises caching FunctionDataSource tasks; ours read TFRecords prepared and cached
    by `prepare_split`, so the advice does not apply and would only bury real messages.
    Installed on the `absl` logger by the command line (`cslm_jax.cli.setup`), not on import."""

    def filter(self, record):
        return "uncached FunctionDataset" not in record.getMessage()


def keep_tensorflow_off_accelerators() -> None:
    """TensorFlow (only the input pipeline uses it) must not take the GPUs/TPUs JAX owns. Only
    possible before TensorFlow sets up its devices (its first op); later calls change nothing.
    Called by the command line at start and by the pipeline before its first TensorFlow op."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (ValueError, RuntimeError):      # no such device type, or devices already set up
            pass


# -- vocabulary ---------------------------------------------------------------------------------

class HFVocabulary(seqio.Vocabulary):
    """A `seqio.Vocabulary` over a Hugging Face fast tokenizer folder (the extended CSLM one)."""

    def __init__(self, tokenizer_dir: str | Path):
        self.tokenizer_dir = str(Path(tokenizer_dir).absolute())
        self._tok = None
        super().__init__(extra_ids=0)

    @property
    def tokenizer(self):
        if self._tok is None:
            from cslm_jax.model.vocab import load_tokenizer
            self._tok = load_tokenizer(self.tokenizer_dir)
        return self._tok

    @property
    def eos_id(self):
        return self.tokenizer.eos_token_id

    @property
    def unk_id(self):
        return self.tokenizer.unk_token_id

    @property
    def _base_vocab_size(self):
        return len(self.tokenizer)

    def _encode(self, s):
        return self.tokenizer.encode(s, add_special_tokens=False)

    def _decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids])

    def _encode_tf(self, s):
        def enc(x):
            return np.asarray(self._encode(x.numpy().decode("utf-8")), np.int32)
        out = tf.py_function(enc, [s], tf.int32)
        out.set_shape([None])
        return out

    def _decode_tf(self, ids):
        def dec(x):
            return self._decode(x.numpy().tolist())
        out = tf.py_function(dec, [ids], tf.string)
        out.set_shape([])
        return out

    def __eq__(self, other):
        return isinstance(other, HFVocabulary) and other.tokenizer_dir == self.tokenizer_dir

    def __hash__(self):
        return hash(self.tokenizer_dir)


# -- statistics: nothing is dropped silently ----------------------------------------------------

class PipelineStats:
    """Per task split ("<task>:<split>"): records, examples, truncated, tokens, skipped, as the
    preparation counted them, with the first skipped records' messages."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.skip_examples: dict[str, list[str]] = collections.defaultdict(list)

    def record(self, name: str, counts: dict, skipped: list[str]):
        with self._lock:
            self.counts[name] = collections.Counter(counts)
            self.skip_examples[name] = list(skipped)

    def report(self) -> dict:
        with self._lock:
            return {t: dict(c) for t, c in sorted(self.counts.items())}


STATS = PipelineStats()


# -- preparation: records -> tokenized, masked examples (once, cached) ------------------------------

PREPARE_VERSION = 1


def cache_root(data_dir) -> Path:
    """Where prepared splits are cached: `<data_dir>/.cslm_cache/` for local data; for data in a
    bucket a local folder ($CSLM_JAX_DATA_CACHE, default ~/.cache/cslm_jax/data/<hash of the
    data_dir>): each host prepares what it reads next to it, never writing into the bucket."""
    import hashlib

    if not fs.is_remote(data_dir):
        return Path(data_dir) / ".cslm_cache"
    base = os.environ.get("CSLM_JAX_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cslm_jax", "data")
    return Path(base) / hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]


def _cache_key(spec: TaskSpec, split: str, files: tuple, cfg: DataConfig, tokenizer_dir: str) -> str:
    import dataclasses
    import hashlib

    tok_files = sorted(Path(tokenizer_dir).glob("*.json"))
    key = {"version": PREPARE_VERSION, "kind": spec.kind, "lang": spec.lang, "split": split,
           "files": [(f, *fs.size_and_mtime(f)) for f in files],
           "format": dataclasses.asdict(cfg.format), "max_length": cfg.max_length,
           "skip_bad": cfg.skip_bad,
           "tokenizer": [hashlib.sha256(f.read_bytes()).hexdigest() for f in tok_files]}
    if spec.tfds is not None:
        key["tfds"] = tfds_cache_key(spec, split)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_split(spec: TaskSpec, split: str, cfg: DataConfig, tokenizer_dir: str,
                  stats: PipelineStats = None) -> Path:
    """Validate, format, render, tokenize and mask one task split into a TFRecord file (cached
    under `<data_dir>/.cslm_cache/`, keyed by the files, the config and the tokenizer).

    Strict by default: the first bad record raises RecordError naming file, line and field, before
    any training starts. With `skip_bad`, bad records are counted (and the first few kept) in the
    split's stats.json. Python runs here once, so the tf.data pipeline that reads the result is pure
    TensorFlow: fast, checkpointable, and free of Python callbacks that could deadlock on the GIL
    when an iterator is torn down.
    """
    import shutil
    import uuid

    from cslm_jax.model.vocab import load_tokenizer

    files = spec.train if split == "train" else spec.validation
    if split not in task_splits(spec):
        raise ConfigError(f"task {spec.name} has no '{split}' files")
    keep_tensorflow_off_accelerators()
    out = cache_root(cfg.data_dir) / f"{spec.name}.{split}.{_cache_key(spec, split, files, cfg, tokenizer_dir)}"
    if not (out / "stats.json").is_file():
        renderer = ChatRenderer(load_tokenizer(tokenizer_dir), cfg.max_length,
                                mask=cfg.format.loss_mask)
        counts = collections.Counter(records=0, examples=0, truncated=0, tokens=0, skipped=0)
        skipped: list = []
        tmp = out.with_name(out.name + f".tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        try:
            with tf.io.TFRecordWriter(str(tmp / "examples.tfrecord")) as writer:
                for where, record in task_records(spec, split, cfg.format, cfg.skip_bad, skipped):
                    if spec.kind in ("asr", "tts") and record["lang"] != spec.lang:
                        err = RecordError(where, "lang", f"is {record['lang']!r} but task "
                                                         f"{spec.name} is for {spec.lang!r}")
                        if not cfg.skip_bad:
                            raise err
                        skipped.append(err)
                        continue
                    counts["records"] += 1
                    for messages in examples(spec.kind, record, cfg.format, where):
                        r = renderer(messages)
                        counts.update(examples=1, truncated=int(r.truncated), tokens=len(r.input_ids))
                        feature = {
                            "targets": tf.train.Feature(int64_list=tf.train.Int64List(value=r.input_ids)),
                            "loss_weights": tf.train.Feature(int64_list=tf.train.Int64List(value=r.loss_mask))}
                        writer.write(tf.train.Example(features=tf.train.Features(
                            feature=feature)).SerializeToString())
            counts["skipped"] = len(skipped)
            (tmp / "stats.json").write_text(json.dumps(
                {"counts": counts, "skipped": [str(e) for e in skipped[:20]]}, ensure_ascii=False))
            try:
                os.rename(tmp, out)
            except OSError:              # another host or process prepared it first: same content
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if stats is not None:
        saved = json.loads((out / "stats.json").read_text())
        stats.record(f"{spec.name}:{split}", saved["counts"], saved["skipped"])
    return out


def prepared_source(spec: TaskSpec, cfg: DataConfig, tokenizer_dir: str,
                    stats: PipelineStats) -> seqio.FunctionDataSource:
    splits = task_splits(spec)
    features = {"targets": tf.io.VarLenFeature(tf.int64), "loss_weights": tf.io.VarLenFeature(tf.int64)}

    def parse(raw):
        ex = tf.io.parse_single_example(raw, features)
        return {k: tf.cast(tf.sparse.to_dense(v), tf.int32) for k, v in ex.items()}

    def dataset_fn(split, shuffle_files, seed=None):
        if split not in splits:
            raise ConfigError(f"task {spec.name} has no '{split}' files; configured: {splits}")
        path = prepare_split(spec, split, cfg, tokenizer_dir, stats)
        return tf.data.TFRecordDataset(str(path / "examples.tfrecord")).map(parse)

    return seqio.FunctionDataSource(dataset_fn, splits=splits, caching_permitted=False)


def add_task_ids(task_index: int):
    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: dict(ex, task_ids=tf.fill(tf.shape(ex["targets"]), task_index)))
    return preprocess


def output_features(vocab: HFVocabulary, num_tasks: int) -> dict:
    return {
        "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
        "loss_weights": seqio.Feature(seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.int32),
        "task_ids": seqio.Feature(seqio.PassThroughVocabulary(max(num_tasks, 1)), add_eos=False,
                                  dtype=tf.int32),
    }


# -- packing ----------------------------------------------------------------------------------

class PackedLMConverter(seqio.FeatureConverter):
    """Decoder-only LM batches with the CSLM mask carried through packing.

    Model features, all [length]: `tokens` (inputs), `positions` (restart per packed document),
    `segment_ids` (1, 2, ... per document, 0 = padding), `targets` (the next token within the same
    document, 0 where none), `loss_weights` (the loss mask of that next token: 1 trained, 0 not),
    `task_ids` (mixture index of the task the target comes from).
    """

    TASK_FEATURES = {
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "task_ids": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {name: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for name in
                      ("tokens", "targets", "loss_weights", "task_ids")}
    PACKING_FEATURE_DTYPES = {"segment_ids": tf.int32, "positions": tf.int32}

    def __init__(self, **kwargs):
        kwargs["pack"] = True      # CSLM batches are always packed (segment ids keep rows apart)
        super().__init__(**kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        length = task_feature_lengths["targets"]
        features = ("targets", "loss_weights", "task_ids")
        # seqio's packer takes each feature's length to be its count of non-zero values; token id
        # 0 is a real token and most loss weights and task ids are 0, so everything is shifted by
        # one while packing and shifted back after (padding becomes 0 again).
        ds = ds.map(lambda ex: {k: ex[k] + 1 for k in features},
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = seqio.utils.trim_and_pack_dataset(ds, {k: length for k in features})

        def unshift(ex):
            real = ex["targets_segment_ids"] > 0
            out = dict(ex)
            for k in features:
                out[k] = tf.where(real, ex[k] - 1, tf.zeros_like(ex[k]))
            return out

        ds = ds.map(unshift, num_parallel_calls=tf.data.AUTOTUNE)

        def to_model(ex):
            tokens, seg = ex["targets"], ex["targets_segment_ids"]

            def shift(x):
                return tf.concat([x[1:], tf.zeros([1], x.dtype)], axis=0)

            valid = tf.logical_and(seg > 0, tf.equal(shift(seg), seg))
            zero = tf.zeros_like(tokens)
            return {"tokens": tokens, "positions": ex["targets_positions"], "segment_ids": seg,
                    "targets": tf.where(valid, shift(tokens), zero),
                    "loss_weights": tf.where(valid, shift(ex["loss_weights"]), zero),
                    "task_ids": tf.where(valid, shift(ex["task_ids"]), zero)}

        return ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["targets"]
        return {k: length for k in (*self.MODEL_FEATURES, *self.PACKING_FEATURE_DTYPES)}


def sequence_lengths(max_length: int) -> dict:
    return {"targets": max_length, "loss_weights": max_length, "task_ids": max_length}


# -- iteration with a resumable position ----------------------------------------------------------

class BatchIterator:
    """Numpy batches from a registered mixture or task, for one host.

    `state()`/`save(dir)`/`restore(dir)` capture the exact pipeline position (tf.data iterator
    checkpoint, shuffle buffers included) and the number of batches served.
    """

    def __init__(self, name: str, *, split: str = "train", max_length: int, batch_size: int,
                 seed: int = 0, shard_index: int = 0, num_shards: int = 1,
                 num_epochs: int | None = None, shuffle: bool = True):
        keep_tensorflow_off_accelerators()
        self.name, self.split = name, split
        shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
        ds = seqio.get_dataset(name, sequence_lengths(max_length), dataset_split=split,
                               shuffle=shuffle, num_epochs=num_epochs, shard_info=shard,
                               use_cached=False, seed=seed,
                               feature_converter=PackedLMConverter())
        ds = ds.batch(batch_size, drop_remainder=num_epochs is None)
        options = tf.data.Options()
        options.deterministic = True
        self._ds = ds.with_options(options).prefetch(2)
        self._it = iter(self._ds)
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            batch = next(self._it)
        except tf.errors.OpError as e:
            raise DataError(f"input pipeline {self.name} ({self.split}): {e.message}") from None
        self.position += 1
        return {k: v.numpy() for k, v in batch.items()}

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tf.train.Checkpoint(iterator=self._it).write(str(directory / "iterator"))
        (directory / "position.json").write_text(json.dumps(
            {"name": self.name, "split": self.split, "batches": self.position}) + "\n")

    def restore(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta_path = directory / "position.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: missing; not a saved data position")
        meta = json.loads(meta_path.read_text())
        if meta.get("name") != self.name:
            raise DataError(f"{meta_path}: field 'name' is {meta.get('name')!r}, this pipeline "
                            f"reads {self.name!r}")
        tf.train.Checkpoint(iterator=self._it).read(str(directory / "iterator")).assert_consumed()
        self.position = int(meta["batches"])


def stats_report() -> dict:
    return STATS.report()

