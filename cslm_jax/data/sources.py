"""Where a task's records come from: JSONL files, or a TensorFlow Datasets (TFDS) dataset.

A data config's stage entry names files (`train`, `validation`) or a TFDS dataset:

    - kind: mt
      rate: 1.0
      tfds: wmt17_translate/zh-en:1.0.0     # name[/config]:version (seqio needs the version)
      tfds_data_dir: /data/tfds              # optional (default: TFDS's own, $TFDS_DATA_DIR)
      splits: {train: train, validation: validation}   # our split -> TFDS split (default:
                                                       # {train: train}; slicing: "train[:1%]")
      fields: {src: zh, tgt: en}             # record field -> TFDS feature (nested: "a/b")
      constants: {src_lang: zh, tgt_lang: en}  # record fields with one value for every example

Each TFDS example becomes a record of the task's record kind (`formats.RECORD_KIND_OF_TASK`),
read through `seqio.TfdsDataSource` and validated like a JSONL line (errors name the dataset,
split, example index and field); from there preparation is the same for both (format, render
with the chat template, tokenize, mask, cache), so a TFDS task's examples equal those of a JSONL
file holding the same records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from cslm_jax.data.formats import (
    RECORD_KIND_OF_TASK,
    RecordError,
    TfdsSpec,
    read_jsonl,
    validate_record,
)
from cslm_jax.errors import DataError


def task_splits(spec) -> list[str]:
    """The splits a task has: those with files, or those its TFDS source maps."""
    if spec.tfds is not None:
        return [s for s, _ in spec.tfds.splits]
    return [s for s, files in (("train", spec.train), ("validation", spec.validation)) if files]


def tfds_cache_key(spec, split: str) -> dict | None:
    """What identifies a TFDS split's records, for the preparation cache (None: a file task)."""
    if spec.tfds is None:
        return None
    return dataclasses.asdict(spec.tfds) | {"split": dict(spec.tfds.splits).get(split)}


def python_value(value, where: str, field: str):
    """A TFDS (numpy) value as JSON would have it: text, ints, floats, lists."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(where, field, f"not UTF-8 text ({e.reason})") from None
    if isinstance(value, np.ndarray):
        return (
            [python_value(v, where, field) for v in value.tolist()]
            if value.dtype == object
            else value.tolist()
        )
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [python_value(v, where, field) for v in value]
    return value


def tfds_examples(spec, split: str) -> Iterator[tuple[str, dict]]:
    """(where, example) for each example of a TFDS task split (numpy values), in dataset order,
    read through `seqio.TfdsDataSource`."""
    import seqio  # heavy: seqio, TensorFlow

    t = spec.tfds
    # read_only: never download and prepare here (seqio would, on every host at once)
    source = seqio.TfdsDataSource(
        tfds_name=t.name, tfds_data_dir=t.data_dir, splits=dict(t.splits), read_only=True
    )
    tfds_split = dict(t.splits)[split]
    try:
        ds = source.get_dataset(split, shuffle=False)
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; name the source
        raise DataError(
            f"task {spec.name}: TFDS dataset {t.name} split {tfds_split!r} (data "
            f"dir {t.data_dir or 'TFDS default'}) cannot be read: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} (training never downloads: "
            f"prepare it once with `tfds build {t.name.split(':')[0]} --data_dir "
            f"DIR`)"
        ) from None
    for n, example in enumerate(ds.as_numpy_iterator()):
        yield f"tfds:{t.name}:{tfds_split}[{n}]", example


def tfds_record(t: TfdsSpec, example: dict, where: str) -> dict:
    """A TFDS example as a record: mapped fields (text decoded, arrays as lists), constants."""
    record = {}
    for field, feature in t.fields:
        value = example
        for part in feature.split("/"):
            if not isinstance(value, dict) or part not in value:
                raise RecordError(
                    where,
                    field,
                    f"TFDS feature {feature!r} not in the example (features: {sorted(example)})",
                )
            value = value[part]
        record[field] = python_value(value, where, field)
    record.update(dict(t.constants))
    return record


def task_records(
    spec, split: str, fmt, skip_bad: bool, skipped: list
) -> Iterator[tuple[str, dict]]:
    """(where, record) for each valid record of a task split, from its files or TFDS dataset.
    Strict unless `skip_bad` (then bad records are appended to `skipped`), as `read_jsonl`."""
    record_kind = RECORD_KIND_OF_TASK[spec.kind]
    if spec.tfds is None:
        for path in spec.train if split == "train" else spec.validation:
            for where, _, record in read_jsonl(path, record_kind, fmt, skip_bad, skipped):
                yield where, record
        return
    for where, example in tfds_examples(spec, split):
        try:
            record = tfds_record(spec.tfds, example, where)
            validate_record(record_kind, record, fmt, where)
        except RecordError as e:
            if not skip_bad:
                raise
            skipped.append(e)
            continue
        yield where, record
