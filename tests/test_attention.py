"""The attention's hand-written gradient and causal block skipping against plain autodiff of the
textbook computation (softmax over masked float32 scores), with GQA and packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cslm_jax.config import ModelConfig
from cslm_jax.model import layers as model
from cslm_jax.model import llama
from cslm_jax.model.llama import attend, attention_mask, forward, init_params


def reference_attend(q, k, v, mask):
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * dh**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


def packed_segments(b, t, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), size=3, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(t), side="right") + 1)
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("t,blocks", [(48, 1), (64, 4), (96, 2)])
def test_attention_and_gradient_match_autodiff(t, blocks):
    b, h, kvh, dh = 2, 6, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, dh))
    k = jax.random.normal(keys[1], (b, t, kvh, dh))
    v = jax.random.normal(keys[2], (b, t, kvh, dh))
    w = jax.random.normal(keys[3], (b, t, h, dh))
    mask = attention_mask(packed_segments(b, t, t))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)) * w)

    ours = lambda q, k, v, m: model.causal_attend(q, k, v, m, blocks)  # noqa: E731
    ref_val, ref_grads = jax.jit(jax.value_and_grad(loss(reference_attend), argnums=(0, 1, 2)))(
        q, k, v
    )
    val, grads = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)
    # decoding's shape: one query row against a longer key sequence, forward only
    np.testing.assert_allclose(
        attend(q[:, -1:], k, v, mask[:, -1:]),
        reference_attend(q[:, -1:], k, v, mask[:, -1:]),
        atol=1e-6,
    )


def test_forward_with_causal_blocks_matches_one_block():
    """forward() splits rows of 256+ tokens into query blocks; logits and gradients are those of
    the unsplit computation (packed segments included)."""
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        compute_dtype="float32",
    )
    t = 256
    assert model.causal_blocks(t) == 2 and model.causal_blocks(1024) == 8
    assert model.causal_blocks(96) == 1
    params = init_params(cfg, seed=3)
    tokens = jax.random.randint(jax.random.key(1), (2, t), 0, 64)
    seg = packed_segments(2, t, 5)

    def loss(p, blocks_fn):
        orig = llama.causal_blocks  # what Llama.__call__ asks for the block count
        llama.causal_blocks = blocks_fn
        try:
            return jnp.mean(jax.nn.log_softmax(forward(cfg, p, tokens, segment_ids=seg))[..., 0])
        finally:
            llama.causal_blocks = orig

    split = jax.jit(jax.value_and_grad(lambda p: loss(p, model.causal_blocks)))
    one = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda _t: 1)))
    (split_val, split_grads), (one_val, one_grads) = split(params), one(params)
    np.testing.assert_allclose(split_val, one_val, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(split_grads), jax.tree.leaves(one_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
