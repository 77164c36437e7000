"""Word timings from forced aligners, joined to records by id (`cslm-jax join-timings`).

Interleaved stage-2 examples cut each answer's units at the start times of its text chunks, so a
`spoken_instruction` record needs `answer_word_times` (and a `paired` record may carry
`word_times`): one [start, end] per timed token of the text, as `cslm_jax.data.formats` defines
them (per whitespace word for word languages; per character, punctuation and spaces excluded, for
character languages). Aligners write their own formats; this module reads three of them:

* `mfa`: Montreal Forced Aligner TextGrids (Praat text format, long or short; UTF-8 or UTF-16).
  The words tier is the tier named `words` (or `<speaker> - words`, MFA's name with several
  speakers; `tier` picks another). Intervals whose label is empty, `<eps>`, `sil`, `<sil>` or `sp`
  are silence. `<unk>` (an out-of-vocabulary word in older MFA versions) stands for exactly one
  answer word (word languages only).
* `whisperx`: whisperX JSON: `segments[].words` (used when `segments` is present), else
  `word_segments` (also accepted as a bare list). A word without `start`/`end` (whisperX gives
  none to words its alignment model has no characters for, e.g. numbers) is untimed: with
  `untimed="interpolate"` (default) a run of untimed words shares the gap between its timed
  neighbours evenly (the utterance's start or end at the edges); with `untimed="error"` it is an
  error. A segment without `words` counts as one aligned piece spanning the segment.
* `ctc`: `ctc-forced-aligner` output: its JSON (`{"text", "segments": [{"start", "end", "text",
  "score"}]}`) or its text file (lines `START-END: TEXT`), at any `--split_size` (word, char or
  sentence). JSON of whisperX's shape (no top-level `text`, or `segments[].words`) is refused
  (its segments would pass for timed words); a TextGrid given as whisperx or ctc is named as one.
* A reversed interval or word (end before start) is an error naming the file, the TextGrid tier
  and interval or the JSON field.

Matching (`word_times`). The aligner's words and the record's text are compared after
normalisation: Unicode NFKC, case folded, punctuation (Unicode category P*, and the data config's
`format.punctuation`) and all whitespace removed. The two character streams must be equal; the
first difference is an error naming the alignment file, the record id and both words. Because
spaces are ignored, Chinese text matches whether the aligner gives characters or multi-character
words; an aligner word covering several timed tokens (a Chinese word, when timings are per
character) is split over them in proportion to characters, and a timed token covering several
aligner words (MFA splits `well-known`) spans from the first one's start to the last one's end.
A timed token with nothing left after normalisation (a lone `—`, a `「`) gets a zero-length time
at the previous token's end. Nothing else is converted: digits against spelled-out numbers, or
traditional against simplified characters, are mismatches.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path

from cslm_jax.data.formats import (
    FormatConfig,
    RecordError,
    detect_kind,
    parse_line,
    piece_is_timed,
    timed_tokens,
    validate_record,
)
from cslm_jax.errors import CslmError, DataError
from cslm_jax.storage import fs
from cslm_jax.storage.outputs import check_output_file

FORMATS = ("mfa", "whisperx", "ctc")
SILENCE = frozenset({"", "<eps>", "sil", "<sil>", "sp"})
WILDCARD = "<unk>"
# record kind -> (text field, language field, timings field)
TIMED_FIELDS = {
    "spoken_instruction": ("answer_text", "answer_lang", "answer_word_times"),
    "paired": ("text", "lang", "word_times"),
}


class AlignmentError(CslmError):
    """An alignment file cannot be read, or its words do not match the record's text."""


@dataclasses.dataclass(frozen=True)
class AlignedWord:
    """One item an aligner timed (a word, character or sentence); start/end None: untimed."""

    text: str
    start: float | None
    end: float | None
    coarse: bool = False  # a whole segment the aligner gave no word timings for


# -- readers ------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AlignmentError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AlignmentError(
            f"{path}: not UTF-8 or UTF-16 text ({e.reason} at byte {e.start})"
        ) from None


_TG_TOKEN = re.compile(
    r'"((?:[^"]|"")*)"'  # a string ("" is a quote)
    r"|<(exists|absent)>"  # a flag
    r"|(?<![\w.])([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![\w.])"  # a number
    r"|\[[^\]\n]*\]"  # item [1]: an index, skipped
    r"|!.*"
)  # a comment


def parse_textgrid(text: str, where: str) -> dict[str, list[tuple[float, float, str]]]:
    """Tiers of a Praat TextGrid in text form (long or short): {name: [(start, end, label)]};
    a point tier's points come as (time, time, label). Everything that is not a string, number
    or flag is layout (the long format's `xmin =` labels), as Praat itself reads the file."""
    tokens = []
    for m in _TG_TOKEN.finditer(text):
        if m.group(1) is not None:
            tokens.append(m.group(1).replace('""', '"'))
        elif m.group(2) is not None:
            tokens.append(m.group(2) == "exists")
        elif m.group(3) is not None:
            tokens.append(float(m.group(3)))
    pos = 0

    def take(kind, what):
        nonlocal pos
        if pos >= len(tokens):
            raise AlignmentError(f"{where}: TextGrid ends early (expected {what})")
        value = tokens[pos]
        ok = (
            isinstance(value, str)
            if kind is str
            else isinstance(value, bool)
            if kind is bool
            else isinstance(value, float) and not isinstance(value, bool)
        )
        if not ok:
            raise AlignmentError(
                f"{where}: TextGrid item {pos + 1}: expected {what}, got {value!r}"
            )
        pos += 1
        return value

    if (
        take(str, "the file type 'ooTextFile'").split()[:1] != ["ooTextFile"]
        or take(str, "the object class 'TextGrid'") != "TextGrid"
    ):
        raise AlignmentError(
            f"{where}: not a Praat TextGrid text file (binary TextGrids are not "
            f"read: save it as a text file)"
        )
    take(float, "xmin")
    take(float, "xmax")
    tiers: dict[str, list] = {}
    if not take(bool, "<exists> or <absent>"):
        return tiers
    for _ in range(int(take(float, "the number of tiers"))):
        cls = take(str, "a tier class")
        name = take(str, "a tier name")
        take(float, "tier xmin")
        take(float, "tier xmax")
        n = int(take(float, "the number of intervals"))
        items = []
        if cls == "IntervalTier":
            for _ in range(n):
                start, end = take(float, "interval xmin"), take(float, "interval xmax")
                items.append((start, end, take(str, "interval text")))
        elif cls == "TextTier":
            for _ in range(n):
                t = take(float, "point time")
                items.append((t, t, take(str, "point mark")))
        else:
            raise AlignmentError(f"{where}: tier {name!r} has unknown class {cls!r}")
        if name in tiers:
            raise AlignmentError(f"{where}: two tiers named {name!r}")
        tiers[name] = items
    return tiers


def words_tier(tiers: dict, where: str, tier: str | None = None) -> tuple[str, list]:
    """(name, intervals) of the words tier: `tier`, else the one named `words` or
    `<speaker> - words`."""
    if tier is not None:
        if tier not in tiers:
            raise AlignmentError(f"{where}: no tier {tier!r}; tiers: {list(tiers)}")
        return tier, tiers[tier]
    names = [n for n in tiers if n == "words" or n.endswith(" - words")]
    if len(names) != 1:
        raise AlignmentError(
            f"{where}: {'no' if not names else 'several'} words tier(s) "
            f"({names or list(tiers)}); pass --tier NAME"
        )
    return names[0], tiers[names[0]]


def mfa_words(text: str, where: str, tier: str | None = None) -> list[AlignedWord]:
    """The words of an MFA TextGrid's words tier, silences left out. A reversed interval (xmin
    after xmax), silent or not, is an error naming the tier and the interval."""
    out = []
    name, intervals = words_tier(parse_textgrid(text, where), where, tier)
    for i, (start, end, label) in enumerate(intervals, start=1):
        if end < start:
            raise AlignmentError(
                f"{where}: tier {name!r} interval {i} ({label.strip()!r}): xmax "
                f"{end:g} lies before xmin {start:g} (a reversed interval); "
                f"fix or realign the TextGrid"
            )
        label = label.strip()
        if label.lower() not in SILENCE:
            out.append(AlignedWord(label, start, end))
    return out


def _time(value, where: str, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AlignmentError(f"{where}: field '{field}' must be a number of seconds, got {value!r}")
    return None if math.isnan(value) else float(value)


def _word(item, where: str, field: str, text_key: str) -> AlignedWord:
    if not isinstance(item, dict) or not isinstance(item.get(text_key), str):
        raise AlignmentError(
            f"{where}: {field} must be an object with a string '{text_key}', got {item!r}"
        )
    start = _time(item.get("start"), where, f"{field}.start")
    end = _time(item.get("end"), where, f"{field}.end")
    if start is None or end is None:
        start = end = None
    elif end < start:
        raise AlignmentError(
            f"{where}: {field} ({item[text_key]!r}) ends at {end}s before it starts ({start}s)"
        )
    return AlignedWord(item[text_key], start, end)


def whisperx_words(data, where: str) -> list[AlignedWord]:
    """Words of a whisperX result: `segments[].words` when `segments` is present (a segment
    without words becomes one piece spanning it), else `word_segments` (or a bare list)."""
    if isinstance(data, list):
        return [_word(w, where, f"[{i}]", "word") for i, w in enumerate(data)]
    if not isinstance(data, dict):
        raise AlignmentError(f"{where}: a whisperX result must be a JSON object or list")
    if isinstance(data.get("segments"), list):
        out = []
        for i, seg in enumerate(data["segments"]):
            if not isinstance(seg, dict):
                raise AlignmentError(f"{where}: segments[{i}] must be an object")
            words = seg.get("words")
            if words:
                if not isinstance(words, list):
                    raise AlignmentError(f"{where}: segments[{i}].words must be a list")
                out += [
                    _word(w, where, f"segments[{i}].words[{j}]", "word")
                    for j, w in enumerate(words)
                ]
            elif isinstance(seg.get("text"), str) and seg["text"].strip():
                w = _word(seg, where, f"segments[{i}]", "text")
                out.append(dataclasses.replace(w, coarse=True))
        return out
    if isinstance(data.get("word_segments"), list):
        return [
            _word(w, where, f"word_segments[{i}]", "word")
            for i, w in enumerate(data["word_segments"])
        ]
    raise AlignmentError(f"{where}: no 'segments' or 'word_segments' (not a whisperX alignment)")


_CTC_LINE = re.compile(
    r"^\s*(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)-(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?): ?(.*)$"
)


def ctc_words(data, where: str) -> list[AlignedWord]:
    """Segments of a ctc-forced-aligner JSON result ({"text", "segments": [...]}). A result of
    another aligner's shape (no top-level `text`, or segments with `words`: whisperX's) is refused:
    its segments are not the items ctc-forced-aligner timed."""
    if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
        raise AlignmentError(f"{where}: no 'segments' list (not a ctc-forced-aligner result)")
    worded = next(
        (i for i, seg in enumerate(data["segments"]) if isinstance(seg, dict) and "words" in seg),
        None,
    )
    if worded is not None or "word_segments" in data or not isinstance(data.get("text"), str):
        why = (
            f"segments[{worded}] has 'words'"
            if worded is not None
            else "it has 'word_segments'"
            if "word_segments" in data
            else "it has no top-level 'text'"
        )
        raise AlignmentError(
            f"{where}: looks like whisperX output ({why}), not a "
            f"ctc-forced-aligner result (a top-level 'text' and segments of "
            f"start, end, text); pass --format whisperx"
        )
    out = []
    for i, seg in enumerate(data["segments"]):
        w = _word(seg, where, f"segments[{i}]", "text")
        if w.start is None:
            raise AlignmentError(f"{where}: segments[{i}] ({w.text!r}) has no start/end")
        out.append(w)
    return out


def ctc_text_words(text: str, where: str) -> list[AlignedWord]:
    """Segments of a ctc-forced-aligner text result (one `START-END: TEXT` line each)."""
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        m = _CTC_LINE.match(line)
        if not m:
            raise AlignmentError(f"{where}:{n}: expected 'START-END: TEXT', got {line!r}")
        start, end = float(m.group(1)), float(m.group(2))
        if end < start:
            raise AlignmentError(f"{where}:{n}: ends at {end}s before it starts ({start}s)")
        out.append(AlignedWord(m.group(3), start, end))
    return out


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AlignmentError(
            f"{where}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None


def read_alignment(path, fmt: str, tier: str | None = None) -> list[AlignedWord]:
    """The aligned words of one aligner output file."""
    path = Path(path)
    text = _read_text(path)
    if fmt != "mfa" and text.lstrip().startswith('File type = "ooTextFile'):
        raise AlignmentError(f"{path}: a Praat TextGrid, not {fmt} output; pass --format mfa")
    if fmt == "mfa":
        return mfa_words(text, str(path), tier)
    if fmt == "whisperx":
        return whisperx_words(_json(text, str(path)), str(path))
    if fmt == "ctc":
        if path.suffix.lower() == ".txt":
            return ctc_text_words(text, str(path))
        return ctc_words(_json(text, str(path)), str(path))
    raise AlignmentError(f"unknown alignment format {fmt!r}; formats: {FORMATS}")


SUFFIXES = {"mfa": (".textgrid",), "whisperx": (".json",), "ctc": (".json", ".txt")}


class Alignments:
    """Alignments by record id, from a folder or a file.

    A folder is searched recursively for the format's files (`.TextGrid`; `.json`; `.json` or
    `.txt`, the JSON preferred where ctc-forced-aligner wrote both); a record's id matches a
    file's path relative to the folder without its suffix (`spk1/utt1`, as MFA mirrors the
    corpus' speaker folders), else its name without suffix (`utt1`; two such files are an
    error). A `.jsonl` file holds one alignment per line with an `id` field (whisperx, ctc);
    any other file is one alignment whose id is its name without suffix.
    """

    def __init__(self, source, fmt: str, tier: str | None = None, id_field: str = "id"):
        if fmt not in FORMATS:
            raise AlignmentError(f"unknown alignment format {fmt!r}; formats: {FORMATS}")
        self.fmt, self.tier = fmt, tier
        self.source = Path(source)
        self.by_path: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = collections.defaultdict(list)
        self.inline: dict[str, tuple[str, list[AlignedWord]]] = {}
        self.used: set = set()
        if self.source.is_dir():
            found = sorted(
                p
                for p in self.source.rglob("*")
                if p.is_file() and p.suffix.lower() in SUFFIXES[fmt]
            )
            for p in found:
                key = p.relative_to(self.source).with_suffix("").as_posix()
                if key in self.by_path:  # ctc's .json and .txt of the same utterance
                    if p.suffix.lower() == ".json":
                        self.by_path[key] = p
                    continue
                self.by_path[key] = p
            for key, p in self.by_path.items():
                self.by_stem[key.rsplit("/", 1)[-1]].append(p)
        elif self.source.is_file() and self.source.suffix.lower() == ".jsonl":
            if fmt == "mfa":
                raise AlignmentError(
                    f"{source}: MFA alignments are TextGrid files; give one or a folder of them"
                )
            read = whisperx_words if fmt == "whisperx" else ctc_words
            for n, line in enumerate(_read_text(self.source).splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{source}:{n}"
                data = _json(line, where)
                key = data.get(id_field) if isinstance(data, dict) else None
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise AlignmentError(
                        f"{where}: field '{id_field}' missing (each line of an "
                        f"alignments JSONL names its record)"
                    )
                if str(key) in self.inline:
                    raise AlignmentError(
                        f"{where}: id {key!r} already aligned at {self.inline[str(key)][0]}"
                    )
                self.inline[str(key)] = (where, read(data, where))
        elif self.source.is_file():
            self.by_path[self.source.stem] = self.source
            self.by_stem[self.source.stem].append(self.source)
        else:
            raise AlignmentError(f"{source}: no such file or folder")

    def __len__(self) -> int:
        return len(self.inline) + len(self.by_path)

    def get(self, record_id: str) -> tuple[str, list[AlignedWord]] | None:
        """(where, words) of a record's alignment, None where there is none."""
        if record_id in self.inline:
            self.used.add(record_id)
            return self.inline[record_id]
        path = self.by_path.get(record_id)
        if path is None:
            paths = self.by_stem.get(record_id, [])
            if len(paths) > 1:
                raise AlignmentError(
                    f"record id {record_id!r} matches several alignment files: "
                    f"{', '.join(map(str, paths))}; name records by relative path"
                )
            path = paths[0] if paths else None
        if path is None:
            return None
        self.used.add(path)
        return str(path), read_alignment(path, self.fmt, self.tier)

    def unused(self) -> int:
        return len(self) - len(self.used)


# -- matching -----------------------------------------------------------------------------------


def normalise(text: str, punctuation: str = "") -> str:
    """NFKC, case folded, without punctuation (Unicode P*, and `punctuation`) or whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(
        c
        for c in text
        if not c.isspace() and c not in punctuation and not unicodedata.category(c).startswith("P")
    )


def fill_untimed(
    words: list[AlignedWord], duration: float, where: str, untimed: str = "interpolate"
) -> tuple[list[AlignedWord], int]:
    """Give untimed words times: each run of them shares the gap between its timed neighbours
    evenly (0 and `duration` at the edges). Returns (words, how many were untimed)."""
    missing = [i for i, w in enumerate(words) if w.start is None]
    if not missing:
        return words, 0
    if untimed == "error":
        w = words[missing[0]]
        raise AlignmentError(
            f"{where}: word {missing[0] + 1} {w.text!r} has no timing "
            f"({len(missing)} untimed); use --untimed interpolate"
        )
    if len(missing) == len(words):
        raise AlignmentError(f"{where}: no word has a timing")
    out = list(words)
    i = 0
    while i < len(out):
        if out[i].start is not None:
            i += 1
            continue
        j = i
        while j < len(out) and out[j].start is None:
            j += 1
        lo = out[i - 1].end if i > 0 else 0.0
        hi = out[j].start if j < len(out) else max(duration, lo)
        hi = max(hi, lo)
        step = (hi - lo) / (j - i)
        for k in range(i, j):
            out[k] = dataclasses.replace(
                out[k], start=lo + step * (k - i), end=lo + step * (k - i + 1)
            )
        i = j
    return out, len(missing)


def word_times(
    text: str, words: list[AlignedWord], chunk_unit: str, punctuation: str, where: str
) -> list[list[float]]:
    """[start, end] per timed token of `text` (formats.timed_tokens) from timed aligner words,
    matched as the module docstring says. AlignmentError at the first difference."""
    pieces = [
        p
        for p in timed_tokens(text, chunk_unit, punctuation)
        if piece_is_timed(p, chunk_unit, punctuation)
    ]
    norms = [normalise(p, punctuation) for p in pieces]
    # the answer as (character, token index), and each token's character times
    chars = [(c, i) for i, n in enumerate(norms) for c in n]
    spans: list[list] = [[] for _ in pieces]
    pos = 0

    def answer_word(at: int) -> str:
        i = chars[at][1]
        return f"answer {'word' if chunk_unit == 'word' else 'character'} {i + 1} {pieces[i]!r}"

    for j, w in enumerate(words):
        label = w.text.strip()
        if w.start is None:
            raise AlignmentError(
                f"{where}: aligner word {j + 1} {label!r} has no timing (fill_untimed gives it one)"
            )
        desc = f"aligner word {j + 1} {label!r} ({w.start:.3f}-{w.end:.3f}s)"
        if label.casefold() == WILDCARD:
            if chunk_unit != "word":
                raise AlignmentError(
                    f"{where}: {desc}: '<unk>' cannot be matched in a "
                    f"character language (how many characters it covers is "
                    f"unknown)"
                )
            if pos >= len(chars):
                raise AlignmentError(f"{where}: {desc} lies beyond the end of the answer text")
            if pos and chars[pos - 1][1] == chars[pos][1]:
                raise AlignmentError(f"{where}: {desc} starts inside {answer_word(pos)}")
            i = chars[pos][1]
            spans[i].append((w.start, w.end))
            pos += len(norms[i])
            continue
        n = normalise(label, punctuation)
        for k, c in enumerate(n):
            if pos >= len(chars):
                raise AlignmentError(
                    f"{where}: {desc} lies beyond the end of the answer text (normalised: "
                    f"NFKC, case folded, punctuation and spaces removed)"
                )
            if chars[pos][0] != c:
                raise AlignmentError(
                    f"{where}: {desc} does not match {answer_word(pos)} (normalised: NFKC, "
                    f"case folded, punctuation and spaces removed: {n!r} vs "
                    f"{norms[chars[pos][1]]!r})"
                )
            step = (w.end - w.start) / len(n)
            spans[chars[pos][1]].append((w.start + step * k, w.start + step * (k + 1)))
            pos += 1
    if pos < len(chars):
        raise AlignmentError(
            f"{where}: the alignment ends before {answer_word(pos)} (and "
            f"{len({i for _, i in chars[pos:]}) - 1} more); it has "
            f"{len(words)} words"
        )
    times: list[list[float]] = []
    first = next((s[0][0] for s in spans if s), 0.0)
    for s in spans:
        if s:
            start, end = min(a for a, _ in s), max(b for _, b in s)
        else:  # nothing to align (a lone dash): zero length, in place
            start = end = times[-1][1] if times else first
        times.append([round(start, 4), round(end, 4)])
    return times


# -- joining ------------------------------------------------------------------------------------


def _write_lines_atomic(out: Path, lines: Iterator[str], force: bool) -> None:
    check_output_file(out, force, flag="--out")  # again: it may have appeared since
    out.parent.mkdir(parents=True, exist_ok=True)
    with fs.atomic_open(out, "w", tmp_name=lambda name: f".{name}.tmp-{uuid.uuid4().hex[:8]}") as f:
        for line in lines:
            f.write(line)


def join_timings(
    records,
    alignments,
    fmt: str,
    out,
    cfg: FormatConfig,
    *,
    id_field: str = "id",
    tier: str | None = None,
    allow_missing: bool = False,
    skip_bad: bool = False,
    untimed: str = "interpolate",
    force: bool = False,
    log=print,
) -> dict:
    """Write `records` (JSONL of spoken_instruction or paired records) to `out` with the timings
    field (`answer_word_times`, `word_times`) filled from `alignments` (a folder or file of
    `fmt` aligner output), matched by `id_field`. Every written record validates.

    Strict by default: a record without an alignment, or whose alignment does not match its
    text, stops the command with an error naming the files, record id and word; with
    `allow_missing` / `skip_bad` such records are counted and left out (the first few named).
    The output appears only when complete (written to a temporary file, then renamed).
    """
    records, out = Path(records), Path(out)
    check_output_file(
        out, force, inputs=[("--records", records), ("--alignments", alignments)], flag="--out"
    )  # before any aligner file is read
    index = Alignments(alignments, fmt, tier, id_field)
    counts = collections.Counter(
        records=0, joined=0, missing=0, bad=0, untimed_words=0, coarse_segments=0, replaced=0
    )
    missing_ids: list[str] = []
    bad: list[str] = []
    seen: dict[str, str] = {}

    def lines():
        try:
            f = open(records, "rb")
        except OSError as e:
            raise DataError(f"{records}: cannot read: {e.strerror or e}") from None
        with f:
            for n, raw in enumerate(f, start=1):
                where = f"{records}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text ({e.reason})") from None
                if not line.strip():
                    continue
                record = parse_line(line, where)
                counts["records"] += 1
                kind = detect_kind(record)
                if kind not in TIMED_FIELDS:
                    raise RecordError(
                        where,
                        "<kind>",
                        f"is a {kind or 'unknown'} record; "
                        f"timings join spoken_instruction and paired records",
                    )
                text_field, lang_field, times_field = TIMED_FIELDS[kind]
                rid = record.get(id_field)
                if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                    raise RecordError(
                        where,
                        id_field,
                        "missing: records are joined to their alignments by id (--id-field)",
                    )
                rid = str(rid)
                if rid in seen:
                    raise RecordError(
                        where, id_field, f"id {rid!r} is used twice (first at {seen[rid]})"
                    )
                seen[rid] = where
                found = index.get(rid)
                if found is None:
                    if not allow_missing:
                        raise AlignmentError(
                            f"{where}: record {rid!r} has no alignment in "
                            f"{alignments}; pass --allow-missing to skip such "
                            f"records"
                        )
                    counts["missing"] += 1
                    missing_ids.append(rid)
                    continue
                align_where, words = found
                try:
                    units_field = "answer_units" if kind == "spoken_instruction" else "units"
                    units = record.get(units_field)
                    lang = cfg.lang(record.get(lang_field), where, lang_field)
                    if not isinstance(record.get(text_field), str):
                        raise RecordError(where, text_field, "must be a string")
                    duration = len(units) / cfg.unit_rate if isinstance(units, list) else 0.0
                    label = f"{align_where}: record {rid!r} ({where})"
                    words, n_untimed = fill_untimed(words, duration, label, untimed)
                    times = word_times(
                        record[text_field], words, lang.chunk_unit, cfg.punctuation, label
                    )
                    joined = dict(record)
                    counts["replaced"] += times_field in record
                    joined[times_field] = times
                    validate_record(kind, joined, cfg, where)
                except (AlignmentError, RecordError) as e:
                    if not skip_bad:
                        raise
                    counts["bad"] += 1
                    bad.append(str(e))
                    continue
                counts["joined"] += 1
                counts["untimed_words"] += n_untimed
                counts["coarse_segments"] += sum(w.coarse for w in words)
                yield json.dumps(joined, ensure_ascii=False) + "\n"

    _write_lines_atomic(out, lines(), force)
    counts["unused_alignments"] = index.unused()
    log(
        f"join-timings: {counts['joined']} of {counts['records']} record(s) joined to {fmt} "
        f"timings -> {out}; {counts['missing']} without alignment, {counts['bad']} bad, "
        f"{counts['untimed_words']} untimed word(s) interpolated, {counts['coarse_segments']} "
        f"segment(s) without word timings spread over their characters, "
        f"{counts['unused_alignments']} alignment(s) unused"
    )
    for rid in missing_ids[:5]:
        log(f"  no alignment: {rid}")
    for msg in bad[:5]:
        log(f"  skipped: {msg}")
    return dict(counts, missing_ids=missing_ids, bad_messages=bad)
