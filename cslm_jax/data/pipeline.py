"""SeqIO for CSLM: the vocabulary, JSONL sources with file/line provenance, the tokenizing
preprocessor (templates + loss mask, in the pipeline), a packing feature converter that carries
the loss mask and task ids, and a batch iterator whose position can be saved and restored.

Pipeline per task: JSONL records -> validate + format + render + tokenize + mask, once, into a
cache in SeqIO's layout (`cslm_jax.data.prepare`: in this process for small corpora, or by
`cslm-jax prepare-data` on Apache Beam; strict errors name file, line and field; `skip_bad`
counts) -> read with `use_cached=True` (pure TensorFlow from here on) -> shard by host
(`seqio.ShardInfo`: whole files of a prepared cache) -> shuffle (seeded) ->
mixture sampling (seeded rates) -> pack to `max_length` -> batch. Every stage is deterministic for a seed, and the tf.data iterator
state (shuffle buffers included) is checkpointed, so a resume continues with exactly the batch an
uninterrupted run would have seen.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf

from cslm_jax.config import ConfigError
from cslm_jax.data.formats import DataConfig, TaskSpec
from cslm_jax.data.prepare import CacheError, completed_key, read_stats, splits_of, task_key
from cslm_jax.errors import DataError
from cslm_jax.model.vocab import load_tokenizer
from cslm_jax.storage import fs


class QuietUncachedWarning(logging.Filter):
    """seqio advises caching FunctionDataSource tasks; ours read TFRecords prepared and cached
    (`cslm_jax.data.prepare`), so the advice does not apply and would only bury real messages.
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
        except (ValueError, RuntimeError):  # no such device type, or devices already set up
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


def local_cache_dir(spec: TaskSpec, cfg: DataConfig, tokenizer_dir: str) -> Path:
    """Where the in-process path caches a task (SeqIO layout, one shard per split):
    `<data_dir>/.cslm_cache/<task>.<key>`, keyed by the files (size, mtime), the config and the
    tokenizer, so any change prepares again."""
    key = task_key(spec, cfg, tokenizer_dir, 1)
    key["stat"] = [(f, *fs.size_and_mtime(f)) for files in splits_of(spec).values() for f in files]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root(cfg.data_dir) / f"{spec.name}.{digest}"


def cache_root(data_dir) -> Path:
    """Where the in-process path caches prepared tasks: `<data_dir>/.cslm_cache/` for local data;
    for data in a bucket a local folder ($CSLM_JAX_DATA_CACHE, default
    ~/.cache/cslm_jax/data/<hash of the data_dir>): each host prepares next to it, never writing
    into the bucket."""
    if not fs.is_remote(data_dir):
        return Path(data_dir) / ".cslm_cache"
    base = os.environ.get("CSLM_JAX_DATA_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "cslm_jax", "data"
    )
    return Path(base) / hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]


class CslmTask(seqio.Task):
    """A SeqIO task over a prepared cache (SeqIO layout, `cslm_jax.data.prepare`).

    Either a cache `cslm-jax prepare-data` wrote (`prepared=True`: checked against the data
    config and tokenizer when registered; read with file-level sharding, so each host opens only
    its own shard files; a cache in a bucket is read through `stage`), or the in-process cache of
    a small corpus, prepared by `prepare` the
    first time it is read (validate, format, render, tokenize, mask: strict errors name file,
    line and field; `skip_bad` counts). Training reads it with `use_cached=True`; the source
    reads the same files for callers that do not (inspection, tests).
    """

    def __init__(
        self,
        name,
        *,
        task_dir: str,
        prepare=None,
        prepared: bool = False,
        stats: PipelineStats | None = None,
        splits=(),
        **kwargs,
    ):
        self._cslm_dir, self._cslm_prepare, self.prepared = str(task_dir), prepare, prepared
        self._cslm_stats, self._cslm_splits = stats, tuple(splits)
        self._cslm_recorded = False
        self._cslm_staged: dict = {}  # (host shard, shards) -> local folder (gs:// caches)
        self._cslm_shard = (0, 1)
        super().__init__(name, source=self._make_source(), **kwargs)

    def _make_source(self) -> seqio.FunctionDataSource:
        features = {
            "targets": tf.io.VarLenFeature(tf.int64),
            "loss_weights": tf.io.VarLenFeature(tf.int64),
        }

        def parse(raw):
            ex = tf.io.parse_single_example(raw, features)
            return {k: tf.cast(tf.sparse.to_dense(v), tf.int32) for k, v in ex.items()}

        def dataset_fn(split, shuffle_files, seed=None):
            if split not in self._cslm_splits:
                raise ConfigError(
                    f"task {self.name} has no '{split}' files; configured: "
                    f"{list(self._cslm_splits)}"
                )
            files = fs.glob(os.path.join(self.cache_dir, f"{split}.tfrecord-*"))
            return tf.data.TFRecordDataset(files).map(parse)

        return seqio.FunctionDataSource(dataset_fn, splits=list(self._cslm_splits))

    @property
    def cache_dir(self) -> str:
        if self._cslm_prepare is not None and completed_key(self._cslm_dir) is None:
            keep_tensorflow_off_accelerators()
            self._cslm_prepare()
        if self._cslm_stats is not None and not self._cslm_recorded:
            self._cslm_recorded = True
            for split in self._cslm_splits:
                saved = read_stats(self._cslm_dir, split)
                counts = {
                    "records": saved["records"],
                    "examples": saved["examples"],
                    "truncated": saved["truncated"],
                    "tokens": saved["targets_tokens"],
                    "trained_tokens": saved["trained_tokens"],
                    "skipped": saved["skipped"],
                }
                self._cslm_stats.record(f"{self.name}:{split}", counts, saved["skipped_messages"])
        if fs.is_remote(self._cslm_dir):
            return self.stage(*self._cslm_shard)
        return self._cslm_dir

    def stage(self, shard_index: int = 0, num_shards: int = 1) -> str:
        """For a cache in a bucket (gs://), a local folder tf.data (and seqio) read instead: the
        shard files host `shard_index` of `num_shards` reads (seqio gives host i the sorted files
        i, i + n, ...), copied through cslm_jax.storage.fs (TensorFlow's own GCS client ignores
        STORAGE_EMULATOR_HOST and would be a second client), the others as empty files of the
        same names (so seqio lists, and shards, the same files; never opened here), and the
        info, stats and COMPLETED files. Copied once per process and host shard; removed at
        exit. Later reads (`cache_dir`) use this host shard's folder. A local cache is read in
        place."""
        self._cslm_shard = (shard_index, num_shards)
        if not fs.is_remote(self._cslm_dir):
            return self._cslm_dir
        local = self._cslm_staged.get(self._cslm_shard)
        if local is None:
            local = tempfile.mkdtemp(prefix=f"cslm_jax-cache-{self.name}-")
            atexit.register(shutil.rmtree, local, True)
            names = ["COMPLETED"]
            for split in self._cslm_splits:
                names += [f"info.{split}.json", f"stats.{split}.json"]
                shards = [
                    os.path.basename(f) for f in fs.glob(f"{self._cslm_dir}/{split}.tfrecord-*")
                ]
                # fewer files than hosts: seqio shards examples, every host reads every file
                mine = set(shards[shard_index::num_shards] if len(shards) >= num_shards else shards)
                names += sorted(mine)
                for other in sorted(set(shards) - mine):
                    open(os.path.join(local, other), "wb").close()
            fs.stage_files(self._cslm_dir, names, local)
            self._cslm_staged[self._cslm_shard] = local
        return local

    def get_dataset(self, *args, **kwargs):
        """seqio's Task.get_dataset without its in-memory cache of small splits: reading stays
        as it was (and as for large ones), and a saved iterator position never carries a copy
        of the cached examples."""
        kwargs["try_in_mem_cache"] = False
        return super().get_dataset(*args, **kwargs)

    def num_files(self, split: str) -> int:
        with fs.open_file(os.path.join(self._cslm_dir, f"info.{split}.json"), "r") as f:
            return int(json.load(f)["num_shards"])


def add_task_ids(task_index: int):
    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda ex: dict(ex, task_ids=tf.fill(tf.shape(ex["targets"]), task_index)))

    return preprocess


def output_features(vocab: HFVocabulary, num_tasks: int) -> dict:
    return {
        "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
        "loss_weights": seqio.Feature(
            seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.int32
        ),
        "task_ids": seqio.Feature(
            seqio.PassThroughVocabulary(max(num_tasks, 1)), add_eos=False, dtype=tf.int32
        ),
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
    MODEL_FEATURES = {
        name: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
        for name in ("tokens", "targets", "loss_weights", "task_ids")
    }
    PACKING_FEATURE_DTYPES = {"segment_ids": tf.int32, "positions": tf.int32}

    def __init__(self, **kwargs):
        kwargs["pack"] = True  # CSLM batches are always packed (segment ids keep rows apart)
        super().__init__(**kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        length = task_feature_lengths["targets"]
        features = ("targets", "loss_weights", "task_ids")
        # seqio's packer takes each feature's length to be its count of non-zero values; token id
        # 0 is a real token and most loss weights and task ids are 0, so everything is shifted by
        # one while packing and shifted back after (padding becomes 0 again).
        ds = ds.map(
            lambda ex: {k: ex[k] + 1 for k in features}, num_parallel_calls=tf.data.AUTOTUNE
        )
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
            return {
                "tokens": tokens,
                "positions": ex["targets_positions"],
                "segment_ids": seg,
                "targets": tf.where(valid, shift(tokens), zero),
                "loss_weights": tf.where(valid, shift(ex["loss_weights"]), zero),
                "task_ids": tf.where(valid, shift(ex["task_ids"]), zero),
            }

        return ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
        length = task_feature_lengths["targets"]
        return {k: length for k in (*self.MODEL_FEATURES, *self.PACKING_FEATURE_DTYPES)}


def sequence_lengths(max_length: int) -> dict:
    return {"targets": max_length, "loss_weights": max_length, "task_ids": max_length}


# -- iteration with a resumable position ----------------------------------------------------------


def check_file_sharding(name: str, split: str, num_shards: int) -> None:
    """A prepared cache is read with file-level sharding (each host opens only its own shard
    files): its file count must divide by the data shards. (In-process caches of small corpora
    hold one file per split and are sharded by example, as SeqIO does when files are fewer.)"""
    provider = seqio.get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for task in tasks:
        if isinstance(task, CslmTask) and task.prepared:
            files = task.num_files(split)
            if files % num_shards:
                raise CacheError(
                    f"{task.cache_dir}: {files} '{split}' shard files cannot be split "
                    f"evenly over {num_shards} data shards (hosts); prepare the cache "
                    f"with a --num-shards that {num_shards} divides (e.g. "
                    f"{num_shards * max(1, files // num_shards)})"
                )


def stage_tasks(name: str, shard_index: int = 0, num_shards: int = 1) -> None:
    """Each prepared task of a mixture or task whose cache lies in a bucket: this host's shard
    files copied to a local folder, read from there (`CslmTask.stage`)."""
    provider = seqio.get_mixture_or_task(name)
    for task in provider.tasks if isinstance(provider, seqio.Mixture) else [provider]:
        if isinstance(task, CslmTask):
            task.stage(shard_index, num_shards)


class BatchIterator:
    """Numpy batches from a registered mixture or task, for one host.

    `state()`/`save(dir)`/`restore(dir)` capture the exact pipeline position (tf.data iterator
    checkpoint, shuffle buffers included) and the number of batches served.
    """

    def __init__(
        self,
        name: str,
        *,
        split: str = "train",
        max_length: int,
        batch_size: int,
        seed: int = 0,
        shard_index: int = 0,
        num_shards: int = 1,
        num_epochs: int | None = None,
        shuffle: bool = True,
    ):
        keep_tensorflow_off_accelerators()
        self.name, self.split = name, split
        shard = (
            seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
        )
        if shard is not None:
            check_file_sharding(name, split, num_shards)
        stage_tasks(name, shard_index, num_shards)
        ds = seqio.get_dataset(
            name,
            sequence_lengths(max_length),
            dataset_split=split,
            shuffle=shuffle,
            num_epochs=num_epochs,
            shard_info=shard,
            use_cached=True,
            seed=seed,
            feature_converter=PackedLMConverter(),
        )
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
        (directory / "position.json").write_text(
            json.dumps({"name": self.name, "split": self.split, "batches": self.position}) + "\n"
        )

    def restore(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta_path = directory / "position.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: missing; not a saved data position")
        meta = json.loads(meta_path.read_text())
        if meta.get("name") != self.name:
            raise DataError(
                f"{meta_path}: field 'name' is {meta.get('name')!r}, this pipeline "
                f"reads {self.name!r}"
            )
        tf.train.Checkpoint(iterator=self._it).read(str(directory / "iterator")).assert_consumed()
        self.position = int(meta["batches"])


def stats_report() -> dict:
    return STATS.report()
