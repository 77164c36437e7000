"""CosyVoice's v1 flow model (speech units -> 80-bin mel) in JAX, computing what upstream's
`cosyvoice.flow.flow.MaskedDiffWithXvec.inference` (CosyVoice at FunAudioLLM, as the wheel
`cosyvoice-minicpmo==0.1.0` ships it) computes.

v1 (CosyVoice-300M, `flow.pt`, 104.9M parameters; `FlowConfig()` is the official sizes), one
utterance of `N` units (after an optional zero-shot prompt of `Np` units and its `Mp` mel frames):
1. Units -> an embedding (4096 x 512), the prompt's units first; a Conformer encoder
   (`ConformerEncoder` as cosyvoice.yaml configures it: `input_layer: linear` - a linear layer,
   LayerNorm, times sqrt(512) -; ESPnet relative positions (`rel_pos_espnet`) with
   `rel_selfattn` (Transformer-XL's u / v biases, 8 heads); pre-norm (`normalize_before`), no
   macaron feed-forward, no conv module, SiLU feed-forward 512 -> 2048 -> 512; 6 blocks; a final
   LayerNorm), a 512 -> 80 projection.
2. `InterpolateRegulator.inference`: the prompt's frames linearly interpolated to its `Mp` mel
   frames, the answer's to `M` (an argument; upstream: `int(N / 50 * 22050 / 256)`); an answer
   of more than 40 units has its first and last 20 units interpolated to 34 frames each
   (upstream's streaming seam), the middle to `M - 68`. Then 4 x [conv k3, GroupNorm(1), Mish]
   and a 1x1 conv (80 channels): `mu [Mp + M, 80]`.
3. `ConditionalCFM`: from Gaussian noise `z [Mp + M, 80]`, 10 Euler steps over the cosine time
   schedule `t = 1 - cos(pi/2 * i/10)`, each step one call of the estimator on a batch of two
   (conditional: `mu`, speaker, prompt-mel condition; unconditional: those three zero) merged as
   `1.7 * cond - 0.7 * uncond` (classifier-free guidance 0.7). The speaker: the 192-d x-vector
   L2-normalised and projected to 80. The condition: the prompt's mel over its frames, 0 after.
4. The estimator (`ConditionalDecoder`): a 1-D U-Net on 320 channels (noisy mel, mu, speaker
   repeated over time, condition), channels [256, 256] (a stride-2 conv between the levels, a
   transposed conv back), per level a ResNet block (two conv k3 + GroupNorm(8) + Mish, the time
   embedding added between) and 4 transformer blocks (LayerNorm, 8 x 64 attention without q/k/v
   biases, GELU feed-forward x4), 12 mid blocks, a final block and a 1x1 conv to 80. The time
   embedding: sinusoidal (320, scale 1000), linear -> SiLU -> linear (1024).
5. The answer's frames `[Mp:]`: `mel [1, 80, M]` (upstream's layout, what HiFT takes).

Noise is an input: `noise="zero"` (deterministic: z = 0), a PRNG key, or an array
`[1, Mp + M, 80]` (upstream's `randn_like(mu)` transposed, for tests). Upstream's flow cache
(streaming) is not part of this module yet.

Batched (`flow_batch`, `flow_inference_batch`; upstream asserts batch 1): answers of different
lengths, each with its own x-vector, mel length, optional zero-shot prompt and noise, in one
compiled call, units and frames padded to buckets (`UNIT_BUCKET`, `FRAME_BUCKET`) so that many
lengths share a program; every row is what it is alone (`regulate_rows`: per-row interpolation;
GroupNorms over each row's frames; zeros past each row's end before every convolution).

Parameters are a flat dict named by upstream's module paths (`input_embedding.w`,
`encoder.encoders.0.self_attn.linear_q.w`, `decoder.estimator.down_blocks.0.1.0.attn1.to_q.w`,
...) with `.w` / `.b` (linear [in, out], conv and transposed conv [k, in, out], LayerNorm and
GroupNorm scale / shift, embedding [vocab, dim]) and the attention's `pos_bias_u` / `pos_bias_v`
as upstream holds them. `cslm_jax.speech.token2wav_weights` maps them to and from upstream's
state dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from cslm_jax.speech.hift import (
    Layer,
    Token2WavError,
    check_shapes,
    fill_preset,
    jax_shape,
    matmul_precision,
)

# The official v1 sizes (cosyvoice.yaml of CosyVoice-300M; tests/cosyvoice_reference.py's
# FLOW_YAML holds the yaml's arguments, and the tests check these against it).
PRESETS = {
    "v1": dict(
        vocab_size=4096,
        input_size=512,
        output_size=80,
        spk_embed_dim=192,
        input_frame_rate=50,
        encoder_size=512,
        encoder_heads=8,
        encoder_linear_units=2048,
        encoder_blocks=6,
        regulator_layers=4,
        regulator_groups=1,
        channels=(256, 256),
        attention_head_dim=64,
        n_blocks=4,
        num_mid_blocks=12,
        num_heads=8,
        n_timesteps=10,
        cfg_rate=0.7,
    ),
}
MEL_RATE = 22050 / 256  # mel frames per second (upstream's hard-coded 22050 / 256)
SEAM_UNITS = 20  # upstream's token_overlap_len, used by the regulator's split


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Sizes of one flow model: the official ones by default; fields left None take the
    version's preset (`PRESETS`), so `FlowConfig(encoder_size=64, encoder_heads=2, ...)` is v1 at
    reduced sizes. Only v1 (`MaskedDiffWithXvec`) for now."""

    version: str = "v1"
    vocab_size: int | None = None
    input_size: int | None = None  # the unit embedding's width
    output_size: int | None = None  # mel bins (80: upstream's CFM hard-codes it)
    spk_embed_dim: int | None = None  # the x-vector's size
    input_frame_rate: int | None = None  # units per second
    encoder_size: int | None = None
    encoder_heads: int | None = None
    encoder_linear_units: int | None = None
    encoder_blocks: int | None = None
    regulator_layers: int | None = None  # len(sampling_ratios)
    regulator_groups: int | None = None
    channels: tuple | None = None  # the estimator's U-Net levels
    attention_head_dim: int | None = None
    n_blocks: int | None = None  # transformer blocks per level
    num_mid_blocks: int | None = None
    num_heads: int | None = None
    n_timesteps: int | None = None
    cfg_rate: float | None = None

    def __post_init__(self):
        if self.version not in PRESETS:
            raise Token2WavError(
                f"unknown flow version {self.version!r}; ported: "
                f"{', '.join(PRESETS)} (v2's causal flow is not ported yet)"
            )
        fill_preset(self, PRESETS[self.version])
        if self.output_size != 80:
            raise Token2WavError(
                f"flow output_size {self.output_size}: upstream's CFM solver "
                f"works on 80 mel bins only"
            )
        if self.encoder_size % self.encoder_heads:
            raise Token2WavError(
                f"flow encoder_size {self.encoder_size} is not a multiple of "
                f"encoder_heads {self.encoder_heads}"
            )
        for c in self.channels:
            if c % 8:
                raise Token2WavError(
                    f"flow channels {self.channels}: each must be a multiple of 8 (GroupNorm(8))"
                )
        if self.output_size % self.regulator_groups:
            raise Token2WavError("flow regulator_groups must divide output_size")

    @property
    def estimator_in(self) -> int:
        """Noisy mel, mu, speaker, condition."""
        return 4 * self.output_size

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def seam_frames(self) -> int:
        """Mel frames of the regulator's head and tail (34 for v1)."""
        return int(SEAM_UNITS / self.input_frame_rate * 22050 / 256)

    def mel_len(self, n_units: int) -> int:
        """Upstream's mel length for `n_units` units: `int(n / 50 * 22050 / 256)`."""
        return int(n_units / self.input_frame_rate * 22050 / 256)


# -- parameters -----------------------------------------------------------------------------------
# Layer.kind: linear [out, in] | conv [out, in, k] | convT [in, out, k] | norm [C] | embed
# [vocab, dim] | param (stored as is); Layer.weight_norm is unused here (False), and a linear layer
# without bias is kind "linear_nb".


def _resnet(p: str, dim: int, out: int, temb: int, norm: int = 1) -> list[Layer]:
    return [
        Layer(f"{p}.mlp.1", "linear", (out, temb), False),
        Layer(f"{p}.block1.block.0", "conv", (out, dim, 3), False),
        Layer(f"{p}.block1.block.{norm}", "norm", (out,), False),
        Layer(f"{p}.block2.block.0", "conv", (out, out, 3), False),
        Layer(f"{p}.block2.block.{norm}", "norm", (out,), False),
        Layer(f"{p}.res_conv", "conv", (out, dim, 1), False),
    ]


def _transformer(p: str, dim: int, heads: int, head_dim: int) -> list[Layer]:
    inner = heads * head_dim
    return [
        Layer(f"{p}.norm1", "norm", (dim,), False),
        Layer(f"{p}.attn1.to_q", "linear_nb", (inner, dim), False),
        Layer(f"{p}.attn1.to_k", "linear_nb", (inner, dim), False),
        Layer(f"{p}.attn1.to_v", "linear_nb", (inner, dim), False),
        Layer(f"{p}.attn1.to_out.0", "linear", (dim, inner), False),
        Layer(f"{p}.norm3", "norm", (dim,), False),
        Layer(f"{p}.ff.net.0.proj", "linear", (4 * dim, dim), False),
        Layer(f"{p}.ff.net.2", "linear", (dim, 4 * dim), False),
    ]


def layers(cfg: FlowConfig) -> list[Layer]:
    """Every layer of upstream's MaskedDiffWithXvec of these sizes."""
    d, h = cfg.encoder_size, cfg.encoder_heads
    out = [
        Layer("input_embedding", "embed", (cfg.vocab_size, cfg.input_size), False),
        Layer("spk_embed_affine_layer", "linear", (cfg.output_size, cfg.spk_embed_dim), False),
        Layer("encoder.embed.out.0", "linear", (d, cfg.input_size), False),
        Layer("encoder.embed.out.1", "norm", (d,), False),
    ]
    for i in range(cfg.encoder_blocks):
        p = f"encoder.encoders.{i}"
        out += [
            Layer(f"{p}.self_attn.linear_q", "linear", (d, d), False),
            Layer(f"{p}.self_attn.linear_k", "linear", (d, d), False),
            Layer(f"{p}.self_attn.linear_v", "linear", (d, d), False),
            Layer(f"{p}.self_attn.linear_out", "linear", (d, d), False),
            Layer(f"{p}.self_attn.linear_pos", "linear_nb", (d, d), False),
            Layer(f"{p}.self_attn.pos_bias_u", "param", (h, d // h), False),
            Layer(f"{p}.self_attn.pos_bias_v", "param", (h, d // h), False),
            Layer(f"{p}.feed_forward.w_1", "linear", (cfg.encoder_linear_units, d), False),
            Layer(f"{p}.feed_forward.w_2", "linear", (d, cfg.encoder_linear_units), False),
            Layer(f"{p}.norm_ff", "norm", (d,), False),
            Layer(f"{p}.norm_mha", "norm", (d,), False),
        ]
    out += [
        Layer("encoder.after_norm", "norm", (d,), False),
        Layer("encoder_proj", "linear", (cfg.output_size, d), False),
    ]
    c = cfg.output_size
    for j in range(cfg.regulator_layers):
        out += [
            Layer(f"length_regulator.model.{3 * j}", "conv", (c, c, 3), False),
            Layer(f"length_regulator.model.{3 * j + 1}", "norm", (c,), False),
        ]
    out.append(
        Layer(f"length_regulator.model.{3 * cfg.regulator_layers}", "conv", (c, c, 1), False)
    )
    return out + estimator_layers(cfg)


def estimator_layers(cfg, norm: int = 1) -> list[Layer]:
    """The estimator's layers (upstream's `ConditionalDecoder`, `decoder.estimator.*`), for the
    v1 flow and v2's causal one (`causal_flow`), whose blocks put their GroupNorm / LayerNorm at
    index `norm` 2 of `block` (a causal conv, a transpose, the norm) where v1's has it at 1."""
    e, temb, ch = "decoder.estimator", cfg.time_embed_dim, cfg.channels
    tr = functools.partial(_transformer, heads=cfg.num_heads, head_dim=cfg.attention_head_dim)
    out = [
        Layer(f"{e}.time_mlp.linear_1", "linear", (temb, cfg.estimator_in), False),
        Layer(f"{e}.time_mlp.linear_2", "linear", (temb, temb), False),
    ]
    prev = cfg.estimator_in
    for i, c in enumerate(ch):
        out += _resnet(f"{e}.down_blocks.{i}.0", prev, c, temb, norm)
        for j in range(cfg.n_blocks):
            out += tr(f"{e}.down_blocks.{i}.1.{j}", c)
        last = i == len(ch) - 1
        out.append(
            Layer(f"{e}.down_blocks.{i}.2" + ("" if last else ".conv"), "conv", (c, c, 3), False)
        )
        prev = c
    for i in range(cfg.num_mid_blocks):
        out += _resnet(f"{e}.mid_blocks.{i}.0", ch[-1], ch[-1], temb, norm)
        for j in range(cfg.n_blocks):
            out += tr(f"{e}.mid_blocks.{i}.1.{j}", ch[-1])
    up = ch[::-1] + (ch[0],)
    for i in range(len(up) - 1):
        c = up[i + 1]
        out += _resnet(f"{e}.up_blocks.{i}.0", 2 * up[i], c, temb, norm)
        for j in range(cfg.n_blocks):
            out += tr(f"{e}.up_blocks.{i}.1.{j}", c)
        last = i == len(up) - 2
        out.append(
            Layer(f"{e}.up_blocks.{i}.2", "conv", (c, c, 3), False)
            if last
            else Layer(f"{e}.up_blocks.{i}.2.conv", "convT", (c, c, 4), False)
        )
    out += [
        Layer(f"{e}.final_block.block.0", "conv", (up[-1], up[-1], 3), False),
        Layer(f"{e}.final_block.block.{norm}", "norm", (up[-1],), False),
        Layer(f"{e}.final_proj", "conv", (cfg.output_size, up[-1], 1), False),
    ]
    return out


def layer_shapes(table: list[Layer]) -> dict:
    """Our parameter names -> shapes, for a layer table (`layers` here or in `causal_flow`)."""
    out = {}
    for layer in table:
        if layer.kind == "param":
            out[layer.name] = layer.shape
            continue
        out[f"{layer.name}.w"] = jax_shape(layer)
        if layer.kind in ("linear", "conv", "norm"):
            out[f"{layer.name}.b"] = (layer.shape[0],)
        elif layer.kind == "convT":
            out[f"{layer.name}.b"] = (layer.shape[1],)
    return out


def random_params(table: list[Layer], seed: int) -> dict:
    """Random weights for a layer table (tests, benchmarks, the demo): ~ N(0, 1 / fan_in), norms'
    scales around 1, small biases, so every signal stays of order one. Random weights give
    noise, not speech."""
    rng = np.random.default_rng(seed)
    params = {}
    for layer in table:
        name = layer.name
        if layer.kind == "param":
            params[name] = (0.1 * rng.standard_normal(layer.shape)).astype(np.float32)
            continue
        shape = jax_shape(layer)
        if layer.kind == "norm":
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif layer.kind == "embed":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[:-1])))
        params[f"{name}.w"] = w.astype(np.float32)
        if layer.kind in ("linear", "conv", "norm", "convT"):
            params[f"{name}.b"] = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    return params


def param_shapes(cfg: FlowConfig) -> dict:
    """Our parameter names -> shapes."""
    return layer_shapes(layers(cfg))


def init_random(version: str = "v1", seed: int = 0, **sizes) -> tuple[FlowConfig, dict]:
    """A random-weight flow model (tests, benchmarks, the demo): `sizes` override `FlowConfig`
    fields; weights as `random_params` draws them. Random weights give noise, not speech."""
    cfg = FlowConfig(version=version, **sizes)
    return cfg, random_params(layers(cfg), seed)


def check_params(cfg: FlowConfig, params: dict, where: str = "parameters") -> None:
    """Every expected tensor present with its shape; names the first that is not."""
    check_shapes(param_shapes(cfg), params, where)


# -- building blocks (all on [B, T, C]) ------------------------------------------------------------


class _Ops:
    def __init__(self, params: dict, precision: str):
        self.p = params
        self.prec = matmul_precision(precision)

    def dense(self, name, x, bias=True):
        import jax.numpy as jnp

        y = jnp.dot(x, self.p[f"{name}.w"], precision=self.prec)
        return y + self.p[f"{name}.b"] if bias else y

    def conv(self, name, x, stride=1):
        """Conv1d with upstream's zero padding (k // 2 on each side)."""
        import jax

        w = self.p[f"{name}.w"]
        pad = w.shape[0] // 2
        y = jax.lax.conv_general_dilated(
            x,
            w,
            (stride,),
            [(pad, pad)],
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.prec,
        )
        return y + self.p[f"{name}.b"]

    def conv_transpose(self, name, x, stride=2, padding=1):
        import jax

        w = self.p[f"{name}.w"][::-1]
        k = w.shape[0]
        y = jax.lax.conv_general_dilated(
            x,
            w,
            (1,),
            [(k - 1 - padding,) * 2],
            lhs_dilation=(stride,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.prec,
        )
        return y + self.p[f"{name}.b"]

    def layer_norm(self, name, x, eps):
        import jax.numpy as jnp

        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + eps) * self.p[f"{name}.w"] + self.p[f"{name}.b"]

    def group_norm(self, name, x, groups, eps=1e-5, mask=None):
        """torch.nn.GroupNorm over [B, T, C]: statistics over every frame given, or with `mask`
        (`[B, T, 1]`, 1 / 0) over each row's valid frames only (what the row alone, without
        its padding, gives)."""
        import jax.numpy as jnp

        b, t, c = x.shape
        g = x.reshape(b, t, groups, c // groups)
        if mask is None:
            mean = g.mean((1, 3), keepdims=True)
            var = jnp.square(g - mean).mean((1, 3), keepdims=True)
        else:
            m = mask.reshape(b, t, 1, 1).astype(x.dtype)
            count = jnp.maximum(m.sum(1, keepdims=True), 1.0) * np.float32(c // groups)
            mean = (g * m).sum((1, 3), keepdims=True) / count
            var = (jnp.square(g - mean) * m).sum((1, 3), keepdims=True) / count
        g = (g - mean) / jnp.sqrt(var + eps)
        return g.reshape(b, t, c) * self.p[f"{name}.w"] + self.p[f"{name}.b"]


def _mish(x):
    import jax
    import jax.numpy as jnp

    return x * jnp.tanh(jax.nn.softplus(x))


def _rel_pos_emb(t: int, d: int) -> np.ndarray:
    """ESPnet's relative positional encoding for `t` frames: [2t - 1, d], positions t-1 .. -(t-1)
    (upstream's EspnetRelPositionalEncoding, float32 as it computes it)."""
    pos = np.arange(t, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, d, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d)))
    pe_pos = np.zeros((t, d), np.float32)
    pe_neg = np.zeros((t, d), np.float32)
    pe_pos[:, 0::2] = np.sin(pos * div)
    pe_pos[:, 1::2] = np.cos(pos * div)
    pe_neg[:, 0::2] = np.sin(np.float32(-1) * pos * div)
    pe_neg[:, 1::2] = np.cos(np.float32(-1) * pos * div)
    return np.concatenate([pe_pos[::-1], pe_neg[1:]], 0)


def encoder(params: dict, cfg: FlowConfig, units, unit_len, precision: str = "highest"):
    """`units [B, N]` (ids), `unit_len [B]` -> `h [B, N, 80]`: the embedding (zeroed past each
    row's length), the Conformer encoder and the projection; traceable."""
    import jax
    import jax.numpy as jnp

    ops = _Ops(params, precision)
    b, n = units.shape
    d, h = cfg.encoder_size, cfg.encoder_heads
    dk = d // h
    valid = jnp.arange(n)[None, :] < unit_len[:, None]  # [B, N]
    x = params["input_embedding.w"][jnp.maximum(units, 0)] * valid[..., None]
    x = ops.layer_norm("encoder.embed.out.1", ops.dense("encoder.embed.out.0", x), 1e-5)
    x = x * np.float32(math.sqrt(d))
    pe = jnp.asarray(_rel_pos_emb(n, d))
    # rel_shift: score[i, k] reads the position column n - 1 - i + k (relative position i - k)
    shift = (n - 1 - np.arange(n)[:, None] + np.arange(n)[None, :]).astype(np.int32)
    key_ok = valid[:, None, None, :]  # [B, 1, 1, N]
    for i in range(cfg.encoder_blocks):
        p = f"encoder.encoders.{i}"
        a = f"{p}.self_attn"
        y = ops.layer_norm(f"{p}.norm_mha", x, 1e-12)
        q = ops.dense(f"{a}.linear_q", y).reshape(b, n, h, dk)
        k = ops.dense(f"{a}.linear_k", y).reshape(b, n, h, dk)
        v = ops.dense(f"{a}.linear_v", y).reshape(b, n, h, dk)
        pos = ops.dense(f"{a}.linear_pos", pe, bias=False).reshape(2 * n - 1, h, dk)
        qu = q + params[f"{a}.pos_bias_u"]
        qv = q + params[f"{a}.pos_bias_v"]
        ac = jnp.einsum("bihd,bjhd->bhij", qu, k, precision=ops.prec)
        bd = jnp.einsum("bihd,jhd->bhij", qv, pos, precision=ops.prec)
        bd = jnp.take_along_axis(bd, jnp.broadcast_to(shift, bd.shape[:2] + shift.shape), -1)
        scores = (ac + bd) / np.float32(math.sqrt(dk))
        scores = jnp.where(key_ok, scores, -jnp.inf)
        att = jnp.where(key_ok, jax.nn.softmax(scores, -1), 0.0)
        o = jnp.einsum("bhij,bjhd->bihd", att, v, precision=ops.prec).reshape(b, n, d)
        x = x + ops.dense(f"{a}.linear_out", o)
        y = ops.layer_norm(f"{p}.norm_ff", x, 1e-12)
        y = ops.dense(f"{p}.feed_forward.w_2", jax.nn.silu(ops.dense(f"{p}.feed_forward.w_1", y)))
        x = x + y
    x = ops.layer_norm("encoder.after_norm", x, 1e-5)
    return ops.dense("encoder_proj", x)


def _interp_index(n_in: int, n_out: int):
    """PyTorch's `interpolate(size=n_out, mode="linear", align_corners=False)` as constants:
    (left index, right index, left weight, right weight), float32 as PyTorch's CPU kernel
    computes the source position (scale in / out, `scale * (i + 0.5) - 0.5`, clamped at 0)."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, n_in - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (np.float32(1.0) - l1).astype(np.float32), l1


def _interp(x, n_out: int):
    """x [B, n_in, C] -> [B, n_out, C], linear (align_corners=False)."""
    i0, i1, l0, l1 = _interp_index(x.shape[1], n_out)
    return x[:, i0] * l0[None, :, None] + x[:, i1] * l1[None, :, None]


def interp_weights(n_in, n_out, i):
    """`_interp_index` traced, per row: output frame `i` of a linear interpolation (PyTorch's,
    align_corners=False) from `n_in` to `n_out` frames (int arrays of one shape, or
    broadcastable) -> (left index, right index, left weight, right weight), the source position
    computed in float32 as PyTorch's CPU kernel does. `n_in` and `n_out` are taken as at least 1
    (a segment of no frames is never read)."""
    import jax.numpy as jnp

    n_in = jnp.maximum(jnp.asarray(n_in, jnp.int32), 1)
    scale = n_in.astype(jnp.float32) / jnp.maximum(jnp.asarray(n_out, jnp.int32), 1).astype(
        jnp.float32
    )
    # scale * (i + 1/2) - 1/2 as (scale * (2i + 1)) / 2 - 1/2: XLA's CPU compiler contracts a
    # multiply-add into one fused (once-rounded) operation; halving is exact, so this rounds the
    # product first, as PyTorch does, fused or not
    odd = (2 * jnp.asarray(i, jnp.int32) + 1).astype(jnp.float32)
    src = jnp.maximum((scale * odd) * np.float32(0.5) - np.float32(0.5), np.float32(0.0))
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    l1 = src - i0.astype(jnp.float32)
    i1 = jnp.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.float32(1.0) - l1, l1


def regulate_rows(
    params: dict,
    cfg: FlowConfig,
    h,
    n_prompt,
    n_units,
    prompt_mel_len,
    mel_len,
    frames: int,
    precision: str = "highest",
):
    """`regulate` for a padded batch, every length per row and traced: `h [B, U, 80]` (row b:
    its `n_prompt[b]` prompt units, then its `n_units[b]` answer units, then padding) ->
    `mu [B, frames, 80]` (row b: `prompt_mel_len[b] + mel_len[b]` frames, zero after), each row
    what `regulate` gives it alone. Upstream's interpolations as up to four segments per row -
    the prompt, the answer (or a long answer's head), a long answer's middle and tail - each
    output frame reading its segment's two source frames; the convolutions see zeros past each
    row's end (upstream's zero padding at the true end) and GroupNorm the row's frames only."""
    import jax.numpy as jnp

    ops = _Ops(params, precision)
    s = cfg.seam_frames
    n_prompt, n_units, prompt_mel_len, mel_len = (
        jnp.asarray(a, jnp.int32) for a in (n_prompt, n_units, prompt_mel_len, mel_len)
    )
    long = n_units > 2 * SEAM_UNITS
    zero = jnp.zeros_like(n_units)
    in_start = jnp.stack(
        [zero, n_prompt, n_prompt + SEAM_UNITS, n_prompt + n_units - SEAM_UNITS], -1
    )  # [B, 4]
    in_len = jnp.stack(
        [
            n_prompt,
            jnp.where(long, SEAM_UNITS, n_units),
            jnp.where(long, n_units - 2 * SEAM_UNITS, 0),
            jnp.where(long, SEAM_UNITS, 0),
        ],
        -1,
    )
    out_len = jnp.stack(
        [
            prompt_mel_len,
            jnp.where(long, s, mel_len),
            jnp.where(long, mel_len - 2 * s, 0),
            jnp.where(long, s, 0),
        ],
        -1,
    )
    out_end = jnp.cumsum(out_len, -1)
    out_start = out_end - out_len
    t = jnp.arange(frames, dtype=jnp.int32)[None, :]  # [1, T]
    seg = (t[..., None] >= out_end[:, None, :3]).sum(-1)  # [B, T]

    def pick(a):
        return jnp.take_along_axis(a, seg, 1)

    i0, i1, l0, l1 = interp_weights(pick(in_len), pick(out_len), t - pick(out_start))
    first = pick(in_start)
    x = (
        jnp.take_along_axis(h, (first + i0)[..., None], 1) * l0[..., None]
        + jnp.take_along_axis(h, (first + i1)[..., None], 1) * l1[..., None]
    )
    m = (t < (prompt_mel_len + mel_len)[:, None]).astype(x.dtype)[..., None]  # [B, T, 1]
    x = x * m
    for j in range(cfg.regulator_layers):
        x = ops.conv(f"length_regulator.model.{3 * j}", x)
        x = (
            _mish(
                ops.group_norm(
                    f"length_regulator.model.{3 * j + 1}", x, cfg.regulator_groups, mask=m
                )
            )
            * m
        )
    return ops.conv(f"length_regulator.model.{3 * cfg.regulator_layers}", x) * m


def regulate(
    params: dict,
    cfg: FlowConfig,
    h,
    n_prompt: int,
    prompt_mel_len: int,
    mel_len: int,
    precision: str = "highest",
):
    """`InterpolateRegulator.inference`: `h [B, Np + N, 80]` -> `mu [B, Mp + M, 80]` (prompt
    frames to `prompt_mel_len`, the answer's to `mel_len`, a long answer's first and last 20
    units to 34 frames each); traceable, the lengths static."""
    import jax.numpy as jnp

    ops = _Ops(params, precision)
    x1, x2 = h[:, :n_prompt], h[:, n_prompt:]
    n2, s = x2.shape[1], cfg.seam_frames
    if n2 > 2 * SEAM_UNITS:
        x2 = jnp.concatenate(
            [
                _interp(x2[:, :SEAM_UNITS], s),
                _interp(x2[:, SEAM_UNITS:-SEAM_UNITS], mel_len - 2 * s),
                _interp(x2[:, -SEAM_UNITS:], s),
            ],
            1,
        )
    else:
        x2 = _interp(x2, mel_len)
    x = jnp.concatenate([_interp(x1, prompt_mel_len), x2], 1) if n_prompt else x2
    for j in range(cfg.regulator_layers):
        x = ops.conv(f"length_regulator.model.{3 * j}", x)
        x = _mish(ops.group_norm(f"length_regulator.model.{3 * j + 1}", x, cfg.regulator_groups))
    return ops.conv(f"length_regulator.model.{3 * cfg.regulator_layers}", x)


def check_lengths(cfg: FlowConfig, n_units: int, mel_len: int) -> None:
    if n_units < 1:
        raise Token2WavError("no units to synthesise")
    if mel_len < 1:
        raise Token2WavError(f"mel length {mel_len} for {n_units} units: must be >= 1")
    if n_units > 2 * SEAM_UNITS and mel_len <= 2 * cfg.seam_frames:
        raise Token2WavError(
            f"mel length {mel_len} for {n_units} units: an answer of more than "
            f"{2 * SEAM_UNITS} units needs more than {2 * cfg.seam_frames} "
            f"frames (upstream's regulator gives its first and last "
            f"{SEAM_UNITS} units {cfg.seam_frames} frames each)"
        )


def encode(
    params: dict,
    cfg: FlowConfig,
    units,
    unit_len,
    mel_len: int,
    n_prompt: int = 0,
    prompt_mel_len: int = 0,
    precision: str = "highest",
):
    """Units (the prompt's `n_prompt` first) -> `mu [B, prompt_mel_len + mel_len, 80]`: the
    embedding, the encoder, the projection and the regulator; traceable, lengths static."""
    h = encoder(params, cfg, units, unit_len, precision)
    return regulate(params, cfg, h, n_prompt, prompt_mel_len, mel_len, precision)


# -- the estimator (ConditionalDecoder) ----------------------------------------------------------


def _time_embedding(t, dim: int):
    """matcha's SinusoidalPosEmb (scale 1000): t [B] -> [B, dim]."""
    import jax.numpy as jnp

    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-(math.log(10000) / (half - 1))))
    e = (np.float32(1000.0) * t)[:, None] * freq[None, :]
    return jnp.concatenate([jnp.sin(e), jnp.cos(e)], -1)


def _block1d(ops, p, x, mask, valid_only=False):
    y = ops.conv(f"{p}.block.0", x * mask)
    return _mish(ops.group_norm(f"{p}.block.1", y, 8, mask=mask if valid_only else None)) * mask


def _resnet_fwd(ops, p, x, mask, temb, valid_only=False):
    h = _block1d(ops, f"{p}.block1", x, mask, valid_only)
    h = h + ops.dense(f"{p}.mlp.1", _mish(temb))[:, None, :]
    h = _block1d(ops, f"{p}.block2", h, mask, valid_only)
    return h + ops.conv(f"{p}.res_conv", x * mask)


def _transformer_fwd(ops, cfg, p, x, bias):
    import jax
    import jax.numpy as jnp

    b, t, _ = x.shape
    h, dh = cfg.num_heads, cfg.attention_head_dim
    y = ops.layer_norm(f"{p}.norm1", x, 1e-5)
    q = ops.dense(f"{p}.attn1.to_q", y, bias=False).reshape(b, t, h, dh)
    k = ops.dense(f"{p}.attn1.to_k", y, bias=False).reshape(b, t, h, dh)
    v = ops.dense(f"{p}.attn1.to_v", y, bias=False).reshape(b, t, h, dh)
    s = jnp.einsum("bihd,bjhd->bhij", q, k, precision=ops.prec) * np.float32(dh**-0.5)
    att = jax.nn.softmax(s + bias, -1)
    o = jnp.einsum("bhij,bjhd->bihd", att, v, precision=ops.prec).reshape(b, t, h * dh)
    x = x + ops.dense(f"{p}.attn1.to_out.0", o)
    y = ops.layer_norm(f"{p}.norm3", x, 1e-5)
    y = jax.nn.gelu(ops.dense(f"{p}.ff.net.0.proj", y), approximate=False)
    return x + ops.dense(f"{p}.ff.net.2", y)


def estimator(
    params: dict,
    cfg: FlowConfig,
    x,
    mask,
    mu,
    t,
    spks,
    cond,
    precision: str = "highest",
    valid_only: bool = False,
):
    """`ConditionalDecoder.forward`: x, mu, cond `[B, T, 80]`, mask `[B, T]` (1 / 0), t `[B]`,
    spks `[B, 80]` -> the velocity `[B, T, 80]`; traceable. Upstream's GroupNorms take their
    statistics over every frame, padded or not; `valid_only` takes them over each row's masked
    frames only, so that a padded row gives what it gives alone (with a mask of ones the two
    agree). Every convolution reads zeros past a row's mask, attention ignores those keys, and
    a mask of even length keeps the stride-2 levels aligned with the row alone."""
    import jax
    import jax.numpy as jnp

    ops = _Ops(params, precision)
    e = "decoder.estimator"
    temb = _time_embedding(t, cfg.estimator_in)
    temb = ops.dense(
        f"{e}.time_mlp.linear_2", jax.nn.silu(ops.dense(f"{e}.time_mlp.linear_1", temb))
    )
    spk = jnp.broadcast_to(spks[:, None, :], x.shape[:2] + spks.shape[-1:])
    h = jnp.concatenate([x, mu, spk, cond], -1)
    m = mask[..., None].astype(h.dtype)

    def blocks(prefix, h, m):
        bias = ((1.0 - m[..., 0]) * np.float32(-1.0e10))[:, None, None, :]
        for j in range(cfg.n_blocks):
            h = _transformer_fwd(ops, cfg, f"{prefix}.{j}", h, bias)
        return h

    ch = cfg.channels
    hiddens, masks = [], [m]
    for i in range(len(ch)):
        md = masks[-1]
        h = _resnet_fwd(ops, f"{e}.down_blocks.{i}.0", h, md, temb, valid_only)
        h = blocks(f"{e}.down_blocks.{i}.1", h, md)
        hiddens.append(h)
        if i == len(ch) - 1:
            h = ops.conv(f"{e}.down_blocks.{i}.2", h * md)
        else:
            h = ops.conv(f"{e}.down_blocks.{i}.2.conv", h * md, stride=2)
        masks.append(md[:, ::2])
    masks = masks[:-1]
    mm = masks[-1]
    for i in range(cfg.num_mid_blocks):
        h = _resnet_fwd(ops, f"{e}.mid_blocks.{i}.0", h, mm, temb, valid_only)
        h = blocks(f"{e}.mid_blocks.{i}.1", h, mm)
    for i in range(len(ch)):
        mu_ = masks.pop()
        skip = hiddens.pop()
        h = jnp.concatenate([h[:, : skip.shape[1]], skip], -1)
        h = _resnet_fwd(ops, f"{e}.up_blocks.{i}.0", h, mu_, temb, valid_only)
        h = blocks(f"{e}.up_blocks.{i}.1", h, mu_)
        if i == len(ch) - 1:
            h = ops.conv(f"{e}.up_blocks.{i}.2", h * mu_)
        else:
            h = ops.conv_transpose(f"{e}.up_blocks.{i}.2.conv", h * mu_)
    h = _block1d(ops, f"{e}.final_block", h, mu_, valid_only)
    return ops.conv(f"{e}.final_proj", h * mu_) * m


# -- the CFM solver ------------------------------------------------------------------------------


def time_steps(n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's Euler schedule in float32: (t before each step, dt of each step), t from
    `1 - cos(linspace(0, 1, n + 1) * 0.5 * pi)` with t advanced as `t + dt` (as `solve_euler`
    does, rounding included; linspace as PyTorch computes it, from both ends)."""
    steps = n_steps + 1
    step = np.float32(1.0) / np.float32(n_steps)
    idx = np.arange(steps)
    lin = np.where(
        idx < steps // 2,
        np.float32(0.0) + step * idx.astype(np.float32),
        np.float32(1.0) - step * (steps - idx - 1).astype(np.float32),
    ).astype(np.float32)
    span = (np.float32(1.0) - np.cos(lin * np.float32(0.5) * np.float32(math.pi))).astype(
        np.float32
    )
    ts, dts = [], []
    t, dt = span[0], np.float32(span[1] - span[0])
    for s in range(1, steps):
        ts.append(t)
        dts.append(dt)
        t = np.float32(t + dt)
        if s < steps - 1:
            dt = np.float32(span[s + 1] - t)
    return np.array(ts, np.float32), np.array(dts, np.float32)


def cfm(
    params: dict,
    cfg: FlowConfig,
    mu,
    mask,
    spks,
    cond,
    noise,
    n_steps: int | None = None,
    cfg_rate: float | None = None,
    precision: str = "highest",
    valid_only: bool = False,
):
    """`ConditionalCFM.forward` (temperature 1, no cache): from `noise [B, T, 80]`, `n_steps`
    Euler steps, each one estimator call on the conditional and unconditional (mu, speaker and
    condition zero) rows as one batch, merged with guidance `cfg_rate`; traceable. mu, cond
    `[B, T, 80]`, mask `[B, T]`, spks `[B, 80]` -> mel `[B, T, 80]`. `valid_only`: the
    estimator's GroupNorms over each row's masked frames (padded rows as alone; `estimator`)."""

    def velocity(x, mask, mu, t, spks, cond):
        return estimator(params, cfg, x, mask, mu, t, spks, cond, precision, valid_only)

    n_steps = cfg.n_timesteps if n_steps is None else n_steps
    return euler_guided(
        velocity,
        mu,
        mask,
        spks,
        cond,
        noise,
        n_steps,
        cfg.cfg_rate if cfg_rate is None else cfg_rate,
    )


def euler_guided(velocity, mu, mask, spks, cond, noise, n_steps: int, cfg_rate: float):
    """The CFM solver of upstream's v1 and v2 flows: from `noise [B, T, 80]`, `n_steps` Euler
    steps over `time_steps`, each one `velocity(x, mask, mu, t, spks, cond)` call on the
    conditional and unconditional (mu, speaker and condition zero) rows as one batch of 2B,
    merged with classifier-free guidance `cfg_rate`; traceable. Returns `[B, T, 80]`."""
    import jax
    import jax.numpy as jnp

    ts, dts = time_steps(n_steps)
    b = mu.shape[0]
    mask2 = jnp.concatenate([mask, mask], 0)
    mu2 = jnp.concatenate([mu, jnp.zeros_like(mu)], 0)
    spks2 = jnp.concatenate([spks, jnp.zeros_like(spks)], 0)
    cond2 = jnp.concatenate([cond, jnp.zeros_like(cond)], 0)

    def step(x, tdt):
        t, dt = tdt
        v = velocity(jnp.concatenate([x, x], 0), mask2, mu2, jnp.full((2 * b,), t), spks2, cond2)
        v = (1.0 + cfg_rate) * v[:b] - cfg_rate * v[b:]
        return x + dt * v, None

    x, _ = jax.lax.scan(step, noise, (jnp.asarray(ts), jnp.asarray(dts)))
    return x


# -- inference ------------------------------------------------------------------------------------


def _forward(
    params,
    units,
    prompt_mel,
    embedding,
    noise,
    *,
    cfg,
    n_prompt,
    prompt_mel_len,
    mel_len,
    n_steps,
    cfg_rate,
    precision,
):
    import jax.numpy as jnp

    spks = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    spks = _Ops(params, precision).dense("spk_embed_affine_layer", spks)
    n = units.shape[1]
    mu = encode(
        params,
        cfg,
        units,
        jnp.full((units.shape[0],), n),
        mel_len,
        n_prompt,
        prompt_mel_len,
        precision,
    )
    total = prompt_mel_len + mel_len
    cond = jnp.zeros((units.shape[0], total, cfg.output_size), mu.dtype)
    cond = cond.at[:, :prompt_mel_len].set(prompt_mel)
    mask = jnp.ones((units.shape[0], total), mu.dtype)
    mel = cfm(params, cfg, mu, mask, spks, cond, noise, n_steps, cfg_rate, precision)
    return jnp.swapaxes(mel[:, prompt_mel_len:], 1, 2)


@functools.lru_cache(maxsize=None)
def _jitted(cfg, n_prompt, prompt_mel_len, mel_len, n_steps, cfg_rate, precision):
    import jax

    return jax.jit(
        functools.partial(
            _forward,
            cfg=cfg,
            n_prompt=n_prompt,
            prompt_mel_len=prompt_mel_len,
            mel_len=mel_len,
            n_steps=n_steps,
            cfg_rate=cfg_rate,
            precision=precision,
        )
    )


def check_units(cfg: FlowConfig, units, what: str = "units") -> np.ndarray:
    u = np.asarray(units)
    if u.ndim == 2 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 1 or (u.size and not np.issubdtype(u.dtype, np.integer)):
        raise Token2WavError(
            f"{what}: expected one sequence of integer unit ids, got shape {u.shape} ({u.dtype})"
        )
    bad = np.flatnonzero((u < 0) | (u >= cfg.vocab_size))
    if bad.size:
        raise Token2WavError(
            f"{what}: unit {int(u[bad[0]])} at position {int(bad[0])} is out "
            f"of range 0..{cfg.vocab_size - 1}"
        )
    return u.astype(np.int32)


def check_utterance(cfg, units, embedding, prompt_units=None, prompt_mel=None):
    """One utterance's inputs, checked and converted (v1 and v2 flows): (units [N], prompt units
    [Np], prompt mel [Mp, 80], x-vector [192]) from units `[N]` or `[1, N]`, the x-vector `[192]`
    or `[1, 192]` (finite), the optional zero-shot prompt (units and mel, both or neither; mel
    `[Mp, 80]` or `[1, Mp, 80]`). Errors say which input is wrong and how."""
    u = check_units(cfg, units)
    pu = check_units(
        cfg, np.zeros((0,), np.int32) if prompt_units is None else prompt_units, "prompt units"
    )
    pm = (
        np.zeros((0, cfg.output_size), np.float32)
        if prompt_mel is None
        else np.asarray(prompt_mel, np.float32)
    )
    if pm.ndim == 3 and pm.shape[0] == 1:
        pm = pm[0]
    if pm.ndim != 2 or pm.shape[1] != cfg.output_size:
        raise Token2WavError(
            f"prompt mel has shape {pm.shape}, expected [frames, {cfg.output_size}]"
        )
    if bool(len(pu)) != bool(len(pm)):
        raise Token2WavError(
            f"zero-shot prompt: {len(pu)} prompt units and {len(pm)} prompt "
            f"mel frames; give both or neither"
        )
    shape = np.shape(embedding)
    if not (shape == (cfg.spk_embed_dim,) or shape == (1, cfg.spk_embed_dim)):
        raise Token2WavError(
            f"speaker embedding has shape {shape}, expected a {cfg.spk_embed_dim}-d x-vector"
        )
    emb = np.asarray(embedding, np.float32).reshape(-1)
    if not np.isfinite(emb).all():
        raise Token2WavError("speaker embedding holds non-finite values")
    return u, pu, pm, emb


def flow_inference(
    params: dict,
    cfg: FlowConfig,
    units,
    embedding,
    prompt_units=None,
    prompt_mel=None,
    noise="zero",
    mel_len: int | None = None,
    n_steps: int | None = None,
    cfg_rate: float | None = None,
    precision: str = "highest",
):
    """What upstream's `MaskedDiffWithXvec.inference` computes, for one utterance: `units [N]`
    (or `[1, N]`), the speaker's x-vector `embedding [192]` (or `[1, 192]`), an optional zero-shot
    prompt (`prompt_units [Np]` and its mel `prompt_mel [Mp, 80]` or `[1, Mp, 80]`, frames
    first), `noise` ("zero", a PRNG key, or an array `[1, Mp + M, 80]`), `mel_len` M (default
    upstream's `int(N / 50 * 22050 / 256)`; give the unmerged length for merged units). Returns
    numpy `mel [1, 80, M]`. Compiled once per (lengths, steps, guidance, precision)."""
    import jax

    check_params(cfg, params)
    u, pu, pm, emb = check_utterance(cfg, units, embedding, prompt_units, prompt_mel)
    m = cfg.mel_len(len(u)) if mel_len is None else int(mel_len)
    check_lengths(cfg, len(u), m)
    total = len(pm) + m
    if isinstance(noise, str):
        if noise != "zero":
            raise Token2WavError(f"noise {noise!r}: give 'zero', a PRNG key or an array")
        z = np.zeros((1, total, cfg.output_size), np.float32)
    elif isinstance(noise, (np.ndarray, list)) or (hasattr(noise, "shape") and np.ndim(noise) == 3):
        z = np.asarray(noise, np.float32)
        if z.shape != (1, total, cfg.output_size):
            raise Token2WavError(
                f"noise has shape {z.shape}, expected [1, {total}, "
                f"{cfg.output_size}] (prompt and answer frames)"
            )
    else:
        z = jax.random.normal(noise, (1, total, cfg.output_size), np.float32)
    fn = _jitted(
        cfg,
        len(pu),
        len(pm),
        m,
        cfg.n_timesteps if n_steps is None else n_steps,
        cfg.cfg_rate if cfg_rate is None else float(cfg_rate),
        precision,
    )
    units_all = np.concatenate([pu, u])[None]
    return np.asarray(fn(params, units_all, pm[None], emb[None], z))


# -- batched inference ----------------------------------------------------------------------------

UNIT_BUCKET = 32  # a batch's units (prompt + answer) padded to a multiple of this
FRAME_BUCKET = 64  # its mel frames (prompt + answer) to a multiple of this (even: the
# estimator's stride-2 level then halves it exactly)


def bucket(n: int, size: int) -> int:
    """`n` rounded up to a multiple of `size` (at least `size`): lengths that share a bucket
    share a compiled program."""
    return max(size, -(-int(n) // size) * size)


def _forward_batch(
    params,
    units,
    unit_len,
    n_prompt,
    prompt_mel_len,
    mel_len,
    cond,
    embedding,
    noise,
    *,
    cfg,
    out_frames,
    n_steps,
    cfg_rate,
    precision,
):
    import jax.numpy as jnp

    spks = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    spks = _Ops(params, precision).dense("spk_embed_affine_layer", spks)
    frames = cond.shape[1]
    h = encoder(params, cfg, units, unit_len, precision)
    mu = regulate_rows(
        params, cfg, h, n_prompt, unit_len - n_prompt, prompt_mel_len, mel_len, frames, precision
    )
    t = jnp.arange(frames)[None, :]
    mask = (t < (prompt_mel_len + mel_len)[:, None]).astype(mu.dtype)
    mel = cfm(
        params,
        cfg,
        mu,
        mask,
        spks,
        cond,
        noise * mask[..., None],
        n_steps,
        cfg_rate,
        precision,
        valid_only=True,
    )
    # each row's answer frames from frame 0, zero past its length
    j = jnp.arange(out_frames)[None, :]
    mel = jnp.take_along_axis(
        mel, jnp.minimum(j + prompt_mel_len[:, None], frames - 1)[..., None], 1
    )
    mel = mel * (j < mel_len[:, None]).astype(mel.dtype)[..., None]
    return jnp.swapaxes(mel, 1, 2)


@functools.lru_cache(maxsize=None)
def _jitted_batch(cfg, rows, units, frames, out_frames, n_steps, cfg_rate, precision):
    """One compiled program per entry (every input shape is in the key): `cache_info()` counts
    the programs the batched flow has compiled."""
    import jax

    return jax.jit(
        functools.partial(
            _forward_batch,
            cfg=cfg,
            out_frames=out_frames,
            n_steps=n_steps,
            cfg_rate=cfg_rate,
            precision=precision,
        )
    )


@functools.lru_cache(maxsize=None)
def _jitted_draws(frames: int, channels: int):
    import jax

    return jax.jit(jax.vmap(lambda k: jax.random.normal(k, (frames, channels), np.float32)))


def compiled_batch_programs() -> int:
    """How many batched-flow programs have been compiled in this process (one per bucket of
    rows, units and frames, and per steps / guidance / precision)."""
    return _jitted_batch.cache_info().currsize


def _row_noise(keys, totals, frames: int, channels: int) -> np.ndarray:
    """Row i's start `[frames, C]` from `keys[i]`: what `flow_inference` draws for that key
    (`normal(key, [1, total_i, C])`) over its `total_i` frames, zero after. With JAX's
    partitionable threefry (its default) an element's draw depends on its flat index only, so a
    draw over the bucket's frames holds the row's own draw as its first frames; without it each
    row is drawn at its own length."""
    import jax
    import jax.numpy as jnp

    out = np.zeros((len(keys), frames, channels), np.float32)
    if jax.config.jax_threefry_partitionable:
        z = np.asarray(_jitted_draws(frames, channels)(jnp.stack([jnp.asarray(k) for k in keys])))
        for i, n in enumerate(totals):
            out[i, :n] = z[i, :n]
    else:
        for i, (k, n) in enumerate(zip(keys, totals)):
            out[i, :n] = np.asarray(jax.random.normal(k, (1, n, channels), np.float32))[0]
    return out


def _is_key(x) -> bool:
    import jax

    try:
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or (
            np.shape(x) == (2,) and np.dtype(x.dtype) == np.uint32
        )
    except (AttributeError, TypeError):
        return False


def flow_batch(
    params: dict,
    cfg: FlowConfig,
    units,
    embeddings,
    prompt_units=None,
    prompt_mels=None,
    noise="zero",
    mel_lens=None,
    n_steps: int | None = None,
    cfg_rate: float | None = None,
    precision: str = "highest",
    rows: int | None = None,
    unit_bucket: int = UNIT_BUCKET,
    frame_bucket: int = FRAME_BUCKET,
):
    """Several utterances of different lengths in one compiled call, each row what
    `flow_inference` gives it alone (float32 rounding aside). `units`: a list of unit sequences;
    `embeddings`: one x-vector for every row or one per row (a list or `[B, 192]`);
    `prompt_units` / `prompt_mels`: None or a list of per-row zero-shot prompts (None entries for
    rows without one); `mel_lens`: None (upstream's length per row) or a list; `noise`: "zero",
    a PRNG key (row i draws from `jax.random.fold_in(key, i)`, so row i equals `flow_inference`
    with that key and does not depend on its batch-mates), or a list with one entry per row (a
    key, or an array `[1, Mp_i + M_i, 80]` as `flow_inference` takes). `rows`: pad the batch to
    this many rows (copies of row 0, dropped; fewer distinct programs).

    Padding: units (prompt + answer) to a multiple of `unit_bucket`, mel frames (prompt +
    answer) to a multiple of `frame_bucket` (even), so that batches of nearby lengths share one
    compiled program. Every step ignores padded frames: the encoder's attention masks padded
    keys, the regulator interpolates each row's segments with its own lengths
    (`regulate_rows`), convolutions read zeros past each row's end, GroupNorms take each row's
    frames only, the estimator masks attention and output.

    Returns numpy (`mel [B, 80, F]`: each row's answer frames from frame 0, zero after;
    `mel_len [B]`), F = `bucket(max mel_len, frame_bucket)`: HiFT's batched `vocode` takes
    both. Errors name the row."""
    import jax

    check_params(cfg, params)
    if frame_bucket < 2 or frame_bucket % 2 or unit_bucket < 1:
        raise Token2WavError(
            f"frame_bucket {frame_bucket} must be even and unit_bucket {unit_bucket} positive"
        )
    units = list(units)
    b = len(units)
    if not b:
        raise Token2WavError("no utterances to synthesise (an empty batch)")

    def per_row(x, what):
        if x is None:
            return [None] * b
        x = list(x)
        if len(x) != b:
            raise Token2WavError(f"{what}: {len(x)} entries for {b} rows; give one per row")
        return x

    emb = np.asarray(embeddings, np.float32) if not isinstance(embeddings, (list, tuple)) else None
    if emb is not None and emb.ndim == 1:
        embs = [emb] * b
    elif emb is not None and emb.ndim == 2 and emb.shape[0] == b:
        embs = list(emb)
    elif emb is not None:
        raise Token2WavError(
            f"speaker embeddings have shape {emb.shape}: give one "
            f"{cfg.spk_embed_dim}-d x-vector, or [{b}, {cfg.spk_embed_dim}]"
        )
    else:
        embs = per_row(embeddings, "speaker embeddings")
    pus, pms = per_row(prompt_units, "prompt units"), per_row(prompt_mels, "prompt mels")
    mls = per_row(mel_lens, "mel lengths")
    if isinstance(noise, str):
        if noise != "zero":
            raise Token2WavError(
                f"noise {noise!r}: give 'zero', a PRNG key, or one key or array per row"
            )
        noises = [None] * b
    elif isinstance(noise, (list, tuple)):
        noises = per_row(noise, "noise")
    else:
        if not _is_key(noise):
            raise Token2WavError(
                f"noise of shape {np.shape(noise)}: give 'zero', a PRNG key, "
                f"or a list with one key or array per row"
            )
        noises = [jax.random.fold_in(noise, i) for i in range(b)]

    checked = []
    for i in range(b):
        try:
            u, pu, pm, e = check_utterance(cfg, units[i], embs[i], pus[i], pms[i])
            m = cfg.mel_len(len(u)) if mls[i] is None else int(mls[i])
            check_lengths(cfg, len(u), m)
            z = noises[i]
            if z is not None and not _is_key(z):
                z = np.asarray(z, np.float32)
                if z.shape != (1, len(pm) + m, cfg.output_size):
                    raise Token2WavError(
                        f"noise has shape {z.shape}, expected [1, "
                        f"{len(pm) + m}, {cfg.output_size}] (prompt and "
                        f"answer frames)"
                    )
        except Token2WavError as err:
            raise Token2WavError(f"row {i}: {err}") from None
        checked.append((u, pu, pm, e, m, z))
    rows = max(b, rows or b)
    checked += [checked[0][:5] + (None,)] * (rows - b)
    n_units = bucket(max(len(c[0]) + len(c[1]) for c in checked), unit_bucket)
    frames = bucket(max(len(c[2]) + c[4] for c in checked), frame_bucket)
    out_frames = bucket(max(c[4] for c in checked), frame_bucket)
    c80 = cfg.output_size
    tok = np.zeros((rows, n_units), np.int32)
    cond = np.zeros((rows, frames, c80), np.float32)
    z0 = np.zeros((rows, frames, c80), np.float32)
    lens = np.zeros((4, rows), np.int32)  # unit_len, n_prompt, prompt_mel_len, mel_len
    keyed = [(i, c[5]) for i, c in enumerate(checked) if c[5] is not None and _is_key(c[5])]
    for i, (u, pu, pm, _e, m, z) in enumerate(checked):
        tok[i, : len(pu) + len(u)] = np.concatenate([pu, u])
        cond[i, : len(pm)] = pm
        lens[:, i] = (len(pu) + len(u), len(pu), len(pm), m)
        if z is not None and not _is_key(z):
            z0[i, : len(pm) + m] = z[0]
    if keyed:
        drawn = _row_noise(
            [k for _, k in keyed], [lens[2, i] + lens[3, i] for i, _ in keyed], frames, c80
        )
        for (i, _), d in zip(keyed, drawn):
            z0[i] = d
    fn = _jitted_batch(
        cfg,
        rows,
        n_units,
        frames,
        out_frames,
        cfg.n_timesteps if n_steps is None else n_steps,
        cfg.cfg_rate if cfg_rate is None else float(cfg_rate),
        precision,
    )
    mel = fn(
        params, tok, lens[0], lens[1], lens[2], lens[3], cond, np.stack([c[3] for c in checked]), z0
    )
    return np.asarray(mel)[:b], lens[3, :b].copy()


def flow_inference_batch(params: dict, cfg: FlowConfig, units, embeddings, **kw) -> list:
    """`flow_batch`, each row cut to its length: a list of numpy `mel [1, 80, M_i]` (what
    `flow_inference` returns for that row alone)."""
    mel, mel_len = flow_batch(params, cfg, units, embeddings, **kw)
    return [mel[i : i + 1, :, : int(m)] for i, m in enumerate(mel_len)]


__all__ = [
    "FlowConfig",
    "PRESETS",
    "layers",
    "estimator_layers",
    "layer_shapes",
    "random_params",
    "param_shapes",
    "init_random",
    "check_params",
    "encoder",
    "regulate",
    "encode",
    "estimator",
    "time_steps",
    "cfm",
    "euler_guided",
    "flow_inference",
    "check_units",
    "check_utterance",
    "check_lengths",
    "interp_weights",
    "regulate_rows",
    "bucket",
    "UNIT_BUCKET",
    "FRAME_BUCKET",
    "flow_batch",
    "flow_inference_batch",
    "compiled_batch_programs",
]
