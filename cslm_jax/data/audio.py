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


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return True
    first = next((s.strip() for s in lines if s.strip()), "")
    return first.startswith("{")


def read_manifest(path: str | Path, strict: bool = True) -> list[ManifestEntry]:
    """The entries of a manifest, in order. Strict: the first bad line raises ManifestError
    naming file, line and field; otherwise bad lines come back with `error` set (and are then
    counted and reported as skipped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(f"{path}:{line}: not UTF-8 text; a manifest must be UTF-8") from None
    lines = text.splitlines()
    jsonl = _is_jsonl(path, lines)
    root = path.parent
    entries: list[ManifestEntry] = []
    for n, line in enumerate(lines, start=1):
        where = f"{path}:{n}"
        if not line.strip():
            continue                        # blank lines separate nothing: ignored
        try:
            record, audio = _parse(line, where, root, jsonl)
        except ManifestError as e:
            if strict:
                raise
            entries.append(ManifestEntry(n, where, None, {}, str(e)))
            continue
        entries.append(ManifestEntry(n, where, record, audio))
    if not entries:
        raise ManifestError(f"{path}: the manifest lists no audio")
    return entries


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
