"""Evaluation measures: word / character error rates (ASR, transcripts of spoken questions),
BLEU / chrF (MT, via sacrebleu), off-target answers (a pluggable language identifier; the
built-in one tells zh from en by script) and a pluggable speech-unit -> text mapper for
text/speech consistency (`UnitLexicon`; the demo corpus' pronunciation table is one).

WER for space-delimited languages, CER for languages written without spaces (zh): the
reference's and the hypothesis' tokens are compared by Levenshtein distance, summed over a
corpus and divided by the total reference length (the usual corpus-level rate, as jiwer does).
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import sacrebleu

from cslm_jax.data.formats import merge_repeats
from cslm_jax.demo.corpus import SILENCE, Pronouncer
from cslm_jax.errors import CslmError

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


class EvaluationError(CslmError, ValueError):
    """Bad evaluation input (task, split, checkpoint, language identifier, unit lexicon); the
    message says what. (Also a ValueError: callers of these measures catch that.)"""


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


def mixed_error_rate(refs: Sequence[str], hyps: Sequence[str], units: Sequence[str]) -> float:
    """Corpus error rate over examples that each have their own unit ("word" or "char"): edits
    summed over all examples divided by all reference tokens (a task mixing en and zh answers
    counts English words and Chinese characters together)."""
    if not len(refs) == len(hyps) == len(units):
        raise ValueError(f"{len(refs)} references, {len(hyps)} hypotheses, {len(units)} units")
    edits = total = 0
    for r, h, u in zip(refs, hyps, units):
        rt, ht = normalize_tokens(r, u), normalize_tokens(h, u)
        edits += edit_distance(rt, ht)
        total += len(rt)
    return edits / max(total, 1)


# -- machine translation: sacrebleu ------------------------------------------------------------------

# sacrebleu's tokenizer per target language (BLEU only; chrF works on characters). Anything
# not listed uses sacrebleu's default "13a"; "zh" splits Chinese characters apart and applies
# 13a to the rest, so it also suits targets that mix scripts.
BLEU_TOKENIZE = {"zh": "zh"}


def bleu_tokenize(langs: Sequence[str]) -> str:
    """The BLEU tokenizer for a set of target languages: the one they share, else "13a", but
    "zh" as soon as one target is Chinese (it tokenizes other scripts as 13a does)."""
    toks = {BLEU_TOKENIZE.get(lang, "13a") for lang in langs}
    if len(toks) == 1:
        return toks.pop()
    return "zh" if "zh" in toks else "13a"


def bleu(refs: Sequence[str], hyps: Sequence[str], tokenize: str = "13a") -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each (sacrebleu)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)], tokenize=tokenize).score)


def chrf(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus chrF (0-100, sacrebleu's defaults: character 6-grams, beta 2)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


# -- language identification (off-target answers) --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LanguageId:
    """A language identifier: detect(text) -> a code of `languages`, or None when the text gives
    no evidence (no letters). Answers expected in a language outside `languages` are not scored."""

    name: str
    languages: frozenset
    detect: Callable[[str], str | None]


def _is_han(ch: str) -> bool:
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x2A6DF
        or 0xF900 <= o <= 0xFAFF
    )


def script_language(text: str) -> str | None:
    """Script-based zh/en identification: "zh" when Han characters outnumber Latin letters,
    "en" when Latin letters do, None for text with neither (empty, digits, punctuation)."""
    han = latin = 0
    for ch in unicodedata.normalize("NFKC", text):
        if _is_han(ch):
            han += 1
        elif ch.isascii() and ch.isalpha():
            latin += 1
    if han == latin == 0:
        return None
    return "zh" if han > latin else "en"


LANGUAGE_IDS: dict[str, LanguageId] = {}


def register_language_id(name: str, languages, detect: Callable[[str], str | None]) -> LanguageId:
    """Add (or replace) a language identifier, selectable by name (`--language-id NAME`)."""
    lid = LanguageId(name, frozenset(languages), detect)
    LANGUAGE_IDS[name] = lid
    return lid


register_language_id("script", ("en", "zh"), script_language)


def language_id(name: str) -> LanguageId:
    if name not in LANGUAGE_IDS:
        raise EvaluationError(
            f"unknown language identifier {name!r}; registered: {sorted(LANGUAGE_IDS)}"
        )
    return LANGUAGE_IDS[name]


def off_target(texts: Sequence[str], expected: Sequence[str], lid: LanguageId) -> dict:
    """How many answers are in another language than expected. ratio = off-target answers /
    scored answers; answers whose expected language `lid` does not cover are not scored, answers
    without letters count as scored but not off-target (reported as `undetermined`)."""
    if len(texts) != len(expected):
        raise ValueError(f"{len(texts)} texts but {len(expected)} expected languages")
    scored = wrong = undetermined = 0
    detected = []
    for text, lang in zip(texts, expected):
        if lang not in lid.languages:
            detected.append(None)
            continue
        got = lid.detect(text)
        detected.append(got)
        scored += 1
        undetermined += got is None
        wrong += got is not None and got != lang
    return {
        "ratio": wrong / scored if scored else None,
        "off_target": wrong,
        "scored": scored,
        "undetermined": undetermined,
        "identifier": lid.name,
        "detected": detected,
    }


# -- speech units -> text (text/speech consistency) --------------------------------------------------


class UnitLexicon:
    """A pluggable unit -> text mapper from a pronunciation table: token (word or character)
    -> its unit sequence. `to_text` merges repeats, drops silence units and reads the rest by
    greedy longest match; units it cannot read become `u<N>` tokens (counted as errors).
    Han characters are joined without spaces, everything else with spaces, so the result scores
    with `error_rate` in either unit."""

    def __init__(
        self, table: dict[str, Sequence[int]], silence: Sequence[int] = (), name: str = "lexicon"
    ):
        self.name = name
        self.silence = {int(s) for s in silence}
        self.by_units: dict[tuple[int, ...], str] = {}
        for token, units in table.items():
            key = tuple(merge_repeats([int(u) for u in units if int(u) not in self.silence]))
            if not key:
                raise EvaluationError(f"{name}: token {token!r} has no non-silence units")
            self.by_units.setdefault(key, token)  # first spelling wins for homophones
        self.longest = max((len(k) for k in self.by_units), default=0)

    @classmethod
    def from_file(cls, path) -> "UnitLexicon":
        """JSON: {"silence": [0], "table": {"cat": [17], ...}} or just the table."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EvaluationError(f"unit lexicon {path}: file not found") from None
        except OSError as e:
            raise EvaluationError(f"unit lexicon {path}: cannot read: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise EvaluationError(f"unit lexicon {path}: invalid JSON ({e})") from None
        table = data.get("table", data) if isinstance(data, dict) else None
        silence = data.get("silence", []) if isinstance(data, dict) and "table" in data else []
        if (
            not isinstance(table, dict)
            or not table
            or not all(
                isinstance(v, list) and all(isinstance(u, int) for u in v) for v in table.values()
            )
        ):
            raise EvaluationError(
                f'unit lexicon {path}: expected {{"table": {{token: [unit, ...]}}, '
                f'"silence": [unit, ...]}}'
            )
        return cls(table, silence, name=str(path))

    @classmethod
    def demo(cls) -> "UnitLexicon":
        """The demo corpus' pronunciation table (cslm_jax.demo.corpus.Pronouncer), silence unit 0."""
        return cls(Pronouncer().table, [SILENCE], name="demo")

    def tokens(self, units: Sequence[int]) -> list[str]:
        seq = [u for u in merge_repeats([int(u) for u in units]) if u not in self.silence]
        out, i = [], 0
        while i < len(seq):
            for n in range(min(self.longest, len(seq) - i), 0, -1):
                token = self.by_units.get(tuple(seq[i : i + n]))
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                out.append(f"u{seq[i]}")
                i += 1
        return out

    def to_text(self, units: Sequence[int]) -> str:
        text = ""
        for token in self.tokens(units):
            glue = "" if text and _is_han(text[-1]) and _is_han(token[0]) else " "
            text = token if not text else text + glue + token
        return text
