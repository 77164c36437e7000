"""The train step: gradient accumulation is exact, and a tiny model overfits a tiny batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cslm_jax.config import ModelConfig
from cslm_jax.model.llama import init_params
from cslm_jax.train.step import OptimizerConfig, make_optimizer, make_train_step


def test_schedule_warmup_then_cosine():
    sched = OptimizerConfig(learning_rate=1.0, total_steps=100, warmup_ratio=0.03).schedule()
    assert float(sched(0)) == 0.0 and abs(float(sched(3)) - 1.0) < 1e-6
    assert 0.45 < float(sched(52)) < 0.55 and float(sched(100)) < 1e-6
    assert float(OptimizerConfig(learning_rate=1.0, warmup_ratio=0.0).schedule()(0)) == 1.0


CFG = ModelConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    compute_dtype="float32",
)
UNITS = (64, 96)


def batch(rows, length=24, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128, (rows, length)).astype(np.int32)
    weights = (rng.random((rows, length)) < 0.6).astype(np.int32)
    return {
        "tokens": tokens,
        "positions": np.broadcast_to(np.arange(length), (rows, length)).copy(),
        "segment_ids": np.ones((rows, length), np.int32),
        "targets": np.roll(tokens, -1, axis=1),
        "loss_weights": weights,
    }


def micro(b, k):
    return {n: jnp.asarray(v.reshape(k, v.shape[0] // k, *v.shape[1:])) for n, v in b.items()}


def test_accumulation_equals_one_big_batch():
    # plain SGD: Adam's first step is ~lr*sign(g), which turns last-bit reduction-order noise in
    # near-zero gradients into visible differences and would hide what is being tested
    import optax

    opt = optax.sgd(0.5)
    step = jax.jit(make_train_step(CFG, opt, UNITS))
    params = init_params(CFG, seed=1)
    b = batch(8)
    p1, _, m1 = step(params, opt.init(params), micro(b, 1))
    p2, _, _ = step(params, opt.init(params), micro(b, 2))
    p4, _, m4 = step(params, opt.init(params), micro(b, 4))
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, c, d in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-5)
        np.testing.assert_allclose(a, d, atol=1e-6, rtol=1e-5)
    assert np.abs(jax.tree.leaves(p1)[0] - jax.tree.leaves(params)[0]).max() > 1e-4


def test_tiny_model_overfits_a_tiny_batch():
    opt = make_optimizer(OptimizerConfig(learning_rate=3e-3, total_steps=150, warmup_ratio=0.05))
    step = jax.jit(make_train_step(CFG, opt, UNITS))
    params = init_params(CFG, seed=2)
    state = opt.init(params)
    b = micro(batch(4, seed=3), 2)
    first = None
    for _ in range(150):
        params, state, m = step(params, state, b)
        first = float(m["loss"]) if first is None else first
    assert first > 4.0  # ~ln(128) at the start
    assert float(m["loss"]) < 0.3  # memorised
    assert float(m["text_loss"]) >= 0 and float(m["unit_loss"]) >= 0


@pytest.mark.parametrize("chunk,tied", [(8, False), (7, True)])
def test_chunked_cross_entropy_equals_full_logits(chunk, tied):
    """The chunked loss (LM head applied `chunk` positions at a time, rematerialised) gives the
    loss sums of the full logits, text/unit and per-task split included, and their gradients,
    with vocabulary padding rows masked and a length (24) that is no multiple of 7 or 100."""
    from cslm_jax.train.step import loss_sums

    cfg = CFG.replace(unpadded_vocab_size=120, tie_word_embeddings=tied)
    full_cfg = cfg.replace(cross_entropy="full")
    chunked_cfg = cfg.replace(cross_entropy="chunked", loss_chunk=chunk)
    assert full_cfg.loss_chunk_for(24) is None and chunked_cfg.loss_chunk_for(24) == min(chunk, 24)
    params = init_params(cfg, seed=4)
    b = {k: jnp.asarray(v) for k, v in batch(3, seed=5).items()}
    b["targets"] = b["targets"] % 120  # targets are real tokens
    b["task_ids"] = jnp.asarray(np.random.default_rng(6).integers(0, 3, (3, 24)), jnp.int32)

    def sums(c):
        def f(p):
            s = loss_sums(c, p, b, UNITS, num_tasks=3)
            return s["loss"], s

        return jax.jit(jax.grad(f, has_aux=True))(params)

    grad_f, all_f = sums(full_cfg)
    grad_c, all_c = sums(chunked_cfg)
    for k in all_f:
        np.testing.assert_allclose(all_c[k], all_f[k], rtol=1e-6, atol=1e-6, err_msg=k)
    assert float(all_f["unit_weight"]) > 0 and float(all_f["text_weight"]) > 0
    worst = max(
        float(jnp.abs(a - c).max())
        for a, c in zip(jax.tree.leaves(grad_f), jax.tree.leaves(grad_c))
    )
    assert worst < 1e-6, worst


def test_cross_entropy_auto_chunks_large_vocabularies_only():
    big = CFG.replace(vocab_size=132480, cross_entropy="auto", loss_chunk=512)
    assert big.loss_chunk_for(4096) == 512 and big.loss_chunk_for(512) is None
    assert CFG.replace(cross_entropy="auto").loss_chunk_for(4096) is None
    with pytest.raises(Exception, match="cross_entropy"):
        CFG.replace(cross_entropy="sometimes")


def test_adam_with_moments_stored_in_float32_is_optax_adamw_and_bfloat16_stays_close():
    import optax

    from cslm_jax.config import OptimizerConfig
    from cslm_jax.train.step import make_optimizer, scale_by_adam_stored_as

    key = jax.random.PRNGKey(0)
    params = {"a": jax.random.normal(key, (64, 32)), "b": {"c": jnp.ones((7,))}}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) * 1e-3, params) for i in range(5)]
    ref_tx = optax.scale_by_adam(0.9, 0.999, 1e-8)
    ours = scale_by_adam_stored_as(jnp.float32, 0.9, 0.999, 1e-8)
    low = scale_by_adam_stored_as(jnp.bfloat16, 0.9, 0.999, 1e-8)
    s_ref, s_ours, s_low = ref_tx.init(params), ours.init(params), low.init(params)
    assert jax.tree.leaves(s_low.mu)[0].dtype == jnp.bfloat16
    assert jax.tree.leaves(s_low.nu)[0].dtype == jnp.bfloat16
    for g in grads:
        u_ref, s_ref = ref_tx.update(g, s_ref)
        u_ours, s_ours = ours.update(g, s_ours)
        u_low, s_low = low.update(g, s_low)
        for x, y, z in zip(jax.tree.leaves(u_ref), jax.tree.leaves(u_ours), jax.tree.leaves(u_low)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(x, z, rtol=2e-2, atol=2e-2)  # bf16: 8 bits of mantissa
    # the configured optimizer: float32 moments are optax.adamw, bfloat16 moments are stored so
    cfg = OptimizerConfig(learning_rate=1e-3, total_steps=10, moment_dtype="bfloat16")
    state = make_optimizer(cfg).init(params)
    dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim > 0}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
