"""The parameter table: every weight of the model, once.

One row per weight: its path in the parameter tree, its logical axes (which give its shape from
the model config and its sharding through the rules table), how it is initialised, how many of
its leading axes a matmul contracts, and its Hugging Face tensor name and layout. The Flax
module (`cslm_jax.model.llama`) creates its parameters from these rows; conversion
(`cslm_jax.convert.hf`), sharding (`param_shardings`) and checkpoints (`storage.checkpoint`) read
them. Adding a weight is one row here plus the line of `llama.py` that uses it.

Layers are stacked on a leading `layers` axis in the tree (`layers/<name>` rows):

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

HF layouts: `copy` (same array), `linear` (transposed: HF stores [out, in]), `qkv` (HF
[N*Dh, D] <-> ours [D, N, Dh]), `out` (HF [D, H*Dh] <-> ours [H, Dh, D]).
"""

from __future__ import annotations

import dataclasses
import math

from cslm_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Weight:
    path: str  # "embed", "final_norm", "lm_head" or "layers/<name>"
    axes: tuple[str, ...]  # logical axes of one layer's tensor (without "layers")
    init: str  # "normal" (initializer_range) or "ones"
    hf_name: str  # may hold "{i}", the layer index
    hf_layout: str  # copy | linear | qkv | out
    contracts: int = 0  # leading axes a matmul contracts (0: not a matmul weight)
    vocab_rows: bool = False  # one axis is the vocabulary: extended on import, trimmed on export
    untied_only: bool = False  # absent when the LM head is tied to the embedding

    @property
    def per_layer(self) -> bool:
        return self.path.startswith("layers/")

    @property
    def name(self) -> str:
        """The attribute name in the module (the path's last part)."""
        return self.path.split("/")[-1]

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """One layer's shape (without the stacked `layers` axis)."""
        return tuple(axis_size(cfg, a) for a in self.axes)

    def in_out(self, cfg: ModelConfig) -> tuple[int, int]:
        """A matmul weight as a matrix: (contracted size, output size)."""
        shape = self.shape(cfg)
        return math.prod(shape[: self.contracts]), math.prod(shape[self.contracts :])


WEIGHTS = (
    Weight(
        "embed", ("vocab", "embed"), "normal", "model.embed_tokens.weight", "copy", vocab_rows=True
    ),
    Weight(
        "layers/attn_norm", ("norm",), "ones", "model.layers.{i}.input_layernorm.weight", "copy"
    ),
    Weight(
        "layers/q_proj",
        ("embed", "heads", "head_dim"),
        "normal",
        "model.layers.{i}.self_attn.q_proj.weight",
        "qkv",
        contracts=1,
    ),
    Weight(
        "layers/k_proj",
        ("embed", "kv_heads", "head_dim"),
        "normal",
        "model.layers.{i}.self_attn.k_proj.weight",
        "qkv",
        contracts=1,
    ),
    Weight(
        "layers/v_proj",
        ("embed", "kv_heads", "head_dim"),
        "normal",
        "model.layers.{i}.self_attn.v_proj.weight",
        "qkv",
        contracts=1,
    ),
    Weight(
        "layers/o_proj",
        ("heads", "head_dim", "embed"),
        "normal",
        "model.layers.{i}.self_attn.o_proj.weight",
        "out",
        contracts=2,
    ),
    Weight(
        "layers/mlp_norm",
        ("norm",),
        "ones",
        "model.layers.{i}.post_attention_layernorm.weight",
        "copy",
    ),
    Weight(
        "layers/gate_proj",
        ("embed", "mlp"),
        "normal",
        "model.layers.{i}.mlp.gate_proj.weight",
        "linear",
        contracts=1,
    ),
    Weight(
        "layers/up_proj",
        ("embed", "mlp"),
        "normal",
        "model.layers.{i}.mlp.up_proj.weight",
        "linear",
        contracts=1,
    ),
    Weight(
        "layers/down_proj",
        ("mlp", "embed"),
        "normal",
        "model.layers.{i}.mlp.down_proj.weight",
        "linear",
        contracts=1,
    ),
    Weight("final_norm", ("norm",), "ones", "model.norm.weight", "copy"),
    Weight(
        "lm_head",
        ("embed", "vocab"),
        "normal",
        "lm_head.weight",
        "linear",
        contracts=1,
        vocab_rows=True,
        untied_only=True,
    ),
)

# Weights a decoding step multiplies as one matrix, side by side (same input, outputs split
# afterwards): fewer, larger matmuls. Training keeps them apart (each has its own sharding).
FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def axis_size(cfg: ModelConfig, axis: str) -> int:
    sizes = {
        "vocab": cfg.vocab_size,
        "embed": cfg.hidden_size,
        "norm": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp": cfg.intermediate_size,
        "layers": cfg.num_layers,
    }
    return sizes[axis]


def weights(cfg: ModelConfig) -> list[Weight]:
    """The rows present in a model of this config."""
    return [w for w in WEIGHTS if not (w.untied_only and cfg.tie_word_embeddings)]


def layer_weights(cfg: ModelConfig) -> list[Weight]:
    return [w for w in weights(cfg) if w.per_layer]


def weight(path: str) -> Weight:
    for w in WEIGHTS:
        if w.path == path:
            return w
    raise KeyError(path)


def param_shapes(cfg: ModelConfig) -> dict:
    """{name: (shape, logical axes)} for every parameter, layers stacked under "layers"."""
    out: dict = {"layers": {}}
    for w in weights(cfg):
        if w.per_layer:
            out["layers"][w.name] = ((cfg.num_layers, *w.shape(cfg)), ("layers", *w.axes))
        else:
            out[w.path] = (w.shape(cfg), w.axes)
    return out


def is_spec(x) -> bool:
    """A leaf of `param_shapes`: (shape, logical axes)."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple)


def hf_shape(w: Weight, cfg: ModelConfig, vocab_rows: int) -> tuple[int, ...]:
    """The HF tensor's shape (one layer) when the vocabulary has `vocab_rows` rows."""
    shape = tuple(vocab_rows if a == "vocab" else axis_size(cfg, a) for a in w.axes)
    if w.hf_layout == "copy":
        return shape
    if w.hf_layout == "linear":
        return shape[::-1]
    if w.hf_layout == "qkv":  # ours [D, N, Dh] -> HF [N*Dh, D]
        return (shape[1] * shape[2], shape[0])
    if w.hf_layout == "out":  # ours [H, Dh, D] -> HF [D, H*Dh]
        return (shape[2], shape[0] * shape[1])
    raise AssertionError(w.hf_layout)
