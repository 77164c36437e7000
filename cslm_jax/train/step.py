"""The optimizer and the jit-able train step (the training loop, checkpoints and CLI build on it).

Loss: token-level cross-entropy weighted by the CSLM loss mask, summed over every micro-batch of
the global batch and divided by the global count of trained tokens, so k micro-batches of b rows
give exactly the update of one batch of k*b rows. Also reported: the loss on text targets and on
speech-unit targets separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cslm_jax.config import ModelConfig, OptimizerConfig
from cslm_jax.model.llama import bind, chunked_token_losses, token_losses


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    if cfg.moment_dtype == "float32":
        return optax.chain(
            optax.clip_by_global_norm(cfg.clip_norm),
            optax.adamw(
                cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay
            ),
        )
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        scale_by_adam_stored_as(jnp.dtype(cfg.moment_dtype), cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(cfg.schedule()),
    )


def scale_by_adam_stored_as(
    dtype, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    """Adam's direction (as optax.scale_by_adam, bias-corrected, eps outside the root) with both
    moments kept in `dtype` between steps: each step computes in float32 and rounds the new
    moments to `dtype` once. With float32 it is optax.scale_by_adam exactly (tested)."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)  # noqa: E731
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
        nu = jax.tree.map(
            lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu
        )
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(
            lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates
        )
        cast = lambda x: x.astype(dtype)  # noqa: E731
        return out, optax.ScaleByAdamState(
            count=count, mu=jax.tree.map(cast, mu), nu=jax.tree.map(cast, nu)
        )

    return optax.GradientTransformation(init, update)


def loss_sums(
    model_cfg: ModelConfig,
    params,
    batch,
    unit_range: tuple[int, int],
    rules=None,
    num_tasks: int = 1,
) -> dict:
    """Sums over one micro-batch, float32 scalars unless noted: loss, weight (trained tokens),
    text_loss/text_weight, unit_loss/unit_weight, and task_loss/task_weight [num_tasks] split by
    the task each target comes from. batch: tokens, positions, segment_ids, targets,
    loss_weights, [task_ids], each [B, T] int32. The per-token losses come from the full logits
    or chunk by chunk (`ModelConfig.cross_entropy`); the sums are the same either way."""
    model = bind(model_cfg, params, rules)
    chunk = model_cfg.loss_chunk_for(batch["tokens"].shape[1])
    if chunk is None:
        logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        token_loss = token_losses(logits, batch["targets"])
    else:
        hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        token_loss = chunked_token_losses(model, hidden, batch["targets"], chunk)
    targets = batch["targets"].reshape(-1)
    w = batch["loss_weights"].reshape(-1).astype(jnp.float32)
    is_unit = ((targets >= unit_range[0]) & (targets < unit_range[1])).astype(jnp.float32)
    wu, wt = w * is_unit, w * (1.0 - is_unit)
    weighted = token_loss * w
    task_ids = batch.get("task_ids")
    task_ids = jnp.zeros_like(targets) if task_ids is None else task_ids.reshape(-1)
    return {
        "loss": jnp.sum(weighted),
        "weight": jnp.sum(w),
        "text_loss": jnp.sum(token_loss * wt),
        "text_weight": jnp.sum(wt),
        "unit_loss": jnp.sum(token_loss * wu),
        "unit_weight": jnp.sum(wu),
        "task_loss": jax.ops.segment_sum(weighted, task_ids, num_segments=num_tasks),
        "task_weight": jax.ops.segment_sum(w, task_ids, num_segments=num_tasks),
    }


def make_train_step(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    unit_range: tuple[int, int],
    rules=None,
    num_tasks: int = 1,
):
    """step(params, opt_state, batch) -> (params, opt_state, metrics).

    `batch` leaves are [k, b, T]: k micro-batches accumulated with `lax.scan` (gradients of the
    summed loss, divided once by the global trained-token count). A step whose loss or gradient
    norm is not finite leaves params and optimizer state unchanged (metrics["finite"] is 0): the
    caller then stops or counts a skipped step, and never holds a poisoned state."""

    def micro(params, mb):
        def f(p):
            sums = loss_sums(model_cfg, p, mb, unit_range, rules, num_tasks)
            return sums["loss"], sums

        grads, sums = jax.grad(f, has_aux=True)(params)
        return grads, sums

    def step(params, opt_state, batch):
        zeros = jax.tree.map(jnp.zeros_like, params)
        sums0 = {
            k: jnp.zeros((num_tasks,) if k.startswith("task_") else (), jnp.float32)
            for k in (
                "loss",
                "weight",
                "text_loss",
                "text_weight",
                "unit_loss",
                "unit_weight",
                "task_loss",
                "task_weight",
            )
        }

        def body(carry, mb):
            g_acc, s_acc = carry
            g, s = micro(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, s)), None

        (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), batch)
        denom = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        loss = sums["loss"] / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        metrics = {
            "loss": loss,
            "tokens_trained": sums["weight"],
            "text_loss": sums["text_loss"] / jnp.maximum(sums["text_weight"], 1.0),
            "unit_loss": sums["unit_loss"] / jnp.maximum(sums["unit_weight"], 1.0),
            "text_tokens": sums["text_weight"],
            "unit_tokens": sums["unit_weight"],
            "task_loss": sums["task_loss"] / jnp.maximum(sums["task_weight"], 1.0),
            "task_tokens": sums["task_weight"],
            "grad_norm": grad_norm,
            "finite": finite.astype(jnp.int32),
        }
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    return step
