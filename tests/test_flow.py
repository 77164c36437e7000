"""cslm_jax.speech.flow (CosyVoice's v1 flow model in JAX) against upstream's
`MaskedDiffWithXvec` (tests/cosyvoice_reference.py), at reduced sizes with random weights: the
encoder's output, mu and the final mel with upstream's own starting noise (with and without a
zero-shot prompt, short answers and one long enough for the regulator's head/mid/tail split),
the mel length as the regulator's argument, named errors, the weight import, the layer table
against upstream's at the official sizes, and (slow, ~45 s) the mel at the official sizes.

Measured (float32, CPU): encoder output ~1e-6, mu ~3e-6, mel ~1e-5 at reduced sizes; mel 6e-6
at the official sizes; the bound is 1e-4."""

import numpy as np
import pytest
import torch

import cosyvoice_reference as ref
from cslm_jax.speech import flow
from cslm_jax.speech.hift import Token2WavError
from cslm_jax.speech.token2wav_weights import flow_from_state_dict, flow_to_state_dict, read_flow

SMALL = dict(
    input_size=32,
    encoder_size=64,
    encoder_heads=2,
    encoder_linear_units=128,
    encoder_blocks=2,
    channels=(32, 32),
    attention_head_dim=16,
    n_blocks=1,
    num_mid_blocks=2,
    num_heads=2,
)
TOL = 1e-4
_CACHE = {}


def _model():
    if "m" not in _CACHE:
        cfg, params = flow.init_random("v1", seed=0, **SMALL)
        _CACHE["m"] = cfg, params, ref.flow_reference(cfg, flow_to_state_dict(cfg, params))
    return _CACHE["m"]


def _inputs(n, seed=1, prompt=0):
    rng = np.random.default_rng(seed)
    units = rng.integers(0, 4096, n)
    emb = rng.standard_normal(192).astype(np.float32) * 3.0
    if not prompt:
        return units, emb, None, None
    pu = rng.integers(0, 4096, prompt)
    pm = rng.standard_normal((int(prompt / 50 * 22050 / 256), 80)).astype(np.float32)
    return units, emb, pu, pm


@pytest.mark.parametrize("n,prompt", [(12, 0), (10, 6), (45, 0)])
def test_mel_matches_upstream_with_its_noise(n, prompt):
    import jax.numpy as jnp

    cfg, params, model = _model()
    units, emb, pu, pm = _inputs(n, seed=n + prompt, prompt=prompt)
    mel_ref, z, h_ref, mu_ref = ref.run_flow(model, units, emb, pu, pm)
    m = cfg.mel_len(n)
    assert mel_ref.shape == (1, 80, m)
    all_units = np.concatenate([pu, units]) if prompt else units
    h = np.asarray(
        flow.encoder(
            params, cfg, jnp.asarray(all_units[None], jnp.int32), jnp.array([len(all_units)])
        )
    )
    mu = np.asarray(
        flow.encode(
            params,
            cfg,
            jnp.asarray(all_units[None], jnp.int32),
            jnp.array([len(all_units)]),
            m,
            prompt,
            0 if pm is None else len(pm),
        )
    )
    mel = flow.flow_inference(params, cfg, units, emb, pu, pm, noise=z)
    e_h, e_mu, e_mel = (
        np.abs(h - h_ref).max(),
        np.abs(mu - mu_ref).max(),
        np.abs(mel - mel_ref).max(),
    )
    print(
        f"n={n} prompt={prompt}: encoder {e_h:.2e}, mu {e_mu:.2e}, mel {e_mel:.2e} "
        f"(mel std {mel_ref.std():.2f})"
    )
    assert 0.1 < mel_ref.std() < 100
    assert e_h <= TOL and e_mu <= TOL and e_mel <= TOL


def test_mel_length_is_the_argument_and_zero_noise_is_deterministic():
    cfg, params, _ = _model()
    units, emb, _, _ = _inputs(8)
    assert flow.flow_inference(params, cfg, units, emb).shape == (1, 80, cfg.mel_len(8))
    a = flow.flow_inference(params, cfg, units, emb, mel_len=23, noise="zero")
    b = flow.flow_inference(params, cfg, units, emb, mel_len=23, noise="zero")
    assert a.shape == (1, 80, 23) and np.array_equal(a, b)
    import jax

    c = flow.flow_inference(params, cfg, units, emb, mel_len=23, noise=jax.random.PRNGKey(0))
    assert c.shape == (1, 80, 23) and not np.allclose(a, c)
    assert cfg.mel_len(100) == 172 and cfg.seam_frames == 34


def test_named_errors():
    cfg, params, _ = _model()
    units, emb, pu, _ = _inputs(8, prompt=4)
    with pytest.raises(Token2WavError, match="unit 4096 at position 2 is out of range"):
        flow.flow_inference(params, cfg, np.array([1, 2, 4096, 3]), emb)
    with pytest.raises(Token2WavError, match="unit -1"):
        flow.flow_inference(params, cfg, np.array([-1, 2]), emb)
    with pytest.raises(Token2WavError, match="192-d x-vector"):
        flow.flow_inference(params, cfg, units, emb[:80])
    with pytest.raises(Token2WavError, match="prompt units and 0 prompt mel"):
        flow.flow_inference(params, cfg, units, emb, pu, None)
    with pytest.raises(Token2WavError, match="needs more than 68 frames"):
        flow.flow_inference(params, cfg, np.arange(50), emb, mel_len=60)
    with pytest.raises(Token2WavError, match="noise has shape"):
        flow.flow_inference(params, cfg, units, emb, noise=np.zeros((1, 5, 80), np.float32))
    with pytest.raises(Token2WavError, match="unknown flow version"):
        flow.FlowConfig(version="v3")


def test_import_from_saved_state_dict(tmp_path):
    cfg, params, _ = _model()
    sd = flow_to_state_dict(cfg, params)
    path = tmp_path / "flow.pt"
    torch.save({k: torch.as_tensor(v) for k, v in sd.items()}, path)
    # the estimator's head count is not in the tensors (heads x head width is): given
    cfg2, params2 = read_flow(path, "v1", num_heads=2, attention_head_dim=16)
    assert cfg2 == cfg
    assert read_flow(path, "v1")[0].attention_head_dim == 4  # 8 heads of 4 read off
    assert set(params2) == set(params)
    units, emb, _, _ = _inputs(9)
    z = np.random.default_rng(0).standard_normal((1, cfg.mel_len(9), 80)).astype(np.float32)
    assert np.array_equal(
        flow.flow_inference(params, cfg, units, emb, noise=z),
        flow.flow_inference(params2, cfg2, units, emb, noise=z),
    )
    bad = dict(sd)
    del bad["encoder.encoders.1.self_attn.pos_bias_v"]
    with pytest.raises(
        Token2WavError, match="missing tensor encoder.encoders.1.self_attn.pos_bias_v"
    ):
        flow_from_state_dict(bad, cfg, "flow.pt")
    bad = dict(sd, **{"encoder_proj.weight": np.zeros((80, 3), np.float32)})
    with pytest.raises(Token2WavError, match="encoder_proj.weight has shape"):
        flow_from_state_dict(bad, cfg, "flow.pt")
    with pytest.raises(Token2WavError, match="unexpected tensor extra"):
        flow_from_state_dict(dict(sd, extra=np.zeros(1)), cfg, "flow.pt")
    with pytest.raises(Token2WavError, match="no such file"):
        read_flow(tmp_path / "nope.pt")


def test_layer_table_is_upstreams_at_reduced_sizes():
    cfg, _, model = _model()
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: v.shape for k, v in flow_to_state_dict(cfg, flow.init_random(**SMALL)[1]).items()}
    assert sd == ours


def test_official_sizes_are_upstreams():
    """FlowConfig() against the model the yaml's arguments build: the same tensors and shapes
    (104.87M parameters), and FlowConfig's preset gives back FLOW_YAML's arguments (about a
    second: upstream's model is built, nothing is run)."""
    cfg = flow.FlowConfig()
    y = ref.flow_yaml_of(cfg)
    for part in ("flow", "encoder", "length_regulator", "decoder", "estimator"):
        assert y[part] == ref.FLOW_YAML["v1"][part], part
    model = ref.flow_reference(cfg)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {}
    for layer in flow.layers(cfg):
        if layer.kind == "param":
            ours[layer.name] = layer.shape
            continue
        ours[f"{layer.name}.weight"] = layer.shape
        if layer.kind in ("linear", "conv", "norm"):
            ours[f"{layer.name}.bias"] = (layer.shape[0],)
        elif layer.kind == "convT":
            ours[f"{layer.name}.bias"] = (layer.shape[1],)
    assert sd == ours
    n = sum(int(np.prod(s)) for s in flow.param_shapes(cfg).values())
    assert round(n / 1e6, 2) == 104.87


@pytest.mark.slow
def test_official_sizes_match_upstream():
    """The official sizes (104.87M parameters, random weights), 20 units with a 5-unit prompt."""
    cfg, params = flow.init_random("v1", seed=0)
    model = ref.flow_reference(cfg, flow_to_state_dict(cfg, params))
    units, emb, pu, pm = _inputs(20, seed=5, prompt=5)
    mel_ref, z, _, _ = ref.run_flow(model, units, emb, pu, pm)
    mel = flow.flow_inference(params, cfg, units, emb, pu, pm, noise=z)
    err = np.abs(mel - mel_ref).max()
    print(f"official sizes: mel max |ours - upstream| = {err:.2e} (std {mel_ref.std():.2f})")
    assert err <= TOL
