"""The Llama-3 decoder in Flax NNX, computed exactly as `transformers` computes `LlamaForCausalLM`.

Parameter schema (the checkpoint's tree, independent of the module library; L layers, D hidden,
H query heads, K kv heads, Dh head dim, F MLP width, V vocabulary rows):

    embed                 [V, D]          (vocab, embed)
    layers/attn_norm      [L, D]          (layers, norm)
    layers/q_proj         [L, D, H, Dh]   (layers, embed, heads, head_dim)
    layers/k_proj         [L, D, K, Dh]   (layers, embed, kv_heads, head_dim)
    layers/v_proj         [L, D, K, Dh]   (layers, embed, kv_heads, head_dim)
    layers/o_proj         [L, H, Dh, D]   (layers, heads, head_dim, embed)
    layers/mlp_norm       [L, D]          (layers, norm)
    layers/gate_proj      [L, D, F]       (layers, embed, mlp)
    layers/up_proj        [L, D, F]       (layers, embed, mlp)
    layers/down_proj      [L, F, D]       (layers, mlp, embed)
    final_norm            [D]             (norm,)
    lm_head               [D, V]          (embed, vocab)   absent when embeddings are tied

Layers are stacked on a leading axis so the forward can `lax.scan` over them (compile time does
not grow with depth); the same tree runs unscanned with `scan_layers: false`.
RoPE uses HF's rotate-half layout, so conversion is transposes and reshapes only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cslm_jax.config import ModelConfig
from cslm_jax.parallel.sharding import constrain

LAYER_PARAMS = {
    "attn_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "heads", "head_dim"),
    "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "o_proj": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm": ("layers", "norm"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}


def param_shapes(cfg: ModelConfig) -> dict:
    """{name: (shape, logical names)} for every parameter, in the schema above."""
    L, D, H, K, Dh, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    layer_shapes = {
        "attn_norm": (L, D), "q_proj": (L, D, H, Dh), "k_proj": (L, D, K, Dh),
        "v_proj": (L, D, K, Dh), "o_proj": (L, H, Dh, D), "mlp_norm": (L, D),
        "gate_proj": (L, D, F), "up_proj": (L, D, F), "down_proj": (L, F, D),
    }
    out = {"embed": ((V, D), ("vocab", "embed")),
           "layers": {k: (s, LAYER_PARAMS[k]) for k, s in layer_shapes.items()},
           "final_norm": ((D,), ("norm",))}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = ((D, V), ("embed", "vocab"))
    return out


def _dtype(name: str):
    return jnp.dtype(name)


# -- building blocks (pure functions, shapes in docstrings) -----------------------------------------

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


def attention_mask(segment_ids: jax.Array, kv_segment_ids: jax.Array | None = None,
                   q_index: jax.Array | None = None, kv_index: jax.Array | None = None) -> jax.Array:
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
    mm = jnp.broadcast_to(mask[:, None, None], (b, 1, g, t, mask.shape[-1])).reshape(b, 1, g * t, -1)
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


def _causal_blocks(length: int) -> int:
    """How many query blocks `_causal_attend` splits a row of `length` tokens into: blocks of at
    least 128 queries, at most 8 blocks (beyond that the saving is small and the graph large)."""
    for n in (8, 4, 2):
        if length % n == 0 and length // n >= 128:
            return n
    return 1


def _causal_attend(q, k, v, mask, blocks: int):
    """`attend` for self-attention under a mask that is causal by index (forward's): query block
    i only reads keys [0, (i+1)*T/blocks), skipping the blocks above the diagonal that the mask
    zeroes anyway (their probabilities are exactly 0: same result, about half the work)."""
    t = q.shape[1]
    if blocks <= 1 or t % blocks or k.shape[1] != t:
        return attend(q, k, v, mask)
    c = t // blocks
    outs = [attend(q[:, i * c:(i + 1) * c], k[:, :(i + 1) * c], v[:, :(i + 1) * c],
                   mask[:, i * c:(i + 1) * c, :(i + 1) * c]) for i in range(blocks)]
    return jnp.concatenate(outs, axis=1)


REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attn_out", "mlp_out"),
}


def decoder_layer(cfg: ModelConfig, rules, x: jax.Array, p: dict, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, blocks: int = 1) -> jax.Array:
    """One pre-norm Llama block. x [B, T, D] in compute dtype; p holds one layer's params.
    With blocks > 1 the mask must be causal by index (see _causal_attend)."""
    cd = x.dtype
    b, t, d = x.shape

    def proj(inp, w, out_shape):
        # 2-D matmuls: XLA:CPU runs the gradients of batched 3-D einsums at about half speed.
        flat = inp.reshape(b * t, -1) @ w.astype(cd).reshape(-1, math.prod(out_shape))
        return flat.reshape(b, t, *out_shape)

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = proj(h, p["q_proj"], p["q_proj"].shape[1:])
    k = proj(h, p["k_proj"], p["k_proj"].shape[1:])
    v = proj(h, p["v_proj"], p["v_proj"].shape[1:])
    q = checkpoint_name(constrain(q, ("batch", "length", "act_heads", None), rules), "qkv_proj")
    k = checkpoint_name(constrain(k, ("batch", "length", "act_kv_heads", None), rules), "qkv_proj")
    v = checkpoint_name(constrain(v, ("batch", "length", "act_kv_heads", None), rules), "qkv_proj")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = _causal_attend(q, k, v, mask, blocks)
    attn = checkpoint_name(proj(o.reshape(b, t, -1), p["o_proj"], (d,)), "attn_out")
    x = constrain(x + attn, ("batch", "length", "act_embed"), rules)
    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = proj(h, p["gate_proj"], p["gate_proj"].shape[1:])
    up = proj(h, p["up_proj"], p["up_proj"].shape[1:])
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"), rules)
    mlp = checkpoint_name(proj(act, p["down_proj"], (d,)), "mlp_out")
    return constrain(x + mlp, ("batch", "length", "act_embed"), rules)


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, rules=None) -> jax.Array:
    """Logits [B, T, V] float32 for tokens [B, T] int32.

    positions [B, T] (default 0..T-1) drive RoPE; segment_ids [B, T] (default all 1) keep packed
    documents apart. Logits of vocabulary padding rows are set to a large negative number.
    """
    b, t = tokens.shape
    cd = _dtype(cfg.compute_dtype)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    x = jnp.take(params["embed"], tokens, axis=0).astype(cd)
    x = constrain(x, ("batch", "length", "act_embed"), rules)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
    cos, sin = cos.astype(cd), sin.astype(cd)
    mask = attention_mask(segment_ids)

    # attention_mask is causal by index: blocks above the diagonal can be skipped
    layer = functools.partial(decoder_layer, cfg, rules, blocks=_causal_blocks(t))
    if cfg.remat_policy != "none":
        layer = jax.checkpoint(layer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    stacked = params["layers"]
    if cfg.scan_layers:
        def body(carry, layer_params):
            return layer(carry, layer_params, cos, sin, mask), None
        x, _ = jax.lax.scan(body, x, stacked)
    else:
        for i in range(cfg.num_layers):
            x = layer(x, jax.tree.map(lambda a: a[i], stacked), cos, sin, mask)

    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    # As a 2-D matmul: XLA:CPU's gradient of the 3-D einsum form is several times slower.
    logits = jnp.dot(x.reshape(b * t, -1), head.astype(cd),
                     preferred_element_type=jnp.float32).reshape(b, t, -1)
    logits = constrain(logits, ("batch", "length", "act_vocab"), rules)
    if cfg.real_vocab_size < cfg.vocab_size:
        valid = jnp.arange(cfg.vocab_size) < cfg.real_vocab_size
        logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
    return logits


# -- the NNX module ------------------------------------------------------------------------------

class LayerStack(nnx.Module):
    """The decoder layers' parameters, stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, shapes: dict, rngs: nnx.Rngs):
        dtype = _dtype(cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.initializer_range)
        for name, (shape, names) in shapes.items():
            if name.endswith("_norm"):
                value = jnp.ones(shape, dtype)
            else:
                value = normal(rngs.params(), shape, dtype)
            setattr(self, name, nnx.Param(value, logical_axes=names))


class Llama(nnx.Module):
    """Llama-3 causal LM. `model(tokens, positions, segment_ids)` -> float32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=None):
        self.cfg = cfg
        self.rules = None if rules is None else tuple(sorted(
            (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(rules).items()))
        shapes = param_shapes(cfg)
        dtype = _dtype(cfg.param_dtype)
        normal = nnx.initializers.normal(cfg.initializer_range)
        (shape, names) = shapes["embed"]
        self.embed = nnx.Param(normal(rngs.params(), shape, dtype), logical_axes=names)
        self.layers = LayerStack(cfg, shapes["layers"], rngs)
        (shape, names) = shapes["final_norm"]
        self.final_norm = nnx.Param(jnp.ones(shape, dtype), logical_axes=names)
        if "lm_head" in shapes:
            (shape, names) = shapes["lm_head"]
            self.lm_head = nnx.Param(normal(rngs.params(), shape, dtype), logical_axes=names)

    def params(self) -> dict:
        """The parameter tree (schema in the module docstring) as plain arrays."""
        return nnx.state(self, nnx.Param).to_pure_dict()

    def __call__(self, tokens, positions=None, segment_ids=None):
        rules = None if self.rules is None else dict(self.rules)
        return forward(self.cfg, self.params(), tokens, positions, segment_ids, rules)


# -- parameters on a mesh -------------------------------------------------------------------------

def _is_spec(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def param_shardings(cfg: ModelConfig, mesh, rules=None) -> dict:
    """NamedSharding per parameter from its logical axis names and the rules table."""
    from cslm_jax.parallel.sharding import named_sharding

    def one(path, spec):
        shape, names = spec
        return named_sharding(mesh, names, rules, shape, what=f"parameter {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg), is_leaf=_is_spec)


def init_params(cfg: ModelConfig, seed: int = 0, mesh=None, rules=None) -> dict:
    """Fresh parameters (HF's initialisation: normal(initializer_range), norms at one), created
    directly in their shardings when a mesh is given (no full copy on one device)."""
    def make():
        return Llama(cfg, rngs=nnx.Rngs(seed)).params()

    if mesh is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=param_shardings(cfg, mesh, rules))()


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B*T] float32 for logits [B, T, V] and int targets [B, T]:
    logsumexp minus the target logit, on a flattened [B*T, V] view (faster on XLA:CPU)."""
    flat = logits.reshape(-1, logits.shape[-1])
    target_logit = jnp.take_along_axis(flat, targets.reshape(-1, 1), axis=-1)[:, 0]
    return jax.nn.logsumexp(flat, axis=-1) - target_logit


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple:
    """(sum of weighted token losses, sum of weights); weights [B, T]."""
    w = weights.reshape(-1).astype(jnp.float32)
    return jnp.sum(token_losses(logits, targets) * w), jnp.sum(w)
