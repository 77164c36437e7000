"""SeqIO for CSLM: the vocabulary, JSONL sources with file/line provenance, the tokenizing
preprocessor (templates + loss mask, in the pipeline), a packing feature converter that carries
the loss mask and task ids, and a batch iterator whose position can be saved and restored.

Pipeline per task: JSONL lines (file, line number) -> shard by host (`seqio.ShardInfo`) ->
validate + format + render + tokenize + mask (Python, via tf.py_function; strict errors name file,
line and field; `skip_bad` counts) -> shuffle (seeded) -> mixture sampling (seeded rates) ->
pack to `max_length` -> batch. Every stage is deterministic for a seed, and the tf.data iterator
state (shuffle buffers included) is checkpointed, so a resume continues with exactly the batch an
uninterrupted run would have seen.
"""
from __future__ import annotations

import collections
import json
import os
import threading
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from cslm_jax.formats import (RECORD_KIND_OF_TASK, ChatRenderer, DataConfig, RecordError,  # noqa: E402
                              TaskSpec, detect_kind, examples, parse_line, validate_record)

# TensorFlow must not grab accelerators that JAX owns.
tf.config.set_visible_devices([], "GPU")
try:
    tf.config.set_visible_devices([], "TPU")
except (ValueError, RuntimeError):
    pass


class DataError(RuntimeError):
    """The input pipeline stopped on bad data; the message names file, line and field."""


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
            from cslm_jax.vocab import load_tokenizer
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
    """Per-task counters filled by the preprocessing functions (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.skip_examples: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, task: str, **counts):
        with self._lock:
            self.counts[task].update(counts)

    def skip(self, task: str, error: RecordError):
        with self._lock:
            self.counts[task]["skipped"] += 1
            if len(self.skip_examples[task]) < 5:
                self.skip_examples[task].append(str(error))

    def report(self) -> dict:
        with self._lock:
            return {t: dict(c) for t, c in sorted(self.counts.items())}


STATS = PipelineStats()


# -- sources and preprocessing --------------------------------------------------------------------

def jsonl_dataset(files: list[str]) -> tf.data.Dataset:
    """Lines of the files in order, as {file, line (1-based), text}."""
    def lines_of(i):
        path = tf.gather(tf.constant(files), i)
        ds = tf.data.TextLineDataset(path)
        return ds.enumerate(start=1).map(lambda n, text: {"file": path, "line": n, "text": text})

    return tf.data.Dataset.range(len(files)).flat_map(lines_of)


def jsonl_source(spec: TaskSpec) -> seqio.FunctionDataSource:
    splits = {"train": spec.train, "validation": spec.validation}
    splits = {k: v for k, v in splits.items() if v}

    def dataset_fn(split, shuffle_files, seed=None):
        if split not in splits:
            raise ValueError(f"task {spec.name} has no '{split}' files; configured: {sorted(splits)}")
        return jsonl_dataset(splits[split])

    return seqio.FunctionDataSource(dataset_fn, splits=list(splits), caching_permitted=False)


def make_example_fn(spec: TaskSpec, cfg: DataConfig, renderer: ChatRenderer, task_index: int,
                    stats: PipelineStats):
    """Python: (file, line, text) -> flat ids, flat loss mask, row lengths (several examples per
    record for MT; zero for a skipped record)."""
    record_kind = RECORD_KIND_OF_TASK[spec.kind]

    def fn(file, line, text):
        where = f"{file.numpy().decode()}:{int(line.numpy())}"
        try:
            raw = text.numpy().decode("utf-8")
            if not raw.strip():
                raise RecordError(where, "<json>", "empty line")
            record = parse_line(raw, where)
            kind = detect_kind(record)
            if kind != record_kind:
                raise RecordError(where, "<kind>", f"task {spec.name} ({spec.kind}) needs "
                                                   f"{record_kind} records, this looks like {kind}")
            validate_record(record_kind, record, cfg.format, where)
            if spec.kind in ("asr", "tts") and record["lang"] != spec.lang:
                raise RecordError(where, "lang", f"is {record['lang']!r} but task {spec.name} is "
                                                 f"for language {spec.lang!r}")
            rendered = [renderer(m) for m in examples(spec.kind, record, cfg.format, where)]
        except RecordError as e:
            if not cfg.skip_bad:
                raise
            stats.skip(spec.name, e)
            return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
        stats.add(spec.name, records=1, examples=len(rendered),
                  truncated=sum(r.truncated for r in rendered),
                  tokens=sum(len(r.input_ids) for r in rendered))
        ids = np.asarray([i for r in rendered for i in r.input_ids], np.int32)
        mask = np.asarray([m for r in rendered for m in r.loss_mask], np.int32)
        return ids, mask, np.asarray([len(r.input_ids) for r in rendered], np.int32)

    def preprocess(ds: tf.data.Dataset) -> tf.data.Dataset:
        def to_rows(ex):
            ids, mask, lengths = tf.py_function(fn, [ex["file"], ex["line"], ex["text"]],
                                                [tf.int32, tf.int32, tf.int32])
            ids.set_shape([None])
            mask.set_shape([None])
            lengths.set_shape([None])
            rows = {"targets": tf.RaggedTensor.from_row_lengths(ids, lengths),
                    "loss_weights": tf.RaggedTensor.from_row_lengths(mask, lengths)}
            return tf.data.Dataset.from_tensor_slices(rows)

        def add_task(ex):
            return dict(ex, task_ids=tf.fill(tf.shape(ex["targets"]), task_index))

        return ds.flat_map(to_rows).map(add_task)

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
        self.name, self.split = name, split
        shard = seqio.ShardInfo(index=shard_index, num_shards=num_shards) if num_shards > 1 else None
        ds = seqio.get_dataset(name, sequence_lengths(max_length), dataset_split=split,
                               shuffle=shuffle, num_epochs=num_epochs, shard_info=shard,
                               use_cached=False, seed=seed,
                               feature_converter=PackedLMConverter())
        ds = ds.batch(batch_size, drop_remainder=num_epochs is None)
        options = tf.data.Options()
        # py_function preprocessing is stateless for our purposes: let tf.data checkpoint around it
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
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
            raise DataError(_our_message(e)) from None
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


def _our_message(error: Exception) -> str:
    """The RecordError text inside a TensorFlow error raised from py_function."""
    text = getattr(error, "message", str(error))
    for line in text.splitlines():
        if "field '" in line and ".jsonl:" in line or "RecordError" in line:
            return line.split("RecordError: ", 1)[-1].strip()
    return text


def stats_report() -> dict:
    return STATS.report()

