"""Prompt-wav voices (cslm_jax.speech.campplus): our Kaldi fbank against kaldi-native-fbank (a
C++ Kaldi port; upstream's torchaudio.compliance.kaldi.fbank computes the same and has no wheel
for our torch), the x-vector against upstream's `_extract_spk_embedding` steps on the same
speaker model (a small random ONNX graph of CAM++'s interface, run by onnxruntime), and
`--voice prompt.wav` through `import-token2wav --campplus` and `synthesize`; errors named.

Measured (float32, CPU): fbank within ~6e-5 of kaldi-native-fbank's (log energies up to ~16);
the bound is 2e-4."""

import json

import numpy as np
import pytest
import soundfile as sf

from cslm_jax.cli.main import main as cli
from cslm_jax.speech import campplus as cp
from cslm_jax.speech import token2wav as t2w
from cslm_jax.speech.hift import Token2WavError

SR = 16000


def _speech_like(seconds, seed=0, f0=220.0):
    """A voiced tone with a slow tremolo plus noise (every mel bin well above the floor)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def _knf_fbank(wave):
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = SR
    opts.mel_opts.num_bins = 80
    f = knf.OnlineFbank(opts)
    f.accept_waveform(SR, wave.tolist())
    f.input_finished()
    return np.stack([f.get_frame(i) for i in range(f.num_frames_ready)]).astype(np.float32)


def test_fbank_is_kaldis():
    """Tone and noise, a stretch of digital silence (the log floor), a length that leaves a
    partial frame (dropped: snip_edges), and exactly one frame (400 samples)."""
    a = _speech_like(1.0)
    waves = [a, np.concatenate([a, np.zeros(3000, np.float32), a[:5123]]), a[:400]]
    errs = []
    for w in waves:
        ours, ref = cp.kaldi_fbank(w), _knf_fbank(w)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (cp.num_frames(len(w)), 80)
        errs.append(float(np.abs(ours - ref).max()))
        assert errs[-1] <= 2e-4
    print("fbank max |ours - kaldi-native-fbank|:", [f"{e:.1e}" for e in errs])
    assert cp.num_frames(len(waves[1])) == 1 + (len(waves[1]) - 400) // 160
    silent = cp.kaldi_fbank(waves[1])[100 + 10]  # inside the silence: every bin at log(eps)
    np.testing.assert_allclose(silent, np.log(np.finfo(np.float32).eps), rtol=1e-6)
    # the scale of the samples only shifts the log energies (what the mean removal cancels)
    np.testing.assert_allclose(cp.kaldi_fbank(0.5 * a), cp.kaldi_fbank(a) + np.log(0.25), atol=1e-4)
    with pytest.raises(Token2WavError, match=r"399 samples: Kaldi's fbank needs at least 400"):
        cp.kaldi_fbank(a[:399])


def _upstream_xvector(model_path, wave):
    """What upstream's `CosyVoiceFrontEnd._extract_spk_embedding` computes, with Kaldi's fbank
    from kaldi-native-fbank: the features minus their mean over time, [1, T, 80] into the
    session's first input, its first output flattened."""
    import onnxruntime
    import torch

    sess = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feat = torch.from_numpy(_knf_fbank(wave))
    feat = feat - feat.mean(dim=0, keepdim=True)
    out = sess.run(None, {sess.get_inputs()[0].name: feat.unsqueeze(dim=0).numpy()})[0]
    return np.asarray(out, np.float32).flatten()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return t2w.save_random_token2wav(tmp_path_factory.mktemp("t2w") / "t2w", campplus=True)


def test_prompt_wav_voice_is_upstreams_xvector(folder, tmp_path):
    model = t2w.load_token2wav(folder)
    assert model.campplus == folder / "campplus.onnx"
    cp.check_campplus(model.campplus)
    wav = tmp_path / "prompt.wav"
    wave = _speech_like(1.5, seed=1)
    sf.write(wav, wave, SR, subtype="FLOAT")
    got = t2w.voice(model, str(wav))
    want = _upstream_xvector(model.campplus, wave)
    assert got.shape == (192,) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # another speaker (voice), another x-vector; the same recording at 8 kHz is resampled
    other = t2w.voice(model, str(_write(tmp_path / "b.wav", _speech_like(1.5, 2, f0=120.0))))
    assert np.abs(other - got).max() > 1e-2
    sf.write(tmp_path / "low.wav", wave[::2], SR // 2, subtype="FLOAT")
    low = t2w.voice(model, str(tmp_path / "low.wav"))
    assert low.shape == (192,) and np.isfinite(low).all()


def _write(path, wave, rate=SR):
    sf.write(path, wave, rate, subtype="PCM_16")
    return path


def test_synthesize_with_a_prompt_wav_voice(folder, tmp_path, capsys):
    """`synthesize --voice prompt.wav` writes what `--voice x.npy` (its x-vector) writes; a
    folder without campplus.onnx, a recording too short, a file that is no audio: exit 2, the
    file named."""
    model = t2w.load_token2wav(folder)
    wav = _write(tmp_path / "prompt.wav", _speech_like(1.0, seed=3))
    np.save(tmp_path / "x.npy", t2w.voice(model, str(wav)))
    units = tmp_path / "u.txt"
    units.write_text("".join(f"<{u}>" for u in range(100, 120)) + "\n")
    base = ["synthesize", "--units", str(units), "--token2wav", str(folder)]
    outs = {}
    for name, v in (("wav", wav), ("npy", tmp_path / "x.npy")):
        outs[name] = tmp_path / f"out_{name}"
        assert cli(base + ["--voice", str(v), "--out", str(outs[name])]) == 0
    a, b = (sf.read(outs[k] / "0000.wav", dtype="float32")[0] for k in ("wav", "npy"))
    assert a.shape == b.shape and np.abs(a).max() > 0.01
    np.testing.assert_array_equal(a, b)
    assert json.loads((outs["wav"] / "synthesize.json").read_text())["voice"] == str(wav)
    capsys.readouterr()
    # a folder without the speaker model
    plain = t2w.save_random_token2wav(tmp_path / "plain")
    assert cli(["synthesize", "--units", str(units), "--token2wav", str(plain), "--voice",
                str(wav), "--out", str(tmp_path / "o1")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "prompt.wav: a prompt-wav voice needs CosyVoice's speaker model" in err, err
    assert "import-token2wav --campplus" in err and not (tmp_path / "o1").exists()
    # too short, and not audio
    short = _write(tmp_path / "short.wav", _speech_like(0.02))
    assert cli(base + ["--voice", str(short), "--out", str(tmp_path / "o2")]) == 2
    assert "short.wav: 20.0 ms of audio" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hello\n")
    assert cli(base + ["--voice", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "o3")]) == 2
    assert "notes.txt: unreadable" in capsys.readouterr().err


def test_missing_onnxruntime_is_named(folder, tmp_path, monkeypatch):
    import shutil
    import sys

    copy = shutil.copy(folder / "campplus.onnx", tmp_path / "c.onnx")  # not a cached session
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(Token2WavError, match=r"onnxruntime, which is not installed: pip install"):
        cp.xvector(copy, _speech_like(0.5))


def test_import_token2wav_copies_and_checks_campplus(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from onnx import TensorProto, helper

    from cslm_jax.speech import flow, hift
    from cslm_jax.speech.token2wav_weights import flow_to_state_dict, hift_to_state_dict

    fcfg, fparams = flow.init_random("v1", 0, **t2w.SMALL_FLOW)
    hcfg, hparams = hift.init_random("v1", 1, **t2w.SMALL_HIFT)
    for name, sd in (
        ("flow.pt", flow_to_state_dict(fcfg, fparams)),
        ("hift.pt", hift_to_state_dict(hcfg, hparams, "weight_norm")),
    ):
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                   tmp_path / name)  # fmt: skip
    good = cp.save_random_campplus(tmp_path / "campplus.onnx", seed=5)
    base = ["import-token2wav", "--flow", str(tmp_path / "flow.pt"), "--hift",
            str(tmp_path / "hift.pt"), "--version", "v1"]  # fmt: skip
    out = tmp_path / "t2w"
    assert cli(base + ["--campplus", str(good), "--out", str(out)]) == 0
    assert "the speaker model campplus.onnx" in capsys.readouterr().out
    assert (out / "campplus.onnx").read_bytes() == good.read_bytes()
    model = t2w.load_token2wav(out)
    wav = _write(tmp_path / "p.wav", _speech_like(0.5, seed=4))
    np.testing.assert_array_equal(t2w.voice(model, str(wav)), cp.prompt_xvector(good, wav))
    # not ONNX; an ONNX graph whose output is not a 192-d x-vector
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    assert (
        cli(base + ["--campplus", str(tmp_path / "bad.onnx"), "--out", str(tmp_path / "b1")]) == 2
    )
    assert "--campplus " in (err := capsys.readouterr().err) and "not an ONNX model" in err, err
    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["output"], axes=[1], keepdims=0)],
        "wrong",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 80])],
    )
    (tmp_path / "wrong.onnx").write_bytes(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()
    )
    assert (
        cli(base + ["--campplus", str(tmp_path / "wrong.onnx"), "--out", str(tmp_path / "b2")]) == 2
    )
    err = capsys.readouterr().err
    assert "wrong.onnx: output 'output' has shape [1, 80], CAM++ gives [batch, 192]" in err, err
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()
