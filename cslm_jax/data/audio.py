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

import codecs
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from cslm_jax.data.sources import python_value
from cslm_jax.errors import CslmError, json_error
from cslm_jax.storage import fs

SAMPLE_RATE = 16000
# the fields of a manifest record that name audio files, and the unit fields they fill
AUDIO_FIELDS = {
    "audio": "units",
    "question_audio": "question_units",
    "answer_audio": "answer_units",
}


class AudioError(CslmError):
    """An audio file cannot be used; `path` and `reason` say which and why."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class ManifestError(CslmError):
    """A manifest line is invalid; the message names file, line and field."""


def _soundfile():
    import soundfile  # heavy: soundfile

    return soundfile


def _opened(path):
    """(label, what soundfile reads) for a local path or a gs:// URL (an open file object);
    AudioError if it does not exist."""
    p = fs.path(path) if fs.is_remote(path) else Path(path)
    if not p.is_file():
        raise AudioError(path, "missing (no such file)" if not p.exists() else "not a file")
    return str(p), (p.open("rb") if fs.is_remote(path) else str(p))


def probe_seconds(path: str | Path) -> float:
    """The duration of an audio file (local or gs://) from its header (no decoding); AudioError
    if it is missing, unreadable or empty."""
    sf = _soundfile()
    path, source = _opened(path)
    try:
        info = sf.info(source)
    except Exception as e:  # libsndfile's errors (LibsndfileError, RuntimeError, ...)
        raise AudioError(path, f"unreadable: {_reason(e)}") from None
    finally:
        if not isinstance(source, str):
            source.close()
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
    path, source = _opened(path)
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(path, f"unreadable: {_reason(e)}") from None
    finally:
        if not isinstance(source, str):
            source.close()
    return _mono_checked(data, rate, path, sample_rate)


def _mono_checked(data: np.ndarray, rate: int, label, sample_rate: int) -> np.ndarray:
    """[frames, channels] float32 -> mono at `sample_rate`; AudioError if empty or non-finite."""
    if data.shape[0] == 0:
        raise AudioError(label, "empty (no samples)")
    wave = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    bad = ~np.isfinite(wave)
    if bad.any():
        raise AudioError(
            label,
            f"non-finite samples ({int(bad.sum())} NaN/inf, the first at "
            f"{int(np.argmax(bad)) / rate:.3f} s)",
        )
    return resample(wave, rate, sample_rate)


def resample(wave: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`wave` (1-D) converted from `rate` to `sample_rate` Hz with soxr (high quality)."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if rate == sample_rate:
        return wave
    import soxr  # heavy: soxr

    return np.ascontiguousarray(
        soxr.resample(wave, rate, sample_rate, quality="HQ"), dtype=np.float32
    )


# -- manifests ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One manifest line: the record (fields passed on to the output), the audio files it names
    (field -> resolved path), or the error that makes it unusable."""

    line: int
    where: str  # "FILE:LINE"
    record: dict | None
    audio: dict[str, str]  # field -> path (a label for in-memory audio)
    error: str | None = None
    arrays: dict | None = None  # field -> (samples, rate): audio read from TFDS


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
    starts: tuple[tuple[int, int], ...]  # (byte offset, line number) of each group

    @property
    def groups(self) -> int:
        return max(1, -(-self.entries // self.group))

    def read(self, g: int, strict: bool = True) -> list[ManifestEntry]:
        """The entries of group `g` (see `read_manifest` for `strict`)."""
        offset, line = self.starts[g]
        entries: list[ManifestEntry] = []
        with self.path.open("rb") as f:
            f.seek(offset)
            for n, raw in enumerate(f, start=line):
                if len(entries) == self.group:
                    break
                if n == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)  # a UTF-8 BOM is no part of a path
                if not raw.strip():
                    continue
                where = f"{self.path}:{n}"
                try:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ManifestError(
                            f"{where}: not UTF-8 text; a manifest must be UTF-8"
                        ) from None
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
    path = fs.path(path, "--manifest")  # local or gs://
    h = hashlib.sha256()
    starts, entries, offset, first = [], 0, 0, None
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, start=1):
                h.update(raw)
                if raw.strip():
                    if entries % group == 0:
                        starts.append((offset, n))
                    if first is None:
                        first = raw.removeprefix(codecs.BOM_UTF8).strip()
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
        raise ManifestError(f"{where}: field '<json>': {json_error(e, line)}") from None
    if not isinstance(record, dict):
        raise ManifestError(
            f"{where}: field '<json>': a manifest line must be a JSON object "
            f"(or the whole file a plain list of paths)"
        )
    audio = {}
    for field in AUDIO_FIELDS:
        if field not in record:
            continue
        value = record[field]
        if not isinstance(value, str) or not value.strip():
            raise ManifestError(
                f"{where}: field '{field}': must be a non-empty path string, got {value!r}"
            )
        audio[field] = str(_resolve(value, root))
    if not audio:
        raise ManifestError(
            f"{where}: field 'audio': missing (a line needs 'audio', or "
            f"'question_audio' / 'answer_audio' for spoken-instruction records)"
        )
    if "audio" in audio and len(audio) > 1:
        raise ManifestError(
            f"{where}: field 'audio': a line has either 'audio' (a paired "
            f"record) or 'question_audio'/'answer_audio' (spoken instruction), "
            f"not both"
        )
    for field in ("text", "lang", "question_text", "answer_text", "question_lang", "answer_lang"):
        if field in record and not isinstance(record[field], str):
            raise ManifestError(
                f"{where}: field '{field}': must be a string, got {type(record[field]).__name__}"
            )
    return record, audio


def _resolve(name: str, root):
    """An audio path of a manifest: a gs:// URL as is, else absolute or relative to the
    manifest's folder (which may itself be in a bucket)."""
    if fs.is_remote(name):
        return name
    p = Path(name).expanduser()
    return p if p.is_absolute() else root / p


# -- audio held in memory (TFDS) ------------------------------------------------------------------


def array_seconds(value, rate: int, label: str) -> float:
    """The duration of in-memory audio: samples (1-D, or [frames, channels]) at `rate`, or the
    bytes of an encoded file (a TFDS Audio feature read with lazy decoding)."""
    if isinstance(value, bytes):
        try:
            info = _soundfile().info(io.BytesIO(value))
        except Exception as e:
            raise AudioError(label, f"undecodable audio bytes: {_reason(e)}") from None
        frames, rate = info.frames, info.samplerate
    else:
        frames = int(np.shape(value)[0]) if np.ndim(value) else 0
    if frames <= 0 or rate <= 0:
        raise AudioError(label, "empty (no samples)")
    return frames / rate


def array_audio(value, rate: int, label: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """In-memory audio as `load_audio` reads a file: integers scaled as libsndfile scales PCM
    (int16 / 32768, ...), channels averaged, resampled to `sample_rate`; AudioError naming
    `label` if empty, undecodable or non-finite."""
    if isinstance(value, bytes):
        try:
            data, rate = _soundfile().read(io.BytesIO(value), dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(label, f"undecodable audio bytes: {_reason(e)}") from None
        return _mono_checked(data, rate, label, sample_rate)
    x = np.asarray(value)
    if x.ndim not in (1, 2):
        raise AudioError(
            label, f"audio of shape {x.shape}: expected [samples] or [samples, channels]"
        )
    if x.shape[0] == 0 or x.size == 0:
        raise AudioError(label, "empty (no samples)")
    if x.dtype.kind == "i":
        data = x.astype(np.float32) / np.float32(2 ** (8 * x.dtype.itemsize - 1))
    elif x.dtype.kind == "u":
        half = 2 ** (8 * x.dtype.itemsize - 1)
        data = (x.astype(np.float32) - np.float32(half)) / np.float32(half)
    elif x.dtype.kind == "f":
        data = x.astype(np.float32)
    else:
        raise AudioError(label, f"audio of dtype {x.dtype}: expected integer or float samples")
    return _mono_checked(data.reshape(len(data), -1), rate, label, sample_rate)


@dataclasses.dataclass(frozen=True)
class TfdsAudio:
    """A TFDS dataset split as an extract-units manifest: `name` is name[/config]:version,
    `split` a TFDS split (slicing allowed: "train_clean100[:1000]"), `fields` record field ->
    feature ("audio" / "question_audio" / "answer_audio" name Audio features; the others are
    copied into each record). No fields: the dataset's one Audio feature becomes "audio" and
    every other text or number feature is copied under its own name."""

    name: str
    split: str = "train"
    data_dir: str | None = None
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"tfds:{self.name}:{self.split}"

    def __str__(self) -> str:
        return self.label

    def index(self, group: int) -> "TfdsIndex":
        """Open the prepared dataset (never downloads) and plan groups of `group` examples."""
        import tensorflow_datasets as tfds  # heavy: tensorflow_datasets

        where = f"--tfds {self.name}"
        if ":" not in self.name:
            raise ManifestError(
                f"{where}: give name[/config]:version (e.g. librispeech:2.1.1); "
                f"a version pins the data a resumed run reads"
            )
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except Exception as e:  # noqa: BLE001 - unknown name, version or config
            raise ManifestError(f"{where}: {type(e).__name__}: {_reason(e)}") from None
        splits = builder.info.splits
        if not splits:
            raise ManifestError(
                f"{where}: not prepared in {self.data_dir or 'the TFDS data dir'}"
                f" (extract-units never downloads: `tfds build "
                f"{self.name.split(':')[0]} --data_dir DIR` once, then "
                f"--tfds-data-dir DIR)"
            )
        try:
            parts = tfds.core.ReadInstruction.from_spec(self.split).to_absolute(splits)
        except (ValueError, KeyError, AssertionError) as e:
            raise ManifestError(
                f"--tfds-split {self.split!r}: {_reason(e)} (splits of "
                f"{self.name}: {sorted(splits)})"
            ) from None
        if len(parts) != 1:
            raise ManifestError(f"--tfds-split {self.split!r}: one split or slice at a time")
        part = parts[0]
        total = splits[part.splitname].num_examples
        start = part.from_ or 0
        stop = total if part.to is None else part.to
        if stop <= start:
            raise ManifestError(f"--tfds-split {self.split!r}: selects no examples")
        fields, rates = _tfds_fields(builder.info.features, self.fields, where)
        ident = {
            "name": self.name,
            "split": part.splitname,
            "from": start,
            "to": stop,
            "examples": total,
            "fields": fields,
        }
        sha = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return TfdsIndex(
            self,
            builder,
            part.splitname,
            start,
            stop - start,
            group,
            sha,
            tuple(fields.items()),
            rates,
        )


def _tfds_fields(features, mapping, where: str) -> tuple[dict, dict]:
    """(record field -> feature, audio field -> sample rate), checked against the features."""
    import tensorflow_datasets as tfds  # heavy: tensorflow_datasets

    top = dict(features.items())
    audio = {k: v for k, v in top.items() if isinstance(v, tfds.features.Audio)}
    if mapping:
        fields = dict(mapping)
    else:
        if len(audio) != 1:
            raise ManifestError(
                f"{where}: {len(audio)} Audio features ({sorted(audio)}); say "
                f"which is which with --tfds-fields audio=FEATURE,..."
            )
        fields = {"audio": next(iter(audio))}
        for k, v in top.items():
            if k not in audio and (
                isinstance(v, tfds.features.Text)
                or (isinstance(v, tfds.features.Tensor) and v.shape == ())
            ):
                fields[k] = k
    if not any(f in AUDIO_FIELDS for f in fields):
        raise ManifestError(
            f"{where}: --tfds-fields maps no audio field ({', '.join(AUDIO_FIELDS)})"
        )
    if "audio" in fields and len(set(fields) & set(AUDIO_FIELDS)) > 1:
        raise ManifestError(
            f"{where}: --tfds-fields: 'audio' (paired records) or "
            f"'question_audio'/'answer_audio' (spoken instruction), not both"
        )
    rates = {}
    for field, feature in fields.items():
        if feature not in top:
            raise ManifestError(
                f"{where}: --tfds-fields {field}={feature}: no feature "
                f"{feature!r} (features: {sorted(top)})"
            )
        if field in AUDIO_FIELDS:
            if feature not in audio:
                raise ManifestError(
                    f"{where}: --tfds-fields {field}={feature}: {feature!r} is "
                    f"not an Audio feature (Audio: {sorted(audio)})"
                )
            rate = getattr(audio[feature], "sample_rate", None)
            if not rate:
                raise ManifestError(f"{where}: Audio feature {feature!r} has no sample_rate")
            rates[field] = int(rate)
    return fields, rates


@dataclasses.dataclass(frozen=True)
class TfdsIndex:
    """A TFDS split planned in groups, read one group at a time (as `ManifestIndex`)."""

    source: TfdsAudio
    builder: object
    splitname: str
    start: int
    entries: int
    group: int
    sha256: str
    fields: tuple[tuple[str, str], ...]
    rates: dict

    @property
    def path(self) -> str:
        return self.source.label

    @property
    def groups(self) -> int:
        return max(1, -(-self.entries // self.group))

    def read(self, g: int, strict: bool = True) -> list[ManifestEntry]:
        """The examples of group `g` as entries with their audio in memory; a missing or
        undecodable text field is a bad line (strict: ManifestError naming the example)."""
        import tensorflow_datasets as tfds  # heavy: tensorflow_datasets

        a = self.start + g * self.group
        b = min(self.start + self.entries, a + self.group)
        ds = self.builder.as_dataset(split=f"{self.splitname}[{a}:{b}]", shuffle_files=False)
        entries = []
        for n, example in enumerate(tfds.as_numpy(ds), start=a):
            where = f"tfds:{self.source.name}:{self.splitname}[{n}]"
            record, audio, arrays = {}, {}, {}
            try:
                for field, feature in self.fields:
                    value = example[feature]
                    if field in AUDIO_FIELDS:
                        audio[field] = record[field] = f"{where}/{feature}"  # provenance
                        arrays[field] = (value, self.rates[field])
                        continue
                    try:
                        record[field] = python_value(value, where, field)
                    except CslmError as e:
                        raise ManifestError(str(e)) from None
            except ManifestError as e:
                if strict:
                    raise
                entries.append(ManifestEntry(n, where, None, {}, str(e)))
                continue
            entries.append(ManifestEntry(n, where, record, audio, arrays=arrays))
        if len(entries) != b - a:
            raise ManifestError(
                f"{self.path}: examples {a}..{b - 1}: the dataset gave "
                f"{len(entries)} of {b - a} (was it rebuilt while extracting?)"
            )
        return entries
