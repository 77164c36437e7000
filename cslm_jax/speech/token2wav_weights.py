"""Token-to-waveform weights: upstream CosyVoice's state dicts <-> our parameter dicts.

HiFT (`hift.pt`; `cslm_jax.speech.hift`): upstream's names are the module paths of
`HiFTGenerator` (`conv_pre`, `ups.N`, `source_downs.N`, `source_resblocks.N.convs1.M`,
`resblocks.N.activations2.M.alpha`, `conv_post`, `m_source.l_linear`,
`f0_predictor.condnet.N`, `f0_predictor.classifier`). Layers under weight norm hold their weight
in one of three layouts, all read:

- `NAME.weight_g` [d0, 1, 1] and `NAME.weight_v` (`torch.nn.utils.weight_norm`, the official
  files),
- `NAME.parametrizations.weight.original0` / `original1` (the same pair, from
  `torch.nn.utils.parametrizations.weight_norm`, what upstream's code builds today),
- `NAME.weight` (after `remove_weight_norm`),

and are folded into one weight: `g * v / ||v||`, the norm over every axis but the first
(upstream's `dim=0`: output channels of a conv, input channels of a transposed conv), computed in
float64. A `generator.` prefix on every name (files saved from upstream's HiFiGan training
wrapper; upstream strips it when loading) is removed. `to_state_dict` writes any of the three.

Flow (`flow.pt`, v1 `MaskedDiffWithXvec`; `cslm_jax.speech.flow`): upstream's names are the module
paths (`input_embedding.weight`, `encoder.encoders.N.self_attn.linear_q.weight`,
`encoder.encoders.N.self_attn.pos_bias_u`, `length_regulator.model.N`,
`decoder.estimator.down_blocks.N.1.M.attn1.to_q.weight`, ...); no weight norm. Linear weights
are transposed, conv weights [out, in, k] and transposed-conv weights [in, out, k] brought to
[k, in, out]; norms, embeddings and the attention's position biases are kept as they are.
The v2 flow (`flow.pt` of CosyVoice2, `CausalMaskedDiffWithXvec`; `cslm_jax.speech.causal_flow`)
maps the same way (`encoder.pre_lookahead_layer.conv1`, `encoder.up_layer.conv`,
`encoder.up_encoders.N...`, `decoder.estimator.down_blocks.0.0.block1.block.2` - a LayerNorm -,
...); its fixed noise buffer is not in the state dict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cslm_jax.speech import causal_flow as _causal_flow
from cslm_jax.speech import flow as _flow
from cslm_jax.speech.hift import HiFTConfig, Layer, Token2WavError, check_params, layers

WEIGHT_NORM_LAYOUTS = ("weight_norm", "parametrizations", "plain")
_WN_KEYS = {
    "weight_norm": ("weight_g", "weight_v"),
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
}


def _to_ours(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # [out, in, k] -> [k, in, out]
        return w.transpose(2, 1, 0)
    if kind == "convT":  # [in, out, k] -> [k, in, out]
        return w.transpose(2, 0, 1)
    if kind == "linear":
        return w.T
    return w


def _to_torch(w: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return w.transpose(2, 1, 0)
    if kind == "convT":
        return w.transpose(1, 2, 0)
    if kind == "linear":
        return w.T
    return w


def strip_prefix(sd: dict, prefix: str = "generator.") -> dict:
    """`sd` without `prefix` where every name has it (else unchanged)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _fold(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    v64 = v.astype(np.float64)
    norm = np.sqrt((v64**2).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
    return (g.astype(np.float64) * v64 / norm).astype(np.float32)


class _Tensors:
    """Tensors taken from an upstream state dict `sd` by name and expected shape (float32);
    errors name `source` (the file) and `model` (e.g. "HiFT v1"). `refuse_unused` then names
    the first tensor no one took."""

    def __init__(self, sd: dict, source: str, model: str):
        self.sd, self.source, self.model, self.used = sd, source, model, set()

    def __call__(self, name: str, shape) -> np.ndarray:
        if name not in self.sd:
            raise Token2WavError(f"{self.source}: missing tensor {name} ({self.model})")
        w = np.asarray(self.sd[name])
        if tuple(w.shape) != tuple(shape):
            raise Token2WavError(
                f"{self.source}: tensor {name} has shape {tuple(w.shape)}, "
                f"expected {tuple(shape)} ({self.model})"
            )
        self.used.add(name)
        return w.astype(np.float32)

    def refuse_unused(self) -> None:
        extra = sorted(set(self.sd) - self.used)
        if extra:
            raise Token2WavError(
                f"{self.source}: unexpected tensor {extra[0]} for {self.model}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )


def hift_from_state_dict(sd: dict, cfg: HiFTConfig, source: str, strict: bool = True) -> dict:
    """Upstream's HiFTGenerator state dict (numpy arrays, any of the weight-norm layouts, a
    possible `generator.` prefix) -> our parameters. Names the first missing, mis-shaped or (if
    `strict`) unexpected tensor, with `source` (the file)."""
    sd = strip_prefix(dict(sd))
    get = _Tensors(sd, source, f"HiFT {cfg.version}")

    def weight(layer: Layer) -> np.ndarray:
        n = layer.name
        if layer.weight_norm:
            for g_key, v_key in _WN_KEYS.values():
                if f"{n}.{g_key}" in sd or f"{n}.{v_key}" in sd:
                    g = get(f"{n}.{g_key}", (layer.shape[0], 1, 1))
                    return _fold(g, get(f"{n}.{v_key}", layer.shape))
        return get(f"{n}.weight", layer.shape)

    params = {}
    for layer in layers(cfg):
        n = layer.name
        if layer.kind == "snake":
            params[f"{n}.alpha"] = get(f"{n}.alpha", layer.shape)
            continue
        params[f"{n}.w"] = np.ascontiguousarray(_to_ours(weight(layer), layer.kind))
        out = layer.shape[1] if layer.kind == "convT" else layer.shape[0]
        params[f"{n}.b"] = get(f"{n}.bias", (out,))
    if strict:
        get.refuse_unused()
    return params


def hift_to_state_dict(cfg: HiFTConfig, params: dict, layout: str = "parametrizations") -> dict:
    """Our parameters -> upstream's HiFTGenerator state dict (numpy float32) with weight-norm
    layers in `layout` (`WEIGHT_NORM_LAYOUTS`): `g = ||w||` per first-axis slice and `v = w`
    for the two pairs, the weight itself for `plain` (loads into a model after
    `remove_weight_norm`)."""
    if layout not in WEIGHT_NORM_LAYOUTS:
        raise Token2WavError(
            f"weight-norm layout {layout!r}: choose one of {', '.join(WEIGHT_NORM_LAYOUTS)}"
        )
    check_params(cfg, params)
    out = {}
    for layer in layers(cfg):
        n = layer.name
        if layer.kind == "snake":
            out[f"{n}.alpha"] = np.asarray(params[f"{n}.alpha"], np.float32)
            continue
        w = np.ascontiguousarray(_to_torch(np.asarray(params[f"{n}.w"], np.float32), layer.kind))
        if layer.weight_norm and layout != "plain":
            g_key, v_key = _WN_KEYS[layout]
            g = np.sqrt((w.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True))
            out[f"{n}.{g_key}"] = g.astype(np.float32)
            out[f"{n}.{v_key}"] = w
        else:
            out[f"{n}.weight"] = w
        out[f"{n}.bias"] = np.asarray(params[f"{n}.b"], np.float32)
    return out


def infer_hift_config(sd: dict, version: str, source: str) -> HiFTConfig:
    """The version's preset with the widths a state dict shows: mel channels and base width from
    `conv_pre`, the F0 predictor's width, the number of harmonics from `m_source.l_linear`."""
    sd = strip_prefix(dict(sd))

    def shape(layer, fallback=None):
        for k in (
            f"{layer}.weight",
            f"{layer}.weight_v",
            f"{layer}.parametrizations.weight.original1",
        ):
            if k in sd:
                return np.shape(sd[k])
        if fallback:
            return fallback
        raise Token2WavError(
            f"{source}: missing tensor {layer}.weight (or its weight-norm pair); "
            f"not a HiFT state dict?"
        )

    pre = shape("conv_pre")
    cond = shape("f0_predictor.condnet.0")
    lin = shape("m_source.l_linear")
    if len(pre) != 3 or len(cond) != 3 or len(lin) != 2:
        raise Token2WavError(
            f"{source}: conv_pre {pre}, f0_predictor.condnet.0 {cond}, "
            f"m_source.l_linear {lin}: not HiFT's layouts"
        )
    return HiFTConfig(
        version=version,
        in_channels=int(pre[1]),
        base_channels=int(pre[0]),
        cond_channels=int(cond[0]),
        nb_harmonics=int(lin[1]) - 1,
    )


def read_hift(path, version: str, **sizes) -> tuple[HiFTConfig, dict]:
    """(config, params) from upstream's `hift.pt` (or a .safetensors of its state dict); sizes
    not given are read from the tensors (`infer_hift_config`)."""
    return _read(path, version, sizes, infer_hift_config, hift_from_state_dict)


def _read(path, version: str, sizes: dict, infer, convert):
    """(config, params) of an upstream state-dict file: the config `infer`red from its tensors
    (`sizes` on top), the params `convert`ed; Token2WavError naming the file otherwise."""
    import dataclasses

    from cslm_jax.speech.s3 import SpeechTokenizerError
    from cslm_jax.speech.weights import read_state_dict

    path = Path(path)
    if not path.is_file():
        raise Token2WavError(f"{path}: no such file")
    try:
        sd = read_state_dict(path)
    except SpeechTokenizerError as e:
        raise Token2WavError(str(e)) from None
    cfg = infer(sd, version, str(path))
    if sizes:
        cfg = dataclasses.replace(cfg, **sizes)
    return cfg, convert(sd, cfg, str(path))


def _flow_module(cfg):
    """The module of a flow config's model: `causal_flow` (v2) or `flow` (v1)."""
    return _causal_flow if isinstance(cfg, _causal_flow.CausalFlowConfig) else _flow


def _flow_kind(kind: str) -> str:
    return {"linear_nb": "linear", "embed": "plain", "norm": "plain", "param": "plain"}.get(
        kind, kind
    )


def flow_from_state_dict(sd: dict, cfg, source: str, strict: bool = True) -> dict:
    """Upstream's MaskedDiffWithXvec (v1, `cfg` a `FlowConfig`) or CausalMaskedDiffWithXvec
    (v2, `cfg` a `CausalFlowConfig`) state dict (numpy arrays or tensors) -> our parameters.
    Names the first missing, mis-shaped or (if `strict`) unexpected tensor, with `source` (the
    file)."""
    get = _Tensors(dict(sd), source, f"flow {cfg.version}")

    params = {}
    for layer in _flow_module(cfg).layers(cfg):
        n = layer.name
        if layer.kind == "param":
            params[n] = get(n, layer.shape)
            continue
        w = get(f"{n}.weight", layer.shape)
        params[f"{n}.w"] = np.ascontiguousarray(_to_ours(w, _flow_kind(layer.kind)))
        if layer.kind in ("linear", "conv", "norm"):
            params[f"{n}.b"] = get(f"{n}.bias", (layer.shape[0],))
        elif layer.kind == "convT":
            params[f"{n}.b"] = get(f"{n}.bias", (layer.shape[1],))
    if strict:
        get.refuse_unused()
    return params


def flow_to_state_dict(cfg, params: dict) -> dict:
    """Our flow parameters -> upstream's MaskedDiffWithXvec (v1) or CausalMaskedDiffWithXvec
    (v2) state dict (numpy float32)."""
    mod = _flow_module(cfg)
    mod.check_params(cfg, params)
    out = {}
    for layer in mod.layers(cfg):
        n = layer.name
        if layer.kind == "param":
            out[n] = np.asarray(params[n], np.float32)
            continue
        out[f"{n}.weight"] = np.ascontiguousarray(
            _to_torch(np.asarray(params[f"{n}.w"], np.float32), _flow_kind(layer.kind))
        )
        if f"{n}.b" in params:
            out[f"{n}.bias"] = np.asarray(params[f"{n}.b"], np.float32)
    return out


def infer_flow_config(sd: dict, version: str, source: str):
    """The version's preset with the sizes a state dict shows (vocabulary and embedding, encoder
    width, heads, blocks and feed-forward, x-vector size, regulator convs, estimator channels,
    transformer and mid blocks). The estimator's attention heads are not in the tensors (only
    heads x head width): the preset's 8 heads are kept and the head width read off; give
    `num_heads` / `attention_head_dim` to `read_flow` for other splits. v2: see
    `infer_causal_flow_config`."""
    _check_flow_version(sd, version, source)
    if version == "v2":
        return infer_causal_flow_config(sd, version, source)

    def shape(name):
        if name not in sd:
            raise Token2WavError(f"{source}: missing tensor {name}; not a flow state dict?")
        return tuple(np.shape(sd[name]))

    vocab, width = shape("input_embedding.weight")
    d = shape("encoder.after_norm.weight")[0]
    blocks = len({k.split(".")[2] for k in sd if k.startswith("encoder.encoders.")})
    heads = shape("encoder.encoders.0.self_attn.pos_bias_u")[0]
    ff = shape("encoder.encoders.0.feed_forward.w_1.weight")[0]
    spk = shape("spk_embed_affine_layer.weight")[1]
    e = "decoder.estimator"
    levels = len({k.split(".")[3] for k in sd if k.startswith(f"{e}.down_blocks.")})
    channels = tuple(shape(f"{e}.down_blocks.{i}.0.res_conv.weight")[0] for i in range(levels))
    mid = len({k.split(".")[3] for k in sd if k.startswith(f"{e}.mid_blocks.")})
    n_blocks = len({k.split(".")[5] for k in sd if k.startswith(f"{e}.down_blocks.0.1.")})
    reg = len(
        {
            k.split(".")[2]
            for k in sd
            if k.startswith("length_regulator.model.") and k.endswith(".weight")
        }
    )
    inner = shape(f"{e}.down_blocks.0.1.0.attn1.to_q.weight")[0]
    kw = dict(
        vocab_size=vocab,
        input_size=width,
        spk_embed_dim=spk,
        encoder_size=d,
        encoder_heads=heads,
        encoder_linear_units=ff,
        encoder_blocks=blocks,
        channels=channels,
        num_mid_blocks=mid,
        n_blocks=n_blocks,
        regulator_layers=(reg - 1) // 2,
    )
    preset = _flow.FlowConfig(version=version)
    if inner != preset.num_heads * preset.attention_head_dim:
        kw["attention_head_dim"] = inner // preset.num_heads
    return _flow.FlowConfig(version=version, **kw)


def _check_flow_version(sd: dict, version: str, source: str) -> None:
    """A v1 file given as v2 or the other way round, named (v2's encoder has a pre-lookahead
    layer and no length regulator)."""
    v2 = "encoder.pre_lookahead_layer.conv1.weight" in sd
    v1 = any(k.startswith("length_regulator.") for k in sd)
    if version == "v2" and v1 and not v2:
        raise Token2WavError(
            f"{source}: a v1 flow (MaskedDiffWithXvec, CosyVoice-300M: it has "
            f"a length regulator); give --version v1"
        )
    if version == "v1" and v2 and not v1:
        raise Token2WavError(
            f"{source}: a v2 flow (CausalMaskedDiffWithXvec, CosyVoice2: it has "
            f"a pre-lookahead layer); give --version v2"
        )


def infer_causal_flow_config(sd: dict, version: str, source: str):
    """v2's preset (`CausalFlowConfig`) with the sizes a CausalMaskedDiffWithXvec state dict
    shows: vocabulary and embedding, encoder width, heads, feed-forward, blocks before and after
    the upsampling, the look-ahead (conv1's kernel - 1), the upsampling stride ((kernel - 1) /
    2), x-vector size, estimator channels, transformer and mid blocks. Not in the tensors: the
    units per second, the streaming chunk sizes (the preset's) and the estimator's head count
    (the preset's 8 kept, the head width read off; give `num_heads` / `attention_head_dim` to
    `read_flow` for other splits)."""

    def shape(name):
        if name not in sd:
            raise Token2WavError(f"{source}: missing tensor {name}; not a v2 flow state dict?")
        return tuple(np.shape(sd[name]))

    def count(prefix, part):
        return len({k.split(".")[part] for k in sd if k.startswith(prefix)})

    vocab, width = shape("input_embedding.weight")
    d = shape("encoder.after_norm.weight")[0]
    e = "decoder.estimator"
    levels = count(f"{e}.down_blocks.", 3)
    inner = shape(f"{e}.down_blocks.0.1.0.attn1.to_q.weight")[0]
    kw = dict(
        vocab_size=vocab,
        input_size=width,
        spk_embed_dim=shape("spk_embed_affine_layer.weight")[1],
        encoder_size=d,
        encoder_heads=shape("encoder.encoders.0.self_attn.pos_bias_u")[0],
        encoder_linear_units=shape("encoder.encoders.0.feed_forward.w_1.weight")[0],
        encoder_blocks=count("encoder.encoders.", 2),
        up_blocks=count("encoder.up_encoders.", 2),
        pre_lookahead_len=shape("encoder.pre_lookahead_layer.conv1.weight")[2] - 1,
        token_mel_ratio=(shape("encoder.up_layer.conv.weight")[2] - 1) // 2,
        channels=tuple(shape(f"{e}.down_blocks.{i}.0.res_conv.weight")[0] for i in range(levels)),
        num_mid_blocks=count(f"{e}.mid_blocks.", 3),
        n_blocks=count(f"{e}.down_blocks.0.1.", 5),
    )
    preset = _causal_flow.CausalFlowConfig(version=version)
    if inner != preset.num_heads * preset.attention_head_dim:
        kw["attention_head_dim"] = inner // preset.num_heads
    try:
        return _causal_flow.CausalFlowConfig(version=version, **kw)
    except Token2WavError as e:
        raise Token2WavError(f"{source}: {e}") from None


def read_flow(path, version: str = "v1", **sizes):
    """(config, params) from upstream's `flow.pt` (v1 or v2, by `version`; or a .safetensors of
    its state dict); sizes not given are read from the tensors (`infer_flow_config`; the
    estimator's head count is not in them)."""
    return _read(path, version, sizes, infer_flow_config, flow_from_state_dict)


__all__ = [
    "WEIGHT_NORM_LAYOUTS",
    "strip_prefix",
    "hift_from_state_dict",
    "hift_to_state_dict",
    "infer_hift_config",
    "read_hift",
    "flow_from_state_dict",
    "flow_to_state_dict",
    "infer_flow_config",
    "infer_causal_flow_config",
    "read_flow",
]
