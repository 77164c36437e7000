"""Model properties: packing isolation, explicit positions, configs, vocabulary padding mask."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cslm_jax.config import ConfigError, ModelConfig, load_model_config
from cslm_jax.model.llama import Llama, forward, init_params, param_shapes

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def tiny(**kw):
    base = load_model_config(CONFIGS / "tiny.yaml")
    return base.replace(**kw)


def test_packed_documents_match_separate_runs():
    cfg = tiny(vocab_size=256, num_layers=3)
    params = init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, 23), rng.integers(0, 256, 17)
    pad = 40 - len(a) - len(b)
    tokens = np.concatenate([a, b, np.zeros(pad, int)])[None]
    segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.arange(pad)])[None]
    packed = forward(
        cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)
    )
    alone_a = forward(cfg, params, jnp.asarray(a[None]))
    alone_b = forward(cfg, params, jnp.asarray(b[None]))
    np.testing.assert_allclose(packed[0, : len(a)], alone_a[0], atol=2e-5, rtol=0)
    np.testing.assert_allclose(packed[0, len(a) : len(a) + len(b)], alone_b[0], atol=2e-5, rtol=0)
    # without segment ids the second document would see the first: the property is not vacuous
    leaky = forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions))
    assert np.abs(leaky[0, len(a) : len(a) + len(b)] - alone_b[0]).max() > 1e-3


def test_explicit_positions_shift_rope():
    cfg = tiny(vocab_size=256)
    params = init_params(cfg)
    tokens = jnp.arange(10)[None]
    default = forward(cfg, params, tokens)
    same = forward(cfg, params, tokens, jnp.arange(10)[None])
    shifted = forward(cfg, params, tokens, jnp.arange(100, 110)[None])
    np.testing.assert_array_equal(default, same)
    # RoPE is relative: shifting every position leaves attention (and logits) unchanged ...
    np.testing.assert_allclose(shifted, default, atol=1e-4)
    # ... while changing relative distances does not
    spread = forward(cfg, params, tokens, (jnp.arange(10) * 3)[None])
    assert np.abs(spread - default).max() > 1e-3


def test_padding_rows_are_masked():
    cfg = tiny(vocab_size=256, unpadded_vocab_size=250)
    logits = forward(cfg, init_params(cfg), jnp.zeros((1, 4), jnp.int32))
    assert (logits[..., 250:] < -1e30).all() and (jnp.abs(logits[..., :250]) < 1e3).all()


def test_nnx_module_carries_logical_axes_and_matches_forward():
    from flax import nnx

    cfg = tiny(vocab_size=256)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    axes = jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"],
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    expected = jax.tree.map(
        lambda spec: spec[1],
        param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], tuple),
    )
    assert axes.to_pure_dict() == expected
    tokens = jnp.arange(12)[None]
    np.testing.assert_array_equal(model(tokens), forward(cfg, model.params(), tokens))


def test_configs_load_with_exact_8b_shape():
    cfg = load_model_config(CONFIGS / "llama3_1_8b.yaml")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.rope_scaling["original_max_position_embeddings"] == 8192
    assert cfg.num_params() == 8_030_261_248  # Llama-3.1-8B's published count
    assert load_model_config(CONFIGS / "tiny.yaml", ["num_layers=3"]).num_layers == 3


@pytest.mark.parametrize(
    "change,field",
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"remat_policy": "most"}, "remat_policy"),
        ({"compute_dtype": "int8"}, "compute_dtype"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ],
)
def test_bad_model_configs_name_the_field(change, field):
    data = tiny().to_dict() | change
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(data)
