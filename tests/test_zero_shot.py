"""Zero-shot prompts (cslm_jax.speech.prompt, token2wav.Prompt): the flow's mel of a recording
against upstream's feature extractor (`matcha.utils.audio.mel_spectrogram`, whose librosa
filters are stood in by ours, themselves checked against `cslm_jax.speech.mel.mel_filters`,
librosa's numbers as the s3tokenizer package ships them); synthesis with a prompt is the flow
conditioned on it (v1 and v2), batched rows with and without prompts each as alone; a prompt
from a recording (units by the speech tokenizer, v2's cut to 2 frames a unit); `synthesize
--voice prompt.wav --prompt-tokenizer DIR`; errors named. Reduced sizes, random weights."""

import importlib
import json
import sys
import types

import numpy as np
import pytest
import soundfile as sf

from cslm_jax.speech import causal_flow as cf
from cslm_jax.speech import flow, hift
from cslm_jax.speech import prompt as zp
from cslm_jax.speech import token2wav as t2w
from cslm_jax.speech.hift import Token2WavError
from cslm_jax.speech.mel import mel_filters


def _tone(seconds, sr, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (
        0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 2 * t))
        + 0.05 * rng.standard_normal(len(t))
    ).astype(np.float32)


def test_slaney_filters_are_librosas():
    """At fmax = sr / 2 our filters are the s3tokenizer's librosa numbers (mel.mel_filters)."""
    for sr, n_fft in ((16000, 400), (22050, 1024)):
        ours = zp.slaney_mel_filters(sr, n_fft, 80, 0.0, sr / 2)
        np.testing.assert_allclose(ours, mel_filters(80, sr, n_fft), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_flow_mel_is_matchas(version, monkeypatch):
    import torch

    import cosyvoice_reference  # noqa: F401  (matcha.utils without its __init__)

    filters = types.ModuleType("librosa.filters")
    filters.mel = lambda sr, n_fft, n_mels, fmin, fmax: zp.slaney_mel_filters(
        sr, n_fft, n_mels, fmin, fmax
    ).copy()
    librosa = types.ModuleType("librosa")
    librosa.filters = filters
    monkeypatch.setitem(sys.modules, "librosa", librosa)
    monkeypatch.setitem(sys.modules, "librosa.filters", filters)
    monkeypatch.delitem(sys.modules, "matcha.utils.audio", raising=False)
    audio = importlib.import_module("matcha.utils.audio")
    monkeypatch.setitem(sys.modules, "matcha.utils.audio", audio)  # dropped again at the end
    sr, n_fft, hop = zp.FEATURES[version]
    wave = _tone(0.7, sr)
    want = (
        audio.mel_spectrogram(
            torch.from_numpy(wave)[None], n_fft, 80, sr, hop, n_fft, 0, 8000, center=False
        )[0]
        .numpy()
        .T
    )  # [T, 80]
    got = zp.flow_mel(wave, version)
    assert got.shape == want.shape == (1 + (len(wave) - hop) // hop, 80)
    err = np.abs(got - want).max()
    print(f"{version}: flow mel max |ours - matcha| = {err:.1e}")
    assert err <= 1e-4


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    return t2w.load_token2wav(
        t2w.save_random_token2wav(tmp_path_factory.mktemp("v1") / "t2w", campplus=True)
    )


def _prompt(n_units, n_frames, vocab, seed=3):
    rng = np.random.default_rng(seed)
    return t2w.Prompt(
        rng.integers(0, vocab, n_units).astype(np.int32),
        rng.standard_normal((n_frames, 80)).astype(np.float32),
    )


def test_v1_synthesis_with_a_prompt_is_the_conditioned_flow(v1):
    """`synthesize(..., prompt)`: the flow on prompt + answer (flow_inference's prompt, checked
    against upstream in test_flow.py), only the answer's frames vocoded; bad prompts named."""
    rng = np.random.default_rng(1)
    u = rng.integers(0, 4096, 20)
    p = _prompt(6, 10, 4096)
    emb = v1.voices["random"]
    got = t2w.synthesize(v1, u, "random", prompt=p)
    mel = flow.flow_inference(v1.flow_params, v1.flow_cfg, u, emb, p.units, p.mel)
    want, n = hift.vocode(v1.hift_params, v1.hift_cfg, mel)
    assert got.shape == (t2w.mel_frames(20) * 256,)
    np.testing.assert_allclose(got, want[0, : int(n[0])], atol=1e-6)
    plain = t2w.synthesize(v1, u, "random")
    assert np.abs(plain - got).max() > 1e-2  # the prompt conditions the answer
    with pytest.raises(Token2WavError, match=r"row 0: zero-shot prompt: 6 prompt units and 0"):
        t2w.synthesize_batch(v1, [u], "random", prompt=(p.units, np.zeros((0, 80))))
    with pytest.raises(Token2WavError, match=r"zero-shot prompt: .*unit 4096 .*out of range"):
        t2w.synthesize(v1, u, "random", prompt=([4096], p.mel))


@pytest.mark.slow
def test_v1_batched_rows_with_and_without_a_prompt(v1):
    """synthesize_batch with a prompt on one row and none on the other: each row as alone
    (the batch's bound, test_token2wav.py's). (Slow: ~30 s of compiling.)"""
    rng = np.random.default_rng(1)
    u, u2 = rng.integers(0, 4096, 20), rng.integers(0, 4096, 20)
    p = _prompt(6, 10, 4096)
    rows = t2w.synthesize_batch(v1, [u, u2], "random", prompt=[p, None], max_batch=2)
    assert np.abs(rows[0] - t2w.synthesize(v1, u, "random", prompt=p)).max() <= 2e-4
    assert np.abs(rows[1] - t2w.synthesize(v1, u2, "random")).max() <= 2e-4


@pytest.mark.slow
def test_v2_synthesis_with_a_prompt_is_the_conditioned_flow(tmp_path):
    """v2: `synthesize(..., prompt)` is the causal flow on prompt + answer vocoded; batched
    with a row without a prompt, each row as alone; the 2-frames-a-unit rule. (Slow: ~40 s of compiling.)"""
    model = t2w.load_token2wav(t2w.save_random_token2wav(tmp_path / "v2", version="v2"))
    rng = np.random.default_rng(2)
    u = rng.integers(0, 6561, 8)
    p = _prompt(4, 8, 6561)
    got = t2w.synthesize(model, u, "random", prompt=p)
    mel = cf.causal_flow_inference(
        model.flow_params, model.flow_cfg, u, model.voices["random"], p.units, p.mel
    )
    want, n = hift.vocode(model.hift_params, model.hift_cfg, mel)
    assert got.shape == (16 * 480,)
    np.testing.assert_allclose(got, want[0, : int(n[0])], atol=1e-6)
    with pytest.raises(Token2WavError, match=r"4 units and 7 mel frames; v2's flow takes 2"):
        t2w.synthesize(model, u, "random", prompt=(p.units, p.mel[:7]))
    # batched with a row without a prompt (the batch's bound: test_causal_flow.py's)
    u2 = rng.integers(0, 6561, 8)
    rows = t2w.synthesize_batch(model, [u, u2], "random", prompt=[p, None], max_batch=2)
    assert np.abs(rows[0] - got).max() <= 1e-3
    assert np.abs(rows[1] - t2w.synthesize(model, u2, "random")).max() <= 1e-3


def test_v2_prompt_cut_is_upstreams():
    """upstream's frontend cut for v2: min(frames // 2, units) units, twice as many frames."""
    cut = zp.make_prompt("v2", np.arange(10), np.zeros((15, 80)))
    assert len(cut.units) == 7 and cut.mel.shape == (14, 80)
    cut = zp.make_prompt("v2", np.arange(5), np.zeros((15, 80)))
    assert len(cut.units) == 5 and cut.mel.shape == (10, 80)
    assert len(zp.make_prompt("v1", np.arange(10), np.zeros((15, 80))).units) == 10  # v1: as given


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """(tokenizer folder, prompt wav, its 16 kHz samples): a random v1 speech tokenizer."""
    from cslm_jax.speech import save_random_tokenizer

    d = tmp_path_factory.mktemp("rec")
    tokdir = save_random_tokenizer(d / "tok", "v1", seed=0, n_state=64, n_head=2, n_layer=1)
    wave = _tone(0.6, 16000, seed=5)
    sf.write(d / "prompt.wav", wave, 16000, subtype="FLOAT")
    return tokdir, d / "prompt.wav", wave


def test_prompt_from_a_recording(v1, recording, tmp_path):
    """`zero_shot_prompt`: the recording's units by the speech tokenizer (16 kHz), its flow mel
    at 22,050 Hz; a tokenizer of other units is named."""
    from cslm_jax.data.audio import resample
    from cslm_jax.speech import load_speech_tokenizer, save_random_tokenizer

    tokdir, wav, wave = recording
    tok = load_speech_tokenizer(tokdir)
    p = zp.zero_shot_prompt(v1, wav, tok)
    np.testing.assert_array_equal(p.units, tok.encode([wave])[0])
    assert len(p.units) == 30  # 50 units/s
    np.testing.assert_allclose(p.mel, zp.flow_mel(resample(wave, 16000, 22050), "v1"))
    assert p.mel.shape == (1 + int(0.6 * 22050 - 256) // 256, 80)
    tok2 = save_random_tokenizer(tmp_path / "tok2", "v1_25hz", n_state=64, n_head=2, n_layer=1)
    with pytest.raises(Token2WavError, match=r"tokenizer v1_25hz \(4096 codes, 25 units/s\)"):
        zp.zero_shot_prompt(v1, wav, load_speech_tokenizer(tok2))


@pytest.mark.slow
def test_synthesize_cli_with_a_zero_shot_prompt(v1, recording, tmp_path, capsys):
    """`synthesize --voice prompt.wav --prompt-tokenizer DIR` writes what `synthesize(units,
    its x-vector, prompt=zero_shot_prompt(...))` gives; --prompt-tokenizer without a recording
    as the voice is named. (Slow: ~25 s of compiling.)"""
    from cslm_jax.cli.main import main as cli
    from cslm_jax.speech import load_speech_tokenizer

    tokdir, wav, _ = recording
    p = zp.zero_shot_prompt(v1, wav, load_speech_tokenizer(tokdir))
    f = tmp_path / "u.txt"
    f.write_text("".join(f"<{u}>" for u in range(200, 220)) + "\n")
    out = tmp_path / "wavs"
    args = ["synthesize", "--units", str(f), "--token2wav", str(v1.path), "--voice", str(wav)]
    assert cli(args + ["--prompt-tokenizer", str(tokdir), "--out", str(out)]) == 0
    got = sf.read(out / "0000.wav", dtype="float32")[0]
    want = t2w.synthesize(v1, list(range(200, 220)), t2w.voice(v1, str(wav)), prompt=p)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1 / 32768 + 2e-4
    report = json.loads((out / "synthesize.json").read_text())
    assert report["prompt"] == {"units": 30, "mel_frames": int(p.mel.shape[0])}
    capsys.readouterr()
    bad = args[:-1] + ["random", "--prompt-tokenizer", str(tokdir), "--out", str(tmp_path / "o")]
    assert cli(bad) == 2
    assert "--prompt-tokenizer: give a prompt recording as --voice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
