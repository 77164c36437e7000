"""CSLM tasks and mixtures, registered from a data config (configs/data/*.yaml).

One SeqIO task per stage entry, named `cslm_<stage>_<kind>[_<lang>]` (or the entry's `name`),
reading JSONL files prepared (validated, rendered, tokenized, masked; cached) by
`cslm_jax.data.pipeline.prepare_split`; one mixture per stage, `cslm_<stage>`, with the
configured rates. Adding a language is configuration only: a `languages.<code>` section with its
templates and chunking, and stage entries pointing at its files.
"""
from __future__ import annotations

from pathlib import Path

import seqio

from cslm_jax.data.pipeline import STATS, HFVocabulary, add_task_ids, output_features, prepared_source
from cslm_jax.data.formats import DataConfig
from cslm_jax.model.vocab import VocabError


def register(cfg: DataConfig, tokenizer_dir: str | Path, stages=None) -> list[str]:
    """Register the tasks and mixtures of `stages` (default: all); returns the mixture names.

    `tokenizer_dir` is the CSLM-extended tokenizer (a checkpoint's `tokenizer/`), so unit tokens
    encode to single ids. Registering again replaces earlier registrations of the same names.
    """
    vocab = HFVocabulary(tokenizer_dir)
    if "<sosp>" not in vocab.tokenizer.get_vocab():
        raise VocabError(f"{tokenizer_dir}: tokenizer has no CSLM tokens (<sosp>, units); use the "
                         f"tokenizer of an imported checkpoint (cslm-jax import-hf)")
    mixtures = []
    for stage in stages or list(cfg.stages):
        specs = cfg.tasks(stage)
        for index, spec in enumerate(specs):
            seqio.TaskRegistry.remove(spec.name)
            seqio.TaskRegistry.add(
                spec.name, source=prepared_source(spec, cfg, vocab.tokenizer_dir, STATS),
                preprocessors=[add_task_ids(index)],
                output_features=output_features(vocab, len(specs)),
                shuffle_buffer_size=cfg.shuffle_buffer)
        name = cfg.mixture_name(stage)
        seqio.MixtureRegistry.remove(name)
        seqio.MixtureRegistry.add(name, [(s.name, s.rate) for s in specs])
        mixtures.append(name)
    return mixtures
