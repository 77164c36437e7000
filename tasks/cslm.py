"""CSLM tasks and mixtures, registered from a data config (configs/data/*.yaml).

One SeqIO task per stage entry, named `cslm_<stage>_<kind>[_<lang>]` (or the entry's `name`),
reading its examples from a cache in SeqIO's layout: `<cache_dir>/<task>/` written by
`cslm-jax prepare-data` (Apache Beam) when the data config sets `cache_dir` (or training passes
`--data-cache`), else an in-process cache under `<data_dir>/.cslm_cache/` prepared on first use
(small corpora, the demo). One mixture per stage, `cslm_<stage>`, with the configured rates.
Adding a language is configuration only: a `languages.<code>` section with its templates and
chunking, and stage entries pointing at its files.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import seqio

from cslm_jax.data.formats import DataConfig
from cslm_jax.data.pipeline import (
    STATS,
    CslmTask,
    HFVocabulary,
    add_task_ids,
    local_cache_dir,
    output_features,
)
from cslm_jax.data.prepare import check_cache, prepare_task_local, splits_of, task_key
from cslm_jax.model.vocab import VocabError


def register(
    cfg: DataConfig, tokenizer_dir: str | Path, stages=None, cache_dir: str | Path | None = None
) -> list[str]:
    """Register the tasks and mixtures of `stages` (default: all); returns the mixture names.

    `tokenizer_dir` is the CSLM-extended tokenizer (a checkpoint's `tokenizer/`), so unit tokens
    encode to single ids. `cache_dir` (default: the data config's `cache_dir`): a cache written
    by `cslm-jax prepare-data`, checked here against the config, tokenizer and input files
    (CacheError if it is missing, incomplete, for other data or from inputs changed since).
    Registering again replaces earlier registrations of the same names.
    """
    vocab = HFVocabulary(tokenizer_dir)
    if "<sosp>" not in vocab.tokenizer.get_vocab():
        raise VocabError(
            f"{tokenizer_dir}: tokenizer has no CSLM tokens (<sosp>, units); use the "
            f"tokenizer of an imported checkpoint (cslm-jax import-hf)"
        )
    cache_dir = cache_dir if cache_dir is not None else cfg.cache_dir
    mixtures = []
    for stage in stages or list(cfg.stages):
        specs = cfg.tasks(stage)
        for index, spec in enumerate(specs):
            if cache_dir is not None:
                task_dir = os.path.join(str(cache_dir), spec.name)
                check_cache(task_dir, task_key(spec, cfg, vocab.tokenizer_dir, 0), spec)
                prepare = None
            else:
                task_dir = local_cache_dir(spec, cfg, vocab.tokenizer_dir)
                prepare = functools.partial(
                    prepare_task_local, spec, cfg, vocab.tokenizer_dir, task_dir
                )
            seqio.TaskRegistry.remove(spec.name)
            seqio.TaskRegistry.add_provider(
                spec.name,
                CslmTask(
                    spec.name,
                    task_dir=task_dir,
                    prepare=prepare,
                    prepared=cache_dir is not None,
                    stats=STATS,
                    splits=list(splits_of(spec)),
                    preprocessors=[seqio.CacheDatasetPlaceholder(), add_task_ids(index)],
                    output_features=output_features(vocab, len(specs)),
                    shuffle_buffer_size=cfg.shuffle_buffer,
                ),
            )
        name = cfg.mixture_name(stage)
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, [(s.name, s.rate) for s in specs])
        mixtures.append(name)
    return mixtures


def prepare_stage(cfg: DataConfig, tokenizer_dir: str | Path, stage: str) -> None:
    """Prepare the in-process caches of a stage's tasks now (what reading them would do). A
    multi-host run calls this on process 0 before the others read, so the work is done once;
    each process writes only into a folder of its own, renamed into place whole."""
    if cfg.cache_dir is not None:
        return
    for spec in cfg.tasks(stage):
        task_dir = local_cache_dir(spec, cfg, str(Path(tokenizer_dir).absolute()))
        if not (task_dir / "COMPLETED").is_file():
            prepare_task_local(spec, cfg, str(Path(tokenizer_dir).absolute()), task_dir)
