"""The decoder's building blocks as pure functions over arrays (shapes in docstrings): RMSNorm,
RoPE with llama3 scaling, attention masks, grouped-query attention with its hand-written
gradient, attention against a KV cache, and the matmul that serves every projection (XLA's dot,
or the native CPU kernel for weights stored in its panel layout). `cslm_jax.model.llama`
composes them into the Llama block.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cslm_jax.config import ModelConfig
from cslm_jax.kernels import cpu_matmul


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x [..., D] any float dtype; variance in float32 as HF does; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """[Dh/2] float32 inverse frequencies, with llama3 rope scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if cfg.rope_type != "llama3":
        return inv_freq
    rs = cfg.rope_scaling
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_len = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] int -> cos, sin [B, T, Dh] float32 (HF's concatenated halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, Dh]; cos/sin [B, T, Dh] already in x's dtype."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention_mask(
    segment_ids: jax.Array,
    kv_segment_ids: jax.Array | None = None,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
) -> jax.Array:
    """[B, Tq, Tk] bool: causal by index within the row, and only within the same segment.

    Packed documents never attend to each other; positions may restart per document, which is
    why causality uses the index in the row, not the position.
    """
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    tq, tk = segment_ids.shape[1], kv_segment_ids.shape[1]
    q_index = jnp.arange(tq) if q_index is None else q_index
    kv_index = jnp.arange(tk) if kv_index is None else kv_index
    causal = q_index[..., :, None] >= kv_index[..., None, :]
    same = segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal & same


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention. q [B, T, H, Dh]; k, v [B, S, K, Dh]; mask [B, T, S] bool.

    Scores and softmax in float32 (as HF's eager path), probabilities cast back to q's dtype.
    Returns [B, T, H, Dh].

    Computed per kv head with the group's queries stacked along the rows, q [B, K, G*T, Dh]:
    both products are then plain batched matmuls, and the softmax runs along the minor axis
    (XLA:CPU otherwise picks transposed layouts and copies the [B, K, G, T, S] scores around).
    The gradient is written by hand (`_attention`): it recomputes the probabilities from q and k
    and the saved row max and sum instead of keeping [B, K, G, T, S] probabilities alive
    between the forward and the backward pass.
    """
    b, t, h, dh = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qm = q.reshape(b, t, kvh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, dh)
    mm = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1])).reshape(
        b, 1, g * t, -1
    )
    out = _attention(qm, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mm)
    return out.reshape(b, kvh, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _masked_scores(qm, km, mm):
    scores = jnp.einsum("bkmd,bksd->bkms", qm, km, preferred_element_type=jnp.float32)
    scores = scores * (qm.shape[-1] ** -0.5)
    return jnp.where(mm, scores, jnp.finfo(jnp.float32).min)


@jax.custom_vjp
def _attention(qm, km, vm, mm):
    """qm [B, K, M, Dh] (M = G*T), km, vm [B, K, S, Dh], mm [B, 1, M, S] bool -> [B, K, M, Dh]."""
    return _attention_fwd(qm, km, vm, mm)[0]


def _attention_fwd(qm, km, vm, mm):
    scores = _masked_scores(qm, km, mm)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    # jax.nn.softmax's exact arithmetic: exp(x - max) / sum
    probs = (unnormalized / row_sum).astype(qm.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, vm)
    return out, (qm, km, vm, mm, out, row_max, row_sum)


def _attention_bwd(res, d_out):
    qm, km, vm, mm, out, row_max, row_sum = res
    # the forward's probabilities, recomputed with the same operations
    probs = jnp.exp(_masked_scores(qm, km, mm) - row_max) / row_sum
    d_v = jnp.einsum("bkms,bkmd->bksd", probs.astype(vm.dtype), d_out)
    d_probs = jnp.einsum("bkmd,bksd->bkms", d_out, vm, preferred_element_type=jnp.float32)
    # softmax backward: sum_s d_probs * probs == sum_d d_out * out (one row of out = probs @ v)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - delta) * (qm.shape[-1] ** -0.5)).astype(qm.dtype)
    d_q = jnp.einsum("bkms,bksd->bkmd", d_scores, km)
    d_k = jnp.einsum("bkms,bkmd->bksd", d_scores, qm)
    return d_q, d_k, d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_blocks(length: int) -> int:
    """How many query blocks `causal_attend` splits a row of `length` tokens into: blocks of at
    least 128 queries, at most 8 blocks (beyond that the saving is small and the graph large)."""
    for n in (8, 4, 2):
        if length % n == 0 and length // n >= 128:
            return n
    return 1


def causal_attend(q, k, v, mask, blocks: int):
    """`attend` for self-attention under a mask that is causal by index (forward's): query block
    i only reads keys [0, (i+1)*T/blocks), skipping the blocks above the diagonal that the mask
    zeroes anyway (their probabilities are exactly 0: same result, about half the work)."""
    t = q.shape[1]
    if blocks <= 1 or t % blocks or k.shape[1] != t:
        return attend(q, k, v, mask)
    c = t // blocks
    outs = [
        attend(
            q[:, i * c : (i + 1) * c],
            k[:, : (i + 1) * c],
            v[:, : (i + 1) * c],
            mask[:, i * c : (i + 1) * c, : (i + 1) * c],
        )
        for i in range(blocks)
    ]
    return jnp.concatenate(outs, axis=1)


def cached_attention(q, ck, cv, mask):
    """One new query per row against a KV cache: q [B, 1, H, Dh], ck, cv [B, K, S, Dh], mask
    [B, 1, S] bool -> [B, 1, H, Dh]. The arithmetic of `attend` (float32 scores and softmax,
    probabilities cast back to q's dtype), with the group's G = H / K queries as rows and the
    cache read in its own layout (no transpose per step)."""
    b, _, h, dh = q.shape
    kvh = ck.shape[1]
    qm = q.reshape(b, kvh, h // kvh, dh)  # [B, K, G, Dh]
    out, _ = _attention_fwd(qm, ck, cv, mask[:, None])
    return out.reshape(b, 1, h, dh)


def dense(x: jax.Array, w: jax.Array, n: int, out_dtype=None) -> jax.Array:
    """x [M, In] @ a weight matrix: [In, n] through XLA's dot (`out_dtype`: its preferred
    element type), or [ceil(n / 32), In, 32] panels through the native CPU kernel (float32; see
    `cslm_jax.kernels.cpu_matmul`, used for decoding where it reads weights faster)."""
    if w.ndim == 3:
        return cpu_matmul.matmul(x, w, n)
    return jnp.dot(x, w, preferred_element_type=out_dtype)
