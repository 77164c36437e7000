"""Evaluation measures: word / character error rates (ASR, transcripts of spoken questions).

WER for space-delimited languages, CER for languages written without spaces (zh): the
reference's and the hypothesis' tokens are compared by Levenshtein distance, summed over a
corpus and divided by the total reference length (the usual corpus-level rate, as jiwer does).
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def normalize_tokens(text: str, unit: str) -> list[str]:
    """Lower-cased, punctuation-free words (`unit="word"`) or characters without spaces and
    punctuation (`unit="char"`), after NFKC (full-width punctuation becomes ASCII)."""
    text = _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower())
    if unit == "word":
        return text.split()
    if unit == "char":
        return [c for c in text if not c.isspace()]
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def error_rate(refs: Sequence[str], hyps: Sequence[str], unit: str) -> float:
    """Corpus error rate (WER with unit="word", CER with unit="char"); may exceed 1."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    edits = total = 0
    for r, h in zip(refs, hyps):
        rt, ht = normalize_tokens(r, unit), normalize_tokens(h, unit)
        edits += edit_distance(rt, ht)
        total += len(rt)
    return edits / max(total, 1)
