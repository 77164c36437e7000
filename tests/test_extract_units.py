"""`cslm-jax extract-units`: audio of any common format, rate and channel count becomes the
16 kHz mono waveform the tokenizer reads; a manifest becomes sharded paired / spoken-instruction
JSONL whose codes equal the tokenizer's own on the same audio; > 30 s audio loses no tail; a
killed run resumes to the same output and a finished one is not redone; bad files stop the run
(strict) or are counted and listed (skip); two processes split the manifest between them."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cslm_jax.data.audio import (AudioError, ManifestError, load_audio, probe_seconds,
                                 read_manifest, resample)
from cslm_jax.speech.extract import (COMPLETE_FILE, SKIPPED_FILE, ExtractError, Options,
                                     batch_rows, bucket_length, extract, marker_name, shard_name)
from conftest import REPO

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
    inner = slice(400, n - 400)             # away from the filter's start-up at the edges
    assert np.max(np.abs(got[inner] - native[inner])) < 2e-3
    # and not a trivially similar signal: a 5% pitch error would be far off
    assert np.max(np.abs(tone(1.0, SR, 462.0)[inner] - native[inner])) > 0.5
    assert resample(native, SR) is not None and np.array_equal(resample(native, SR), native)


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(0.5, SR, 300.0), tone(0.5, SR, 700.0, amp=0.25)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-7)
    # stereo at another rate: averaged, then resampled
    sf.write(tmp_path / "s48.wav", np.stack([tone(0.5, 48000, 300.0), tone(0.5, 48000, 300.0)],
                                             axis=1), 48000, subtype="FLOAT")
    got = load_audio(tmp_path / "s48.wav")
    assert np.max(np.abs(got[400:-400] - left[400:len(got) - 400])) < 2e-3


@pytest.mark.parametrize("fmt,subtype,tol", [("wav", "PCM_16", 1e-4), ("flac", "PCM_16", 1e-4),
                                             ("ogg", "VORBIS", None)])
def test_formats(tmp_path, fmt, subtype, tol):
    x = speechlike(1.0)
    path = tmp_path / f"a.{fmt}"
    sf.write(path, x, SR, format=fmt.upper() if fmt != "ogg" else "OGG", subtype=subtype)
    got = load_audio(path)
    assert len(got) == len(x)
    if tol is not None:                                  # lossless: PCM16 steps
        assert np.max(np.abs(got - x)) < tol
    else:                                                # vorbis is lossy: close in energy
        assert np.sqrt(np.mean((got - x) ** 2)) < 0.1 * np.sqrt(np.mean(x ** 2))
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
    with pytest.raises(AudioError, match=r"nan\.wav: non-finite samples \(1 NaN/inf, the first "
                                         r"at 0\.077 s\)"):
        load_audio(tmp_path / "nan.wav")


def test_manifests_jsonl_and_plain_lists(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"audio": "a.wav", "text": "hi", "lang": "en", "id": 7}\n\n'
        '{"question_audio": "/abs/q.wav", "answer_audio": "sub/a.wav", "question_text": "q"}\n')
    e = read_manifest(tmp_path / "m.jsonl")
    assert [x.line for x in e] == [1, 3]
    assert e[0].audio == {"audio": str(tmp_path / "a.wav")} and e[0].record["id"] == 7
    assert e[1].audio == {"question_audio": "/abs/q.wav", "answer_audio": str(tmp_path / "sub/a.wav")}
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
            ('{"audio": "a.wav", "question_audio": "q.wav"}\n', r":1: field 'audio': .*not both")]:
        bad.write_text(text)
        with pytest.raises(ManifestError, match=message):
            read_manifest(bad)
    bad.write_text('{"audio": "a.wav"}\n[1]\n')
    entries = read_manifest(bad, strict=False)
    assert entries[0].error is None and "bad.jsonl:2: field '<json>'" in entries[1].error
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
    assert batch_rows(4_800_000, 4, 2) == 2                 # never below one row per device
    with pytest.raises(ExtractError, match="--on-bad"):
        Options(on_bad="ignore")
    with pytest.raises(ExtractError, match="--buckets"):
        Options(buckets=(4.0, 2.0))
