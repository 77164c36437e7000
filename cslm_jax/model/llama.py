"""The Llama-3 decoder in Flax NNX, computed exactly as `transformers` computes `LlamaForCausalLM`.

The modules here are the one definition of the decoder: `DecoderLayer` holds one block's weights
(created from the rows of `cslm_jax.model.schema`) and its computation; training, prefill and
KV-cache decoding all run `DecoderLayer.__call__` (with or without a cache). `Llama` holds the
embedding, the layers, the final norm and the head.

The layers come in two layouts of the same parameters:

* **stacked** (training, checkpoints, conversion): one `DecoderLayer` whose weights carry a
  leading `layers` axis; the forward `lax.scan`s over it (compile time does not grow with depth)
  or, with `scan_layers: false`, slices it layer by layer.
* **decoding** (`decoding_params`): one `DecoderLayer` per layer with weights of their own (a
  step then reads each weight once instead of copying a slice out of a stack first), in the
  compute dtype, matmul weights as matrices [In, Out] with q/k/v and gate/up side by side
  (`schema.FUSED`: one matmul each; their columns interleaved per kv head / MLP block,
  `fused_groups`), stored in the native CPU kernel's panel layout where it serves
  (`cslm_jax.kernels.cpu_matmul`), or split over a mesh's `tensor` axis by the training rules
  (`decoding_params(cfg, params, mesh)`, `decoding_shardings`, `kv_cache_sharding`).

The functional view the optimizer, Orbax and the converters work with is the parameter tree of
`nnx.state(model, nnx.Param)` as plain arrays (`Llama.params()`, `init_params`); `bind` turns
such a tree back into a module (inside jit), and `forward` is `bind(...)(tokens, ...)`.
RoPE uses HF's rotate-half layout, so conversion is transposes and reshapes only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from cslm_jax.config import ConfigError, ModelConfig
from cslm_jax.kernels import cpu_matmul
from cslm_jax.kernels.splash import splash_attend, target_platform
from cslm_jax.model import schema
from cslm_jax.model.layers import (
    apply_rope,
    attend,
    attention_mask,
    cached_attention,
    causal_attend,
    causal_blocks,
    dense,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
)
from cslm_jax.model.schema import FUSED, param_shapes  # noqa: F401  (param_shapes: public API)
from cslm_jax.parallel.sharding import MESH_AXES, constrain, make_mesh, named_sharding

NEG = float(np.finfo(np.float32).min)  # the "never" logit of vocabulary padding rows

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attn_out", "mlp_out"),
}


def uses_splash(cfg: ModelConfig) -> bool:
    """Whether training self-attention goes through the splash kernel (`ModelConfig.attention`;
    "auto": when the traced computation runs on TPUs)."""
    return cfg.attention == "splash" or (cfg.attention == "auto" and target_platform() == "tpu")


class LayerCache(NamedTuple):
    """One layer's keys and values [B, K, S, Dh] in the compute dtype (kv heads before slots:
    attention reads each head's keys as one contiguous matrix). Keys are stored rotated."""

    k: jax.Array
    v: jax.Array


class KVCache(NamedTuple):
    """The whole model's cache: k, v tuples of L arrays [B, K, S, Dh]. Slot s of row b holds the
    token at RoPE position s - pad[b] (see `cslm_jax.infer.decode`)."""

    k: tuple
    v: tuple


# The logical axes of one layer's cache [B, K, S, Dh] (`kv_cache_sharding`, and the constraint
# that keeps a written cache in that sharding on a mesh).
CACHE_AXES = ("batch", "act_kv_heads", "length", None)


def fused_groups(cfg: ModelConfig, group: str) -> int:
    """How many groups the columns of a fused decoding matrix (`schema.FUSED`) are interleaved in:
    qkv in K groups (group g: the H/K query heads that share kv head g, then k_g, then v_g),
    gate_up in gcd(F, K) (group g: the gate columns of the g-th block of the MLP, then the up
    columns of the same block); 1 for an unfused weight. A split of the columns into T equal
    parts, T dividing the group count (as the kv heads must on a tensor mesh), so gives every
    shard whole heads with their kv head, and gate and up columns that belong together: the
    matmul needs no communication, and the same layout serves one device and any mesh."""
    if group == "qkv":
        return cfg.num_kv_heads
    if group == "gate_up":
        return math.gcd(cfg.intermediate_size, cfg.num_kv_heads)
    return 1


def fuse_columns(mats: list, groups: int) -> jax.Array:
    """Matrices [In, n_i] (each n_i a multiple of `groups`) side by side in the grouped order of
    `fused_groups`: [In, sum n_i] whose column block g holds block g of each matrix in turn."""
    rows = mats[0].shape[0]
    return jnp.concatenate([m.reshape(rows, groups, -1) for m in mats], axis=2).reshape(rows, -1)


def split_fused(y: jax.Array, sizes: list[int], groups: int) -> list[jax.Array]:
    """The inverse of `fuse_columns` on a product's columns: y [N, sum(sizes)] -> [N, size] per
    member (a reshape and slices of the last axis, local to each shard of a column split)."""
    if len(sizes) == 1:
        return [y]
    n = y.shape[0]
    cuts = np.cumsum([s // groups for s in sizes])[:-1].tolist()
    return [p.reshape(n, -1) for p in jnp.split(y.reshape(n, groups, -1), cuts, axis=2)]


def _new_param(w: schema.Weight, shape, dtype, rngs, cfg: ModelConfig, axes) -> nnx.Param:
    if w.init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = nnx.initializers.normal(cfg.initializer_range)(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=axes)


def packed_names(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """The decoding layout of one layer, in table order: (attribute, the weights it holds); a
    fused group (`schema.FUSED`) appears once, at its first member's place."""
    group_of = {m: g for g, members in FUSED.items() for m in members}
    out, seen = [], set()
    for w in schema.layer_weights(cfg):
        name = group_of.get(w.name, w.name)
        if name not in seen:
            seen.add(name)
            out.append((name, FUSED.get(name, (w.name,))))
    return out


class DecoderLayer(nnx.Module):
    """One pre-norm Llama block: attention (GQA, RoPE) and a SwiGLU MLP, each with a residual.

    `layers=L` stacks L layers' weights on a leading axis (training); `packed=True` is the
    decoding layout (module docstring); its weights are filled by `decoding_params`.
    """

    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, layers: int | None = None, packed: bool = False
    ):
        self.cfg = cfg
        self.packed = packed
        dtype = jnp.dtype(cfg.compute_dtype if packed else cfg.param_dtype)
        if packed:
            for name, members in packed_names(cfg):
                rows = [schema.weight("layers/" + m) for m in members]
                if rows[0].contracts:
                    shape = (rows[0].in_out(cfg)[0], sum(r.in_out(cfg)[1] for r in rows))
                else:
                    shape = rows[0].shape(cfg)
                setattr(self, name, nnx.Param(jnp.zeros(shape, dtype)))
            return
        for w in schema.layer_weights(cfg):
            shape, axes = w.shape(cfg), w.axes
            if layers is not None:
                shape, axes = (layers, *shape), ("layers", *axes)
            setattr(self, w.name, _new_param(w, shape, dtype, rngs, cfg, axes))

    def _project(self, h: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
        """h [B, T, In] through the weights `names` (which share that input) -> one
        [B, T, *out] per weight. Each is a 2-D matmul (XLA:CPU runs the gradients of batched
        3-D einsums at about half speed); packed, a fused group is one matmul, split after."""
        b, t = h.shape[:2]
        rows = [schema.weight("layers/" + n) for n in names]
        outs = [r.shape(self.cfg)[r.contracts :] for r in rows]
        flat = h.reshape(b * t, -1)
        if self.packed:
            group = next((g for g, m in FUSED.items() if m == tuple(names)), names[0])
            sizes = [math.prod(o) for o in outs]
            y = dense(flat, getattr(self, group)[...], sum(sizes))
            parts = split_fused(y, sizes, fused_groups(self.cfg, group))
        else:
            parts = [
                dense(
                    flat,
                    getattr(self, n)[...].astype(h.dtype).reshape(flat.shape[1], -1),
                    math.prod(o),
                )
                for n, o in zip(names, outs)
            ]
        return [p.reshape(b, t, *o) for p, o in zip(parts, outs)]

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array | None,
        *,
        rules=None,
        blocks: int = 1,
        cache: LayerCache | None = None,
        index: jax.Array | int = 0,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [B, T, D] in the compute dtype; cos, sin [B, T, Dh]; mask [B, T, S] bool.

        Without a cache: causal self-attention among the T tokens (training). Through the splash
        kernel when `uses_splash(cfg)` (then `segment_ids` [B, T] replace the mask, which may be
        None), else the einsum path, where blocks > 1 skips the blocks above the diagonal (the
        mask must then be causal by index).
        With a cache: this call's keys and values are written to slots [index, index + T)
        first; a single token (T == 1) whose mask spans the cache's S slots then attends to the
        cache (a decoding step), otherwise the tokens attend to each other (prefill).
        Returns (x, the updated cache or None).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm[...], cfg.rms_norm_eps)
        q, k, v = self._project(h, FUSED["qkv"])
        q = checkpoint_name(constrain(q, ("batch", "length", "act_heads", None), rules), "qkv_proj")
        k = checkpoint_name(
            constrain(k, ("batch", "length", "act_kv_heads", None), rules), "qkv_proj"
        )
        v = checkpoint_name(
            constrain(v, ("batch", "length", "act_kv_heads", None), rules), "qkv_proj"
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None and uses_splash(cfg):
            o = splash_attend(q, k, v, segment_ids)
        elif cache is None:
            o = causal_attend(q, k, v, mask, blocks)
        else:
            cache = LayerCache(
                constrain(
                    write_cache(cache.k, k.transpose(0, 2, 1, 3).astype(cache.k.dtype), index),
                    CACHE_AXES,
                    rules,
                ),
                constrain(
                    write_cache(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype), index),
                    CACHE_AXES,
                    rules,
                ),
            )
            if t == 1 and mask.shape[-1] == cache.k.shape[2]:
                o = cached_attention(q, cache.k, cache.v, mask)
            else:
                o = attend(q, k, v, mask)
        [attn] = self._project(o.reshape(b, t, -1), ("o_proj",))
        x = constrain(
            x + checkpoint_name(attn, "attn_out"), ("batch", "length", "act_embed"), rules
        )
        h = rms_norm(x, self.mlp_norm[...], cfg.rms_norm_eps)
        gate, up = self._project(h, FUSED["gate_up"])
        act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"), rules)
        [mlp] = self._project(act, ("down_proj",))
        x = constrain(x + checkpoint_name(mlp, "mlp_out"), ("batch", "length", "act_embed"), rules)
        return x, cache


def write_cache(cache: jax.Array, new: jax.Array, index) -> jax.Array:
    """cache [B, K, S, Dh] with new [B, K, T, Dh] written at slots [index, index + T): `index` an
    int32 scalar (every row at the same slot: left-padded batches) or [B] (each row at its own
    slot: the serving engine's slots, `cslm_jax.infer.engine`)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0)))(
        cache, new, index
    )


def _rules_key(rules) -> tuple | None:
    if rules is None:
        return None
    return tuple(
        sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(rules).items())
    )


class Llama(nnx.Module):
    """Llama-3 causal LM. `model(tokens, positions, segment_ids)` -> float32 logits [B, T, V];
    `prefill` and `decode_step` run the same layers with a KV cache (decoding layout)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=None, decoding: bool = False):
        self.cfg = cfg
        self.rules = _rules_key(rules)
        self.decoding = decoding
        dtype = jnp.dtype(cfg.compute_dtype if decoding else cfg.param_dtype)
        for w in schema.weights(cfg):  # table order: the initialisers' random order
            if w.per_layer:
                if not hasattr(self, "layers"):
                    self.layers = (
                        nnx.List(
                            [
                                DecoderLayer(cfg, rngs=rngs, packed=True)
                                for _ in range(cfg.num_layers)
                            ]
                        )
                        if decoding
                        else DecoderLayer(cfg, rngs=rngs, layers=cfg.num_layers)
                    )
            elif decoding and w.contracts:
                continue  # the packed head comes below
            else:
                setattr(self, w.path, _new_param(w, w.shape(cfg), dtype, rngs, cfg, w.axes))
        if decoding:  # the head as a matrix [D, V], a copy of the embedding's transpose if tied
            self.lm_head = nnx.Param(jnp.zeros((cfg.hidden_size, cfg.vocab_size), dtype))

    def params(self) -> dict:
        """The parameter tree (schema in `cslm_jax.model.schema`) as plain arrays."""
        return nnx.state(self, nnx.Param).to_pure_dict()

    # -- the pieces every path shares ---------------------------------------------------------

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.dtype(self.cfg.compute_dtype))

    def _rope(self, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg))
        return cos.astype(dtype), sin.astype(dtype)

    def head_matrix(self) -> jax.Array:
        """The LM head as [D, V] (the embedding's transpose when tied) in the compute dtype, or the
        CPU kernel's panels in the decoding layout."""
        if self.decoding or not self.cfg.tie_word_embeddings:
            head = self.lm_head[...]
        else:
            head = self.embed[...].T
        return head.astype(jnp.dtype(self.cfg.compute_dtype)) if head.ndim == 2 else head

    def head_logits(self, x: jax.Array) -> jax.Array:
        """x [N, D] final-normed hidden states -> float32 logits [N, V], vocabulary padding rows
        masked (2-D matmul: XLA:CPU's gradient of the 3-D einsum form is several times slower)."""
        return self._mask_padding_rows(
            dense(x, self.head_matrix(), self.cfg.vocab_size, out_dtype=jnp.float32)
        )

    def _logits(self, x: jax.Array) -> jax.Array:
        """x [N, D] last hidden states -> float32 logits [N, V], padding rows masked."""
        return self.head_logits(rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps))

    def _mask_padding_rows(self, logits: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.real_vocab_size < cfg.vocab_size:
            logits = jnp.where(jnp.arange(cfg.vocab_size) < cfg.real_vocab_size, logits, NEG)
        return logits

    def _layer_list(self) -> list[DecoderLayer]:
        if self.decoding:
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [
            nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.cfg.num_layers)
        ]

    # -- training / scoring ---------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] float32 for tokens [B, T] int32.

        positions [B, T] (default 0..T-1) drive RoPE; segment_ids [B, T] (default all 1) keep
        packed documents apart. Logits of vocabulary padding rows are set to a large negative
        number.
        """
        rules = None if self.rules is None else dict(self.rules)
        h = self.hidden_states(tokens, positions, segment_ids)
        b, t, _ = h.shape
        logits = self.head_logits(h.reshape(b * t, -1)).reshape(b, t, -1)
        return constrain(logits, ("batch", "length", "act_vocab"), rules)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """The final-normed hidden states [B, T, D] (compute dtype) that `head_logits` turns into
        logits: the whole model but the head (`chunked_token_losses` applies it chunk by chunk)."""
        cfg = self.cfg
        rules = None if self.rules is None else dict(self.rules)
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = constrain(self._embed(tokens), ("batch", "length", "act_embed"), rules)
        cos, sin = self._rope(positions, x.dtype)
        # the splash kernel takes the segment ids; the einsum path a [B, T, T] mask, causal by
        # index (so blocks above the diagonal can be skipped)
        mask = None if uses_splash(cfg) else attention_mask(segment_ids)
        blocks = causal_blocks(t)
        kw = dict(rules=rules, blocks=blocks, segment_ids=segment_ids)

        if self.decoding:
            for layer in self.layers:
                x, _ = layer(x, cos, sin, mask, **kw)
        else:
            graphdef, stacked = nnx.split(self.layers)

            def layer(x, state, cos, sin, mask):
                return nnx.merge(graphdef, state)(x, cos, sin, mask, **kw)[0]

            if cfg.remat_policy != "none":
                layer = jax.checkpoint(
                    layer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers
                )
            if cfg.scan_layers:
                x, _ = jax.lax.scan(lambda c, s: (layer(c, s, cos, sin, mask), None), x, stacked)
            else:
                for i in range(cfg.num_layers):
                    x = layer(x, jax.tree.map(lambda a, i=i: a[i], stacked), cos, sin, mask)
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)

    # -- decoding with a KV cache ---------------------------------------------------------------

    def prefill(self, tokens: jax.Array, pad: jax.Array, cache_len: int):
        """tokens [B, P] int32 left-padded, pad [B] int32 -> (logits [B, V] float32 of the last
        prompt token, KVCache with slots [0, P) filled and [P, cache_len) zero)."""
        cfg = self.cfg
        b, p_len = tokens.shape
        x = self._embed(tokens)
        slots = jnp.arange(p_len, dtype=jnp.int32)[None, :]
        cos, sin = self._rope(jnp.maximum(slots - pad[:, None], 0), x.dtype)
        # Padding slots get segment 0, prompt tokens segment 1: prompt queries see only their
        # own row's real, earlier tokens (padding queries see padding; their outputs are unused).
        mask = attention_mask((slots >= pad[:, None]).astype(jnp.int32))
        empty = jnp.zeros((b, cfg.num_kv_heads, cache_len, cfg.head_dim), x.dtype)
        ks, vs = [], []
        for layer in self._layer_list():
            x, cache = layer(x, cos, sin, mask, cache=LayerCache(empty, empty), index=0)
            ks.append(cache.k)
            vs.append(cache.v)
        return self._logits(x[:, -1]), KVCache(tuple(ks), tuple(vs))

    def decode_step(self, cache: KVCache, token: jax.Array, index: jax.Array, pad: jax.Array):
        """token [B] int32 goes to cache slot `index` at position index - pad[b]; `index` an
        int32 scalar (the same slot for all rows) or [B] (row b at slot index[b]). Returns
        (logits [B, V] float32 for the following token, the updated KVCache)."""
        x = self._embed(token[:, None])  # [B, 1, D]
        cos, sin = self._rope((index - pad)[:, None], x.dtype)
        slots = jnp.arange(cache.k[0].shape[2], dtype=jnp.int32)
        last = jnp.reshape(index, (-1, 1))  # [1, 1] or [B, 1]
        # [B, 1, S]: the row's own real tokens up to and including this one.
        mask = ((slots[None, :] >= pad[:, None]) & (slots[None, :] <= last))[:, None, :]
        ks, vs = [], []
        # A Python loop over layers, not a scan: each layer's weights and cache are arrays of
        # their own; the cache slot is updated in place (the caller donates the cache).
        for layer, ck, cv in zip(self._layer_list(), cache.k, cache.v):
            x, new = layer(x, cos, sin, mask, cache=LayerCache(ck, cv), index=index)
            ks.append(new.k)
            vs.append(new.v)
        return self._logits(x[:, 0]), KVCache(tuple(ks), tuple(vs))


# -- the functional view --------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _skeleton(cfg_key: str, rules_key, decoding: bool):
    """(graphdef, abstract state) of a Llama for one config (built once, without allocating)."""
    cfg = ModelConfig.from_dict(json.loads(cfg_key))
    rules = None if rules_key is None else dict(rules_key)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), rules=rules, decoding=decoding))
    return nnx.split(model)


def config_key(cfg: ModelConfig) -> str:
    """A hashable, canonical form of a config (ModelConfig holds a dict, so is not hashable)."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def is_decoding_layout(params: dict) -> bool:
    return isinstance(params.get("layers"), (tuple, list))


def bind(cfg: ModelConfig, params: dict, rules=None) -> Llama:
    """The module holding `params` (a plain tree, stacked or decoding layout); cheap enough to
    call inside a jitted function, where it costs trace time only."""
    decoding = is_decoding_layout(params)
    graphdef, abstract = _skeleton(config_key(cfg), _rules_key(rules), decoding)
    if decoding:
        params = {**params, "layers": dict(enumerate(params["layers"]))}
    state = jax.tree.map(lambda a: a, abstract)  # a fresh copy to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def forward(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    rules=None,
) -> jax.Array:
    """`Llama.__call__` on a parameter tree: logits [B, T, V] float32 for tokens [B, T]."""
    return bind(cfg, params, rules)(tokens, positions, segment_ids)


def pack_layer(cfg: ModelConfig, weights: dict) -> dict:
    """One layer in the decoding layout: `weights` {table name: that layer's array} -> {the
    `packed_names` attribute: array} in the compute dtype, matmul weights as matrices [In, Out],
    a fused group's columns in the grouped order of `fused_groups`."""
    cd = jnp.dtype(cfg.compute_dtype)
    layer = {}
    for name, members in packed_names(cfg):
        rows = [schema.weight("layers/" + m) for m in members]
        if not rows[0].contracts:
            layer[name] = jnp.asarray(weights[name], cd)
            continue
        mats = [jnp.asarray(weights[r.name], cd).reshape(r.in_out(cfg)) for r in rows]
        layer[name] = mats[0] if len(mats) == 1 else fuse_columns(mats, fused_groups(cfg, name))
    return layer


def decoding_params(cfg: ModelConfig, params: dict, mesh=None, rules=None) -> dict:
    """The parameters in the decoding layout (module docstring), from the stacked tree (or as
    they are when already in it). Device arrays in the compute dtype:

        {"embed": [V, D], "final_norm": [D], "lm_head": [D, V],
         "layers": ({"attn_norm", "mlp_norm": [D], "qkv": [D, (H + 2K) Dh], "o_proj": [H Dh, D],
                     "gate_up": [D, 2F], "down_proj": [F, D]}, ... one dict per layer)}

    qkv and gate_up hold their members' columns interleaved in groups (`fused_groups`: per kv
    head, per block of the MLP), so that a split of the columns over a mesh keeps whole heads
    and matching gate / up columns on each shard.

    Without a mesh, on CPU in float32, where the native kernel builds, every matrix is stored in
    the kernel's panel layout [ceil(Out / 32), In, 32] instead. Building the layout copies the
    weights once (a tied embedding also gets a transposed copy as the head); drop the stacked
    tree afterwards to keep one copy in memory. Decoding calls this itself, so the stacked tree
    works everywhere but pays that copy per call. Why this layout: benchmarks/RESULTS.md
    ("Decoding").

    With a `mesh` (`tensor_mesh`; axes data, fsdp, tensor), every array is placed in its
    `decoding_shardings` (the training rules table `rules`, default
    `cslm_jax.parallel.sharding.DEFAULT_RULES`: heads, kv heads, MLP and vocabulary split over
    `tensor`), layer by layer: each input weight goes to the devices in the shards of its own
    logical axes first (host numpy arrays, as `load_params` gives them, are never whole on one
    device), then is cast and fused there. `prefill` / `decode_step` / `generate` run on such
    params unchanged (under `on_mesh(params)`, which `cslm_jax.infer.decode` enters)."""
    if is_decoding_layout(params):
        if mesh is None:
            return params
        if any(a.ndim == 3 for layer in params["layers"] for a in layer.values()):
            raise ConfigError(
                "decoding_params: these params are in the CPU kernel's panel layout; place the "
                "stacked tree on the mesh instead (decoding_params(cfg, stacked, mesh))"
            )
        return jax.device_put(params, decoding_shardings(cfg, mesh, rules))
    cd = jnp.dtype(cfg.compute_dtype)
    stacked = params["layers"]
    if mesh is not None:
        shardings = decoding_shardings(cfg, mesh, rules)
        place = functools.partial(named_sharding, mesh, rules=rules)

        def put(x, axes, what):
            return jax.device_put(x, place(axes, shape=np.shape(x), what=what))

        top = jax.jit(
            lambda e, n, h: (e.astype(cd), n.astype(cd), h.astype(cd)),
            out_shardings=(shardings["embed"], shardings["final_norm"], shardings["lm_head"]),
        )
        tied = cfg.tie_word_embeddings
        embed = put(params["embed"], ("vocab", "embed"), "embed")
        head = embed.T if tied else put(params["lm_head"], ("embed", "vocab"), "lm_head")
        e, n, h = top(embed, put(params["final_norm"], ("norm",), "final_norm"), head)
        pack = jax.jit(functools.partial(pack_layer, cfg), out_shardings=shardings["layers"][0])
        layers = []
        for i in range(cfg.num_layers):
            ws = {
                w.name: put(stacked[w.name][i], w.axes, f"layers/{w.name}[{i}]")
                for w in schema.layer_weights(cfg)
            }
            layers.append(pack(ws))
        return {"embed": e, "final_norm": n, "lm_head": h, "layers": tuple(layers)}
    kernel = cd == jnp.float32 and jax.default_backend() == "cpu" and cpu_matmul.available()
    matrix = cpu_matmul.panel_layout if kernel else (lambda a: a)
    head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    out = {
        "embed": jnp.asarray(params["embed"], cd),
        "final_norm": jnp.asarray(params["final_norm"], cd),
        "lm_head": matrix(jnp.asarray(head, cd)),
    }
    layers = []
    for i in range(cfg.num_layers):
        layer = pack_layer(cfg, {w.name: stacked[w.name][i] for w in schema.layer_weights(cfg)})
        layers.append({k: matrix(a) if a.ndim == 2 else a for k, a in layer.items()})
    out["layers"] = tuple(layers)
    return out


# -- parameters on a mesh -------------------------------------------------------------------------


def param_shardings(cfg: ModelConfig, mesh, rules=None) -> dict:
    """NamedSharding per parameter from its logical axis names and the rules table."""

    def one(path, spec):
        shape, names = spec
        return named_sharding(
            mesh, names, rules, shape, what=f"parameter {jax.tree_util.keystr(path)}"
        )

    return jax.tree_util.tree_map_with_path(one, param_shapes(cfg), is_leaf=schema.is_spec)


def decoding_shapes(cfg: ModelConfig) -> dict:
    """jax.ShapeDtypeStruct per array of the decoding layout as on a mesh (matrices [In, Out], no
    panels), the tree `decoding_params` returns: for lowering without weights (`cslm-jax compile
    --decode`)."""
    tree = jax.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), decoding=True).params())
    return {**tree, "layers": tuple(tree["layers"][i] for i in range(cfg.num_layers))}


def decoding_shardings(cfg: ModelConfig, mesh, rules=None) -> dict:
    """NamedSharding per array of the decoding layout (the tree `decoding_params` returns), by
    the logical axes of the weights it holds and the rules table, as training shards them:
    embed [V, D] (vocab, embed); lm_head [D, V] (embed, vocab); a layer's norms (norm); q / k /
    v, gate / up (embed, heads | kv_heads | mlp); o_proj [H Dh, D] (heads, embed); down_proj
    [F, D] (mlp, embed). A fused matrix's columns split by its groups (`fused_groups`: qkv by
    kv heads, gate_up as mlp), so the mesh's ways on them must divide the group count; a dim the
    mesh does not divide is a ConfigError naming the array."""

    def sh(names, shape, what):
        return named_sharding(mesh, names, rules, shape, what=f"decoding parameter {what}")

    d, v = cfg.hidden_size, cfg.vocab_size
    layer = {}
    for name, members in packed_names(cfg):
        rows = [schema.weight("layers/" + m) for m in members]
        r = rows[0]
        if not r.contracts:
            layer[name] = sh(r.axes, r.shape(cfg), f"layers[i].{name}")
            continue
        ins, outs = r.axes[: r.contracts], r.axes[r.contracts :]
        size = schema.axis_size
        if len(rows) > 1:  # a fused group: its columns split in whole groups
            out = "kv_heads" if any("kv_heads" in w.axes for w in rows) else outs[0]
            layer[name] = sh((ins[0], out), (size(cfg, ins[0]), fused_groups(cfg, name)), name)
        else:
            check = (size(cfg, ins[0]), size(cfg, outs[0]))
            layer[name] = sh((ins[0], outs[0]), check, f"layers[i].{name}")
    return {
        "embed": sh(("vocab", "embed"), (v, d), "embed"),
        "final_norm": sh(("norm",), (d,), "final_norm"),
        "lm_head": sh(("embed", "vocab"), (d, v), "lm_head"),
        "layers": (layer,) * cfg.num_layers,
    }


def kv_cache_sharding(cfg: ModelConfig, mesh, rules=None, slots: int | None = None):
    """The NamedSharding of one layer's cache [B, K, S, Dh] (`CACHE_AXES`: rows over the batch
    axes, kv heads over `tensor` with the default rules). `slots` (B), when given, is checked
    against the batch axes too; K against the kv heads' ways (a ConfigError naming the cache)."""
    shape = (slots or 0, cfg.num_kv_heads, 0, cfg.head_dim)
    return named_sharding(mesh, CACHE_AXES, rules, shape, what="the KV cache [B, K, S, Dh]")


def tensor_mesh(cfg: ModelConfig, tensor: int, devices=None):
    """A mesh of `tensor` devices of this host (the first ones; data = fsdp = 1) to decode on,
    with the weights and the cache split over `tensor`. ConfigError (naming --tensor) when it
    does not divide the device count, the kv heads, the query heads or the MLP."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor < 1 or len(devices) % tensor:
        raise ConfigError(
            f"--tensor {tensor}: must divide the {len(devices)} device(s) of this host "
            f"({jax.default_backend()})"
        )
    for what, n in (
        ("kv heads", cfg.num_kv_heads),
        ("query heads", cfg.num_heads),
        ("MLP width", cfg.intermediate_size),
        ("vocabulary rows", cfg.vocab_size),
    ):
        if n % tensor:
            raise ConfigError(
                f"--tensor {tensor}: does not divide the model's {n} {what}; each device needs "
                f"whole heads (give a divisor of {math.gcd(cfg.num_kv_heads, cfg.num_heads)})"
            )
    if tensor == len(devices):  # the whole host: jax orders the chips along the ICI links
        return make_mesh({"data": 1, "fsdp": 1, "tensor": tensor}, devices)
    # a part of the host: its first devices as they are (jax's topology-aware ordering wants
    # every chip of the host)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    grid = np.array(devices[:tensor], dtype=object).reshape(1, 1, tensor)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def params_mesh(params: dict):
    """The mesh decoding params were placed on (`decoding_params(..., mesh)`), or None for params
    on one device."""
    sharding = getattr(params.get("embed"), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.size == 1 or set(mesh.axis_names) != set(MESH_AXES):
        return None
    return mesh


def on_mesh(params: dict):
    """The context to trace and run a decoding program on `params` in: `jax.set_mesh` of their
    mesh (so that the model's `constrain` calls keep activations and the cache sharded), or
    nothing for params on one device."""
    mesh = params_mesh(params)
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


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


def chunked_token_losses(
    model: Llama, hidden: jax.Array, targets: jax.Array, chunk: int
) -> jax.Array:
    """`token_losses` without the full logits: per-token cross-entropy [B*T] float32 from the
    final hidden states [B, T, D] (`Llama.hidden_states`) and int targets [B, T], applying the LM
    head to `chunk` positions of every row at a time inside a rematerialised loop. Only one
    chunk's float32 logits [B, chunk, V] are ever live, forward and backward (the backward
    recomputes them); the batch axis keeps its sharding. T need not be a multiple of `chunk`."""
    b, t, d = hidden.shape
    rules = None if model.rules is None else dict(model.rules)
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, c]
    head = model.head_matrix()

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def one(head, h, tgt):
        logits = dense(h.reshape(b * chunk, d), head, model.cfg.vocab_size, out_dtype=jnp.float32)
        logits = model._mask_padding_rows(logits)
        logits = constrain(logits.reshape(b, chunk, -1), ("batch", "length", "act_vocab"), rules)
        return token_losses(logits, tgt).reshape(b, chunk)

    losses = jax.lax.map(lambda xs: one(head, *xs), (hs, ts))  # [n, B, c]
    return losses.swapaxes(0, 1).reshape(b, -1)[:, :t].reshape(-1)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple:
    """(sum of weighted token losses, sum of weights); weights [B, T]."""
    w = weights.reshape(-1).astype(jnp.float32)
    return jnp.sum(token_losses(logits, targets) * w), jnp.sum(w)
