"""cslm_jax.speech.token2wav (token2wav folders, one-utterance synthesis: the v1 flow then HiFT)
and the `import-token2wav` / `synthesize` commands, at reduced sizes with random weights (the
models themselves are tested against upstream in test_flow.py / test_hift.py). Few unit counts,
so that few shapes compile."""

import json

import numpy as np
import pytest
import soundfile as sf

from cslm_jax.cli.main import main as cli
from cslm_jax.speech import flow, hift
from cslm_jax.speech import token2wav as t2w
from cslm_jax.speech.hift import Token2WavError

N = 20  # units of the test utterances (34 mel frames)
RATE = 22050


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return t2w.save_random_token2wav(tmp_path_factory.mktemp("t2w") / "t2w", seed=0)


@pytest.fixture(scope="module")
def model(folder):
    return t2w.load_token2wav(folder)


def _units(n, seed=0):
    return np.random.default_rng(seed).integers(0, 4096, n).tolist()


def _line(units):
    return "".join(f"<{u}>" for u in units)


def test_save_random_then_load_gives_the_same_models(model):
    fcfg, fparams = flow.init_random("v1", 0, **t2w.SMALL_FLOW)
    hcfg, hparams = hift.init_random("v1", 1, **t2w.SMALL_HIFT)
    assert model.flow_cfg == fcfg and model.hift_cfg == hcfg and model.version == "v1"
    assert fparams.keys() == model.flow_params.keys()
    assert hparams.keys() == model.hift_params.keys()
    for a, b in ((fparams, model.flow_params), (hparams, model.hift_params)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert list(model.voices) == ["random"] and model.voices["random"].shape == (192,)
    assert (model.sample_rate, model.units_per_second, model.samples_per_frame) == (RATE, 50, 256)


def test_load_names_what_is_wrong(folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "voices.npz").unlink()
    with pytest.raises(Token2WavError, match="missing voices.npz"):
        t2w.load_token2wav(bad)
    shutil.copy(folder / "voices.npz", bad / "voices.npz")
    meta = json.loads((bad / "token2wav.json").read_text())
    (bad / "token2wav.json").write_text(json.dumps({**meta, "version": "v3"}))
    with pytest.raises(Token2WavError, match="version 'v3' is not supported"):
        t2w.load_token2wav(bad)
    meta["flow"]["encoder_size"] = 128
    (bad / "token2wav.json").write_text(json.dumps(meta))
    with pytest.raises(Token2WavError, match="flow.safetensors: tensor .* has shape"):
        t2w.load_token2wav(bad)


def test_synthesis_length_is_the_mel_frames_times_256(model):
    assert t2w.mel_frames(N) == flow.FlowConfig().mel_len(N) == 34
    wave = t2w.synthesize(model, _units(N), "random")
    assert wave.dtype == np.float32 and wave.shape == (34 * 256,)
    assert np.isfinite(wave).all() and 0 < np.abs(wave).max() <= 0.99
    np.testing.assert_array_equal(wave, t2w.synthesize(model, _units(N), "random"))
    import jax

    noisy = t2w.synthesize(model, _units(N), "random", noise=jax.random.PRNGKey(3))
    assert noisy.shape == wave.shape and not np.array_equal(noisy, wave)
    np.testing.assert_array_equal(
        noisy, t2w.synthesize(model, _units(N), "random", noise=jax.random.PRNGKey(3))
    )
    slow = t2w.synthesize(model, _units(N), "random", speech_rate=1.5)
    assert slow.shape == (t2w.mel_frames(N, 1.5) * 256,) == (51 * 256,)


def test_voice_names_and_npy(model, tmp_path):
    np.save(tmp_path / "v.npy", np.ones((1, 192), np.float32))
    assert t2w.voice(model, str(tmp_path / "v.npy")).shape == (192,)
    np.save(tmp_path / "short.npy", np.ones(100, np.float32))
    with pytest.raises(Token2WavError, match=r"shape \(100,\); a voice is a 192-d"):
        t2w.voice(model, str(tmp_path / "short.npy"))
    with pytest.raises(Token2WavError, match=r"voice 'alice': not a voice .*\(random\)"):
        t2w.voice(model, "alice")


def test_cli_writes_a_wav_per_line(folder, tmp_path, capsys):
    lines = [_units(N, 1), _units(N, 2), _units(25, 3)]
    f = tmp_path / "units.txt"
    f.write_text(
        _line(lines[0]) + "\n<sosp>" + _line(lines[1]) + "<eosp>\n" + _line(lines[2]) + "\n"
    )
    out = tmp_path / "wavs"
    assert (
        cli(
            [
                "synthesize",
                "--units",
                str(f),
                "--token2wav",
                str(folder),
                "--voice",
                "random",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    want = [t2w.mel_frames(len(u)) * 256 for u in lines]
    for i, n in enumerate(want):
        wave, sr = sf.read(out / f"{i:04d}.wav", dtype="float32")
        info = sf.info(out / f"{i:04d}.wav")
        assert sr == RATE and info.subtype == "PCM_16" and wave.shape == (n,)
    report = json.loads((out / "synthesize.json").read_text())
    assert [w["samples"] for w in report["wavs"]] == want and report["noise"] == "zero"
    # the same answers from a decode responses.jsonl: chunks joined in order, same audio
    recs = tmp_path / "responses.jsonl"
    recs.write_text(
        "\n".join(
            json.dumps({"index": i, "speech_chunks": [u[:7], u[7:]]})
            for i, u in enumerate(lines[:2])
        )
        + "\n"
    )
    out2 = tmp_path / "wavs2"
    assert (
        cli(
            [
                "synthesize",
                "--units",
                str(recs),
                "--token2wav",
                str(folder),
                "--voice",
                "random",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    for i in range(2):  # batches of 2 and 3 rows: float32 rounding, then 16-bit PCM's
        np.testing.assert_allclose(
            sf.read(out2 / f"{i:04d}.wav")[0],
            sf.read(out / f"{i:04d}.wav")[0],
            atol=1 / 32768 + 2e-4,
            rtol=0,
        )
    assert not (out2 / "0002.wav").exists()


def test_cli_gives_a_text_only_answer_an_empty_wav(folder, tmp_path, capsys):
    """A responses.jsonl answer without speech is a valid line: an empty wav (as decode
    --speech-out writes), counted in the summary; the other answers' audio unchanged."""
    u = _units(N, 1)
    recs = tmp_path / "responses.jsonl"
    recs.write_text(
        "\n".join(
            json.dumps(r)
            for r in (
                {"index": 0, "text": "hi", "speech_chunks": []},
                {"index": 1, "speech_chunks": [u[:7], u[7:]]},
                {"index": 2, "speech_chunks": [[], []]},
            )
        )
        + "\n"
    )
    out = tmp_path / "wavs"
    args = ["synthesize", "--units", str(recs), "--token2wav", str(folder), "--voice", "random"]
    assert cli(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 wav(s) (2 empty: answers without speech)" in printed, printed
    for i in (0, 2):
        wave, sr = sf.read(out / f"{i:04d}.wav", dtype="float32")
        assert sr == RATE and wave.shape == (0,)
    wave = sf.read(out / "0001.wav", dtype="float32")[0]
    assert wave.shape == (t2w.mel_frames(N) * 256,) and np.abs(wave).max() > 0
    report = json.loads((out / "synthesize.json").read_text())
    assert report["empty_wavs"] == 2
    assert [w["samples"] for w in report["wavs"]] == [0, len(wave), 0]
    assert report["wavs"][0]["source"] == f"{recs}:1" and report["wavs"][0]["units"] == 0
    # a unit file stays strict: its empty line is an error naming the line
    f = tmp_path / "units.txt"
    f.write_text(_line(u) + "\n\n")
    assert cli(args[:2] + [str(f)] + args[3:] + ["--out", str(tmp_path / "o")]) == 2
    assert "units.txt:2: empty line" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        ("<1><2><3>\n<4>x<5>\n", r"units.txt:2: column 4"),
        ("<1><2><3>\n\n", r"units.txt:2: empty line"),
        ("<1><2><3>\n<4><5000>\n", r"units.txt:2: .*unit 5000 .*out of range 0..4095"),
    ],
)
def test_cli_bad_line_exits_2_and_writes_nothing(folder, tmp_path, capsys, content, message):
    f = tmp_path / "units.txt"
    f.write_text(content)
    out = tmp_path / "wavs"
    assert (
        cli(
            [
                "synthesize",
                "--units",
                str(f),
                "--token2wav",
                str(folder),
                "--voice",
                "random",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_cli_names_a_wrong_size_voice(folder, tmp_path, capsys):
    (tmp_path / "u.txt").write_text("<1><2>\n")
    np.save(tmp_path / "v.npy", np.zeros(191, np.float32))
    assert (
        cli(
            [
                "synthesize",
                "--units",
                str(tmp_path / "u.txt"),
                "--token2wav",
                str(folder),
                "--voice",
                str(tmp_path / "v.npy"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "192-d x-vector" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_import_from_upstream_state_dicts_synthesises_the_same(model, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from cslm_jax.speech.token2wav_weights import flow_to_state_dict, hift_to_state_dict

    def save(sd, name):
        torch.save(
            {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, tmp_path / name
        )
        return str(tmp_path / name)

    fpt = save(flow_to_state_dict(model.flow_cfg, model.flow_params), "flow.pt")
    hpt = save(hift_to_state_dict(model.hift_cfg, model.hift_params, "weight_norm"), "hift.pt")
    torch.save(
        {"spk_a": {"embedding": torch.from_numpy(model.voices["random"][None])}},
        tmp_path / "spk2info.pt",
    )
    out = tmp_path / "imported"
    args = [
        "import-token2wav",
        "--flow",
        fpt,
        "--hift",
        hpt,
        "--version",
        "v1",
        "--voices",
        str(tmp_path / "spk2info.pt"),
        "--out",
        str(out),
    ]
    assert cli(args) == 0
    got = t2w.load_token2wav(out)
    assert got.flow_cfg == model.flow_cfg and got.hift_cfg == model.hift_cfg
    assert list(got.voices) == ["spk_a"]
    np.testing.assert_allclose(
        t2w.synthesize(got, _units(N), "spk_a"),
        t2w.synthesize(model, _units(N), "random"),
        atol=1e-5,
    )
    # a non-empty output is refused, --force replaces it
    assert cli(args) == 2 and "--force" in capsys.readouterr().err
    assert cli(args + ["--force"]) == 0
    # wrong files and version are named, before anything is written
    bad = tmp_path / "bad"
    assert (
        cli(
            ["import-token2wav", "--flow", hpt, "--hift", hpt, "--version", "v1", "--out", str(bad)]
        )
        == 2
    )
    assert "missing tensor input_embedding.weight" in capsys.readouterr().err
    assert (
        cli(
            ["import-token2wav", "--flow", fpt, "--hift", fpt, "--version", "v1", "--out", str(bad)]
        )
        == 2
    )
    assert "--hift" in capsys.readouterr().err
    assert (
        cli(
            ["import-token2wav", "--flow", fpt, "--hift", hpt, "--version", "v2", "--out", str(bad)]
        )
        == 2
    )
    assert "a v1 flow" in capsys.readouterr().err
    assert not bad.exists()


def test_synthesize_batch_equals_synthesize_per_row(model):
    """Three answers (per-row speech rates: 34, 43 and 51 mel frames) in one batch padded to
    four rows: each row as `synthesize` alone, with zero noise and with a key (row i draws from
    fold_in(key, i)). The batched flow's mel is within 1e-5 of the row's alone (~5e-6:
    test_flow_batch.py, which also covers the long answers' regulator split); HiFT turns that
    into up to ~7e-5 in the waveform (measured on 0.9 s), as its source's phase is a running sum
    of F0 over the samples: the bound here is 2e-4 (the issue's for a whole synthesis: 1e-3).
    The lengths are this module's others, so the one-row programs compile once."""
    import jax

    lines, rates = [_units(N, 5), _units(25, 6), _units(N, 7)], [1.0, 1.0, 1.5]
    got = t2w.synthesize_batch(model, lines, "random", speech_rate=rates, max_batch=4)
    errs = []
    for i, u in enumerate(lines):
        want = t2w.synthesize(model, u, "random", speech_rate=rates[i])
        assert got[i].dtype == np.float32 and got[i].shape == want.shape
        errs.append(np.abs(got[i] - want).max())
        assert errs[-1] <= 2e-4 and np.abs(want).max() > 0.01
    key = jax.random.PRNGKey(3)
    noisy = t2w.synthesize_batch(
        model, lines, ["random"] * 3, noise=key, speech_rate=rates, max_batch=4
    )
    for i, u in enumerate(lines):
        want = t2w.synthesize(
            model, u, "random", noise=jax.random.fold_in(key, i), speech_rate=rates[i]
        )
        errs.append(np.abs(noisy[i] - want).max())
        assert errs[-1] <= 2e-4
        assert not np.allclose(noisy[i], got[i], atol=1e-3)
    print("max |batched - alone| per row (zero noise, then a key):", [f"{e:.1e}" for e in errs])
    # bad rows are named before anything runs
    with pytest.raises(Token2WavError, match=r"row 1: .*unit 5000 at position 1 is out of range"):
        t2w.synthesize_batch(model, [_units(5), [1, 5000]], "random")
    with pytest.raises(Token2WavError, match=r"voices: 2 entries for 3 utterances"):
        t2w.synthesize_batch(model, lines, ["random", "random"])
    with pytest.raises(Token2WavError, match=r"row 0: voice 'alice'"):
        t2w.synthesize_batch(model, lines[:1], ["alice"])
    with pytest.raises(Token2WavError, match=r"row 2: speech rate -1"):
        t2w.synthesize_batch(model, lines, "random", speech_rate=[1, 1, -1])
    assert t2w.synthesize_batch(model, [], "random") == []


def test_cli_batch_size_gives_the_same_wavs(folder, tmp_path):
    """--batch-size 1 and 4 (lines sorted by length and batched, one key per line) write the
    same wavs in line order; a line's audio is synthesize's with its line's key."""
    import jax

    lines = [_units(25, 6), _units(N, 5), _units(N, 1)]
    f = tmp_path / "units.txt"
    f.write_text("".join(_line(u) + "\n" for u in lines))
    outs = {}
    for bs in (1, 4):
        outs[bs] = tmp_path / f"wavs{bs}"
        assert (
            cli(
                [
                    "synthesize",
                    "--units",
                    str(f),
                    "--token2wav",
                    str(folder),
                    "--voice",
                    "random",
                    "--out",
                    str(outs[bs]),
                    "--noise",
                    "random",
                    "--seed",
                    "7",
                    "--batch-size",
                    str(bs),
                ]
            )
            == 0
        )
        report = json.loads((outs[bs] / "synthesize.json").read_text())
        assert [w["wav"] for w in report["wavs"]] == ["0000.wav", "0001.wav", "0002.wav"]
        assert len(report["batches"]) == (3 if bs == 1 else 1)
    model = t2w.load_token2wav(folder)
    for i, u in enumerate(lines):
        a = sf.read(outs[1] / f"{i:04d}.wav", dtype="float32")[0]
        b = sf.read(outs[4] / f"{i:04d}.wav", dtype="float32")[0]
        assert a.shape == (t2w.mel_frames(len(u)) * 256,)
        # 16-bit PCM: one rounding step apart at most, as the floats are within 2e-4
        np.testing.assert_allclose(a, b, atol=1 / 32768 + 2e-4, rtol=0)
        want = t2w.synthesize(
            model, u, "random", noise=jax.random.fold_in(jax.random.PRNGKey(7), i)
        )
        np.testing.assert_allclose(a, want, atol=1 / 32768 + 2e-4, rtol=0)
    assert (
        cli(
            [
                "synthesize",
                "--units",
                str(f),
                "--token2wav",
                str(folder),
                "--voice",
                "random",
                "--out",
                str(tmp_path / "x"),
                "--batch-size",
                "0",
            ]
        )
        == 2
    )
