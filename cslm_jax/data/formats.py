"""CSLM data formats: records -> chat examples -> rendered token ids with the CSLM loss mask.

Plain Python (no TensorFlow): each piece is testable alone and is what the SeqIO tasks call.

Record kinds (one JSON object per line):
  paired              {lang, text, units, [word_times]}            -> ASR and TTS examples
  translation         {src_lang, tgt_lang, src, tgt}               -> MT, both directions
  instruction         {prompt, response} (strings, or equal-length lists for multi-turn; the
                      reference's own format, accepted as is, speech spans included)
  spoken_instruction  {question_units, question_text, question_lang, answer_text,
                       answer_units, answer_word_times, answer_lang} -> interleaved chain

`word_times` / `answer_word_times` are [start, end] seconds per timed token of the text: per
whitespace-separated word for word languages, per character (punctuation and spaces excluded)
for character languages. A time t is unit index round(t * unit_rate) of the *unmerged* units.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import operator
import os
import re
import string
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cslm_jax.config import ConfigError, apply_overrides, load_yaml
from cslm_jax.errors import CslmError, DataError, json_error
from cslm_jax.speech.units import ALIASES, UNITS, SpeechUnitsError, speech_units_info
from cslm_jax.storage import fs

KINDS = ("paired", "translation", "instruction", "spoken_instruction")
TASK_KINDS = ("asr", "tts", "mt", "instruct", "s2s")
REQUIRED = {
    "paired": ("lang", "text", "units"),
    "translation": ("src_lang", "tgt_lang", "src", "tgt"),
    "instruction": ("prompt", "response"),
    "spoken_instruction": (
        "question_units",
        "question_text",
        "question_lang",
        "answer_text",
        "answer_units",
        "answer_word_times",
        "answer_lang",
    ),
}
DEFAULT_PUNCTUATION = ".,!?;:。，！？；：、…"
LOSS_MASKS = ("reference", "assistant_only")
SPEECH_SPAN = re.compile(r"<sosp>(.*?)<eosp>", re.S)
UNIT_TOKEN = re.compile(r"<(\d+)>")


class RecordError(CslmError):
    """A record is invalid; the message names file, line and field."""

    def __init__(self, where: str, field: str, message: str):
        self.where, self.field = where, field
        super().__init__(f"{where}: field '{field}': {message}")


# -- configuration ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """Per-language templates and chunking. Prompts use {speech} (a rendered speech span),
    {text}, {src_name}/{tgt_name} placeholders."""

    name: str
    asr_prompt: str
    tts_prompt: str
    mt_prompt: str  # used when this language is the MT target
    s2s_prompt: str  # same-language spoken question, answer in this language
    s2s_cross_prompt: str  # spoken question in another language, answer in this one
    chunk_unit: str = "word"  # word | char
    chunk_size: int = 7

    def __post_init__(self):
        if self.chunk_unit not in ("word", "char"):
            raise ConfigError(
                f"language {self.name}: chunk_unit must be 'word' or 'char', "
                f"got {self.chunk_unit!r}"
            )
        if self.chunk_size < 1:
            raise ConfigError(f"language {self.name}: chunk_size must be >= 1")


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    languages: dict[str, LanguageConfig]
    unit_count: int
    unit_rate: float = 50.0
    merge_repeats: bool = True
    # the corpus's mean run length of units (raw / merged; extract-units prints it): synthesis
    # stretches merged units by it to their natural duration. Not part of prepared examples.
    speech_rate: float | None = None
    chain: str = "interleaved"  # interleaved | sequential (TQ -> whole TA -> whole SA)
    cut_at_punctuation: bool = True
    punctuation: str = DEFAULT_PUNCTUATION
    time_tolerance: float = 0.1  # seconds a timing may exceed the utterance
    loss_mask: str = "reference"  # reference | assistant_only (see `loss_mask`)

    def __post_init__(self):
        rate = self.speech_rate
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 1.0 <= rate < 100
        ):
            raise ConfigError(
                f"format.speech_rate {rate!r}: the mean run length of the units (raw / merged, "
                f"1 to 100; extract-units prints it)"
            )
        if self.chain not in ("interleaved", "sequential"):
            raise ConfigError(f"chain must be 'interleaved' or 'sequential', got {self.chain!r}")
        if self.loss_mask not in LOSS_MASKS:
            raise ConfigError(f"loss_mask must be one of {LOSS_MASKS}, got {self.loss_mask!r}")

    def synthesis_rate(self) -> tuple[float, str]:
        """(speech rate, where it comes from) for synthesising this format's units: 1.0 for
        unmerged units, `speech_rate` for merged ones, 1.0 with a warning where it is unset."""
        if not self.merge_repeats:
            return 1.0, "units are not merged (format.merge_repeats: false)"
        if self.speech_rate is not None:
            return float(self.speech_rate), "format.speech_rate"
        return 1.0, (
            "format.speech_rate is not set: merged units will sound faster than "
            "natural; set it to the mean run length extract-units prints, or give "
            "--speech-rate"
        )

    def lang(self, code: str, where: str, field: str) -> LanguageConfig:
        if code not in self.languages:
            raise RecordError(
                where, field, f"unknown language {code!r}; configured: {sorted(self.languages)}"
            )
        return self.languages[code]


# -- validation ---------------------------------------------------------------------------------


def detect_kind(record: dict) -> str | None:
    if "question_units" in record or "answer_units" in record:
        return "spoken_instruction"
    if "src" in record and "tgt" in record:
        return "translation"
    if "units" in record:
        return "paired"
    if "prompt" in record and "response" in record:
        return "instruction"
    return None


def parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(where, "<json>", json_error(e, line)) from None
    if not isinstance(record, dict):
        raise RecordError(where, "<json>", "a record must be a JSON object")
    return record


def _text(record: dict, field: str, where: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise RecordError(where, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(where, field, "is empty")
    return value


_INT = {int}
_NUMBER_TYPES = {int, float}
_PAIR_TYPES = {list, tuple}


def _units(record: dict, field: str, where: str, unit_count: int) -> list[int]:
    value = record.get(field)
    if not isinstance(value, list) or not value:
        raise RecordError(where, field, "must be a non-empty list of unit ids")
    if set(map(type, value)) == _INT and 0 <= min(value) and max(value) < unit_count:
        return value  # the common case, checked without a Python loop body
    for i, u in enumerate(value):
        if not isinstance(u, int) or isinstance(u, bool):
            raise RecordError(where, f"{field}[{i}]", f"unit id must be an integer, got {u!r}")
        if not 0 <= u < unit_count:
            raise RecordError(
                where, f"{field}[{i}]", f"unit id {u} is outside the codebook 0..{unit_count - 1}"
            )
    return value


def check_speech_spans(text: str, where: str, field: str, unit_count: int) -> None:
    """Reference-format strings: <sosp>/<eosp> balanced and not nested, unit ids in range."""
    depth = 0
    for m in re.finditer(r"<sosp>|<eosp>", text):
        depth += 1 if m.group() == "<sosp>" else -1
        if depth not in (0, 1):
            raise RecordError(where, field, f"unbalanced <sosp>/<eosp> at character {m.start()}")
    if depth:
        raise RecordError(where, field, "unbalanced <sosp>/<eosp>: a speech span is not closed")
    for span in SPEECH_SPAN.finditer(text):
        body = span.group(1)
        if UNIT_TOKEN.sub("", body):
            raise RecordError(
                where,
                field,
                f"speech span at character {span.start()} holds "
                f"something other than unit tokens <N>",
            )
        for u in UNIT_TOKEN.findall(body):
            if int(u) >= unit_count:
                raise RecordError(
                    where, field, f"unit <{u}> is outside the codebook 0..{unit_count - 1}"
                )


def timed_tokens(text: str, chunk_unit: str, punctuation: str) -> list[str]:
    """Split text into timed tokens (words, or characters with punctuation/space attached to the
    preceding character). Joining gives back the text (word mode: with single spaces)."""
    if chunk_unit == "word":
        return text.split()
    pieces: list[str] = []
    for ch in text:
        if (ch.isspace() or ch in punctuation) and pieces:
            pieces[-1] += ch
        elif ch.isspace() or ch in punctuation:
            pieces.append(ch)  # leading punctuation: its own (untimed) piece
        else:
            pieces.append(ch)
    return pieces


def piece_is_timed(piece: str, chunk_unit: str, punctuation: str) -> bool:
    return chunk_unit == "word" or any(not (c.isspace() or c in punctuation) for c in piece)


def timed_count(text: str, lang: "LanguageConfig", cfg: "FormatConfig") -> int:
    """How many [start, end] timings a text needs: its timed tokens (word mode: the words;
    char mode: the characters that are neither whitespace nor punctuation, each of which
    starts a timed piece of `timed_tokens`; tests/test_formats.py checks both against the
    pieces)."""
    if lang.chunk_unit == "word":
        return len(text.split())
    return len(_timed_chars(cfg.punctuation).findall(text))


_TIMED_CHARS: dict = {}


def _timed_chars(punctuation: str):
    """A regex matching one character that is not whitespace (`\\s` of a str pattern is
    str.isspace) and not in `punctuation`."""
    rx = _TIMED_CHARS.get(punctuation)
    if rx is None:
        body = "".join(re.escape(c) for c in punctuation)
        rx = _TIMED_CHARS[punctuation] = re.compile(f"[^\\s{body}]")
    return rx


def validated_times(
    record: dict,
    field: str,
    where: str,
    n_tokens: int,
    n_units: int,
    cfg: FormatConfig,
    shortcut: bool = True,
    values: bool = True,
) -> list[tuple[float, float]] | None:
    """The [start, end] pairs of `field`, checked (`values=False`: checked only, None
    returned); `shortcut=False` runs the exact loop alone (what the shortcut is tested
    against)."""
    value = record.get(field)
    if not isinstance(value, list):
        raise RecordError(where, field, "must be a list of [start, end] pairs (seconds)")
    if len(value) != n_tokens:
        raise RecordError(
            where, field, f"has {len(value)} timings but the text has {n_tokens} timed tokens"
        )
    duration = n_units / cfg.unit_rate
    if shortcut and value and set(map(type, value)) <= _PAIR_TYPES and set(map(len, value)) == {2}:
        # the common case without a Python loop body: every check of the loop below passes
        # (NaN fails a comparison here and goes to the loop, which reports what it reports)
        flat = list(itertools.chain.from_iterable(value))
        if set(map(type, flat)) <= _NUMBER_TYPES:
            starts, ends = flat[0::2], flat[1::2]
            if (
                starts[0] >= 0
                and all(map(operator.le, starts, starts[1:]))  # monotonic
                and all(map(operator.le, starts, ends))
                and max(ends) <= duration + cfg.time_tolerance
            ):
                return list(zip(map(float, starts), map(float, ends))) if values else None
    out, last_start = [], 0.0
    for i, pair in enumerate(value):
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in pair)
        ):
            raise RecordError(where, f"{field}[{i}]", f"must be [start, end] numbers, got {pair!r}")
        start, end = float(pair[0]), float(pair[1])
        if start < 0 or end < start:
            raise RecordError(where, f"{field}[{i}]", f"[{start}, {end}] is not a valid interval")
        if start < last_start:
            raise RecordError(
                where,
                f"{field}[{i}]",
                f"start {start} is before the previous start {last_start}: timings not monotonic",
            )
        if end > duration + cfg.time_tolerance:
            raise RecordError(
                where,
                f"{field}[{i}]",
                f"end {end}s lies beyond the utterance ({n_units} units = {duration:.2f}s)",
            )
        out.append((start, end))
        last_start = start
    return out if values else None


def validate_record(kind: str, record: dict, cfg: FormatConfig, where: str) -> None:
    """Raise RecordError (file, line, field) for the first problem; return None if valid."""
    if kind not in REQUIRED:
        raise RecordError(where, "<kind>", f"unknown record kind {kind!r}; kinds: {KINDS}")
    for field in REQUIRED[kind]:
        if field not in record:
            raise RecordError(where, field, f"missing (a {kind} record needs {REQUIRED[kind]})")
    if kind == "paired":
        lang = cfg.lang(record["lang"], where, "lang")
        _text(record, "text", where)
        units = _units(record, "units", where, cfg.unit_count)
        if record.get("word_times") is not None:
            validated_times(
                record,
                "word_times",
                where,
                timed_count(record["text"], lang, cfg),
                len(units),
                cfg,
                values=False,
            )
    elif kind == "translation":
        cfg.lang(record["src_lang"], where, "src_lang")
        cfg.lang(record["tgt_lang"], where, "tgt_lang")
        _text(record, "src", where)
        _text(record, "tgt", where)
    elif kind == "instruction":
        prompts, responses = _turns(record, where)
        for field, turns in (("prompt", prompts), ("response", responses)):
            for i, t in enumerate(turns):
                name = field if isinstance(record[field], str) else f"{field}[{i}]"
                if not isinstance(t, str) or not t.strip():
                    raise RecordError(where, name, "must be a non-empty string")
                check_speech_spans(t, where, name, cfg.unit_count)
    else:
        cfg.lang(record["question_lang"], where, "question_lang")
        lang = cfg.lang(record["answer_lang"], where, "answer_lang")
        _text(record, "question_text", where)
        answer = _text(record, "answer_text", where)
        _units(record, "question_units", where, cfg.unit_count)
        units = _units(record, "answer_units", where, cfg.unit_count)
        validated_times(
            record,
            "answer_word_times",
            where,
            timed_count(answer, lang, cfg),
            len(units),
            cfg,
            values=False,
        )


def _turns(record: dict, where: str) -> tuple[list, list]:
    p, r = record["prompt"], record["response"]
    if isinstance(p, str) and isinstance(r, str):
        return [p], [r]
    if isinstance(p, list) and isinstance(r, list):
        if len(p) != len(r) or not p:
            raise RecordError(
                where,
                "response",
                f"multi-turn lists must have equal, non-zero "
                f"lengths (prompt {len(p)}, response {len(r)})",
            )
        return p, r
    raise RecordError(where, "prompt", "prompt and response must both be strings or both lists")


# -- units and the chain of modality ------------------------------------------------------------


def merge_repeats(units: Sequence[int]) -> list[int]:
    """Collapse consecutive repeats: [5, 5, 7, 7, 7, 5] -> [5, 7, 5]."""
    return [u for u, _ in itertools.groupby(units)]


def speech(units: Iterable[int]) -> str:
    """A speech span as the LLM sees it: <sosp><12><907><eosp> (no spaces)."""
    units = list(units)
    return "<sosp><" + "><".join(map(str, units)) + "><eosp>" if units else "<sosp><eosp>"


def _merged_index(units: Sequence[int], raw_index: int) -> int:
    """Index in the merged sequence where raw position `raw_index` falls: the number of runs
    that start before it. A boundary inside a run gives the run to the earlier side."""
    return sum(1 for i in range(min(raw_index, len(units))) if i == 0 or units[i] != units[i - 1])


def chunk_answer(
    text: str,
    times: Sequence[tuple[float, float]],
    units: Sequence[int],
    lang: LanguageConfig,
    cfg: FormatConfig,
) -> list[tuple[str, list[int]]]:
    """Split an answer into (text chunk, unit chunk) pairs.

    Chunks hold at most `lang.chunk_size` timed tokens and, with `cut_at_punctuation`, end at a
    token that ends in punctuation. Unit boundaries are the unit index of each chunk's first token
    start (computed on unmerged units); with merging on, boundaries are mapped onto the merged
    sequence, so the unit chunks concatenate to exactly the merged sequence and the text chunks
    (joined with spaces for word languages, directly for character languages) to the text.
    """
    pieces = timed_tokens(text, lang.chunk_unit, cfg.punctuation)
    timed = [piece_is_timed(p, lang.chunk_unit, cfg.punctuation) for p in pieces]
    groups: list[list[int]] = []  # piece indices per chunk
    current: list[int] = []
    count = 0
    for i, piece in enumerate(pieces):
        current.append(i)
        count += timed[i]
        at_punct = cfg.cut_at_punctuation and piece.rstrip()[-1:] in cfg.punctuation
        if count >= lang.chunk_size or (at_punct and count > 0):
            groups.append(current)
            current, count = [], 0
    if current:
        if groups and count == 0:  # only untimed trailing punctuation: keep with the last
            groups[-1].extend(current)
        else:
            groups.append(current)

    time_of = {}  # piece index -> start time
    t = iter(times)
    for i, is_timed in enumerate(timed):
        if is_timed:
            time_of[i] = next(t)[0]
    raw_bounds = [0]
    for g in groups[1:]:
        first = next((i for i in g if i in time_of), None)
        b = len(units) if first is None else round(time_of[first] * cfg.unit_rate)
        raw_bounds.append(min(max(b, raw_bounds[-1]), len(units)))
    raw_bounds.append(len(units))

    if cfg.merge_repeats:
        seq = merge_repeats(units)
        bounds = [_merged_index(units, b) for b in raw_bounds[:-1]] + [len(seq)]
    else:
        seq, bounds = list(units), raw_bounds
    join = " " if lang.chunk_unit == "word" else ""
    out = []
    for k, g in enumerate(groups):
        chunk_text = join.join(pieces[i] for i in g)
        out.append(
            (
                chunk_text.strip() if lang.chunk_unit == "word" else chunk_text,
                seq[bounds[k] : bounds[k + 1]],
            )
        )
    return out


def interleaved_parts(transcript: str, chunks: Sequence[tuple[str, Sequence[int]]]) -> list:
    """The interleaved chain as parts (`joined` gives the string):
    [question] TQ [answer] TA1 <sosp>SA1<eosp> TA2 <sosp>SA2<eosp> ... <eoa>
    (items joined by single spaces; an empty text left out)."""
    items = ["[question]", transcript.strip(), "[answer]"]
    for text, units in chunks:
        items += [text.strip(), units]
    items.append("<eoa>")
    return spaced_parts(items, keep_empty=False)


def sequential_parts(transcript: str, answer: str, units: Sequence[int]) -> list:
    """The older chain as parts: [question] TQ [answer] TA <sosp>SA<eosp> <eoa> (every item
    joined by a single space, an empty one too)."""
    items = ["[question]", transcript.strip(), "[answer]", answer.strip(), units, "<eoa>"]
    return spaced_parts(items, keep_empty=True)


# -- records -> chat examples ----------------------------------------------------------------------
#
# A content holding speech is defined once, as parts [text, units, text, units, ..., text]: the
# texts with each unit list standing for its speech span (`joined` writes the string: the exact
# path). The fast preparation (cslm_jax/data/fast_chat.py) takes the same parts from `examples`
# and computes the spans' ids instead of tokenizing their text, so a template, a chain or a
# joining rule is changed here only.

Messages = list  # [{"role": ..., "content": ...}, ...]
ROLES = ("user", "assistant")


def joined(parts: list) -> str:
    """The content string of parts [text, units, text, ...]: each unit list as its speech span."""
    if len(parts) == 1:
        return parts[0]
    return "".join(p if k % 2 == 0 else speech(p) for k, p in enumerate(parts))


def spaced_parts(items: Sequence, keep_empty: bool) -> list:
    """Parts of `items` (texts, and unit lists for speech spans) joined by single spaces;
    empty texts are joined too with `keep_empty`, else left out (a span is never empty)."""
    parts, cur, first = [], "", True
    for item in items:
        if isinstance(item, str):
            if item or keep_empty:
                cur += item if first else " " + item
                first = False
        else:
            parts += [cur if first else cur + " ", item]
            cur, first = "", False
    parts.append(cur)
    return parts


@functools.lru_cache(maxsize=1024)
def template_around(template: str, field: str) -> tuple[str, str] | None:
    """(before, after) when `template.format(**{field: x}) == before + x + after` for every
    string x: the template's only replacement field is `field`, once, without conversion or
    format spec (literal text as str.format unescapes it); else None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        return None
    fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
    if fields != [(field, "", None)]:
        return None
    before, after, seen = [], [], False
    for literal, name, _, _ in parsed:
        (after if seen else before).append(literal)
        if name is not None:
            seen = True
    return "".join(before), "".join(after)


def filled_parts(template: str, field: str, units: Sequence[int]) -> list:
    """`template.format(**{field: speech(units)})` as parts: [before, units, after] where the
    template splits around its one field (`template_around`), else the formatted string."""
    around = template_around(template, field)
    if around is None:
        return [template.format(**{field: speech(units)})]
    return [around[0], units, around[1]]


def chat(*contents) -> Messages:
    """Messages of alternating roles, user first."""
    return [{"role": ROLES[i % 2], "content": c} for i, c in enumerate(contents)]


def pair(user, assistant) -> Messages:
    """A user turn and the assistant's answer (`chat` of two contents)."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def units_of(record: dict, field: str, cfg: FormatConfig) -> list[int]:
    """A record's unit ids as the examples hold them (repeats merged when configured)."""
    return merge_repeats(record[field]) if cfg.merge_repeats else list(record[field])


def examples(
    task_kind: str, record: dict, cfg: FormatConfig, where: str, content=joined
) -> list[Messages]:
    """Chat examples of one task kind from one (validated) record.

    asr/tts from paired records, mt (both directions) from translation records, instruct from
    instruction records, s2s from spoken instructions (the prompt picks same-language or
    cross-lingual wording from the languages involved).

    A content holding speech is defined here as parts [text, units, text, ..., text] and
    `content(parts)` is the message's content: by default its string (`joined`); the fast
    preparation keeps the unit lists (cslm_jax/data/fast_chat.py `fast_examples`), so both
    paths take their examples from this one definition.
    """
    if task_kind in ("asr", "tts"):
        lang = cfg.lang(record["lang"], where, "lang")
        units, text = units_of(record, "units", cfg), record["text"].strip()
        if task_kind == "asr":
            return [pair(content(filled_parts(lang.asr_prompt, "speech", units)), text)]
        return [pair(lang.tts_prompt.format(text=text), content(["", units, ""]))]
    if task_kind == "mt":
        out = []
        for s, t, sl, tl in (
            ("src", "tgt", "src_lang", "tgt_lang"),
            ("tgt", "src", "tgt_lang", "src_lang"),
        ):
            src_lang = cfg.lang(record[sl], where, sl)
            tgt_lang = cfg.lang(record[tl], where, tl)
            prompt = tgt_lang.mt_prompt.format(
                text=record[s].strip(), src_name=src_lang.name, tgt_name=tgt_lang.name
            )
            out.append(pair(prompt, record[t].strip()))
        return out
    if task_kind == "instruct":
        prompts, responses = _turns(record, where)
        return [chat(*[x for turn in zip(prompts, responses) for x in turn])]
    if task_kind == "s2s":
        q_lang = record["question_lang"]
        lang = cfg.lang(record["answer_lang"], where, "answer_lang")
        template = lang.s2s_prompt if q_lang == record["answer_lang"] else lang.s2s_cross_prompt
        prompt = filled_parts(template, "speech", units_of(record, "question_units", cfg))
        times = validated_times(
            record,
            "answer_word_times",
            where,
            timed_count(record["answer_text"], lang, cfg),
            len(record["answer_units"]),
            cfg,
        )
        if cfg.chain == "sequential":
            response = sequential_parts(
                record["question_text"],
                record["answer_text"],
                units_of(record, "answer_units", cfg),
            )
        else:
            chunks = chunk_answer(record["answer_text"], times, record["answer_units"], lang, cfg)
            response = interleaved_parts(record["question_text"], chunks)
        return [pair(content(prompt), content(response))]
    raise ValueError(f"unknown task kind {task_kind!r}; kinds: {TASK_KINDS}")


RECORD_KIND_OF_TASK = {
    "asr": "paired",
    "tts": "paired",
    "mt": "translation",
    "instruct": "instruction",
    "s2s": "spoken_instruction",
}


# -- rendering and the loss mask (CSLM.md section 4) ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rendered:
    text: str
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool


class ChatRenderer:
    """Renders chat examples with the tokenizer's own template and masks them (`loss_mask`).

    `mask`: "reference" (default) is the authors' rule, which trains the system block the
    Llama-3.1 template renders before the first user turn; "assistant_only" trains assistant
    turns only. Either way each assistant header, response and end-of-turn token is trained and
    the first <|begin_of_text|> is not. A trailing empty assistant header is removed; the
    tokenizer's EOS is appended when the last id is not EOS and there is room (as the reference's
    `tokenize`: `<|eot_id|>` for an Instruct tokenizer, already last; `<|end_of_text|>` for a
    base one).
    """

    def __init__(
        self,
        tokenizer,
        max_length: int | None = None,
        user_header: str = "<|start_header_id|>user<|end_header_id|>",
        assistant_header: str = "<|start_header_id|>assistant<|end_header_id|>",
        mask: str = "reference",
    ):
        if mask not in LOSS_MASKS:
            raise ValueError(f"loss mask must be one of {LOSS_MASKS}, got {mask!r}")
        self.tok = tokenizer
        self.max_length = max_length
        self.mask = mask
        self.user = tokenizer.encode(user_header, add_special_tokens=False)
        self.assistant = tokenizer.encode(assistant_header, add_special_tokens=False)
        self.assistant_header_text = assistant_header
        self.bos_id = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token
        self.eos_id = tokenizer.eos_token_id

    def render_text(self, messages: Messages) -> str:
        text = self.tok.apply_chat_template(messages, tokenize=False)
        stripped = text.rstrip()
        if stripped.endswith(self.assistant_header_text):
            text = stripped[: -len(self.assistant_header_text)]
        return text

    @property
    def adds_special_tokens(self) -> bool:
        """Whether rendered text is tokenized with the tokenizer's own special tokens added, as
        the reference's `tokenize` does (`tokenizer(text)`: a Llama-3 tokenizer prepends
        `<|begin_of_text|>` to the one the chat template already wrote, so sequences start with
        two); `assistant_only` tokenizes the rendered text as it is (one)."""
        return self.mask == "reference"

    def encode(self, text: str) -> list[int]:
        """Rendered text -> ids, as training tokenizes it (`adds_special_tokens`)."""
        return self.tok.encode(text, add_special_tokens=self.adds_special_tokens)

    def prompt_ids(self, text: str) -> list[int]:
        """A user turn plus the assistant header, tokenized as training tokenizes its examples:
        the prompt a model trained with this renderer answers."""
        rendered = self.tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return self.encode(rendered)

    def __call__(self, messages: Messages) -> Rendered:
        text = self.render_text(messages)
        raw = self.encode(text)
        ids, mask, truncated = self.finish_ids(list(raw))
        if self.adds_special_tokens:
            text = self.tok.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        elif (
            self.eos_id is not None
            and (not raw or raw[-1] != self.eos_id)
            and (self.max_length is None or len(raw) < self.max_length)
        ):
            text += self.eos
        return Rendered(text, ids, mask, truncated)

    def finish_ids(
        self, ids: list[int], found: tuple | None = None
    ) -> tuple[list[int], list[int], bool]:
        """Encoded rendered text -> (ids, loss mask, truncated): EOS, truncation and the mask,
        in the order of the chosen rule (what `__call__` does after rendering and encoding;
        the batched preparation, cslm_jax.data.prepare, calls it too). `found`: the header
        positions in `ids` when already known (`loss_mask`)."""
        if self.adds_special_tokens:
            # the reference's order: truncate to max_length, then EOS if there is room, then mask
            # what is left (its loop never sees the truncated tail)
            truncated = self.max_length is not None and len(ids) > self.max_length
            if truncated:
                ids = ids[: self.max_length]
                found = None  # positions cut off: search what is left
            if (
                self.eos_id is not None
                and ids[-1] != self.eos_id
                and (self.max_length is None or len(ids) < self.max_length)
            ):
                ids.append(self.eos_id)
            return (
                ids,
                loss_mask(ids, self.user, self.assistant, self.bos_id, self.mask, found),
                truncated,
            )
        if (
            self.eos_id is not None
            and (not ids or ids[-1] != self.eos_id)
            and (self.max_length is None or len(ids) < self.max_length)
        ):
            ids.append(self.eos_id)
        mask = loss_mask(ids, self.user, self.assistant, self.bos_id, self.mask, found)
        truncated = self.max_length is not None and len(ids) > self.max_length
        if truncated:
            ids, mask = ids[: self.max_length], mask[: self.max_length]
        return ids, mask, truncated


def _find(ids: Sequence[int], pattern: Sequence[int], start: int) -> int:
    """First index >= start where `pattern` occurs in `ids`, or -1 (candidates by list.index)."""
    n = len(pattern)
    ids = ids if type(ids) is list else list(ids)
    pattern = pattern if type(pattern) is list else list(pattern)
    i = start
    while i <= len(ids) - n:
        try:
            i = ids.index(pattern[0], i, len(ids) - n + 1)
        except ValueError:
            return -1
        if ids[i : i + n] == pattern:
            return i
        i += 1
    return -1


def _find_all(ids: list, pattern: Sequence[int]) -> list[int]:
    """The starts of the occurrences of `pattern` in `ids` met scanning left to right, each
    search resuming after the previous occurrence (what repeated `_find` calls give)."""
    out, n = [], len(pattern)
    if not n:
        return _find_all_slow(ids, pattern)
    pattern = list(pattern)
    first, limit, i = pattern[0], len(ids) - n + 1, 0
    index = ids.index
    while i < limit:
        try:
            i = index(first, i, limit)
        except ValueError:
            break
        if ids[i : i + n] == pattern:
            out.append(i)
            i += n
        else:
            i += 1
    return out


def _find_all_slow(ids, pattern) -> list[int]:
    out, pos = [], 0
    while (pos := _find(ids, pattern, pos)) >= 0:
        out.append(pos)
        pos += len(pattern)
    return out


def loss_mask(
    ids: Sequence[int],
    user: Sequence[int],
    assistant: Sequence[int],
    bos_id: int | None,
    mode: str = "reference",
    found: tuple | None = None,
) -> list[int]:
    """0/1 per token (1: trained) under one of two rules:

    reference: the authors' loop (`cslm/train/pretrain.py`, `sft.py`): `begin` starts at 0 and
      moves to each user header met; at each assistant header [begin, header) is masked (the
      loop stops at an assistant header with nothing after it); then position 0 is masked if it
      is `bos_id`. The Llama-3.1 template renders a system block before the first user header,
      so `begin` has already left it when the first assistant header comes: the system block is
      trained (and so is a second `<|begin_of_text|>` at position 1).
    assistant_only: [start, next assistant header) is masked for the sequence start and for each
      user header (to the end when no assistant header follows): only assistant turns train.

    `found`: (user starts, assistant starts), every occurrence of each pattern in `ids`, when the
    caller knows them (the fast preparation reads them off the template: FastChat._mark, for
    patterns that cannot overlap themselves); otherwise they are searched.
    """
    ids = ids if type(ids) is list else list(ids)
    mask = [1] * len(ids)
    users = _find_all(ids, user) if found is None else found[0]
    if mode == "reference":
        u, begin = 0, 0
        for pos in _find_all(ids, assistant) if found is None else found[1]:
            if pos + len(assistant) >= len(ids):
                break
            while u < len(users) and users[u] < pos:
                begin = users[u]
                u += 1
            mask[begin:pos] = [0] * (pos - begin)
        if bos_id is not None and ids and ids[0] == bos_id:
            mask[0] = 0
        return mask
    if mode == "assistant_only":
        for s in [0] + users:
            a = (
                _find(ids, assistant, s)
                if found is None
                else next((x for x in found[1] if x >= s), -1)
            )
            end = len(ids) if a < 0 else a
            mask[s:end] = [0] * (end - s)
    else:
        raise ValueError(f"loss mask must be one of {LOSS_MASKS}, got {mode!r}")
    if bos_id is not None and bos_id in ids:
        mask[list(ids).index(bos_id)] = 0
    return mask


def _lines(f, path) -> Iterator[str]:
    """The lines of a file opened in binary, decoded; DataError naming the file and line where
    one is not UTF-8."""
    for n, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                f"line); JSONL corpora must be UTF-8"
            ) from None


def read_jsonl(
    path, kind: str | None, cfg: FormatConfig, skip_bad: bool = False, skipped: list | None = None
) -> Iterator[tuple[str, str, dict]]:
    """(where, kind, record) for each valid line of a JSONL file. Strict by default: the first bad
    record raises RecordError naming file, line and field. With skip_bad, bad records are
    appended to `skipped` (as RecordErrors) instead."""
    try:
        f = fs.path(path).open("rb") if fs.is_remote(path) else open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for n, line in enumerate(_lines(f, path), start=1):
            where = f"{path}:{n}"
            if not line.strip():
                err = RecordError(where, "<json>", "empty line")
            else:
                try:
                    record = parse_line(line, where)
                    k = kind or detect_kind(record)
                    if k is None:
                        raise RecordError(
                            where,
                            "<kind>",
                            "cannot tell the record kind from its fields; pass --kind",
                        )
                    validate_record(k, record, cfg, where)
                    yield where, k, record
                    continue
                except RecordError as e:
                    err = e
            if not skip_bad:
                raise err
            if skipped is not None:
                skipped.append(err)


def format_config_from_dict(data: dict, where: str = "data config", root=None) -> FormatConfig:
    """FormatConfig from the `format` and `languages` sections of a data config (`root`: the
    folder a relative `format.speech_tokenizer` resolves against)."""
    fmt = dict(data.get("format") or {})
    langs_raw = data.get("languages")
    if not isinstance(langs_raw, dict) or not langs_raw:
        raise ConfigError(f"{where}: section 'languages' is missing or empty")
    languages = {}
    for code, spec in langs_raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: languages.{code} must be a mapping")
        try:
            languages[code] = LanguageConfig(**spec)
        except TypeError as e:
            raise ConfigError(f"{where}: languages.{code}: {e}") from None
    if "speech_tokenizer" in fmt:
        _units_from_tokenizer(fmt, where, root)
    if "unit_count" not in fmt:
        raise ConfigError(
            f"{where}: field 'format.unit_count' is required (the speech codebook "
            f"size; or 'format.speech_tokenizer': a version or tokenizer folder)"
        )
    try:
        return FormatConfig(languages=languages, **fmt)
    except TypeError as e:
        raise ConfigError(f"{where}: section 'format': {e}") from None


def _units_from_tokenizer(fmt: dict, where: str, root) -> None:
    """`format.speech_tokenizer` (a version, a tokenizer folder or an extract-units folder) sets
    unit_count and unit_rate; either given as well must agree with it."""
    spec = fmt.pop("speech_tokenizer")
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"{where}: field 'format.speech_tokenizer' must be a version name or a "
            f"folder, got {spec!r}"
        )
    name = spec  # a version, or a folder (relative: against data_dir)
    if (
        ALIASES.get(spec, spec) not in UNITS
        and root is not None
        and "://" not in spec
        and not os.path.isabs(os.path.expanduser(spec))
    ):
        name = str(root / spec)
    try:
        info = speech_units_info(name, f"{where}: field 'format.speech_tokenizer'")
    except SpeechUnitsError as e:
        raise ConfigError(str(e)) from None
    for field, value in (("unit_count", info.codebook_size), ("unit_rate", info.units_per_second)):
        if field in fmt and fmt[field] != value:
            raise ConfigError(
                f"{where}: field 'format.{field}' is {fmt[field]} but "
                f"'format.speech_tokenizer' ({info.source}) gives {value:g}; drop "
                f"'format.{field}' or make them agree"
            )
        fmt[field] = value


# -- data configuration (YAML) ---------------------------------------------------------------------

# -- TFDS sources in a data config (read by cslm_jax.data.sources) ------------------------------

TFDS_KEYS = ("tfds", "tfds_data_dir", "splits", "fields", "constants")
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """A TFDS dataset as a task's source: name with version, data dir, our split -> TFDS split,
    record field -> feature path, record field -> constant."""

    name: str
    data_dir: str | None
    splits: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, object], ...]


def tfds_spec_from_entry(
    entry: dict, where: str, path, kind: str, root: Path, languages
) -> TfdsSpec:
    """The TFDS source of a data config's stage entry; ConfigError naming the field otherwise."""
    name = entry["tfds"]
    if not isinstance(name, str) or ":" not in name:
        raise ConfigError(
            f"{path}: field '{where}.tfds' is {name!r}; give name[/config]:version, "
            f"e.g. wmt17_translate/zh-en:1.0.0 (a version pins the data)"
        )
    if entry.get("train") or entry.get("validation"):
        raise ConfigError(
            f"{path}: field '{where}': give files (train/validation) or a tfds dataset, not both"
        )
    data_dir = entry.get("tfds_data_dir")
    if data_dir is not None:
        if not isinstance(data_dir, str) or not data_dir:
            raise ConfigError(f"{path}: field '{where}.tfds_data_dir' must be a path")
        if "://" not in data_dir and not Path(data_dir).is_absolute():
            data_dir = str(root / data_dir)
    splits = entry.get("splits", {"train": "train"})
    if (
        not isinstance(splits, dict)
        or not splits
        or not all(isinstance(v, str) and v for v in splits.values())
    ):
        raise ConfigError(
            f"{path}: field '{where}.splits' must map our splits {SPLITS} to TFDS split names"
        )
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ConfigError(
            f"{path}: field '{where}.splits': unknown split(s) {unknown}; splits: {SPLITS}"
        )
    fields = entry.get("fields") or {}
    constants = entry.get("constants") or {}
    for key, value in (("fields", fields), ("constants", constants)):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: field '{where}.{key}' must be a mapping")
    if not all(isinstance(v, str) and v for v in fields.values()):
        raise ConfigError(
            f"{path}: field '{where}.fields' maps record fields to TFDS feature names (strings)"
        )
    both = sorted(set(fields) & set(constants))
    if both:
        raise ConfigError(f"{path}: field '{where}': {both} in both 'fields' and 'constants'")
    record_kind = RECORD_KIND_OF_TASK[kind]
    missing = [f for f in REQUIRED[record_kind] if f not in fields and f not in constants]
    if missing:
        raise ConfigError(
            f"{path}: field '{where}.fields': a {kind} task reads {record_kind} "
            f"records, which need {list(REQUIRED[record_kind])}; map {missing} "
            f"(fields: from a TFDS feature; constants: one value)"
        )
    for field, value in constants.items():
        if field.endswith("lang") and value not in languages:
            raise ConfigError(
                f"{path}: field '{where}.constants.{field}' is {value!r}; "
                f"configured languages: {sorted(languages)}"
            )
    return TfdsSpec(
        name, data_dir, tuple(splits.items()), tuple(fields.items()), tuple(constants.items())
    )


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One SeqIO task: a task kind over files, in a stage's mixture at `rate`."""

    stage: str
    kind: str
    lang: str | None
    rate: float
    train: tuple[str, ...]
    validation: tuple[str, ...]
    name: str
    tfds: TfdsSpec | None = None  # when the entry reads a TFDS dataset


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str
    data_dir: str
    tokenizer: str | None
    format: FormatConfig
    max_length: int
    shuffle_buffer: int
    skip_bad: bool
    stages: dict
    cache_dir: str | None = None  # a cache `cslm-jax prepare-data` wrote (None: in-process)

    def tasks(self, stage: str | None = None) -> list[TaskSpec]:
        if stage is not None and stage not in self.stages:
            raise ConfigError(f"{self.path}: no stage {stage!r}; stages: {sorted(self.stages)}")
        return [t for s, ts in self.stages.items() if stage in (None, s) for t in ts]

    def mixture_name(self, stage: str) -> str:
        return f"cslm_{stage}"


def check_stage_files(cfg: DataConfig, stage: str, tasks=None) -> None:
    """The files of `stage`'s tasks (those named in `tasks`, when given) exist: a command
    working on one stage needs no other stage's files. ConfigError naming the field, as
    `load_data_config(check_files=True)` would (and the stages, for an unknown one)."""
    for i, spec in enumerate(cfg.tasks(stage)):
        if tasks and spec.name not in tasks:
            continue
        for split, files in (("train", spec.train), ("validation", spec.validation)):
            for j, f in enumerate(files):
                local = fs.local_file(f)  # file://...: its local path; gs://: None
                if not (fs.path(f).is_file() if local is None else os.path.isfile(local)):
                    raise ConfigError(
                        f"{cfg.path}: field 'stages.{stage}[{i}].{split}[{j}]': "
                        f"file {f} does not exist"
                    )


def load_data_config(path, overrides: Sequence[str] = (), check_files: bool = True) -> DataConfig:
    """Read a data config (see configs/data/demo.yaml); relative files resolve against
    `data_dir` (itself relative to the config file); with `check_files` every file must exist."""
    path = fs.path(path, "data config")  # local or gs://; files too
    data = apply_overrides(load_yaml(path), list(overrides), str(path))
    data_dir = data.get("data_dir")
    root = (
        path.parent
        if data_dir in (None, "")
        else fs.path(data_dir)
        if fs.is_remote(data_dir) or os.path.isabs(data_dir)
        else path.parent / data_dir
    )

    def absolute(name: str):
        return fs.path(name) if fs.is_remote(name) or os.path.isabs(name) else root / name

    def resolve(name: str, field: str) -> str:
        if "://" in str(name) and not fs.is_remote(name):
            return str(name)  # a file:// URL, kept as given (storage.fs.local_file reads it)
        p = absolute(name)
        if check_files and not p.is_file():
            raise ConfigError(f"{path}: field '{field}': file {p} does not exist")
        return str(p)

    fmt = format_config_from_dict(data, str(path), root=root)
    packing = dict(data.get("packing") or {})
    unknown = sorted(set(packing) - {"max_length", "shuffle_buffer", "skip_bad"})
    if unknown:
        raise ConfigError(f"{path}: section 'packing': unknown field(s) {unknown}")
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{path}: section 'stages' is missing or empty")
    stages: dict[str, list[TaskSpec]] = {}
    names: set[str] = set()
    for stage, entries in stages_raw.items():
        specs = []
        for i, e in enumerate(entries or []):
            where = f"stages.{stage}[{i}]"
            if not isinstance(e, dict):
                raise ConfigError(f"{path}: field '{where}' must be a mapping")
            unknown = sorted(
                set(e) - {"kind", "lang", "rate", "train", "validation", "name", *TFDS_KEYS}
            )
            if unknown:
                raise ConfigError(f"{path}: field '{where}': unknown key(s) {unknown}")
            kind = e.get("kind")
            if kind not in TASK_KINDS:
                raise ConfigError(f"{path}: field '{where}.kind' is {kind!r}; kinds: {TASK_KINDS}")
            lang = e.get("lang")
            if kind in ("asr", "tts") and lang not in fmt.languages:
                raise ConfigError(
                    f"{path}: field '{where}.lang' is {lang!r}; {kind} tasks need a "
                    f"configured language: {sorted(fmt.languages)}"
                )
            rate = e.get("rate", 1.0)
            if not isinstance(rate, (int, float)) or rate <= 0:
                raise ConfigError(f"{path}: field '{where}.rate' must be a positive number")
            train = tuple(
                resolve(f, f"{where}.train[{j}]") for j, f in enumerate(e.get("train") or [])
            )
            val = tuple(
                resolve(f, f"{where}.validation[{j}]")
                for j, f in enumerate(e.get("validation") or [])
            )
            tfds = (
                None
                if "tfds" not in e
                else tfds_spec_from_entry(e, where, path, kind, root, fmt.languages)
            )
            if tfds is None and set(e) & set(TFDS_KEYS):
                raise ConfigError(
                    f"{path}: field '{where}': {sorted(set(e) & set(TFDS_KEYS))} "
                    f"need a 'tfds' dataset name"
                )
            if not train and not val and tfds is None:
                raise ConfigError(
                    f"{path}: field '{where}': no train or validation files (or tfds dataset)"
                )
            name = e.get("name") or f"cslm_{stage}_{kind}" + (f"_{lang}" if lang else "")
            if name in names:
                raise ConfigError(
                    f"{path}: field '{where}': task name {name!r} is used twice; give one a 'name'"
                )
            names.add(name)
            specs.append(TaskSpec(stage, kind, lang, float(rate), train, val, name, tfds))
        stages[stage] = specs
    tok = data.get("tokenizer")
    return DataConfig(
        path=str(path),
        data_dir=str(root),
        tokenizer=None if not tok else str(absolute(tok)),
        format=fmt,
        max_length=int(packing.get("max_length", 1024)),
        shuffle_buffer=int(packing.get("shuffle_buffer", 1000)),
        skip_bad=bool(packing.get("skip_bad", False)),
        stages=stages,
        cache_dir=_cache_dir(data.get("cache_dir"), root),
    )


def _cache_dir(value, root) -> str | None:
    """`cache_dir:` of a data config: a URL (gs://...) as is, a relative path against data_dir."""
    if value in (None, ""):
        return None
    value = str(value)
    return value if "://" in value or Path(value).is_absolute() else str(root / value)
