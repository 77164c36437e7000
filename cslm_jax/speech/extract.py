"""Speech units from audio at corpus scale (`cslm-jax extract-units`).

A manifest (`cslm_jax.data.audio.index_manifest`), or a TFDS dataset split (`TfdsAudio`: its
examples' audio is read from the dataset, in its order), is cut into fixed shards of `shard_size`
lines.
Each shard's audio is read by a pool of threads (soundfile + soxr, ahead of the device), sorted
by length and cut into batches padded to a few bucket lengths, so that a handful of compiled
shapes serve the whole corpus; each batch runs through the speech tokenizer, data-parallel over
this host's devices. The shard's records are written in manifest order, as JSONL in the formats
the data config reads:

  {"audio": A, "lang", "text", ...}                      -> paired record + "units"
  {"question_audio": Q, "answer_audio": A, ...}          -> spoken_instruction record +
                                                            "question_units" / "answer_units"

Units are the tokenizer's raw codes (before repeat merging, which the data config does). Every
other field of the manifest line is passed on unchanged.

Output folder (--out):
  extract.json                         what is extracted: manifest checksum, tokenizer, options
  units-SSSSS-of-NNNNN.jsonl           one shard's records (written atomically; none for a
                                       shard whose every line was skipped)
  units-SSSSS-of-NNNNN.done.json       the shard's completion marker: counts, skipped files
  skipped.jsonl                        every skipped line / file and why (at the end)
  COMPLETE.json                        the final marker and summary, once every shard is done

A killed run, rerun with the same command, keeps the finished shards and redoes the others; a
finished one is reported and not redone. With several processes (a multi-host job), each takes
its share of the shards not done yet; the last to finish writes the final marker.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from cslm_jax.data.audio import (
    AUDIO_FIELDS,
    SAMPLE_RATE,
    AudioError,
    ManifestEntry,
    TfdsAudio,
    array_audio,
    array_seconds,
    index_manifest,
    load_audio,
    probe_seconds,
)
from cslm_jax.errors import CslmError, OutputExistsError
from cslm_jax.speech.units import EXTRACTION_FILE
from cslm_jax.storage import fs
from cslm_jax.storage.outputs import OutputPathError, check_output_place

FORMAT = "cslm_jax.extract_units/1"
PLAN_FILE = EXTRACTION_FILE
COMPLETE_FILE = "COMPLETE.json"
SKIPPED_FILE = "skipped.jsonl"
MAX_SECONDS = 30.0  # the tokenizer's window; longer audio is windowed or refused
LONG_SAMPLES = 3001 * 160  # from here on, more than the window's 3000 mel frames of 10 ms
DEFAULT_BUCKETS = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0)
ON_BAD = ("strict", "skip")
LONG_AUDIO = ("window", "refuse")


class ExtractError(CslmError):
    """Extraction stopped on bad input (strict mode), or the output folder cannot be used."""


class Encoder(Protocol):
    """What extraction needs from a speech tokenizer."""

    version: str
    codebook_size: int
    units_per_second: float
    sample_rate: int
    batch_multiple: int  # batch rows must be a multiple of this (the local devices)
    min_samples: int  # shorter audio cannot be tokenized (a bad file)
    # True where the encoder packs valid frames (CPUs): padded rows and samples then cost
    # little but attention, so batches are cut to their rows and longest utterance (a
    # compiled shape per packed size anyway) instead of the bucket's full shape
    packs: bool

    def __call__(self, waves: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        """waves [B, N] float32 (zero-padded), lengths [B] -> the codes of each row."""


@dataclasses.dataclass(frozen=True)
class Options:
    batch_size: int = 32
    on_bad: str = "strict"
    long_audio: str = "window"
    shard_size: int = 1000
    lang: str | None = None  # fills a paired record's missing `lang`
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    workers: int = 4  # threads reading audio
    progress: bool = True

    def __post_init__(self):
        if self.on_bad not in ON_BAD:
            raise ExtractError(f"--on-bad must be one of {ON_BAD}, got {self.on_bad!r}")
        if self.long_audio not in LONG_AUDIO:
            raise ExtractError(f"--long-audio must be one of {LONG_AUDIO}, got {self.long_audio!r}")
        if self.batch_size < 1 or self.shard_size < 1 or self.workers < 1:
            raise ExtractError("--batch-size, --shard-size and --workers must be >= 1")
        if (
            not self.buckets
            or any(b <= 0 for b in self.buckets)
            or list(self.buckets) != sorted(set(self.buckets))
        ):
            raise ExtractError(
                f"--buckets must be increasing positive seconds, got {list(self.buckets)}"
            )


# -- shapes ---------------------------------------------------------------------------------------


def bucket_length(samples: int, buckets: Sequence[float], sample_rate: int = SAMPLE_RATE) -> int:
    """The padded length (samples) of a batch whose longest row has `samples`: the first bucket
    that holds it; past the last bucket, a multiple of the last bucket."""
    for b in buckets:
        if samples <= round(b * sample_rate):
            return int(round(b * sample_rate))
    step = int(round(buckets[-1] * sample_rate))
    return int(math.ceil(samples / step) * step)


def batch_rows(padded: int, batch_size: int, multiple: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Rows of a batch padded to `padded` samples: `batch_size` up to 30 s, fewer for longer
    (about the same number of samples), always a multiple of the devices."""
    rows = batch_size
    limit = MAX_SECONDS * sample_rate
    if padded > limit:
        rows = max(1, int(batch_size * limit // padded))
    return int(math.ceil(rows / multiple) * multiple)


# -- the output folder ----------------------------------------------------------------------------


def shard_name(index: int, count: int) -> str:
    return f"units-{index:05d}-of-{count:05d}.jsonl"


def marker_name(index: int, count: int) -> str:
    return f"units-{index:05d}-of-{count:05d}.done.json"


_OWN = re.compile(
    r"(extract\.json|COMPLETE\.json|skipped\.jsonl|"
    r"units-\d{5,}-of-\d{5,}\.(jsonl|done\.json)|"
    r"\.(extract\.json|COMPLETE\.json|skipped\.jsonl|units-\d{5,}-of-\d{5,}\."
    r"(jsonl|done\.json))\.partial-[0-9a-f]{8})"
)


def own_file(name: str) -> bool:
    """A name extract-units writes in its output folder (what `--force` may remove)."""
    return _OWN.fullmatch(name) is not None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden sibling, then rename it over `path`: readers see the old file or
    the whole new one, never a part. In a bucket one object upload is that already."""
    fs.write_text_atomic(
        path, text, tmp_name=lambda name: f".{name}.partial-{uuid.uuid4().hex[:8]}"
    )


def identity(
    *,
    manifest_sha256: str,
    manifest_lines: int,
    encoder: Encoder,
    tokenizer_dir: str | Path,
    opts: Options,
) -> dict:
    """What makes two runs the same extraction (and so resumable into one folder)."""
    return {
        "format": FORMAT,
        "manifest_sha256": manifest_sha256,
        "manifest_entries": manifest_lines,
        "shard_size": opts.shard_size,
        "num_shards": max(1, math.ceil(manifest_lines / opts.shard_size)),
        "tokenizer": {
            "sha256": tokenizer_fingerprint(tokenizer_dir),
            "version": encoder.version,
            "codebook_size": int(encoder.codebook_size),
            "units_per_second": float(encoder.units_per_second),
            "precision": getattr(encoder, "precision", None),
        },
        "long_audio": opts.long_audio,
        "lang": opts.lang,
    }


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """A checksum of the tokenizer folder's files (names and contents): the same weights
    resume an extraction wherever the folder lies; other weights do not."""
    import hashlib

    h = hashlib.sha256()
    root = Path(tokenizer_dir)
    for path in sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def check_out(out, force: bool, inputs=()) -> set[str]:
    """`--out` apart from every input, a folder (or creatable), and under `force` holding only
    files extract-units writes; returns the names it holds."""
    out = check_output_place(out, inputs=inputs, flag="--out")
    names = fs.listdir(out)
    foreign = sorted(n for n in names if not own_file(n))
    if force and foreign:
        raise OutputPathError(
            f"--out {out}: --force removes only the files extract-units "
            f"writes, and it holds others: {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}; move them away or give "
            f"another --out (nothing was deleted)"
        )
    return names


def prepare_output(
    out: Path, ident: dict, manifest: str, force: bool, tokenizer_dir: str = "", inputs=()
) -> str:
    """Make `out` ready for `ident` (process 0 only). Returns 'new', 'resume' or 'complete'.

    An empty or missing folder starts a new extraction. A folder holding the same extraction
    resumes it (or is complete); one holding the plan of another extraction that wrote no shard
    yet (a strict run stopped by bad input) is started again. Anything else is refused unless
    `force`, which removes the files extract-units writes (`own_file`) and starts over; a folder
    holding other files is refused even then, and so is one that is, holds or lies inside an
    input (`inputs`, (flag, path) pairs; `storage.outputs`)."""
    names = check_out(out, force, inputs)
    plan = out / PLAN_FILE
    state = "new"
    shards_there = any(n.startswith("units-") and own_file(n) for n in names)
    if plan.is_file() and not force:
        try:
            old = json.loads(plan.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OutputExistsError(
                f"{plan}: unreadable ({e}); pass --force to start over"
            ) from None
        diffs = [k for k in ident if old.get(k) != ident[k]]
        if diffs and shards_there:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {ident[k]!r} now" for k in diffs)
            raise OutputExistsError(
                f"{out} holds another extraction ({shown}); rerunning the same command resumes "
                f"an extraction, so give another --out, or pass --force to discard it and start "
                f"over"
            )
        if not diffs:
            state = "complete" if (out / COMPLETE_FILE).is_file() else "resume"
    elif names and not force:
        raise OutputExistsError(
            f"{out} exists, is not empty and holds no extraction "
            f"({PLAN_FILE}); give another --out, or pass --force to "
            f"discard its contents"
        )
    if state == "new":
        for name in sorted(names):  # --force, or a plan that wrote no shard
            if own_file(name):
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not fs.is_remote(out):
        for stale in out.glob(".*.partial-*"):  # a killed run's unfinished writes
            if own_file(stale.name):
                stale.unlink(missing_ok=True)
    if state == "new":
        write_atomic(
            plan,
            json.dumps(
                {**ident, "manifest": str(manifest), "tokenizer_dir": str(tokenizer_dir)}, indent=2
            )
            + "\n",
        )
    return state


def done_shards(out: Path, count: int) -> set[int]:
    """Shards with their marker and records file (a shard whose every line was skipped has
    no records file: its marker says 0 records)."""
    names = fs.listdir(out)  # one listing (a bucket: one request, not 2N)
    done = set()
    for i in range(count):
        if marker_name(i, count) in names:
            if shard_name(i, count) in names or _marker(out, i, count).get("records") == 0:
                done.add(i)
    return done


def _marker(out: Path, i: int, count: int) -> dict:
    try:
        return json.loads((out / marker_name(i, count)).read_text())
    except (OSError, ValueError):
        return {}


# -- one shard ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Item:
    entry: int  # index of the entry in the shard
    field: str  # audio | question_audio | answer_audio
    path: str  # a file, or a label for audio held in memory (TFDS)
    seconds: float = 0.0
    array: tuple | None = None  # (samples or encoded bytes, rate) for audio held in memory


@dataclasses.dataclass
class ShardResult:
    records: list[dict]
    skipped: list[dict]
    files: int = 0
    audio_seconds: float = 0.0


class _Failures:
    """Bad input: strict mode stops at the first; skip mode keeps one reason per manifest line."""

    def __init__(self, strict: bool):
        self.strict, self.by_entry = strict, {}

    def add(self, entry: int, where: str, field: str, path: str | None, reason: str) -> None:
        if self.strict:
            what = f"{path}: {reason}" if path else reason
            raise ExtractError(
                f"{where}: field '{field}': {what} (--on-bad skip counts and "
                f"lists such lines instead of stopping)"
            )
        self.by_entry.setdefault(
            entry, {"where": where, "field": field, "audio": path, "reason": reason}
        )


def _probe(item: _Item):
    try:
        if item.array is not None:
            return array_seconds(item.array[0], item.array[1], item.path)
        return probe_seconds(item.path)
    except AudioError as e:
        return e


def _load(item: _Item, sample_rate: int):
    try:
        if item.array is not None:
            return array_audio(item.array[0], item.array[1], item.path, sample_rate)
        return load_audio(item.path, sample_rate)
    except AudioError as e:
        return e


def extract_shard(
    entries: Sequence[ManifestEntry],
    encoder: Encoder,
    opts: Options,
    pool: cf.Executor,
    *,
    fmt=None,
    on_batch: Callable[[int, float], None] | None = None,
) -> ShardResult:
    """The records of one shard of the manifest, in manifest order, and the lines skipped."""
    fail = _Failures(opts.on_bad == "strict")
    sr = encoder.sample_rate
    items: list[_Item] = []
    for k, e in enumerate(entries):
        if e.error is not None:
            fail.add(k, e.where, "<line>", None, e.error)
            continue
        items.extend(_Item(k, f, p, array=(e.arrays or {}).get(f)) for f, p in e.audio.items())
    # headers first: durations for the batches, and missing / unreadable files found early
    usable = []
    for item, seconds in zip(items, pool.map(_probe, items)):
        if isinstance(seconds, AudioError):
            fail.add(item.entry, entries[item.entry].where, item.field, item.path, seconds.reason)
        elif seconds * sr >= LONG_SAMPLES * sr // SAMPLE_RATE and opts.long_audio == "refuse":
            fail.add(
                item.entry,
                entries[item.entry].where,
                item.field,
                item.path,
                f"{seconds:.1f} s is longer than {MAX_SECONDS:.0f} s (--long-audio refuse; "
                f"'window' tokenizes it in overlapping windows)",
            )
        else:
            item.seconds = seconds
            usable.append(item)
    batches = _plan_batches([i for i in usable if i.entry not in fail.by_entry], encoder, opts)
    codes: dict[tuple[int, str], list[int]] = {}
    result = ShardResult([], [])

    def submit(batch):
        return [pool.submit(_load, item, sr) for item in batch]

    ahead = [submit(b) for b in batches[:2]]
    for n, batch in enumerate(batches):
        loaded = [f.result() for f in ahead.pop(0)]
        if n + 2 < len(batches):
            ahead.append(submit(batches[n + 2]))
        rows, waves = [], []
        for item, wave in zip(batch, loaded):
            where = entries[item.entry].where
            if isinstance(wave, AudioError):
                fail.add(item.entry, where, item.field, item.path, wave.reason)
            elif len(wave) >= LONG_SAMPLES * sr // SAMPLE_RATE and opts.long_audio == "refuse":
                fail.add(
                    item.entry,
                    where,
                    item.field,
                    item.path,
                    f"{len(wave) / sr:.1f} s is longer than {MAX_SECONDS:.0f} s "
                    f"(--long-audio refuse)",
                )
            elif len(wave) < getattr(encoder, "min_samples", 1):
                fail.add(
                    item.entry,
                    where,
                    item.field,
                    item.path,
                    f"too short: {len(wave)} samples at {sr} Hz (the tokenizer needs at "
                    f"least {encoder.min_samples})",
                )
            elif item.entry not in fail.by_entry:
                rows.append(item)
                waves.append(wave)
        if rows:
            out = _encode(encoder, waves, opts)
            for item, wave, c in zip(rows, waves, out):
                if len(c) == 0:
                    fail.add(
                        item.entry,
                        entries[item.entry].where,
                        item.field,
                        item.path,
                        f"too short: {len(wave)} samples give no units",
                    )
                    continue
                if c.min() < 0 or c.max() >= encoder.codebook_size:  # a bug, not bad input
                    raise RuntimeError(
                        f"{item.path}: the tokenizer returned a code outside "
                        f"0..{encoder.codebook_size - 1}"
                    )
                codes[(item.entry, item.field)] = [int(u) for u in c]
                result.files += 1
                result.audio_seconds += len(wave) / sr
        if on_batch is not None:  # progress in manifest lines (s2s lines have 2 files)
            on_batch(
                sum(1 / len(entries[i.entry].audio) for i in batch), sum(len(w) for w in waves) / sr
            )
    for k, e in enumerate(entries):
        if k in fail.by_entry:
            continue
        record = _record(e, codes, k, opts)
        if fmt is not None:
            from cslm_jax.data.formats import RecordError, detect_kind, validate_record

            try:
                validate_record(detect_kind(record), record, fmt, e.where)
            except RecordError as err:
                fail.add(
                    k,
                    e.where,
                    err.field,
                    None,
                    f"the output record would not validate: {str(err).split(': ', 2)[-1]}",
                )
                continue
        result.records.append(record)
    result.skipped = [fail.by_entry[k] for k in sorted(fail.by_entry)]
    return result


def _plan_batches(items: list[_Item], encoder: Encoder, opts: Options) -> list[list[_Item]]:
    """Items sorted by length, grouped by bucket, cut into batches of that bucket's rows."""
    sr = encoder.sample_rate
    groups: dict[int, list[_Item]] = {}
    for item in sorted(items, key=lambda i: (i.seconds, i.entry, i.field)):
        groups.setdefault(
            bucket_length(int(math.ceil(item.seconds * sr)), opts.buckets, sr), []
        ).append(item)
    batches = []
    for padded, group in sorted(groups.items()):
        rows = batch_rows(padded, opts.batch_size, encoder.batch_multiple, sr)
        batches.extend(group[i : i + rows] for i in range(0, len(group), rows))
    return batches


def _encode(encoder: Encoder, waves: list[np.ndarray], opts: Options) -> list[np.ndarray]:
    """Pad a batch to its bucket (rows and samples) and run it; the codes of the real rows."""
    sr = encoder.sample_rate
    longest = max(len(w) for w in waves)
    padded = bucket_length(longest, opts.buckets, sr)
    rows = batch_rows(padded, opts.batch_size, encoder.batch_multiple, sr)
    enough = int(math.ceil(len(waves) / encoder.batch_multiple) * encoder.batch_multiple)
    rows = max(rows, enough)
    if getattr(encoder, "packs", False) and padded <= MAX_SECONDS * sr:
        # packed: no filler rows past the devices' multiple, samples to the next whole second
        rows, padded = enough, min(padded, int(math.ceil(longest / sr) * sr))
    batch = np.zeros((rows, padded), np.float32)
    # filler rows: the shortest silence the tokenizer takes (one window if the batch is long);
    # their codes are dropped
    lengths = np.full(rows, max(getattr(encoder, "min_samples", 1), 1), np.int32)
    for r, w in enumerate(waves):
        batch[r, : len(w)] = w
        lengths[r] = len(w)
    out = encoder(batch, lengths)
    return [np.asarray(c) for c in out[: len(waves)]]


def _record(e: ManifestEntry, codes: dict, k: int, opts: Options) -> dict:
    record = dict(e.record)
    for field in e.audio:
        record[AUDIO_FIELDS[field]] = codes[(k, field)]
    if "audio" in e.audio and opts.lang is not None and "lang" not in record:
        record["lang"] = opts.lang
    return record


# -- the whole extraction -------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    state: str  # done | complete (found finished, nothing redone)
    complete: bool  # every shard is done (others may still be running)
    out: Path
    records: int
    skipped: int
    files: int
    audio_seconds: float
    wall_seconds: float  # this process's extraction time
    shards_done_here: list[int]
    shards: list[str]
    untexted: int = 0  # paired records without text or lang
    units: int = 0  # units in every record's unit fields
    unit_runs: int = 0  # the same after merging repeats

    def lines(self) -> list[str]:
        head = (
            "already complete: nothing redone"
            if self.state == "complete"
            else f"{len(self.shards_done_here)} shard(s) extracted here"
            + ("" if self.complete else "; other processes are still extracting theirs")
        )
        lines = [
            f"extract-units: {self.out}: {head}; {self.records} record(s) in "
            f"{len(self.shards)} shard(s), {self.skipped} line(s) skipped"
            + (f" (listed in {self.out / SKIPPED_FILE})" if self.skipped else "")
        ]
        if self.wall_seconds > 0 and self.audio_seconds > 0:
            lines.append(
                f"extract-units: {self.files} audio file(s), "
                f"{self.audio_seconds / 3600:.3f} h of audio in {self.wall_seconds:.1f} s: "
                f"{self.audio_seconds / 3600 / self.wall_seconds:.4f} h of audio/s, "
                f"real-time factor {self.wall_seconds / self.audio_seconds:.4f}"
            )
        if self.unit_runs:
            lines.append(
                f"extract-units: {self.units} units, {self.unit_runs} after merging "
                f"repeats: mean run length {self.units / self.unit_runs:.4f} (set "
                f"format.speech_rate to it in the data config so that synthesis gives "
                f"merged units their natural duration)"
            )
        if self.untexted:
            lines.append(
                f"extract-units: {self.untexted} record(s) without 'text' or 'lang' "
                f"(units only): they do not validate as paired records until both "
                f"are added (--lang sets a default language)"
            )
        return lines


def extract(
    manifest,
    out: str | Path,
    encoder: Encoder,
    *,
    tokenizer_dir: str | Path,
    opts: Options = Options(),
    force: bool = False,
    fmt=None,
    log: Callable[[str], None] = print,
    tokenizer_source: str | None = None,
) -> Summary:
    """Extract the units of `manifest` (a manifest file, local or gs://, or a
    `cslm_jax.data.audio.TfdsAudio` dataset split) into `out` (local or gs://) with `encoder`
    (see the module docstring); `tokenizer_dir` is the tokenizer's local folder (its files are
    the extraction's identity), `tokenizer_source` where it came from, if elsewhere (recorded).
    Multi-process: every process calls this with the same arguments after joining the job."""
    import jax

    from cslm_jax.parallel.distributed import any_process, barrier, check_shared_dir, run_together

    tfds_source = isinstance(manifest, TfdsAudio)
    if not tfds_source:
        manifest = fs.path(manifest, "--manifest")  # local (absolute) or gs://
    out = fs.path(out, "--out")  # local (absolute) or gs://
    if fmt is not None and fmt.unit_count != encoder.codebook_size:
        raise ExtractError(
            f"the data config's format.unit_count is {fmt.unit_count} but the "
            f"tokenizer ({encoder.version}) has {encoder.codebook_size} codes"
        )
    proc, count = jax.process_index(), jax.process_count()

    def read_inputs():  # every process reads the manifest and the tokenizer folder itself
        index = (
            manifest.index(opts.shard_size)
            if tfds_source
            else index_manifest(manifest, opts.shard_size)
        )
        return index, identity(
            manifest_sha256=index.sha256,
            manifest_lines=index.entries,
            encoder=encoder,
            tokenizer_dir=tokenizer_dir,
            opts=opts,
        )

    index, ident = run_together(
        read_inputs,
        ExtractError(
            f"{manifest}: another process of this job cannot read the manifest (its log says why)"
        ),
    )
    inputs = [("--tokenizer", tokenizer_source or tokenizer_dir), ("--tokenizer", tokenizer_dir)]
    if not tfds_source:
        inputs.append(("--manifest", manifest))
    elif manifest.data_dir:
        inputs.append(("--tfds-data-dir", manifest.data_dir))
    run_together(
        lambda: prepare_output(
            out,
            ident,
            str(manifest),
            force,
            tokenizer_source or str(Path(tokenizer_dir).resolve()),
            inputs,
        ),
        ExtractError(f"{out}: process 0 could not prepare the output folder (its log says why)"),
        only_primary=True,
    )
    check_shared_dir(out)
    plan = json.loads((out / PLAN_FILE).read_text())
    mismatch = any(plan.get(k) != v for k, v in ident.items())
    if any_process(mismatch):
        raise ExtractError(
            f"{out}: the processes of this job were given different manifests, "
            f"tokenizers or options"
        )
    num = ident["num_shards"]
    done = done_shards(out, num)
    barrier("cslm_jax: extract-units shards listed")
    pending = [i for i in range(num) if i not in done]
    mine = pending[proc::count]

    start = time.perf_counter()
    files = audio = 0.0
    done_lines = 0
    size = opts.shard_size
    bar = None
    where = f" [process {proc}]" if count > 1 else ""
    if opts.progress and mine and sys.stderr.isatty():
        from tqdm import tqdm

        total = sum(min(size, index.entries - i * size) for i in mine)
        bar = tqdm(
            total=total,
            unit="line",
            dynamic_ncols=True,
            file=sys.stderr,
            desc=f"extract-units{where}",
        )
    seen = {"audio": 0.0}

    def rate() -> str:
        wall = max(time.perf_counter() - start, 1e-9)
        return (
            f"{seen['audio'] / 3600 / wall:.4f} h audio/s, RTF "
            f"{wall / max(seen['audio'], 1e-9):.4f}"
        )

    def on_batch(n: float, seconds: float) -> None:
        seen["audio"] += seconds
        if bar is not None:
            bar.update(n)
            bar.set_postfix_str(rate(), refresh=False)

    try:
        with cf.ThreadPoolExecutor(opts.workers) as pool:
            for here, i in enumerate(mine, start=1):
                t0 = time.perf_counter()
                lines = index.read(i, strict=opts.on_bad == "strict")
                res = extract_shard(lines, encoder, opts, pool, fmt=fmt, on_batch=on_batch)
                units, runs = unit_runs(res.records)
                if res.records:  # an empty JSONL file is refused by every reader
                    write_atomic(
                        out / shard_name(i, num),
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res.records),
                    )
                write_atomic(
                    out / marker_name(i, num),
                    json.dumps(
                        {
                            "shard": i,
                            "lines": [lines[0].line, lines[-1].line],
                            "records": len(res.records),
                            "skipped": res.skipped,
                            "files": res.files,
                            "audio_seconds": res.audio_seconds,
                            "untexted": _untexted(res.records),
                            "units": units,
                            "unit_runs": runs,
                            "seconds": time.perf_counter() - t0,
                            "process": proc,
                        }
                    )
                    + "\n",
                )
                files += res.files
                audio += res.audio_seconds
                done_lines += len(lines)
                if bar is not None:  # skipped lines too: the bar ends on the shard
                    bar.n = done_lines
                    bar.refresh()
                elif opts.progress:  # not a terminal (a log file): a line per shard
                    log(
                        f"extract-units{where}: shard {i + 1}/{num} written "
                        f"({here}/{len(mine)} here, "
                        f"{len(res.records)} records, {len(res.skipped)} skipped): {rate()}"
                    )
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start if mine else 0.0
    return _finish(
        out,
        num,
        ident,
        state="complete" if not pending else "done",
        here=mine,
        files=int(files),
        audio=audio,
        wall=wall,
    )


def _untexted(records: list[dict]) -> int:
    return sum(1 for r in records if "units" in r and not (r.get("text") and r.get("lang")))


def unit_runs(records: list[dict]) -> tuple[int, int]:
    """(units, runs of repeated units) over every unit field of `records`: units / runs is the
    mean run length, the factor by which merging repeats (`format.merge_repeats`) shortens the
    stream, and so the speech rate (`format.speech_rate`) that synthesis needs to give merged
    units their natural duration."""
    units = runs = 0
    for r in records:
        for field in AUDIO_FIELDS.values():
            u = r.get(field)
            if u is not None and len(u):
                units += len(u)
                runs += 1 + sum(1 for a, b in zip(u[:-1], u[1:]) if a != b)
    return units, runs


def _finish(
    out: Path,
    num: int,
    ident: dict,
    *,
    state: str,
    here: list[int],
    files: int,
    audio: float,
    wall: float,
) -> Summary:
    """Once every shard is done (this process may not be the last): the skipped report and the
    final marker. Their content comes from the shard markers alone, so whichever process
    writes them writes the same."""
    markers = {}
    for i in range(num):
        try:
            markers[i] = json.loads((out / marker_name(i, num)).read_text())
        except FileNotFoundError:
            pass
    shards = [shard_name(i, num) for i in range(num) if markers.get(i, {}).get("records") != 0]
    records = sum(m["records"] for m in markers.values())
    skipped = [s for i in sorted(markers) for s in markers[i]["skipped"]]
    untexted = sum(m.get("untexted", 0) for m in markers.values())
    units = sum(m.get("units", 0) for m in markers.values())
    runs = sum(m.get("unit_runs", 0) for m in markers.values())
    if len(markers) == num and not (out / COMPLETE_FILE).is_file():
        write_atomic(
            out / SKIPPED_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
        )
        write_atomic(
            out / COMPLETE_FILE,
            json.dumps(
                {
                    "format": FORMAT,
                    "records": records,
                    "skipped": len(skipped),
                    "files": sum(m["files"] for m in markers.values()),
                    "audio_hours": sum(m["audio_seconds"] for m in markers.values()) / 3600,
                    "untexted": untexted,
                    "units": units,
                    "unit_runs": runs,
                    "mean_run_length": round(units / runs, 4) if runs else None,
                    "shards": shards,
                    "skipped_report": SKIPPED_FILE,
                    "tokenizer": ident["tokenizer"],
                },
                indent=2,
            )
            + "\n",
        )
    return Summary(
        state=state,
        complete=len(markers) == num,
        out=out,
        records=records,
        skipped=len(skipped),
        files=files,
        audio_seconds=audio,
        wall_seconds=wall,
        shards_done_here=list(here),
        shards=shards,
        untexted=untexted,
        units=units,
        unit_runs=runs,
    )


class TokenizerEncoder:
    """A `cslm_jax.speech.SpeechTokenizer` as the Encoder extraction runs: batches sharded over a
    `data` mesh of this process's devices (every host runs its own batches). On CPUs each
    device's share of a batch runs its dense layers on its valid frames packed into rows
    (`SpeechTokenizer.encode(pack=True)`); accelerators keep one compiled shape per bucket.
    `tokenizer` may be a future of one (`open_tokenizer(background=True)`): the attributes
    extraction reads first then come from `meta` (the folder's speech_tokenizer.json), and the
    first batch waits for the weights."""

    def __init__(self, tokenizer, batch_multiple: int, *, meta: dict | None = None, packs=None):
        self._tokenizer = tokenizer
        src = meta if meta is not None else tokenizer
        get = src.get if isinstance(src, dict) else lambda k: getattr(src, k)
        self.version = str(get("version"))
        self.codebook_size = int(get("codebook_size"))
        self.units_per_second = float(get("units_per_second"))
        self.sample_rate = int(get("sample_rate"))
        self.precision = get("precision")
        self.min_samples = int(getattr(tokenizer, "min_samples", 0) or _min_samples())
        self.batch_multiple = batch_multiple
        self.packs = bool(tokenizer.on_cpu if packs is None else packs)

    @property
    def tokenizer(self):
        """The SpeechTokenizer (waits for a background load; raises its error)."""
        if isinstance(self._tokenizer, cf.Future):
            tok = self._tokenizer.result()
            seen = (tok.version, int(tok.codebook_size), float(tok.units_per_second))
            if seen != (self.version, self.codebook_size, self.units_per_second):
                raise ExtractError(
                    f"the speech tokenizer loaded as {seen}, its JSON said "
                    f"{(self.version, self.codebook_size, self.units_per_second)}"
                )
            self._tokenizer = tok
        return self._tokenizer

    def __call__(self, waves: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        # audio over 30 s arrives here only with --long-audio window (refusal happens earlier):
        # the tokenizer windows it (30 s windows every 26 s, stitched, tail kept)
        return self.tokenizer.encode(waves, lengths, long_audio="window", pack=self.packs)


def _min_samples() -> int:
    from cslm_jax.speech.mel import MIN_SAMPLES

    return int(MIN_SAMPLES)


def open_tokenizer(
    tokenizer_dir: str | Path,
    precision: str = "highest",
    devices: Sequence | None = None,
    background: bool = False,
) -> TokenizerEncoder:
    """The speech tokenizer of `tokenizer_dir` (`cslm-jax import-speech-tokenizer` output),
    data-parallel over a `data` mesh of `devices` (default: `jax.local_devices()`).
    `background`: the weights load (and go to the devices) in a thread while extraction reads
    the manifest, checks the output folder and reads the first batches' audio; a folder that
    cannot be loaded raises its error at the first batch (or here, where its JSON is bad)."""
    import jax
    from jax.sharding import Mesh

    from cslm_jax.speech import load_speech_tokenizer

    devices = list(devices if devices is not None else jax.local_devices())
    mesh = Mesh(np.array(devices), ("data",))

    def load():
        return load_speech_tokenizer(
            tokenizer_dir, precision=precision, mesh=mesh, batch_axis="data"
        )

    if not background:
        return TokenizerEncoder(load(), len(devices))
    from cslm_jax.speech.s3 import canonical_version
    from cslm_jax.speech.weights import CONFIG_FILE

    future = cf.ThreadPoolExecutor(1, thread_name_prefix="tokenizer").submit(load)
    try:
        meta = json.loads((Path(tokenizer_dir) / CONFIG_FILE).read_text())
        meta = {k: meta[k] for k in ("version", "codebook_size", "units_per_second", "sample_rate")}
        meta["version"] = canonical_version(meta["version"])
    except Exception:
        future.result()  # the folder's own error (SpeechTokenizerError names the file)
        raise
    meta["precision"] = precision
    packs = all(d.platform == "cpu" for d in devices)
    return TokenizerEncoder(future, len(devices), meta=meta, packs=packs)
