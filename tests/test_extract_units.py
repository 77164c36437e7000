"""`cslm-jax extract-units`: audio of any common format, rate and channel count becomes the
16 kHz mono waveform the tokenizer reads; a manifest becomes sharded paired / spoken-instruction
JSONL whose codes equal the tokenizer's own on the same audio; > 30 s audio loses no tail; a
killed run resumes to the same output and a finished one is not redone; bad files stop the run
(strict) or are counted and listed (skip); two processes split the manifest between them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO
from cslm_jax.data.audio import (
    AudioError,
    ManifestError,
    index_manifest,
    load_audio,
    probe_seconds,
    read_manifest,
    resample,
)
from cslm_jax.data.formats import merge_repeats
from cslm_jax.speech.extract import (
    COMPLETE_FILE,
    SKIPPED_FILE,
    ExtractError,
    Options,
    batch_rows,
    bucket_length,
    extract,
    marker_name,
    shard_name,
)

SR = 16000


def tone(seconds, rate, freq=440.0, amp=0.5, phase=0.0):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def speechlike(seconds, rate=SR, seed=0):
    """A signal the tokenizer sees change over time: tones that glide, bursts of noise."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    f = 200 + 150 * np.sin(2 * np.pi * 0.7 * t + seed)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate) + 0.05 * rng.standard_normal(n)
    x *= 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 1.3 * t))
    return x.astype(np.float32)


# -- audio files --------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [44100, 8000, 22050])
def test_other_rates_resample_to_the_16k_signal(tmp_path, rate):
    native = tone(1.0, SR)
    sf.write(tmp_path / "a.wav", tone(1.0, rate), rate, subtype="FLOAT")
    got = load_audio(tmp_path / "a.wav")
    assert got.dtype == np.float32 and got.ndim == 1
    assert abs(len(got) - len(native)) <= 1
    n = min(len(got), len(native))
    inner = slice(400, n - 400)  # away from the filter's start-up at the edges
    assert np.max(np.abs(got[inner] - native[inner])) < 2e-3
    # and not a trivially similar signal: a 5% pitch error would be far off
    assert np.max(np.abs(tone(1.0, SR, 462.0)[inner] - native[inner])) > 0.5
    assert resample(native, SR) is not None and np.array_equal(resample(native, SR), native)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(0.5, SR, 300.0), tone(0.5, SR, 700.0, amp=0.25)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-7)
    # stereo at another rate: averaged, then resampled
    sf.write(
        tmp_path / "s48.wav",
        np.stack([tone(0.5, 48000, 300.0), tone(0.5, 48000, 300.0)], axis=1),
        48000,
        subtype="FLOAT",
    )
    got = load_audio(tmp_path / "s48.wav")
    assert np.max(np.abs(got[400:-400] - left[400 : len(got) - 400])) < 2e-3


@pytest.mark.parametrize(
    "fmt,subtype,tol", [("wav", "PCM_16", 1e-4), ("flac", "PCM_16", 1e-4), ("ogg", "VORBIS", None)]
)
def test_formats(tmp_path, fmt, subtype, tol):
    x = speechlike(1.0)
    path = tmp_path / f"a.{fmt}"
    sf.write(path, x, SR, format=fmt.upper() if fmt != "ogg" else "OGG", subtype=subtype)
    got = load_audio(path)
    assert len(got) == len(x)
    if tol is not None:  # lossless: PCM16 steps
        assert np.max(np.abs(got - x)) < tol
    else:  # vorbis is lossy: close in energy
        assert np.sqrt(np.mean((got - x) ** 2)) < 0.1 * np.sqrt(np.mean(x**2))
    assert np.corrcoef(got, x)[0, 1] > 0.99
    assert probe_seconds(path) == pytest.approx(1.0, abs=1e-3)


def test_bad_audio_is_named_with_its_reason(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: missing"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file" * 10)
    with pytest.raises(AudioError, match=r"junk\.wav: unreadable"):
        load_audio(tmp_path / "junk.wav")
    with pytest.raises(AudioError, match="unreadable"):
        probe_seconds(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match=r"empty\.wav: empty"):
        load_audio(tmp_path / "empty.wav")
    x = tone(0.5, SR)
    x[1234] = np.nan
    sf.write(tmp_path / "nan.wav", x, SR, subtype="FLOAT")
    with pytest.raises(
        AudioError,
        match=r"nan\.wav: non-finite samples \(1 NaN/inf, the first "
        r"at 0\.077 s\)",
    ):
        load_audio(tmp_path / "nan.wav")


def test_manifests_jsonl_and_plain_lists(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"audio": "a.wav", "text": "hi", "lang": "en", "id": 7}\n\n'
        '{"question_audio": "/abs/q.wav", "answer_audio": "sub/a.wav", "question_text": "q"}\n'
    )
    e = read_manifest(tmp_path / "m.jsonl")
    assert [x.line for x in e] == [1, 3]
    assert e[0].audio == {"audio": str(tmp_path / "a.wav")} and e[0].record["id"] == 7
    assert e[1].audio == {
        "question_audio": "/abs/q.wav",
        "answer_audio": str(tmp_path / "sub/a.wav"),
    }
    (tmp_path / "list.txt").write_text("a.wav\n/x/b.flac\n")
    e = read_manifest(tmp_path / "list.txt")
    assert [x.audio["audio"] for x in e] == [str(tmp_path / "a.wav"), "/x/b.flac"]
    assert e[0].record == {"audio": "a.wav"}
    bad = tmp_path / "bad.jsonl"
    for text, message in [
        ('{"audio": "a.wav"}\n{"text": "no audio"}\n', r"bad\.jsonl:2: field 'audio': missing"),
        ('{"audio": 3}\n', r"bad\.jsonl:1: field 'audio': must be a non-empty path"),
        ('{"audio": "a.wav", "text": 5}\n', r"bad\.jsonl:1: field 'text': must be a string"),
        ('{"audio": "a.wav"\n', r"bad\.jsonl:1: field '<json>': invalid JSON"),
        ('{"audio": "a.wav", "question_audio": "q.wav"}\n', r":1: field 'audio': .*not both"),
    ]:
        bad.write_text(text)
        with pytest.raises(ManifestError, match=message):
            read_manifest(bad)
    bad.write_text('{"audio": "a.wav"}\n[1]\n')
    entries = read_manifest(bad, strict=False)
    assert entries[0].error is None and "bad.jsonl:2: field '<json>'" in entries[1].error
    # read a group at a time, from the offsets of one scan (blank lines are not entries)
    (tmp_path / "g.txt").write_text("a.wav\n\nb.wav\nc.wav\n\n\nd.wav\ne.wav\n")
    index = index_manifest(tmp_path / "g.txt", group=2)
    assert index.entries == 5 and index.groups == 3 and not index.jsonl
    assert [[(e.line, e.record["audio"]) for e in index.read(g)] for g in range(3)] == [
        [(1, "a.wav"), (3, "b.wav")],
        [(4, "c.wav"), (7, "d.wav")],
        [(8, "e.wav")],
    ]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ManifestError, match="lists no audio"):
        read_manifest(tmp_path / "empty.jsonl")


def test_buckets_keep_the_compiled_shapes_few():
    b = (2.0, 4.0, 30.0)
    assert bucket_length(1, b) == 32000 and bucket_length(32000, b) == 32000
    assert bucket_length(32001, b) == 64000 and bucket_length(480000, b) == 480000
    assert bucket_length(480001, b) == 960000 and bucket_length(1_000_000, b) == 1_440_000
    assert batch_rows(64000, 32, 8) == 32 and batch_rows(64000, 30, 8) == 32
    assert batch_rows(960000, 32, 8) == 16 and batch_rows(960000, 32, 1) == 16
    assert batch_rows(4_800_000, 4, 2) == 2  # never below one row per device
    with pytest.raises(ExtractError, match="--on-bad"):
        Options(on_bad="ignore")
    with pytest.raises(ExtractError, match="--buckets"):
        Options(buckets=(4.0, 2.0))


# -- extraction -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def encoder(tokdir):
    """The tokenizer as extraction runs it, sharded over a `data` mesh (2 of the 8 fake CPU
    devices: small batches; the command itself takes all local devices)."""
    import jax

    from cslm_jax.speech.extract import open_tokenizer

    return open_tokenizer(tokdir, devices=jax.local_devices()[:2])


@pytest.fixture(scope="session")
def alone(tokdir):
    """The same folder's tokenizer on one device, unsharded."""
    from cslm_jax.speech import load_speech_tokenizer

    return load_speech_tokenizer(tokdir)


def direct(tok, wave):
    """The tokenizer called on one utterance alone (its own padding, no mesh)."""
    return np.asarray(tok.encode([wave])[0])


def data_config(tmp_path, unit_count):
    """The demo data config with the tokenizer's codebook size."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    cfg["format"]["unit_count"] = unit_count
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def write_corpus(root, n=7, seed=0):
    """n utterances of 0.4..4.6 s: 16 kHz mono wav, 44.1 kHz stereo flac, 8 kHz ogg, in turn;
    returns the manifest and each line's 16 kHz waveform."""
    root.mkdir(parents=True, exist_ok=True)
    lines, waves = [], []
    for i in range(n):
        seconds = 0.4 + (i * 0.7) % 4.2
        kind = i % 3
        if kind == 0:
            name, x, rate = f"u{i}.wav", speechlike(seconds, SR, seed + i), SR
            sf.write(root / name, x, rate, subtype="FLOAT")
        elif kind == 1:
            name, rate = f"u{i}.flac", 44100
            x = speechlike(seconds, rate, seed + i)
            sf.write(root / name, np.stack([x, 0.5 * x], 1), rate)
        else:
            name, rate = f"u{i}.ogg", 8000
            sf.write(
                root / name,
                speechlike(seconds, rate, seed + i),
                rate,
                format="OGG",
                subtype="VORBIS",
            )
        lines.append(
            {
                "id": f"utt{i}",
                "audio": name,
                "text": f"utterance number {i}",
                "lang": "en" if i % 2 else "zh",
            }
        )
        waves.append(load_audio(root / name))
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest, lines, waves


def read_out(out):
    done = json.loads((out / COMPLETE_FILE).read_text())
    return [json.loads(line) for s in done["shards"] for line in (out / s).read_text().splitlines()]


def test_records_hold_the_tokenizers_codes_and_validate(tmp_path, tokdir, encoder, alone):
    from cslm_jax.cli.main import main as cli

    manifest, lines, waves = write_corpus(tmp_path / "audio")
    out = tmp_path / "units"
    opts = Options(batch_size=3, shard_size=3, progress=False)
    shapes = []

    class Recording:  # the real encoder; remembers the padded shapes it was given
        packs = False  # batches laid out as on an accelerator: one shape per bucket

        def __getattr__(self, name):
            return getattr(encoder, name)

        def __call__(self, batch, lengths):
            shapes.append(batch.shape)
            return encoder(batch, lengths)

    summary = extract(manifest, out, Recording(), tokenizer_dir=tokdir, opts=opts)
    # lengths 0.4..4.6 s: padded to the 2, 4 and 6 s buckets, rows always 3 -> 4 (2 devices)
    assert set(shapes) <= {(4, 32000), (4, 64000), (4, 96000)} and len(shapes) >= 3
    assert summary.complete and summary.records == 7 and summary.skipped == 0
    assert summary.files == 7 and summary.audio_seconds == pytest.approx(
        sum(len(w) for w in waves) / SR
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["extract.json", COMPLETE_FILE, SKIPPED_FILE]
        + [f(i, 3) for i in range(3) for f in (shard_name, marker_name)]
    )
    records = read_out(out)
    assert [r["id"] for r in records] == [x["id"] for x in lines]  # manifest order
    # the mean run length (the speech rate merged units need), counted from the records
    units = sum(len(r["units"]) for r in records)
    runs = sum(len(merge_repeats(r["units"])) for r in records)
    done = json.loads((out / COMPLETE_FILE).read_text())
    assert (done["units"], done["unit_runs"]) == (summary.units, summary.unit_runs) == (
        units,
        runs,
    ) and runs < units
    assert done["mean_run_length"] == round(units / runs, 4)
    assert f"mean run length {units / runs:.4f} (set format.speech_rate" in "\n".join(
        summary.lines()
    )
    reference = alone.encode(waves)  # the tokenizer called directly
    for r, line, wave, codes in zip(records, lines, waves, reference):
        assert {k: v for k, v in r.items() if k != "units"} == line  # fields passed on
        assert r["units"] == codes.tolist()
        assert abs(len(r["units"]) - len(wave) / SR * encoder.units_per_second) <= 1
    cfg = data_config(tmp_path, encoder.codebook_size)
    files = [str(out / s) for s in json.loads((out / COMPLETE_FILE).read_text())["shards"]]
    assert cli(["validate-data", *files, "--data-config", str(cfg)]) == 0
    assert (out / SKIPPED_FILE).read_text() == ""


def test_packed_batches_on_cpu_give_the_same_files_as_the_bucket_shapes(tmp_path, tokdir, encoder):
    """On CPUs each device's share of a batch runs on its valid frames packed into rows, the
    batch cut to its rows and longest utterance (whole seconds), not padded to the bucket: the
    output files are those of the bucket-shaped batches an accelerator runs, byte for byte."""
    root = tmp_path / "audio"
    root.mkdir()
    # 15 short utterances, one of 1.9 s and 5 of 2.1-2.5 s, the long ones first in the manifest:
    # shard 0 has a 2 s batch of 10 (shares of 5 rows, mostly padding) and a 4 s batch of 5
    # (cut to 6 rows of 3 s), shard 1 a batch of 6 under 1 s; wav at 16 kHz and flac at
    # 44.1 kHz in turn
    seconds = [0.2 + 0.03 * i for i in range(15)] + [1.9] + [2.1 + 0.1 * i for i in range(5)]
    lines, waves = [], []
    for i, sec in enumerate(seconds):
        name, rate = (f"u{i}.wav", SR) if i % 2 else (f"u{i}.flac", 44100)
        sf.write(root / name, speechlike(sec, rate, seed=20 + i), rate)
        lines.append({"id": f"utt{i}", "audio": name, "lang": "en", "text": f"number {i}"})
        waves.append(load_audio(root / name))
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines[::-1]))  # long ones first
    lines, waves = lines[::-1], waves[::-1]
    opts = Options(batch_size=16, shard_size=15, progress=False)
    assert encoder.packs and encoder.tokenizer.on_cpu

    class Recording:  # the real encoder, asked to pack or not; remembers its batches
        def __init__(self, packs):
            self.packs, self.shapes, self.packed_rows = packs, [], []

        def __getattr__(self, name):
            return getattr(encoder, name)

        def __call__(self, batch, lengths):
            self.shapes.append(batch.shape)
            self.packed_rows.append(encoder.tokenizer._packed_rows(lengths, batch.shape[1]))
            return encoder.tokenizer.encode(batch, lengths, pack=self.packs)

    runs = {}
    for packs in (False, True):
        out, rec = tmp_path / f"units_{packs}", Recording(packs)
        extract(manifest, out, rec, tokenizer_dir=tokdir, opts=opts)
        runs[packs] = (out, rec.shapes, rec.packed_rows)
    (bucketed, bucket_shapes, _), (packed, packed_shapes, packed_rows) = runs[False], runs[True]
    # buckets: 16 rows always, 2 or 4 s; packed: the batch's rows (a multiple of the 2
    # devices), whole seconds
    assert sorted(bucket_shapes) == [(16, 32000), (16, 32000), (16, 64000)]
    assert sorted(packed_shapes) == [(6, 16000), (6, 48000), (10, 32000)]
    # each device's share packed into its own rows (a multiple of 256 frames) in some batches
    assert any(packed_rows) and all(r % 256 == 0 for r in packed_rows)
    assert {r for r in packed_rows if r} <= set(encoder.tokenizer._packed_steps)
    names = sorted(p.name for p in bucketed.iterdir())
    assert names == sorted(p.name for p in packed.iterdir())
    for name in names:
        a, b = (bucketed / name).read_text(), (packed / name).read_text()
        if name.endswith(".done.json"):  # the shard's own wall time differs
            a, b = ({k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (a, b))
        assert a == b, name
    records = read_out(packed)
    for r, codes in zip(records, encoder.tokenizer.encode(waves, pack=False)):
        assert r["units"] == codes.tolist()


def test_long_audio_is_windowed_without_losing_its_tail_or_refused(
    tmp_path, tokdir, encoder, alone
):
    root = tmp_path / "audio"
    root.mkdir()
    long = speechlike(71.3, 22050, seed=3)  # three 30 s windows, the last partial
    sf.write(root / "long.flac", long, 22050)
    sf.write(root / "short.wav", speechlike(2.0, SR, seed=4), SR)
    manifest = root / "m.jsonl"
    manifest.write_text(
        '{"audio": "short.wav", "text": "a", "lang": "en"}\n'
        '{"audio": "long.flac", "text": "b", "lang": "en"}\n'
    )
    out = tmp_path / "units"
    extract(
        manifest, out, encoder, tokenizer_dir=tokdir, opts=Options(progress=False, batch_size=2)
    )
    short, windowed = read_out(out)
    wave = load_audio(root / "long.flac")
    assert len(wave) == pytest.approx(71.3 * SR, abs=1)
    # one code per 20 ms of the whole utterance: the tail after the last full window is there
    assert abs(len(windowed["units"]) - 71.3 * encoder.units_per_second) <= 1
    assert windowed["units"] == direct(alone, wave).tolist()
    # refused: strict stops naming the file; skip lists it and keeps the rest
    with pytest.raises(
        ExtractError,
        match=r"m\.jsonl:2: field 'audio': .*long\.flac: 71\.3 s is "
        r"longer than 30 s \(--long-audio refuse",
    ):
        extract(
            manifest,
            tmp_path / "refused",
            encoder,
            tokenizer_dir=tokdir,
            opts=Options(progress=False, long_audio="refuse"),
        )
    s = extract(
        manifest,
        tmp_path / "skipped",
        encoder,
        tokenizer_dir=tokdir,
        opts=Options(progress=False, long_audio="refuse", on_bad="skip"),
    )
    assert s.records == 1 and s.skipped == 1
    assert read_out(tmp_path / "skipped") == [short]
    listed = [json.loads(x) for x in (tmp_path / "skipped" / SKIPPED_FILE).read_text().splitlines()]
    assert [x["audio"] for x in listed] == [str(root / "long.flac")]


def bad_corpus(root):
    root.mkdir(parents=True, exist_ok=True)
    sf.write(root / "good0.wav", speechlike(1.0, SR, 1), SR)
    sf.write(root / "good1.wav", speechlike(1.5, SR, 2), SR)
    (root / "junk.wav").write_bytes(b"this is not audio" * 50)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), SR)
    x = speechlike(1.0, SR, 3)
    x[100:200] = np.inf
    sf.write(root / "inf.wav", x, SR, subtype="FLOAT")
    lines = [
        '{"audio": "good0.wav", "text": "a", "lang": "en"}',
        '{"audio": "missing.wav", "text": "b", "lang": "en"}',
        '{"audio": "junk.wav", "text": "c", "lang": "en"}',
        '{"audio": "empty.wav", "text": "d", "lang": "en"}',
        '{"audio": "inf.wav", "text": "e", "lang": "en"}',
        '{"audio": "good1.wav", "text": "f", "lang": "en"}',
    ]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_a_tokenizer_that_cannot_load_is_reported_when_no_batch_needed_it(tmp_path, tokdir):
    """The weights load in the background; when every line is skipped no batch waits for them,
    and a folder whose weights cannot load is still an error (exit 2), not a silent success."""
    import shutil

    from cslm_jax.cli.main import main as cli

    broken = tmp_path / "tokenizer"
    shutil.copytree(tokdir, broken)
    for f in broken.iterdir():
        if f.name != "speech_tokenizer.json":
            f.write_bytes(b"not weights")
    (tmp_path / "m.txt").write_text(f"{tmp_path / 'missing.wav'}\n")
    code = cli(
        ["extract-units", "--manifest", str(tmp_path / "m.txt"), "--tokenizer", str(broken),
         "--out", str(tmp_path / "out"), "--on-bad", "skip", "--no-progress"]
    )  # fmt: skip
    assert code == 2


def test_bad_files_stop_strict_runs_and_are_listed_in_skip_mode(tmp_path, tokdir, encoder):
    from cslm_jax.cli.main import main as cli

    manifest = bad_corpus(tmp_path / "audio")
    args = [
        "extract-units",
        "--manifest",
        str(manifest),
        "--tokenizer",
        str(tokdir),
        "--no-progress",
        "--shard-size",
        "4",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "cslm_jax.cli.main", *args, "--out", str(tmp_path / "strict")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"cslm-jax extract-units: error: {manifest}:2: field 'audio': {manifest.parent}/missing.wav: "
        f"missing (no such file) (--on-bad skip counts and lists such lines instead of stopping)"
    )
    assert not (tmp_path / "strict" / COMPLETE_FILE).exists()
    assert cli([*args, "--out", str(tmp_path / "skip"), "--on-bad", "skip"]) == 0
    assert [r["text"] for r in read_out(tmp_path / "skip")] == ["a", "f"]
    listed = [json.loads(x) for x in (tmp_path / "skip" / SKIPPED_FILE).read_text().splitlines()]
    assert [(x["where"], x["reason"].split(" ")[0]) for x in listed] == [
        (f"{manifest}:2", "missing"),
        (f"{manifest}:3", "unreadable:"),
        (f"{manifest}:4", "empty"),
        (f"{manifest}:5", "non-finite"),
    ]
    done = json.loads((tmp_path / "skip" / COMPLETE_FILE).read_text())
    assert done["records"] == 2 and done["skipped"] == 4
    # a bad manifest line is one more skipped line (strict: an error naming file, line, field)
    manifest.write_text(manifest.read_text() + '{"text": "no audio"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:7: field 'audio': missing"):
        extract(
            manifest,
            tmp_path / "strict2",
            encoder,
            tokenizer_dir=tokdir,
            opts=Options(progress=False),
        )
    s = extract(
        manifest,
        tmp_path / "skip2",
        encoder,
        tokenizer_dir=tokdir,
        opts=Options(progress=False, on_bad="skip"),
    )
    assert s.records == 2 and s.skipped == 5


def test_spoken_instruction_records_get_question_and_answer_units(tmp_path, tokdir, encoder, alone):
    from cslm_jax.cli.main import main as cli

    root = tmp_path / "audio"
    root.mkdir()
    q, a = speechlike(1.7, 44100, 5), speechlike(2.3, SR, 6)
    sf.write(root / "q.wav", q, 44100)
    sf.write(root / "a.flac", a, SR)
    line = {
        "question_audio": "q.wav",
        "question_text": "what is two plus two",
        "question_lang": "en",
        "answer_audio": "a.flac",
        "answer_text": "four",
        "answer_word_times": [[0.2, 0.9]],
        "answer_lang": "en",
    }
    manifest = root / "s2s.jsonl"
    manifest.write_text(
        json.dumps(line) + "\n" + json.dumps({**line, "answer_audio": "q.wav"}) + "\n"
    )
    out = tmp_path / "units"
    extract(manifest, out, encoder, tokenizer_dir=tokdir, opts=Options(progress=False))
    first, second = read_out(out)
    assert first["question_units"] == direct(alone, load_audio(root / "q.wav")).tolist()
    assert first["answer_units"] == direct(alone, load_audio(root / "a.flac")).tolist()
    assert second["answer_units"] == first["question_units"]
    assert {k: v for k, v in first.items() if not k.endswith("_units")} == line
    cfg = data_config(tmp_path, encoder.codebook_size)
    assert (
        cli(
            [
                "validate-data",
                str(out / shard_name(0, 1)),
                "--kind",
                "spoken_instruction",
                "--data-config",
                str(cfg),
            ]
        )
        == 0
    )


def test_records_checked_against_a_data_config(tmp_path, tokdir, encoder):
    manifest, lines, _ = write_corpus(tmp_path / "audio", n=3)
    text = manifest.read_text().replace('"lang": "zh"', '"lang": "fr"', 1)
    manifest.write_text(text)
    from cslm_jax.data.formats import load_data_config

    fmt = load_data_config(data_config(tmp_path, encoder.codebook_size), check_files=False).format
    with pytest.raises(
        ExtractError,
        match=r"manifest\.jsonl:1: field 'lang': the output record "
        r"would not validate: unknown language 'fr'",
    ):
        extract(
            manifest,
            tmp_path / "a",
            encoder,
            tokenizer_dir=tokdir,
            fmt=fmt,
            opts=Options(progress=False),
        )
    s = extract(
        manifest,
        tmp_path / "b",
        encoder,
        tokenizer_dir=tokdir,
        fmt=fmt,
        opts=Options(progress=False, on_bad="skip"),
    )
    assert s.records == 2 and s.skipped == 1
    wrong = load_data_config(
        data_config(tmp_path, encoder.codebook_size + 1), check_files=False
    ).format
    with pytest.raises(ExtractError, match="unit_count"):
        extract(manifest, tmp_path / "c", encoder, tokenizer_dir=tokdir, fmt=wrong)
    # a path list without text: units only, counted in the summary
    (tmp_path / "list.txt").write_text("audio/u0.wav\n")
    s = extract(
        tmp_path / "list.txt",
        tmp_path / "d",
        encoder,
        tokenizer_dir=tokdir,
        opts=Options(progress=False, lang="en"),
    )
    assert read_out(tmp_path / "d")[0].keys() == {"audio", "units", "lang"}
    assert s.untexted == 1 and "without 'text'" in "\n".join(s.lines())


KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import cslm_jax.speech.extract as E
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    encode = E._encode
    def killed_once_a_shard_is_done(*args, **kwargs):
        # a real SIGKILL in the middle of the second shard: nothing gets to clean up
        if any(out.glob("*.done.json")):
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(*args, **kwargs)
    E._encode = killed_once_a_shard_is_done
    from cslm_jax.cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_killed_run_resumes_to_the_same_output_and_a_finished_one_is_not_redone(
    tmp_path, tokdir, encoder, capsys
):
    from cslm_jax.cli.main import main as cli

    manifest, _, _ = write_corpus(tmp_path / "audio")
    out = tmp_path / "units"
    args = [
        "extract-units",
        "--manifest",
        str(manifest),
        "--tokenizer",
        str(tokdir),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "extract.json",
        marker_name(0, 4),
        shard_name(0, 4),
    ]
    first = (out / shard_name(0, 4)).stat().st_mtime_ns
    # what a kill during a write leaves: a hidden partial file, never a shard that looks whole
    (out / f".{shard_name(1, 4)}.partial-0badf00d").write_text('{"half": ')
    assert cli([a for a in args if a != "--no-progress"]) == 0  # the same command resumes
    printed = capsys.readouterr().out
    assert "3 shard(s) extracted here; 7 record(s) in 4 shard(s)" in printed
    # progress, not on a terminal: a line per shard with the rate; the summary's figures
    assert re.search(
        r"shard 2/4 written \(1/3 here, 2 records, 0 skipped\): [0-9.]+ h audio/s, "
        r"RTF [0-9.]+",
        printed,
    ), printed
    assert "shard 1/4" not in printed
    assert re.search(
        r"5 audio file\(s\), [0-9.]+ h of audio in [0-9.]+ s: [0-9.]+ h of audio/s, "
        r"real-time factor [0-9.]+",
        printed,
    ), printed
    assert (out / shard_name(0, 4)).stat().st_mtime_ns == first  # kept, not redone
    assert not list(out.glob(".*"))  # partial file removed
    whole = tmp_path / "uninterrupted"
    extract(
        manifest,
        whole,
        encoder,
        tokenizer_dir=tokdir,
        opts=Options(shard_size=2, batch_size=2, progress=False),
    )
    for i in range(4):
        assert (out / shard_name(i, 4)).read_bytes() == (whole / shard_name(i, 4)).read_bytes()
    assert len(read_out(out)) == 7
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli(args) == 0  # finished: nothing is redone
    assert "already complete: nothing redone" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_the_output_folder_holds_one_extraction(tmp_path, tokdir, encoder):
    manifest, _, _ = write_corpus(tmp_path / "audio", n=3)
    out = tmp_path / "units"
    opts = Options(progress=False)
    extract(manifest, out, encoder, tokenizer_dir=tokdir, opts=opts)
    # another manifest, shard size or long-audio rule into the same folder: refused, naming why
    other = manifest.parent / "other.jsonl"
    other.write_text(manifest.read_text().splitlines()[0] + "\n")
    from cslm_jax.errors import OutputExistsError

    with pytest.raises(
        OutputExistsError,
        match=r"holds another extraction \(manifest_sha256: .*"
        r"pass --force to discard it",
    ):
        extract(other, out, encoder, tokenizer_dir=tokdir, opts=opts)
    with pytest.raises(OutputExistsError, match=r"shard_size: 1000 there, 2 now"):
        extract(
            manifest, out, encoder, tokenizer_dir=tokdir, opts=Options(progress=False, shard_size=2)
        )
    # the same weights elsewhere resume (here: find it complete); other weights are refused
    copy = tmp_path / "copied_tokenizer"
    shutil.copytree(tokdir, copy)
    assert extract(manifest, out, encoder, tokenizer_dir=copy, opts=opts).state == "complete"
    from cslm_jax.speech import save_random_tokenizer

    save_random_tokenizer(
        tmp_path / "other_tokenizer", "v1", seed=1, n_state=64, n_head=2, n_layer=1
    )
    with pytest.raises(OutputExistsError, match=r"holds another extraction \(tokenizer: "):
        extract(manifest, out, encoder, tokenizer_dir=tmp_path / "other_tokenizer", opts=opts)
    s = extract(other, out, encoder, tokenizer_dir=tokdir, opts=opts, force=True)
    assert s.state == "done" and s.records == 1 and len(read_out(out)) == 1
    # a folder holding something else: refused unless --force
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds no extraction"):
        extract(manifest, foreign, encoder, tokenizer_dir=tokdir, opts=opts)
    assert (foreign / "notes.txt").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        extract(manifest, tmp_path / "afile", encoder, tokenizer_dir=tokdir, opts=opts)


TWO_PROCESS_CHILD = textwrap.dedent("""
    import os, sys
    from cslm_jax.cli.main import main
    code = main(sys.argv[1:])
    import jax
    jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
""")


def test_two_processes_extract_disjoint_shares_whose_union_is_the_manifest(
    tmp_path, tokdir, encoder
):
    from test_multihost import communicate_all, free_port

    manifest, lines, _ = write_corpus(tmp_path / "audio", n=9)
    out = tmp_path / "units"
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
        )
        cmd = [
            sys.executable,
            "-c",
            TWO_PROCESS_CHILD,
            "extract-units",
            "--manifest",
            str(manifest),
            "--tokenizer",
            str(tokdir),
            "--out",
            str(out),
            "--shard-size",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    codes, outs = communicate_all(procs, 240, "the two-process extraction")
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    owners = {}
    for i in range(5):
        owners.setdefault(json.loads((out / marker_name(i, 5)).read_text())["process"], []).append(
            i
        )
    assert owners == {0: [0, 2, 4], 1: [1, 3]}  # disjoint, union = all 5
    assert "3 shard(s) extracted here" in outs[0] and "2 shard(s) extracted here" in outs[1]
    records = read_out(out)
    assert [r["id"] for r in records] == [x["id"] for x in lines]  # every line, once, in order
    single = tmp_path / "one_process"
    extract(
        manifest,
        single,
        encoder,
        tokenizer_dir=tokdir,
        opts=Options(shard_size=2, batch_size=2, progress=False),
    )
    assert read_out(single) == records


@pytest.mark.parametrize(
    "version,sizes",
    [
        ("v2_25hz", dict(n_state=128, n_head=2, n_layer=1)),
        ("v1_25hz", dict(n_state=64, n_head=2, n_layer=1)),
    ],
)
def test_other_tokenizer_versions(tmp_path, version, sizes):
    """The 25 Hz tokenizers (v2: FSQ to 6561 codes) through the same command."""
    import jax

    from cslm_jax.speech import load_speech_tokenizer, save_random_tokenizer
    from cslm_jax.speech.extract import open_tokenizer

    tokdir = save_random_tokenizer(tmp_path / version, version, seed=2, **sizes)
    enc = open_tokenizer(tokdir, devices=jax.local_devices()[:2])
    manifest, _, waves = write_corpus(tmp_path / "audio", n=3)
    extract(manifest, tmp_path / "units", enc, tokenizer_dir=tokdir, opts=Options(progress=False))
    records = read_out(tmp_path / "units")
    reference = load_speech_tokenizer(tokdir).encode(waves)
    assert [r["units"] for r in records] == [c.tolist() for c in reference]
    assert enc.units_per_second == 25
    assert all(abs(len(r["units"]) - len(w) / SR * 25) <= 1 for r, w in zip(records, waves))
    assert (
        json.loads((tmp_path / "units" / COMPLETE_FILE).read_text())["tokenizer"]["codebook_size"]
        == enc.codebook_size
        == (6561 if version == "v2_25hz" else 4096)
    )
