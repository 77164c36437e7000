"""Audio files -> 16 kHz mono float32 waveforms, and manifests of audio files.

Reading goes through `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3 and the other formats it
knows), several channels are averaged to mono, and other sample rates are converted with `soxr`
(the SoX resampler, high quality). Anything that cannot become a usable waveform raises
`AudioError`, which names the file and the reason (missing, unreadable, empty, non-finite).

A manifest lists what to read: JSON lines with an `audio` path (or `question_audio` /
`answer_audio` for spoken-instruction records) and any other fields, which are passed on; or a
plain list of paths, one a line. Relative paths resolve against the manifest's folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from cslm_jax.errors import CslmError

SAMPLE_RATE = 16000
# the fields of a manifest record that name audio files, and the unit fields they fill
AUDIO_FIELDS = {"audio": "units", "question_audio": "question_units",
                "answer_audio": "answer_units"}


class AudioError(CslmError):
    """An audio file cannot be used; `path` and `reason` say which and why."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class ManifestError(CslmError):
    """A manifest line is invalid; the message names file, line and field."""


def _soundfile():
    import soundfile
    return soundfile


def probe_seconds(path: str | Path) -> float:
    """The duration of an audio file from its header (no decoding); AudioError if it is missing,
    unreadable or empty."""
    sf = _soundfile()
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing (no such file)" if not path.exists() else "not a file")
    try:
        info = sf.info(str(path))
    except Exception as e:          # libsndfile's errors (LibsndfileError, RuntimeError, ...)
        raise AudioError(path, f"unreadable: {_reason(e)}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(path, "empty (no samples)")
    return info.frames / info.samplerate


def _reason(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[-1] if text else type(e).__name__


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The file as a mono float32 waveform at `sample_rate` (channels averaged, resampled with
    soxr's high-quality filter where the file's rate differs)."""
    sf = _soundfile()
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "missing (no such file)" if not path.exists() else "not a file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, f"unreadable: {_reason(e)}") from None
    if data.shape[0] == 0:
        raise AudioError(path, "empty (no samples)")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    bad = ~np.isfinite(wave)
    if bad.any():
        raise AudioError(path, f"non-finite samples ({int(bad.sum())} NaN/inf, the first at "
                               f"{int(np.argmax(bad)) / rate:.3f} s)")
    return resample(wave, rate, sample_rate)


def resample(wave: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`wave` (1-D) converted from `rate` to `sample_rate` Hz with soxr (high quality)."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if rate == sample_rate:
        return wave
    import soxr
    return np.ascontiguousarray(soxr.resample(wave, rate, sample_rate, quality="HQ"),
                                dtype=np.float32)


# -- manifests ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One manifest line: the record (fields passed on to the output), the audio files it names
    (field -> resolved path), or the error that makes it unusable."""

    line: int
    where: str                                  # "FILE:LINE"
    record: dict | None
    audio: dict[str, str]
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class ManifestIndex:
    """One pass over a manifest: its checksum, how many entries (non-blank lines) it has, and
    where each group of `group` entries starts, so that a group is read alone later (a corpus
    manifest can have millions of lines; no process holds them all)."""

    path: Path
    sha256: str
    entries: int
    jsonl: bool
    group: int
    starts: tuple[tuple[int, int], ...]         # (byte offset, line number) of each group

    @property
    def groups(self) -> int:
        return max(1, -(-self.entries // self.group))

    def read(self, g: int, strict: bool = True) -> list[ManifestEntry]:
        """The entries of group `g` (see `read_manifest` for `strict`)."""
        offset, line = self.starts[g]
        entries: list[ManifestEntry] = []
        with open(self.path, "rb") as f:
            f.seek(offset)
            for n, raw in enumerate(f, start=line):
                if len(entries) == self.group:
                    break
                if not raw.strip():
                    continue
                where = f"{self.path}:{n}"
                try:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ManifestError(f"{where}: not UTF-8 text; a manifest must be "
                                            f"UTF-8") from None
                    record, audio = _parse(text, where, self.path.parent, self.jsonl)
                except ManifestError as e:
                    if strict:
                        raise
                    entries.append(ManifestEntry(n, where, None, {}, str(e)))
                    continue
                entries.append(ManifestEntry(n, where, record, audio))
        return entries


def index_manifest(path: str | Path, group: int) -> ManifestIndex:
    """Scan a manifest once (checksum, entry count, group starts); ManifestError if it cannot be
    read or lists nothing."""
    path = Path(path)
    h = hashlib.sha256()
    starts, entries, offset, first = [], 0, 0, None
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                h.update(raw)
                if raw.strip():
                    if entries % group == 0:
                        starts.append((offset, n))
                    if first is None:
                        first = raw.strip()
                    entries += 1
                offset += len(raw)
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e.strerror or e}") from None
    if not entries:
        raise ManifestError(f"{path}: the manifest lists no audio")
    jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson") or first.startswith(b"{")
    return ManifestIndex(path, h.hexdigest(), entries, jsonl, group, tuple(starts))


def read_manifest(path: str | Path, strict: bool = True) -> list[ManifestEntry]:
    """The entries of a whole manifest, in order. Strict: the first bad line raises
    ManifestError naming file, line and field; otherwise bad lines come back with `error` set
    (and are then counted and reported as skipped). Blank lines are ignored."""
    index = index_manifest(path, group=1 << 62)
    return index.read(0, strict)


def _parse(line: str, where: str, root: Path, jsonl: bool) -> tuple[dict, dict[str, str]]:
    if not jsonl:
        name = line.strip()
        return {"audio": name}, {"audio": str(_resolve(name, root))}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{where}: field '<json>': invalid JSON: {e.msg} at column "
                            f"{e.colno}") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: field '<json>': a manifest line must be a JSON object "
                            f"(or the whole file a plain list of paths)")
    audio = {}
    for field in AUDIO_FIELDS:
        if field not in record:
            continue
        value = record[field]
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(f"{where}: field '{field}': must be a non-empty path string, got "
                                f"{value!r}")
        audio[field] = str(_resolve(value, root))
    if not audio:
        raise ManifestError(f"{where}: field 'audio': missing (a line needs 'audio', or "
                            f"'question_audio' / 'answer_audio' for spoken-instruction records)")
    if "audio" in audio and len(audio) > 1:
        raise ManifestError(f"{where}: field 'audio': a line has either 'audio' (a paired "
                            f"record) or 'question_audio'/'answer_audio' (spoken instruction), "
                            f"not both")
    for field in ("text", "lang", "question_text", "answer_text", "question_lang", "answer_lang"):
        if field in record and not isinstance(record[field], str):
            raise ManifestError(f"{where}: field '{field}': must be a string, got "
                                f"{type(record[field]).__name__}")
    return record, audio


def _resolve(name: str, root: Path) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else root / p
