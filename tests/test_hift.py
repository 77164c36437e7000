"""cslm_jax.speech.hift (CosyVoice's HiFT vocoder in JAX) against upstream's `HiFTGenerator`
(tests/cosyvoice_reference.py), at reduced widths with random weights, v1 (22,050 Hz, [8, 8]) and
v2 (24,000 Hz, [8, 5, 3]): the waveform with upstream's own random draws, the source and the
generator on their own, padded batches against rows run alone, the source cache of streaming,
the weight import (three weight-norm layouts, a `generator.` prefix, named errors), and the layer
table against upstream's at the official sizes.

Tolerances. Given upstream's f0, the source is computed to upstream's float32 rounding (1e-6);
given upstream's source, the generator agrees to float32 accumulation order (1e-5). End to end,
the F0 predictor's convs differ from PyTorch's by float32 summation order (~1e-7 relative), and the
source integrates f0 into a phase, so that difference grows along the utterance (v2's phase
gains ~1 rad per Hz of f0 per frame): a few 1e-5 in the waveform at the 12 to 24 frames used
here, under the 1e-4 bound."""

import functools

import numpy as np
import pytest
import torch

import cosyvoice_reference as ref
from cslm_jax.speech import hift
from cslm_jax.speech.hift import HiFTConfig, Token2WavError
from cslm_jax.speech.token2wav_weights import hift_from_state_dict, hift_to_state_dict, read_hift

SMALL = dict(base_channels=32, cond_channels=16)
FRAMES = 12  # mel frames of the test utterance (0.14 s for v1, 0.24 s for v2)
TOL = 1e-4


def _mel(frames, seed=1, batch=1):
    """Input: smooth in time, at a level where the random F0 predictor of `init_random` gives
    voiced frames (mostly) and unvoiced ones (f0 <= 10 Hz: no sine, more noise)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 80, frames + 2)).astype(np.float32)
    return 2.0 * (x[..., :-2] + x[..., 1:-1] + x[..., 2:]) + 1.0


_CACHE = {}


def _vocoder(version):
    """(cfg, params, upstream model with the same weights) at the reduced width, built once."""
    if version not in _CACHE:
        cfg, params = hift.init_random(version, seed=0, **SMALL)
        _CACHE[version] = cfg, params, ref.hift_reference(cfg, hift_to_state_dict(cfg, params))
    return _CACHE[version]


def _source(cfg):
    import jax

    return jax.jit(lambda p, f0, n, noise: hift.source(p, cfg, f0, n, noise))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_waveform_matches_upstream_with_its_draws(version):
    cfg, params, model = _vocoder(version)
    mel = _mel(FRAMES, seed=3)
    wave_ref, source_ref, draws = ref.run_hift(model, mel)
    noise = ref.hift_noise(cfg, draws)
    wave, wave_len, s = hift.vocode(params, cfg, mel, noise=noise, return_source=True)
    assert wave.shape == wave_ref.shape == (1, FRAMES * cfg.samples_per_frame)
    assert wave_len.tolist() == [FRAMES * cfg.samples_per_frame]
    assert 0.03 < wave_ref.std() < 0.5  # a signal, not silence or clipping
    err = np.abs(wave - wave_ref).max()
    print(
        f"{version}: waveform max |ours - upstream| = {err:.2e}, "
        f"source {np.abs(s - source_ref).max():.2e}"
    )
    assert err <= TOL

    # the source from upstream's own f0: upstream's float32 rounding, to the last bit or so
    with torch.inference_mode():
        f0_ref = model.f0_predictor(torch.as_tensor(mel)).numpy()
    assert (f0_ref < cfg.nsf_voiced_threshold).any() and (f0_ref > 100).any()  # both kinds
    s2 = np.asarray(_source(cfg)(params, f0_ref, np.array([FRAMES]), noise))
    assert np.abs(s2 - source_ref).max() <= 1e-6


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_source_cache_as_upstream_streaming(version):
    """inference(cache_source=...) (streaming: the previous chunk's source over the first
    samples), and so the generator alone: given all of upstream's source, within 1e-5."""
    cfg, params, model = _vocoder(version)
    mel = _mel(FRAMES, seed=2)
    cache = np.tanh(
        np.random.default_rng(3).standard_normal((1, 1, 5 * cfg.samples_per_frame))
    ).astype(np.float32)
    wave_ref, source_ref, draws = ref.run_hift(model, mel, cache_source=cache)
    np.testing.assert_array_equal(source_ref[:, : cache.shape[2]], cache[:, 0])
    wave, _ = hift.vocode(
        params, cfg, mel, noise=ref.hift_noise(cfg, draws), cache_source=cache[:, 0]
    )
    assert np.abs(wave - wave_ref).max() <= TOL
    full, _ = hift.vocode(params, cfg, mel, noise="zero", cache_source=source_ref)
    assert np.abs(full - wave_ref).max() <= 1e-5


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_padded_batch_equals_rows_alone(version):
    """Two mels of different lengths padded into one batch (padding that would show if it
    leaked): each row as upstream gives it run alone, within 1e-4 end to end (and as ours alone;
    XLA:CPU's convs may round the F0 differently in another batch shape, which the phase carries
    along as above), and exactly where nothing is ill-conditioned: the source from upstream's
    f0 (1e-6; v2's interpolation clamps at each row's last frame) and the generator from
    upstream's source (1e-5; convs' zero padding, the STFT's reflection and the iSTFT's last
    frames at each row's end). Padded samples are 0."""
    cfg, params, model = _vocoder(version)
    r = cfg.samples_per_frame
    lengths = [FRAMES, 7]
    mels = [_mel(n, seed=s) for n, s in zip(lengths, (9, 12))]  # each with an unvoiced frame
    rows = [ref.run_hift(model, m) for m in mels]
    batch = np.full((2, 80, FRAMES), 7.0, np.float32)
    f0 = np.full((2, FRAMES), 250.0, np.float32)
    sources = np.full((2, FRAMES * r), 0.5, np.float32)
    noise = {
        "phase": np.zeros((2, cfg.nb_harmonics + 1), np.float32),
        "noise": np.zeros((2, FRAMES * r, cfg.nb_harmonics + 1), np.float32),
    }
    for i, (m, (_, s, draws)) in enumerate(zip(mels, rows)):
        n = lengths[i]
        batch[i, :, :n] = m[0]
        with torch.inference_mode():
            f0[i, :n] = model.f0_predictor(torch.as_tensor(m)).numpy()[0]
        sources[i, : n * r] = s[0]
        d = ref.hift_noise(cfg, draws)
        noise["phase"][i] = d["phase"][0]
        noise["noise"][i, : n * r] = d["noise"][0]
    wave, wave_len = hift.vocode(params, cfg, batch, lengths, noise=noise)
    assert wave_len.tolist() == [n * r for n in lengths]
    s_ours = np.asarray(_source(cfg)(params, f0, np.array(lengths), noise))
    gen, _ = hift.vocode(params, cfg, batch, lengths, cache_source=sources)
    for i, (n, (wave_ref, s_ref, _)) in enumerate(zip(lengths, rows)):
        assert np.abs(wave[i, : n * r] - wave_ref[0]).max() <= TOL
        assert np.abs(s_ours[i, : n * r] - s_ref[0]).max() <= 1e-6
        assert np.abs(gen[i, : n * r] - wave_ref[0]).max() <= 1e-5
        alone, _ = hift.vocode(
            params,
            cfg,
            mels[i],
            noise={
                k: v[i : i + 1, : n * r] if k == "noise" else v[i : i + 1] for k, v in noise.items()
            },
        )
        assert np.abs(wave[i, : n * r] - alone[0]).max() <= TOL
        assert not wave[i, n * r :].any() and not gen[i, n * r :].any()


def test_noise_zero_is_deterministic():
    """noise="zero": the same output every call, equal to zero arrays given as draws and to
    `forward(noise=None)` jitted by the caller; a key draws noise (same key, same output)."""
    import jax

    cfg, params, _ = _vocoder("v2")
    mel = _mel(FRAMES, seed=4)
    a, _ = hift.vocode(params, cfg, mel, noise="zero")
    b, _ = hift.vocode(params, cfg, mel, noise="zero")
    np.testing.assert_array_equal(a, b)
    zeros = {
        "phase": np.zeros((1, 9), np.float32),
        "noise": np.zeros((1, FRAMES * cfg.samples_per_frame, 9), np.float32),
    }
    np.testing.assert_array_equal(hift.vocode(params, cfg, mel, noise=zeros)[0], a)
    # the traceable forward under the caller's jit: noise=None is the same zero noise
    fwd = jax.jit(functools.partial(hift.forward, cfg=cfg))
    np.testing.assert_allclose(
        np.asarray(fwd(params, mel=mel, mel_len=np.array([FRAMES]))[0]), a, rtol=0, atol=1e-6
    )
    k1, k2 = (hift.vocode(params, cfg, mel, noise=jax.random.key(7))[0] for _ in range(2))
    np.testing.assert_array_equal(k1, k2)
    assert np.abs(k1 - a).max() > 1e-3
    with pytest.raises(Token2WavError, match="noise"):
        hift.vocode(params, cfg, mel, noise="random")
    with pytest.raises(Token2WavError, match="expected phase"):
        hift.vocode(
            params, cfg, mel, noise={"phase": zeros["phase"], "noise": zeros["noise"][:, :100]}
        )
    with pytest.raises(Token2WavError, match="mel_len"):
        hift.vocode(params, cfg, mel, [FRAMES + 1])


def test_weight_norm_layouts_and_prefix_import_alike(tmp_path):
    """Upstream's state dict as torch writes it today (parametrizations), the official files'
    layout (weight_g / weight_v, which torch itself loads through its compatibility hook), plain
    weights, and a `generator.` prefix: the same parameters and the same waveform; read from
    .pt files too."""
    cfg, params, model = _vocoder("v1")
    sd_new = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(".parametrizations.weight.original0" in k for k in sd_new)
    sd_old = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in sd_new.items()
    }
    assert set(sd_old) == set(hift_to_state_dict(cfg, params, "weight_norm"))
    variants = {
        "parametrizations": sd_new,
        "weight_norm": sd_old,
        "plain": hift_to_state_dict(cfg, params, "plain"),
        "prefixed": {f"generator.{k}": v for k, v in sd_old.items()},
    }
    mel = _mel(FRAMES, seed=5)
    base, _ = hift.vocode(params, cfg, mel)
    for name, sd in variants.items():
        got = hift_from_state_dict(sd, cfg, name)
        assert got.keys() == params.keys()
        for k in params:
            np.testing.assert_allclose(
                got[k], params[k], rtol=1e-6, atol=1e-7, err_msg=f"{name} {k}"
            )
        # weights equal to the last bit or so; the phase makes that up to ~1e-5 in the wave
        assert np.abs(hift.vocode(got, cfg, mel)[0] - base).max() <= TOL, name
    # torch reads the old layout into the same model
    old = ref.hift_reference(cfg, sd_old)
    with torch.inference_mode():
        a = model.f0_predictor(torch.as_tensor(mel))
        b = old.f0_predictor(torch.as_tensor(mel))
    torch.testing.assert_close(a, b)
    for name in ("parametrizations", "prefixed"):
        path = tmp_path / f"hift_{name}.pt"
        torch.save({k: torch.as_tensor(v) for k, v in variants[name].items()}, path)
        cfg2, got = read_hift(path, "v1")
        assert (cfg2.base_channels, cfg2.cond_channels) == (32, 16)
        assert cfg2 == cfg
        for k in params:
            np.testing.assert_allclose(got[k], params[k], rtol=1e-6, atol=1e-7)


def test_import_errors_name_file_and_tensor(tmp_path):
    cfg, params, _ = _vocoder("v1")
    sd = hift_to_state_dict(cfg, params, "weight_norm")
    missing = {k: v for k, v in sd.items() if k != "resblocks.4.convs2.1.weight_v"}
    with pytest.raises(
        Token2WavError,
        match=r"hift\.pt: missing tensor resblocks\.4\.convs2\.1"
        r"\.weight_v",
    ):
        hift_from_state_dict(missing, cfg, "hift.pt")
    bad = dict(sd, **{"conv_post.bias": np.zeros(5, np.float32)})
    with pytest.raises(
        Token2WavError,
        match=r"hift\.pt: tensor conv_post\.bias has shape \(5,\), "
        r"expected \(18,\)",
    ):
        hift_from_state_dict(bad, cfg, "hift.pt")
    extra = dict(sd, **{"mpd.discriminators.0.conv.weight": np.zeros(3, np.float32)})
    with pytest.raises(Token2WavError, match="unexpected tensor mpd.discriminators.0.conv.weight"):
        hift_from_state_dict(extra, cfg, "hift.pt")
    # v1 weights read as v2: v2 has a third upsampling stage
    path = tmp_path / "hift.pt"
    torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, path)
    with pytest.raises(Token2WavError, match=rf"{path}: (missing tensor|tensor \S+ has shape)"):
        read_hift(path, "v2")
    with pytest.raises(Token2WavError, match="no such file"):
        read_hift(tmp_path / "absent.pt", "v1")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Token2WavError, match="junk.pt"):
        read_hift(tmp_path / "junk.pt", "v1")
    with pytest.raises(Token2WavError, match="unknown HiFT version"):
        HiFTConfig("v3")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_layer_table_is_upstreams_at_official_sizes(version):
    """The official sizes: every tensor name and shape of upstream's model (parametrizations
    layout), and the parameter count (upstream's, less the weight-norm gains folded in). The
    presets are the official yaml files' arguments."""
    cfg = HiFTConfig(version)
    yaml = dict(ref.HIFT_YAML[version])
    istft = yaml.pop("istft_params")
    assert (cfg.n_fft, cfg.hop_len) == (istft["n_fft"], istft["hop_len"])
    for k, v in yaml.items():
        assert getattr(cfg, k) == hift.nested_tuple(v), k
    shapes = hift.param_shapes(cfg)
    fake = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    ours = hift_to_state_dict(cfg, fake)
    theirs = ref.hift_reference(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    gains = sum(v.numel() for k, v in theirs.items() if k.endswith("original0"))
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert n == sum(v.numel() for v in theirs.values()) - gains
    print(f"{version}: {n / 1e6:.2f}M parameters")


@pytest.mark.slow
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_official_sizes_match_upstream(version):
    cfg, params = hift.init_random(version, seed=1)
    model = ref.hift_reference(cfg, hift_to_state_dict(cfg, params, "weight_norm"))
    mel = _mel(24, seed=6)
    wave_ref, _, draws = ref.run_hift(model, mel)
    wave, _ = hift.vocode(params, cfg, mel, noise=ref.hift_noise(cfg, draws))
    assert 0.03 < wave_ref.std() < 0.5
    err = np.abs(wave - wave_ref).max()
    print(f"{version} official sizes: waveform max |ours - upstream| = {err:.2e}")
    assert err <= TOL
