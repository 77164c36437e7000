"""Parameters sharded by the rules table on 8 fake CPU devices; sharded forward == unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cslm_jax.config import ConfigError, ModelConfig
from cslm_jax.model.llama import forward, init_params, param_shardings
from cslm_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec, make_mesh

CFG = ModelConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    compute_dtype="float32",
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
)

# What the default rules table gives (embed->fsdp; vocab, heads, kv_heads, mlp->tensor).
EXPECTED = {
    (2, 2, 2): {
        "embed": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"),
        "final_norm": P(),
        "layers/q_proj": P(None, "fsdp", "tensor"),
        "layers/k_proj": P(None, "fsdp", "tensor"),
        "layers/v_proj": P(None, "fsdp", "tensor"),
        "layers/o_proj": P(None, "tensor", None, "fsdp"),
        "layers/gate_proj": P(None, "fsdp", "tensor"),
        "layers/up_proj": P(None, "fsdp", "tensor"),
        "layers/down_proj": P(None, "tensor", "fsdp"),
        "layers/attn_norm": P(),
        "layers/mlp_norm": P(),
    },
    (1, 8, 1): {
        "embed": P(None, "fsdp"),
        "lm_head": P("fsdp"),
        "final_norm": P(),
        "layers/q_proj": P(None, "fsdp"),
        "layers/k_proj": P(None, "fsdp"),
        "layers/v_proj": P(None, "fsdp"),
        "layers/o_proj": P(None, None, None, "fsdp"),
        "layers/gate_proj": P(None, "fsdp"),
        "layers/up_proj": P(None, "fsdp"),
        "layers/down_proj": P(None, None, "fsdp"),
        "layers/attn_norm": P(),
        "layers/mlp_norm": P(),
    },
}


def flat(tree):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_parameters_carry_rule_shardings_and_forward_matches(shape):
    assert len(jax.devices()) == 8
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    params = init_params(CFG, seed=3, mesh=mesh)
    got = {k: v.sharding.spec for k, v in flat(params).items()}
    assert got == EXPECTED[shape]
    # each device holds only its slice: the embedding's per-device shard is 1/(fsdp*tensor)
    emb = params["embed"]
    shard = emb.addressable_shards[0].data
    assert shard.size * (mesh.shape["fsdp"] * mesh.shape["tensor"]) == emb.size

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (8, 24)))
    segments = jnp.asarray(np.repeat([[1] * 10 + [2] * 14], 8, axis=0))
    positions = jnp.asarray(np.repeat([list(range(10)) + list(range(14))], 8, axis=0))
    single = jax.device_put(params, jax.devices()[0])
    ref = forward(CFG, single, tokens, positions, segments)

    batch = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh=mesh))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, t, pos, s: forward(CFG, p, t, pos, s, DEFAULT_RULES))
        out = fn(params, *(jax.device_put(x, batch) for x in (tokens, positions, segments)))
    assert out.sharding.spec[0] == (("data", "fsdp") if shape == (2, 2, 2) else "fsdp")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)


def test_rules_are_config_and_errors_are_clear():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    rules = dict(DEFAULT_RULES, embed=None, kv_heads=None, mlp=["fsdp", "tensor"])
    shard = param_shardings(CFG, mesh, rules)
    assert shard["layers"]["gate_proj"].spec == P(None, None, ("fsdp", "tensor"))
    assert shard["layers"]["k_proj"].spec == P()
    assert shard["embed"].spec == P("tensor")
    # 2 kv heads cannot be split 4 ways by the default rules: refused, naming the parameter
    with pytest.raises(
        ConfigError, match=r"parameter \['layers'\]\['k_proj'\].*kv_heads.*not divisible"
    ):
        param_shardings(CFG, mesh)
    with pytest.raises(ConfigError, match="mesh axis 'model'"):
        logical_to_spec(("embed",), {"embed": "model"})
    with pytest.raises(ConfigError, match="needs 12 devices"):
        make_mesh({"data": 3, "fsdp": 4, "tensor": 1})
    with pytest.raises(ConfigError, match="not divisible by 3"):
        make_mesh({"data": 3, "fsdp": -1})


def test_checkpoint_restores_into_the_current_mesh(make_hf_llama, tmp_path):
    """A checkpoint written from host memory restores straight into a sharded layout."""
    from cslm_jax.convert.hf import import_hf
    from cslm_jax.storage.checkpoint import load_params, read_metadata

    hf_dir, _ = make_hf_llama(num_kv_heads=2, num_heads=4)
    ckpt = import_hf(hf_dir, tmp_path / "ck", speech_units=8, log=lambda *_: None)
    _, cfg, _ = read_metadata(ckpt)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = param_shardings(cfg, mesh)
    sharded = load_params(ckpt, shardings=shardings)
    host = load_params(ckpt)
    for (path, arr), (_, want) in zip(
        jax.tree_util.tree_flatten_with_path(sharded)[0],
        jax.tree_util.tree_flatten_with_path(shardings)[0],
    ):
        assert arr.sharding == want, path
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(host)):
        np.testing.assert_array_equal(np.asarray(a), b)
