"""Splash attention (the Pallas TPU kernel, run in interpret mode on this CPU) against the einsum
attention with its hand-written gradient: causal, packed segments, grouped-query heads, lengths
that are not multiples of the kernel's blocks; alone, inside the model, and under a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cslm_jax.config import ConfigError, ModelConfig
from cslm_jax.kernels.splash import block_size, splash_attend, target_platform
from cslm_jax.model.layers import attend, attention_mask
from cslm_jax.model.llama import forward, init_params, uses_splash
from test_attention import packed_segments as segments  # four packed segments per row


@pytest.mark.parametrize("t,heads,kv_heads", [(256, 8, 2), (200, 4, 4), (384, 4, 1)])
def test_splash_equals_einsum_forward_and_gradients(t, heads, kv_heads):
    """GQA 32/8 scaled down to 8/2, MHA and MQA; 256 = one block, 200 padded to 256, 384 = 3
    blocks of 128; four packed segments per row."""
    b, dh = 2, 32
    keys = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(keys[0], (b, t, heads, dh))
    k = jax.random.normal(keys[1], (b, t, kv_heads, dh))
    v = jax.random.normal(keys[2], (b, t, kv_heads, dh))
    w = jax.random.normal(keys[3], (b, t, heads, dh))
    seg = segments(b, t, seed=t)
    mask = attention_mask(seg)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ref_out = attend(q, k, v, mask)
    out = jax.jit(lambda q, k, v: splash_attend(q, k, v, seg))(q, k, v)
    assert float(jnp.abs(out - ref_out).max()) < 1e-5
    ref_grads = jax.jit(jax.grad(loss(lambda q, k, v: attend(q, k, v, mask)), argnums=(0, 1, 2)))(
        q, k, v
    )
    grads = jax.jit(jax.grad(loss(lambda q, k, v: splash_attend(q, k, v, seg)), argnums=(0, 1, 2)))(
        q, k, v
    )
    for name, g, r in zip("qkv", grads, ref_grads):
        assert float(jnp.abs(g - r).max()) < 1e-4, name


def test_block_sizes_follow_the_length():
    assert [block_size(n) for n in (128, 256, 384, 1024, 4096)] == [128, 256, 128, 512, 512]
    with pytest.raises(ValueError, match="multiple of 128"):
        block_size(200)


def test_model_with_splash_equals_einsum_logits_and_gradients():
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        compute_dtype="float32",
        attention="einsum",
    )
    splash = cfg.replace(attention="splash")
    assert uses_splash(splash) and not uses_splash(cfg)
    assert target_platform() == "cpu" and not uses_splash(cfg.replace(attention="auto"))
    params = init_params(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 160), 0, 96)
    seg = segments(2, 160, seed=3)

    def loss(c):
        return jax.jit(
            jax.value_and_grad(
                lambda p: jnp.mean(
                    jax.nn.log_softmax(forward(c, p, tokens, segment_ids=seg))[..., 0]
                )
            )
        )

    (v1, g1), (v2, g2) = loss(cfg)(params), loss(splash)(params)
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    worst = max(
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2))
    )
    assert worst < 1e-5, worst
    with pytest.raises(ConfigError, match="attention"):
        cfg.replace(attention="flash")


def test_splash_under_a_mesh_runs_per_shard():
    """Under a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices the kernel runs in shard_map
    (batch over data x fsdp, heads over tensor) and equals the unsharded einsum attention."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cslm_jax.parallel.sharding import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    b, t, h, kvh, dh = 4, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (b, t, h, dh))
    k = jax.random.normal(keys[1], (b, t, kvh, dh))
    v = jax.random.normal(keys[2], (b, t, kvh, dh))
    seg = segments(b, t, seed=8)
    ref = attend(q, k, v, attention_mask(seg))
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, s: splash_attend(q, k, v, s))(
            jax.device_put(q, spec),
            jax.device_put(k, spec),
            jax.device_put(v, spec),
            jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), None))),
        )
    assert float(jnp.abs(out - ref).max()) < 1e-5
