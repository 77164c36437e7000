"""What `validate-data` and `inspect-data` do: check JSONL corpora, and show rendered examples
(text, input ids, loss mask) from a JSONL file or a registered SeqIO task."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from pathlib import Path

from cslm_jax.config import ConfigError
from cslm_jax.data.formats import (
    RECORD_KIND_OF_TASK,
    TASK_KINDS,
    ChatRenderer,
    FormatConfig,
    examples,
    load_data_config,
    read_jsonl,
)
from cslm_jax.errors import DataError
from cslm_jax.model.vocab import load_tokenizer, require_cslm_tokens


def validate_file(
    path: str | Path, *, fmt: FormatConfig, kind: str | None = None, skip_bad: bool = False
) -> tuple[collections.Counter, list]:
    """(valid records per kind, skipped RecordErrors) of one JSONL file. Strict unless
    `skip_bad`: the first bad record raises RecordError naming file, line and field."""
    skipped: list = []
    kinds = collections.Counter(k for _, k, _ in read_jsonl(path, kind, fmt, skip_bad, skipped))
    if not kinds and not skipped:
        raise DataError(f"{path}: empty (no records); a corpus needs at least one JSON line")
    return kinds, skipped


def jsonl_examples(
    *, jsonl: str | Path, kind: str, data_config: str | Path, tokenizer_dir: str | Path, n: int
) -> Iterator[dict]:
    """The first `n` rendered examples of a JSONL file, as `kind` (a task kind, or a record kind:
    every task kind it feeds): {source, text, input_ids, loss_mask, truncated}."""
    task_kinds = (
        [kind] if kind in TASK_KINDS else [t for t, r in RECORD_KIND_OF_TASK.items() if r == kind]
    )
    if not task_kinds:
        raise ConfigError(
            f"--kind {kind!r}: expected a task kind {TASK_KINDS} or a record "
            f"kind {sorted(set(RECORD_KIND_OF_TASK.values()))}"
        )
    cfg = load_data_config(data_config, check_files=False)
    tok = load_tokenizer(tokenizer_dir)
    require_cslm_tokens(tok, str(tokenizer_dir))
    renderer = ChatRenderer(tok, max_length=cfg.max_length, mask=cfg.format.loss_mask)
    shown = 0
    record_kind = RECORD_KIND_OF_TASK[task_kinds[0]]
    for where, _, record in read_jsonl(jsonl, record_kind, cfg.format):
        for task_kind in task_kinds:
            for messages in examples(task_kind, record, cfg.format, where):
                r = renderer(messages)
                yield {
                    "source": f"{where} {task_kind}",
                    "text": r.text,
                    "input_ids": r.input_ids,
                    "loss_mask": r.loss_mask,
                    "loss_mask_rule": cfg.format.loss_mask,
                    "truncated": r.truncated,
                }
                shown += 1
                if shown >= n:
                    return


def task_examples(
    *, task: str, split: str, data_config: str | Path, tokenizer_dir: str | Path, n: int
) -> Iterator[dict]:
    """The first `n` examples a SeqIO task of `data_config` serves (registered with the
    tokenizer): {source, text, input_ids, loss_mask}."""
    import seqio  # heavy: seqio, TensorFlow

    from cslm_jax.tasks.cslm import register  # heavy: seqio, TensorFlow

    tok = load_tokenizer(tokenizer_dir)
    cfg = load_data_config(data_config)
    require_cslm_tokens(tok, str(tokenizer_dir))
    register(cfg, tokenizer_dir)
    names = [s.name for s in cfg.tasks()] + [cfg.mixture_name(stage) for stage in cfg.stages]
    if task not in names:
        raise ConfigError(
            f"--task {task!r}: no such task in {data_config}; tasks: {', '.join(names)}"
        )
    found = seqio.get_mixture_or_task(task)
    if not isinstance(found, seqio.Task):
        raise ConfigError(
            f"--task {task!r} is a mixture; name one of its tasks: {[t.name for t in found.tasks]}"
        )
    ds = found.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    for ex in ds.take(n).as_numpy_iterator():
        ids = ex["targets"].tolist()
        yield {
            "source": task,
            "text": tok.decode(ids),
            "input_ids": ids,
            "loss_mask": ex["loss_weights"].tolist(),
            "loss_mask_rule": cfg.format.loss_mask,
        }
