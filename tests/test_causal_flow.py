"""cslm_jax.speech.causal_flow (CosyVoice 2's causal flow in JAX) against upstream's
`CausalMaskedDiffWithXvec` (tests/cosyvoice_reference.py), at reduced sizes with random weights
and upstream's own fixed noise: the encoder's output and the mel for non-streamed, streamed and
streamed-then-finalized calls, with and without a zero-shot prompt; chunk causality; two
consecutive streamed calls cut by token offset as upstream's CosyVoice2Model does; named errors;
the weight import; the layer table against upstream's at reduced and official sizes; the v2
token2wav folder through `import-token2wav` and `synthesize`; and (slow) the mel at the official
sizes.

Upstream's encoder hard-codes its width (512), look-ahead (3), upsampling (x2) and the 4 blocks
after it, so the reduced sizes keep those and shrink the rest (and the streaming chunks, so that
short utterances span several). Measured (float32, CPU): encoder output ~4e-6, mel ~5e-6; the
bound is 1e-4."""

import numpy as np
import pytest
import torch

import cosyvoice_reference as ref
from cslm_jax.speech import causal_flow as cf
from cslm_jax.speech.hift import Token2WavError
from cslm_jax.speech.token2wav_weights import flow_from_state_dict, flow_to_state_dict, read_flow

SMALL = dict(
    vocab_size=100,
    encoder_linear_units=64,
    encoder_blocks=1,
    channels=(32,),
    attention_head_dim=8,
    n_blocks=1,
    num_mid_blocks=1,
    num_heads=2,
    encoder_chunk=4,
    decoder_chunk=8,
)
TOL = 1e-4
_CACHE = {}


def _model():
    if "m" not in _CACHE:
        cfg, params = cf.init_random("v2", seed=0, **SMALL)
        _CACHE["m"] = cfg, params, ref.flow_v2_reference(cfg, flow_to_state_dict(cfg, params))
    return _CACHE["m"]


def _inputs(n, seed=1, prompt=0, vocab=100):
    rng = np.random.default_rng(seed)
    units = rng.integers(0, vocab, n)
    emb = rng.standard_normal(192).astype(np.float32) * 3.0
    if not prompt:
        return units, emb, None, None
    pu = rng.integers(0, vocab, prompt)
    pm = rng.standard_normal((2 * prompt, 80)).astype(np.float32)  # upstream: 2 per unit
    return units, emb, pu, pm


# Units of the test utterances: few shapes, so few compilations (~8 s each); the tests share
# them (13 units finalized, 11 streamed and not finalized, 7 streamed and not finalized).
N = 13
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "n,streaming,finalize,prompt",
    [
        (N, False, True, 0),
        (N, True, True, 5),
        (11, True, False, 0),
        pytest.param(N, False, True, 5, marks=SLOW),
        pytest.param(N, True, True, 0, marks=SLOW),
        pytest.param(N, True, False, 5, marks=SLOW),
    ],
)
def test_mel_matches_upstream_with_its_noise(n, streaming, finalize, prompt):
    cfg, params, model = _model()
    units, emb, pu, pm = _inputs(n, seed=n + prompt, prompt=prompt)
    mel_ref, z, _ = ref.run_flow_v2(model, units, emb, pu, pm, streaming, finalize)
    kept = n if finalize else n - 3
    assert mel_ref.shape == (1, 80, 2 * kept)
    mel = cf.causal_flow_inference(
        params, cfg, units, emb, pu, pm, noise=z, streaming=streaming, finalize=finalize
    )
    err = np.abs(mel - mel_ref).max()
    print(
        f"streaming={streaming} finalize={finalize} prompt={prompt}: mel {err:.2e} "
        f"(mel std {mel_ref.std():.2f})"
    )
    assert 0.1 < mel_ref.std() < 100
    assert err <= TOL
    # the noise is the first frames of upstream's buffer, which upstream_noise() reproduces
    np.testing.assert_array_equal(z, cf.upstream_noise()[:, : z.shape[1]])
    np.testing.assert_array_equal(
        mel,
        cf.causal_flow_inference(
            params,
            cfg,
            units,
            emb,
            pu,
            pm,
            noise="upstream",
            streaming=streaming,
            finalize=finalize,
        ),
    )


def test_upstream_noise_is_its_buffer():
    _, _, model = _model()
    z = cf.upstream_noise()
    assert z.shape == (1, cf.NOISE_FRAMES, 80) and z.dtype == np.float32
    np.testing.assert_array_equal(z, model.decoder.rand_noise.numpy().transpose(0, 2, 1))


@pytest.mark.slow
def test_padded_calls_match_upstream_with_two_levels():
    """`pad_to`, with a two-level U-Net (a strided conv down and a transposed conv up, which
    look at their neighbours: the padding must be masked out before them), streamed and not,
    with a prompt: upstream's frames."""
    cfg, params = cf.init_random("v2", seed=1, **{**SMALL, "channels": (32, 32)})
    model = ref.flow_v2_reference(cfg, flow_to_state_dict(cfg, params))
    units, emb, pu, pm = _inputs(11, seed=9, prompt=3)
    for streaming, finalize in ((False, True), (True, False)):
        mel_ref, _, _ = ref.run_flow_v2(model, units, emb, pu, pm, streaming, finalize)
        mel = cf.causal_flow_inference(
            params,
            cfg,
            units,
            emb,
            pu,
            pm,
            noise="upstream",
            streaming=streaming,
            finalize=finalize,
            pad_to=21,
        )
        assert mel.shape == mel_ref.shape and np.abs(mel - mel_ref).max() <= TOL


@pytest.mark.slow
def test_encoder_matches_upstream():
    """The encoder's projected output (mu) on its own, streamed and not finalized, with a
    prompt (run eagerly: slow to trace)."""
    import jax.numpy as jnp

    cfg, params, model = _model()
    units, emb, pu, pm = _inputs(N, seed=2, prompt=5)
    _, _, h_ref = ref.run_flow_v2(model, units, emb, pu, pm, streaming=True, finalize=False)
    all_units = np.concatenate([pu, units])
    h = np.asarray(
        cf.encoder(
            params,
            cfg,
            jnp.asarray(all_units[None, :-3]),
            jnp.asarray(all_units[None, -3:]),
            streaming=True,
        )
    )
    assert h.shape == h_ref.shape and np.abs(h - h_ref).max() <= TOL


def test_streaming_is_chunk_causal():
    """Streamed, the first chunk's frames (8 frames: 4 units and their 3 units of look-ahead)
    do not depend on later units; not streamed, they do."""
    cfg, params, _ = _model()
    a, emb, _, _ = _inputs(N, seed=3)
    b = a.copy()
    b[7:] = (b[7:] + 1) % 100
    for streaming, n, finalize in ((True, 11, False), (False, N, True)):
        ma, mb = (
            cf.causal_flow_inference(
                params, cfg, x[:n], emb, noise="upstream", streaming=streaming, finalize=finalize
            )
            for x in (a, b)
        )
        head = np.abs(ma[..., :8] - mb[..., :8]).max()
        assert (head < 1e-5) if streaming else (head > 1e-2), (streaming, head)
        assert np.abs(ma[..., 8:] - mb[..., 8:]).max() > 1e-2


def test_consecutive_streamed_calls_match_upstreams_driver():
    """What CosyVoice2Model.token2wav does with the flow while units arrive (hop = the encoder's
    chunk, 4 here, 25 officially): the units so far plus 3 of look-ahead, streamed and not
    finalized, the frames from 2 * token_offset on kept; the last call finalized with every
    unit (upstream's last call is not streamed). The streamed calls are padded to one length
    (`pad_to`: one compiled program for the growing prefix). Each call's new frames match
    upstream's, the frames a later call gives again agree with the earlier call's, and the
    pieces add up to 2 frames per unit."""
    cfg, params, model = _model()
    units, emb, _, _ = _inputs(N, seed=4)
    hop, look, pieces, offset = cfg.encoder_chunk, cfg.pre_lookahead_len, [], 0
    earlier = None
    calls = [
        (units[: hop + look], True, False),
        (units[: 2 * hop + look], True, False),
        (units, False, True),
    ]
    for upto, streaming, finalize in calls:
        mel_ref, _, _ = ref.run_flow_v2(model, upto, emb, streaming=streaming, finalize=finalize)
        mel = cf.causal_flow_inference(
            params,
            cfg,
            upto,
            emb,
            noise="upstream",
            streaming=streaming,
            finalize=finalize,
            pad_to=16 if streaming else None,
        )
        new, new_ref = cf.new_frames(cfg, mel, offset), mel_ref[:, :, 2 * offset :]
        assert new.shape == new_ref.shape and np.abs(new - new_ref).max() <= TOL
        if earlier is not None and streaming:
            assert np.abs(mel[..., : earlier.shape[2]] - earlier).max() < 1e-5
        earlier = mel
        pieces.append(new)
        offset += hop
    assert [p.shape[2] for p in pieces] == [8, 8, 10]
    assert sum(p.shape[2] for p in pieces) == cfg.mel_len(len(units))


def test_named_errors():
    cfg, params, _ = _model()
    units, emb, pu, pm = _inputs(8, prompt=4)
    with pytest.raises(Token2WavError, match="unit 100 at position 2 is out of range 0..99"):
        cf.causal_flow_inference(params, cfg, np.array([1, 2, 100, 3]), emb)
    with pytest.raises(Token2WavError, match="192-d x-vector"):
        cf.causal_flow_inference(params, cfg, units, emb[:80])
    with pytest.raises(Token2WavError, match="4 prompt units and 0 prompt mel"):
        cf.causal_flow_inference(params, cfg, units, emb, pu, None)
    with pytest.raises(Token2WavError, match="needs more than 3 .* look-ahead only"):
        cf.causal_flow_inference(params, cfg, units[:3], emb, finalize=False)
    with pytest.raises(Token2WavError, match="no units"):
        cf.causal_flow_inference(params, cfg, units[:0], emb)
    with pytest.raises(Token2WavError, match="noise has 5 frames, this call needs 16"):
        cf.causal_flow_inference(params, cfg, units, emb, noise=np.zeros((1, 5, 80), np.float32))
    with pytest.raises(Token2WavError, match="noise 'gauss'"):
        cf.causal_flow_inference(params, cfg, units, emb, noise="gauss")
    with pytest.raises(Token2WavError, match="leaves no frames of the answer"):
        cf.causal_flow_inference(params, cfg, units[:1], emb, pu[:1], np.zeros((9, 80)))
    with pytest.raises(Token2WavError, match="pad_to 10: this call has 12 units"):
        cf.causal_flow_inference(params, cfg, units, emb, pu, pm, pad_to=10)
    with pytest.raises(Token2WavError, match="unknown causal flow version"):
        cf.CausalFlowConfig(version="v1")
    with pytest.raises(Token2WavError, match="input_size 256 != encoder_size 512"):
        cf.CausalFlowConfig(input_size=256)


def test_zero_and_key_noise():
    import jax

    cfg, params, _ = _model()
    units, emb, _, _ = _inputs(N)
    a = cf.causal_flow_inference(params, cfg, units, emb)
    assert a.shape == (1, 80, 2 * N)
    np.testing.assert_array_equal(a, cf.causal_flow_inference(params, cfg, units, emb))
    k = cf.causal_flow_inference(params, cfg, units, emb, noise=jax.random.PRNGKey(1))
    assert not np.allclose(a, k)
    np.testing.assert_array_equal(
        k, cf.causal_flow_inference(params, cfg, units, emb, noise=jax.random.PRNGKey(1))
    )


def test_import_from_saved_state_dict(tmp_path):
    cfg, params, model = _model()
    sd = flow_to_state_dict(cfg, params)
    path = tmp_path / "flow.pt"
    torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, path)
    # the estimator's head count and the streaming chunks are not in the tensors: given
    cfg2, params2 = read_flow(
        path, "v2", num_heads=2, attention_head_dim=8, encoder_chunk=4, decoder_chunk=8
    )
    assert cfg2 == cfg and set(params2) == set(params)
    read = read_flow(path, "v2")[0]
    assert (read.num_heads, read.attention_head_dim, read.encoder_chunk) == (8, 2, 25)
    units, emb, _, _ = _inputs(N)
    mel_ref, z, _ = ref.run_flow_v2(model, units, emb)
    mel = cf.causal_flow_inference(params2, cfg2, units, emb, noise=z)
    assert np.abs(mel - mel_ref).max() <= TOL
    bad = dict(sd)
    del bad["encoder.up_encoders.3.self_attn.pos_bias_v"]
    with pytest.raises(
        Token2WavError, match="missing tensor encoder.up_encoders.3.self_attn.pos_bias_v"
    ):
        flow_from_state_dict(bad, cfg, "flow.pt")
    bad = dict(sd, **{"encoder.up_layer.conv.weight": np.zeros((512, 512, 3), np.float32)})
    with pytest.raises(Token2WavError, match="encoder.up_layer.conv.weight has shape"):
        flow_from_state_dict(bad, cfg, "flow.pt")
    with pytest.raises(Token2WavError, match="unexpected tensor extra .*flow v2"):
        flow_from_state_dict(dict(sd, extra=np.zeros(1)), cfg, "flow.pt")
    with pytest.raises(Token2WavError, match="a v2 flow .*give --version v2"):
        read_flow(path, "v1")


def _state_dict_shapes(cfg):
    out = {}
    for layer in cf.layers(cfg):
        if layer.kind == "param":
            out[layer.name] = layer.shape
            continue
        out[f"{layer.name}.weight"] = layer.shape
        if layer.kind in ("linear", "conv", "norm"):
            out[f"{layer.name}.bias"] = (layer.shape[0],)
        elif layer.kind == "convT":
            out[f"{layer.name}.bias"] = (layer.shape[1],)
    return out


def test_layer_table_is_upstreams_at_reduced_sizes():
    cfg, params, model = _model()
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sd == _state_dict_shapes(cfg)
    assert sd == {k: v.shape for k, v in flow_to_state_dict(cfg, params).items()}
    # two U-Net levels (a strided conv down, a transposed conv up), against upstream too
    cfg2 = cf.CausalFlowConfig(**{**SMALL, "channels": (32, 32)})
    sd2 = {k: tuple(v.shape) for k, v in ref.flow_v2_reference(cfg2).state_dict().items()}
    assert sd2 == _state_dict_shapes(cfg2)


def test_official_sizes_are_upstreams():
    """CausalFlowConfig() against the model the yaml's arguments build: the same tensors and
    shapes, and the preset gives back FLOW_V2_YAML's arguments (upstream's model is built,
    nothing is run)."""
    cfg = cf.CausalFlowConfig()
    y = ref.flow_v2_yaml_of(cfg)
    for part in ("flow", "encoder", "decoder", "estimator"):
        assert y[part] == ref.FLOW_V2_YAML["v2"][part], part
    model = ref.flow_v2_reference(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == _state_dict_shapes(cfg)
    n = sum(int(np.prod(s)) for s in cf.param_shapes(cfg).values())
    assert n == sum(p.numel() for p in model.parameters())
    print(f"v2 flow: {n / 1e6:.2f}M parameters")


@pytest.mark.slow
def test_official_sizes_match_upstream():
    """The official sizes (random weights), 30 units with a 10-unit prompt, streamed and not
    finalized (chunks of 25 units / 50 frames take effect)."""
    cfg, params = cf.init_random("v2", seed=0)
    model = ref.flow_v2_reference(cfg, flow_to_state_dict(cfg, params))
    units, emb, pu, pm = _inputs(30, seed=5, prompt=10, vocab=6561)
    mel_ref, z, _ = ref.run_flow_v2(model, units, emb, pu, pm, streaming=True, finalize=False)
    mel = cf.causal_flow_inference(
        params, cfg, units, emb, pu, pm, noise=z, streaming=True, finalize=False
    )
    err = np.abs(mel - mel_ref).max()
    print(f"official sizes: mel max |ours - upstream| = {err:.2e} (std {mel_ref.std():.2f})")
    assert err <= TOL


# -- v2 token2wav folders: import-token2wav --version v2, synthesize ------------------------------


def test_v2_token2wav_import_and_synthesize(tmp_path, capsys):
    """A random v2 folder synthesises 24 kHz audio of 2 mel frames per unit x 480 samples per
    frame through `cslm-jax synthesize`; the same models saved as upstream's flow.pt / hift.pt
    and imported with `import-token2wav --version v2` synthesise the same audio; the flow's mel
    in the synthesis is causal_flow_inference's."""
    import json

    import soundfile as sf

    from cslm_jax.cli.main import main as cli
    from cslm_jax.speech import hift
    from cslm_jax.speech import token2wav as t2w
    from cslm_jax.speech.token2wav_weights import hift_to_state_dict

    folder = t2w.save_random_token2wav(tmp_path / "t2w", version="v2", seed=0)
    model = t2w.load_token2wav(folder)
    assert model.version == "v2" and isinstance(model.flow_cfg, cf.CausalFlowConfig)
    assert model.hift_cfg.upsample_rates == (8, 5, 3) and model.hift_cfg.sampling_rate == 24000
    assert (model.sample_rate, model.units_per_second, model.samples_per_frame) == (24000, 25, 480)
    rng = np.random.default_rng(7)
    lines = [rng.integers(0, 6561, 8).tolist(), rng.integers(0, 6561, 8).tolist()]
    f = tmp_path / "units.txt"
    f.write_text("".join("".join(f"<{u}>" for u in line) + "\n" for line in lines))
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
    waves = []
    for i, line in enumerate(lines):
        wave, sr = sf.read(out / f"{i:04d}.wav", dtype="float32")
        assert sr == 24000 and wave.shape == (2 * len(line) * 480,)
        assert np.abs(wave).max() > 0.01
        waves.append(wave)
    report = json.loads((out / "synthesize.json").read_text())
    assert report["version"] == "v2" and report["sample_rate"] == 24000
    assert [w["mel_frames"] for w in report["wavs"]] == [16, 16]
    # the synthesis is the flow's mel vocoded
    mel = cf.causal_flow_inference(
        model.flow_params, model.flow_cfg, lines[0], model.voices["random"]
    )
    direct, n = hift.vocode(model.hift_params, model.hift_cfg, mel, noise="zero")
    # (the two lines ran as one batch: its bound, test_v2_synthesize_batch_equals_synthesize_...)
    np.testing.assert_allclose(np.asarray(direct[0, : int(n[0])]), waves[0], atol=1e-3)
    # a merged-units speech rate resamples v2's mel (upstream's speed change)
    slow = t2w.synthesize(model, lines[1], "random", speech_rate=1.5)
    assert slow.shape == (int(16 * 1.5) * 480,)

    # upstream's state dicts, saved by torch, imported as v2
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
    imported = tmp_path / "imported"
    assert (
        cli(
            [
                "import-token2wav",
                "--flow",
                fpt,
                "--hift",
                hpt,
                "--version",
                "v2",
                "--voices",
                str(tmp_path / "spk2info.pt"),
                "--out",
                str(imported),
            ]
        )
        == 0
    )
    assert "token2wav v2 (24000 Hz, 25 units/s, 6561 codes)" in capsys.readouterr().out
    got = t2w.load_token2wav(imported)
    assert got.flow_cfg == model.flow_cfg and got.hift_cfg == model.hift_cfg
    np.testing.assert_allclose(
        t2w.synthesize(got, lines[0], "spk_a"), t2w.synthesize(model, lines[0], "random"), atol=1e-5
    )
    # a v2 flow.pt given as v1 is named, and nothing is written
    bad = tmp_path / "bad"
    assert (
        cli(
            ["import-token2wav", "--flow", fpt, "--hift", hpt, "--version", "v1", "--out", str(bad)]
        )
        == 2
    )
    assert "a v2 flow" in capsys.readouterr().err and not bad.exists()
    # units past v2's vocabulary are named with their line
    f.write_text("<1><6561>\n")
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
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "units.txt:1" in err and "unit 6561" in err and "0..6560" in err


def test_stretch_is_upstreams_speed_change():
    """`stretch` (the v2 speech rate) is upstream's `F.interpolate(mel, size, mode="linear")`."""
    mel = np.random.default_rng(0).standard_normal((1, 80, 16)).astype(np.float32)
    for n in (24, 10, 16, 33):
        want = torch.nn.functional.interpolate(torch.from_numpy(mel), size=n, mode="linear").numpy()
        got = cf.stretch(mel, n)
        assert got.shape == (1, 80, n) and np.abs(got - want).max() <= 1e-5  # rounding


@pytest.mark.slow
def test_batch_rows_match_upstream():
    """causal_flow_batch: rows of different lengths (one with a prompt, the batch padded to 4
    rows and 16 units) in one call, streamed: each row upstream's mel, zero past its length; a
    key's row i is causal_flow_inference with fold_in(key, i); bad rows named. (Slow: ~40 s,
    the vmapped program's compilation.)"""
    import jax

    cfg, params, model = _model()
    rows = [_inputs(N, seed=N + 5, prompt=5), _inputs(9, seed=22), _inputs(4, seed=23)]
    args = ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    mel, lens = cf.causal_flow_batch(params, cfg, *args, noise="upstream", streaming=True, rows=4)
    assert mel.shape == (3, 80, 2 * N) and lens.tolist() == [2 * N, 18, 8]
    for i, (u, e, pu, pm) in enumerate(rows):
        mel_ref, _, _ = ref.run_flow_v2(model, u, e, pu, pm, streaming=True, finalize=True)
        assert np.abs(mel[i, :, : lens[i]] - mel_ref).max() <= TOL, i
        assert not mel[i, :, lens[i] :].any()
    key = jax.random.PRNGKey(5)
    keyed, _ = cf.causal_flow_batch(params, cfg, *args, noise=key, streaming=True, rows=4)
    alone = cf.causal_flow_inference(
        params,
        cfg,
        rows[0][0],
        rows[0][1],
        rows[0][2],
        rows[0][3],
        noise=jax.random.fold_in(key, 0),
        streaming=True,
    )
    assert np.abs(keyed[0] - alone[0]).max() <= 1e-5 and not np.allclose(keyed[0], mel[0])
    with pytest.raises(Token2WavError, match="row 1: units: unit 100 at position 0"):
        cf.causal_flow_batch(params, cfg, [[1, 2], [100]], rows[0][1])


def test_v2_synthesize_batch_equals_synthesize_per_row(tmp_path):
    """v2 rows batched (`synthesize_batch`: one `causal_flow_batch` call, then HiFT batched):
    three answers (8 units each: 16 mel frames, one at speech rate 1.5: 24) in one batch padded
    to four rows, each as `synthesize` alone (keys and the CLI: the slow test below). Measured (float32, CPU): the batched flow's mel within ~6e-6 of the row's alone (bound
    1e-5, test_flow_batch.py's); v2's HiFT (480 samples a frame, its source's phase a running
    sum of F0) turns that into up to ~2e-4 in the waveform, so the bound on audio is the
    issue's for a whole synthesis, 1e-3."""
    from cslm_jax.speech import token2wav as t2w

    folder = t2w.save_random_token2wav(tmp_path / "t2w", version="v2", seed=0)
    model = t2w.load_token2wav(folder)
    rng = np.random.default_rng(11)
    lines = [rng.integers(0, 6561, 8).tolist() for _ in range(3)]
    rates = [1.0, 1.5, 1.0]
    emb = model.voices["random"]
    # the batched flow (the rows resampled to their rates): each row's mel alone
    mel, mel_len = t2w._causal_flow_rows(
        model, lines, np.stack([emb] * 3), "zero", [16, 24, 16], 4, "highest"
    )
    assert mel.shape == (3, 80, 64) and mel_len.tolist() == [16, 24, 16]
    for i, u in enumerate(lines):
        alone = cf.causal_flow_inference(model.flow_params, model.flow_cfg, u, emb)
        alone = cf.stretch(alone, int(16 * rates[i]))
        assert np.abs(mel[i : i + 1, :, : mel_len[i]] - alone).max() <= 1e-5, i
        assert not mel[i, :, mel_len[i] :].any()
    hits = cf._jitted_batch.cache_info().hits
    got = t2w.synthesize_batch(model, lines, "random", speech_rate=rates, max_batch=4)
    assert cf._jitted_batch.cache_info().hits == hits + 1  # one batched flow call for the rows
    errs = []
    for i, u in enumerate(lines):
        want = t2w.synthesize(model, u, "random", speech_rate=rates[i])
        assert got[i].shape == want.shape == (int(16 * rates[i]) * 480,)
        errs.append(np.abs(got[i] - want).max())
        assert errs[-1] <= 1e-3 and np.abs(want).max() > 0.01
    print("v2: max |batched - alone| per row:", [f"{e:.1e}" for e in errs])


@pytest.mark.slow
def test_v2_cli_batch_size_gives_the_same_wavs(tmp_path):
    """`cslm-jax synthesize --noise random --batch-size 1` / `4` on a v2 folder write the same
    wavs, each its line alone with its line's key (fold_in(seed, line)); bound as
    test_v2_synthesize_batch_equals_synthesize_per_row's. (Slow: ~40 s of compiling.)"""
    import json

    import jax
    import soundfile as sf

    from cslm_jax.cli.main import main as cli
    from cslm_jax.speech import token2wav as t2w

    folder = t2w.save_random_token2wav(tmp_path / "t2w", version="v2", seed=0)
    model = t2w.load_token2wav(folder)
    rng = np.random.default_rng(11)
    lines = [rng.integers(0, 6561, 8).tolist() for _ in range(3)]
    key = jax.random.PRNGKey(7)
    alone = [
        t2w.synthesize(model, u, "random", noise=jax.random.fold_in(key, i))
        for i, u in enumerate(lines)
    ]
    f = tmp_path / "units.txt"
    f.write_text("".join("".join(f"<{u}>" for u in line) + "\n" for line in lines))
    for bs in (1, 4):
        out = tmp_path / f"wavs{bs}"
        args = ["synthesize", "--units", str(f), "--token2wav", str(folder), "--voice", "random"]
        args += ["--out", str(out), "--noise", "random", "--seed", "7", "--batch-size", str(bs)]
        assert cli(args) == 0
        report = json.loads((out / "synthesize.json").read_text())
        assert len(report["batches"]) == (3 if bs == 1 else 1)
        for i in range(3):  # 16-bit PCM's rounding on top
            wave, sr = sf.read(out / f"{i:04d}.wav", dtype="float32")
            assert sr == 24000 and wave.shape == alone[i].shape
            assert np.abs(wave - alone[i]).max() <= 1 / 32768 + 1e-3, (bs, i)
