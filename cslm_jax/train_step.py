"""The optimizer and the jit-able train step (the training loop, checkpoints and CLI build on it).

Loss: token-level cross-entropy weighted by the CSLM loss mask, summed over every micro-batch of
the global batch and divided by the global count of trained tokens, so k micro-batches of b rows
give exactly the update of one batch of k*b rows. Also reported: the loss on text targets and on
speech-unit targets separately.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from cslm_jax.config import ModelConfig
from cslm_jax.model import forward, token_losses


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to zero, global-norm clipping. Defaults are the
    reference's (PyTorch AdamW betas/eps, weight decay 0, HF Trainer's clip 1.0, warmup 3%)."""

    learning_rate: float = 6e-5
    total_steps: int = 1000
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0

    def schedule(self):
        warmup = int(round(self.warmup_ratio * self.total_steps))
        if warmup == 0:      # as HF's cosine schedule: no warmup means the peak rate at step 0
            return optax.cosine_decay_schedule(self.learning_rate, max(self.total_steps, 1))
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warmup, max(self.total_steps, warmup + 1), end_value=0.0)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay))


def loss_sums(model_cfg: ModelConfig, params, batch, unit_range: tuple[int, int], rules=None):
    """Sums over one micro-batch: (loss, weight, text loss, text weight, unit loss, unit weight).
    batch: tokens, positions, segment_ids, targets, loss_weights, each [B, T]."""
    logits = forward(model_cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                     rules)
    token_loss = token_losses(logits, batch["targets"])
    targets = batch["targets"].reshape(-1)
    w = batch["loss_weights"].reshape(-1).astype(jnp.float32)
    is_unit = ((targets >= unit_range[0]) & (targets < unit_range[1])).astype(jnp.float32)
    wu, wt = w * is_unit, w * (1.0 - is_unit)
    return jnp.stack([jnp.sum(token_loss * w), jnp.sum(w), jnp.sum(token_loss * wt), jnp.sum(wt),
                      jnp.sum(token_loss * wu), jnp.sum(wu)])


def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation,
                    unit_range: tuple[int, int], rules=None):
    """step(params, opt_state, batch) -> (params, opt_state, metrics).

    `batch` leaves are [k, b, T]: k micro-batches accumulated with `lax.scan` (gradients of the
    summed loss, divided once by the global trained-token count)."""

    def micro(params, mb):
        def f(p):
            sums = loss_sums(model_cfg, p, mb, unit_range, rules)
            return sums[0], sums
        grads, sums = jax.grad(f, has_aux=True)(params)
        return grads, sums

    def step(params, opt_state, batch):
        zeros = jax.tree.map(jnp.zeros_like, params)

        def body(carry, mb):
            g_acc, s_acc = carry
            g, s = micro(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s), None

        (grads, sums), _ = jax.lax.scan(body, (zeros, jnp.zeros(6, jnp.float32)), batch)
        denom = jnp.maximum(sums[1], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": sums[0] / denom, "tokens_trained": sums[1],
                   "text_loss": sums[2] / jnp.maximum(sums[3], 1.0),
                   "unit_loss": sums[4] / jnp.maximum(sums[5], 1.0),
                   "grad_norm": optax.global_norm(grads)}
        return params, opt_state, metrics

    return step
