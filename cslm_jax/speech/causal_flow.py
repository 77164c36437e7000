"""CosyVoice 2's flow model (speech units -> 80-bin mel, chunk-aware and causal) in JAX,
computing what upstream's `cosyvoice.flow.flow.CausalMaskedDiffWithXvec.inference(...,
streaming, finalize)` (CosyVoice at FunAudioLLM, as the wheel `cosyvoice-minicpmo==0.1.0` ships
it) computes.

v2 (CosyVoice2-0.5B, `flow.pt`; `CausalFlowConfig()` is the official sizes of cosyvoice2.yaml),
one utterance of `N` units (after an optional zero-shot prompt of `Np` units and its `Mp` mel
frames, upstream's frontend gives `Mp = 2 Np`), 25 units per second, 2 mel frames per unit:
1. Units -> an embedding (6561 x 512), the prompt's units first. `finalize=False` (a streamed
   chunk that is not the last) holds the last `pre_lookahead_len` (3) units back as right
   context: they are embedded but give no frames of their own.
2. `UpsampleConformerEncoder`: `embed` (a linear layer, LayerNorm, times sqrt(512)); the
   `PreLookaheadLayer` (a conv k4 over the frames and the next 3 - the held-back context's
   embedding, or zeros -, leaky ReLU 0.01, a causal conv k3, a residual); 6 Conformer blocks
   (as v1's: ESPnet relative positions, Transformer-XL's u / v biases, 8 heads, pre-norm, SiLU
   feed-forward 2048, no conv module); `Upsample1D` (each frame repeated twice, 4 zeros in
   front, a conv k5); `up_embed` (linear, LayerNorm, times sqrt(512)); 4 more Conformer blocks;
   a final LayerNorm; a 512 -> 80 projection: `mu [Mp + M, 80]`, `M = 2 (Np + N') - Mp` where
   `N'` is the units that give frames (`N`, or `N - 3` when not finalized). With `streaming`,
   the blocks attend within chunks: frame i sees frames j < (i // c + 1) c (every earlier chunk
   and its own), c = 25 before the upsampling and 50 after; otherwise everything.
3. `CausalConditionalCFM`: the starting noise is not drawn per call but the first `Mp + M`
   frames of a fixed buffer (upstream: `torch.randn([1, 80, 15000])` right after
   `torch.manual_seed(0)`, `upstream_noise`), so successive streamed calls share their noise;
   then v1's solver: 10 Euler steps over the cosine schedule, classifier-free guidance 0.7
   (conditional and unconditional rows as one batch). The speaker: the 192-d x-vector
   L2-normalised and projected to 80. The condition: the prompt's mel over its frames, 0 after.
4. The estimator (`CausalConditionalDecoder`): v1's 1-D U-Net (320 input channels: noisy mel,
   mu, speaker, condition; the same time embedding, ResNet blocks and transformer blocks), with
   one level (channels [256]), causal convs k3 (2 zeros in front) and a LayerNorm over the
   channels in place of GroupNorm in its blocks, causal convs at the level's end; with
   `streaming`, its attention too within chunks of 50 frames (at every level).
5. The answer's frames `[Mp:]`: `mel [1, 80, M]`.

Noise is an input: "zero" (deterministic: z = 0), "upstream" (upstream's own buffer; needs
torch), a PRNG key (a buffer of `NOISE_FRAMES` frames drawn from it, its first frames used, so
successive streamed calls with one key share their noise too), or an array `[1, F, 80]`,
`F >= Mp + M` (its first frames used, as upstream slices its buffer).

Streaming as upstream's `CosyVoice2Model.token2wav` drives it: call with every unit so far
(`streaming=True, finalize=False`; upstream waits for a hop of 25 units, the first hop lengthened
to round a prompt up to a multiple of 25, plus the 3 of look-ahead) and keep the frames from
`2 * token_offset` on (`new_frames`); the last call `finalize=True` (upstream's last call is not
streamed). Each call recomputes the whole prefix, as upstream does (no caches); `pad_to` pads
the prefix so that the growing calls share one compiled program (e.g. a power of two), and
streamed frames already given come out again the same (chunk-causal attention, causal convs,
the same noise frames).

Batched: `causal_flow_batch` runs rows of different lengths in one call (each row padded and
masked as `pad_to` does, the rows vmapped), each row as it would alone.

Parameters are a flat dict named by upstream's module paths (`encoder.pre_lookahead_layer.conv1.w`,
`encoder.up_encoders.0.self_attn.linear_q.w`, `decoder.estimator.down_blocks.0.0.block1.block.2.w`,
...) with `.w` / `.b` in `cslm_jax.speech.flow`'s layouts; `cslm_jax.speech.token2wav_weights`
maps them to and from upstream's state dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from cslm_jax.speech.flow import (
    check_utterance,
    estimator_layers,
    euler_guided,
    layer_shapes,
    random_params,
)
from cslm_jax.speech.hift import (
    Layer,
    Token2WavError,
    check_shapes,
    fill_preset,
    matmul_precision,
)

# The official v2 sizes (cosyvoice2.yaml of CosyVoice2-0.5B; tests/cosyvoice_reference.py's
# FLOW_V2_YAML holds the yaml's arguments, and the tests check these against it). Upstream's
# UpsampleConformerEncoder hard-codes some: the pre-lookahead layer (512 channels, 3 units),
# the upsampling (512 channels, x2) and the 4 blocks after it.
PRESETS = {
    "v2": dict(
        vocab_size=6561,
        input_size=512,
        output_size=80,
        spk_embed_dim=192,
        input_frame_rate=25,
        token_mel_ratio=2,
        pre_lookahead_len=3,
        encoder_size=512,
        encoder_heads=8,
        encoder_linear_units=2048,
        encoder_blocks=6,
        up_blocks=4,
        encoder_chunk=25,
        channels=(256,),
        attention_head_dim=64,
        n_blocks=4,
        num_mid_blocks=12,
        num_heads=8,
        decoder_chunk=50,
        n_timesteps=10,
        cfg_rate=0.7,
    ),
}
NOISE_FRAMES = 50 * 300  # upstream's fixed noise buffer: [1, 80, 15000]
NOISE_SEED = 0  # upstream seeds torch with 0 right before drawing it


@dataclasses.dataclass(frozen=True)
class CausalFlowConfig:
    """Sizes of one v2 flow model: the official ones by default; fields left None take the
    preset (`PRESETS`), so `CausalFlowConfig(encoder_blocks=1, channels=(32,), ...)` is v2 at
    reduced sizes (upstream's encoder needs `encoder_size` 512, `pre_lookahead_len` 3,
    `token_mel_ratio` 2 and `up_blocks` 4; ours takes others)."""

    version: str = "v2"
    vocab_size: int | None = None
    input_size: int | None = None  # the unit embedding's width (= encoder_size)
    output_size: int | None = None  # mel bins (80: upstream's CFM hard-codes it)
    spk_embed_dim: int | None = None
    input_frame_rate: int | None = None  # units per second
    token_mel_ratio: int | None = None  # mel frames per unit (the upsampling's stride)
    pre_lookahead_len: int | None = None  # units of right context
    encoder_size: int | None = None
    encoder_heads: int | None = None
    encoder_linear_units: int | None = None
    encoder_blocks: int | None = None  # Conformer blocks before the upsampling
    up_blocks: int | None = None  # and after it
    encoder_chunk: int | None = None  # streaming attention chunk in units (static_chunk_size)
    channels: tuple | None = None  # the estimator's U-Net levels
    attention_head_dim: int | None = None
    n_blocks: int | None = None
    num_mid_blocks: int | None = None
    num_heads: int | None = None
    decoder_chunk: int | None = None  # the estimator's streaming chunk in mel frames
    n_timesteps: int | None = None
    cfg_rate: float | None = None

    def __post_init__(self):
        if self.version not in PRESETS:
            raise Token2WavError(
                f"unknown causal flow version {self.version!r}; ported: "
                f"{', '.join(PRESETS)} (v1's flow is cslm_jax.speech.flow)"
            )
        fill_preset(self, PRESETS[self.version])
        if self.output_size != 80:
            raise Token2WavError(
                f"flow output_size {self.output_size}: upstream's CFM solver "
                f"works on 80 mel bins only"
            )
        if self.input_size != self.encoder_size:
            raise Token2WavError(
                f"flow input_size {self.input_size} != encoder_size "
                f"{self.encoder_size}: the upsampling's embedding takes the "
                f"encoder's output with the input's width"
            )
        if self.encoder_size % self.encoder_heads:
            raise Token2WavError(
                f"flow encoder_size {self.encoder_size} is not a multiple of "
                f"encoder_heads {self.encoder_heads}"
            )
        for name in ("token_mel_ratio", "pre_lookahead_len", "encoder_chunk", "decoder_chunk"):
            if getattr(self, name) < 1:
                raise Token2WavError(f"flow {name} {getattr(self, name)}: must be >= 1")

    @property
    def estimator_in(self) -> int:
        """Noisy mel, mu, speaker, condition."""
        return 4 * self.output_size

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def mel_len(self, n_units: int) -> int:
        """Mel frames of `n_units` finalized units (2 per unit)."""
        return self.token_mel_ratio * n_units


# -- parameters -----------------------------------------------------------------------------------
# Layer kinds as in cslm_jax.speech.flow: linear [out, in] (linear_nb without bias), conv
# [out, in, k], convT [in, out, k], norm [C], embed [vocab, dim], param (stored as is).


def _conformer_layers(p: str, d: int, h: int, ff: int) -> list[Layer]:
    a = f"{p}.self_attn"
    return [
        Layer(f"{a}.linear_q", "linear", (d, d), False),
        Layer(f"{a}.linear_k", "linear", (d, d), False),
        Layer(f"{a}.linear_v", "linear", (d, d), False),
        Layer(f"{a}.linear_out", "linear", (d, d), False),
        Layer(f"{a}.linear_pos", "linear_nb", (d, d), False),
        Layer(f"{a}.pos_bias_u", "param", (h, d // h), False),
        Layer(f"{a}.pos_bias_v", "param", (h, d // h), False),
        Layer(f"{p}.feed_forward.w_1", "linear", (ff, d), False),
        Layer(f"{p}.feed_forward.w_2", "linear", (d, ff), False),
        Layer(f"{p}.norm_ff", "norm", (d,), False),
        Layer(f"{p}.norm_mha", "norm", (d,), False),
    ]


def layers(cfg: CausalFlowConfig) -> list[Layer]:
    """Every layer of upstream's CausalMaskedDiffWithXvec of these sizes."""
    d, h, ff = cfg.encoder_size, cfg.encoder_heads, cfg.encoder_linear_units
    out = [
        Layer("input_embedding", "embed", (cfg.vocab_size, cfg.input_size), False),
        Layer("spk_embed_affine_layer", "linear", (cfg.output_size, cfg.spk_embed_dim), False),
        Layer("encoder.embed.out.0", "linear", (d, cfg.input_size), False),
        Layer("encoder.embed.out.1", "norm", (d,), False),
        Layer(
            "encoder.pre_lookahead_layer.conv1", "conv", (d, d, cfg.pre_lookahead_len + 1), False
        ),
        Layer("encoder.pre_lookahead_layer.conv2", "conv", (d, d, 3), False),
    ]
    for i in range(cfg.encoder_blocks):
        out += _conformer_layers(f"encoder.encoders.{i}", d, h, ff)
    out += [
        Layer("encoder.up_layer.conv", "conv", (d, d, 2 * cfg.token_mel_ratio + 1), False),
        Layer("encoder.up_embed.out.0", "linear", (d, cfg.input_size), False),
        Layer("encoder.up_embed.out.1", "norm", (d,), False),
    ]
    for i in range(cfg.up_blocks):
        out += _conformer_layers(f"encoder.up_encoders.{i}", d, h, ff)
    out += [
        Layer("encoder.after_norm", "norm", (d,), False),
        Layer("encoder_proj", "linear", (cfg.output_size, d), False),
    ]
    return out + estimator_layers(cfg, norm=2)


def param_shapes(cfg: CausalFlowConfig) -> dict:
    """Our parameter names -> shapes."""
    return layer_shapes(layers(cfg))


def init_random(version: str = "v2", seed: int = 0, **sizes) -> tuple[CausalFlowConfig, dict]:
    """A random-weight v2 flow (tests, benchmarks, the demo): `sizes` override
    `CausalFlowConfig` fields; weights as `flow.random_params` draws them. Random weights give
    noise, not speech."""
    cfg = CausalFlowConfig(version=version, **sizes)
    return cfg, random_params(layers(cfg), seed)


def check_params(cfg: CausalFlowConfig, params: dict, where: str = "parameters") -> None:
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

    def conv(self, name, x, pad, stride=1):
        """Conv1d with `pad = (left, right)` zeros."""
        import jax

        y = jax.lax.conv_general_dilated(
            x,
            self.p[f"{name}.w"],
            (stride,),
            [pad],
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.prec,
        )
        return y + self.p[f"{name}.b"]

    def causal_conv(self, name, x):
        """upstream's CausalConv1d: k - 1 zeros in front."""
        return self.conv(name, x, (self.p[f"{name}.w"].shape[0] - 1, 0))

    def conv_transpose(self, name, x, stride=2, padding=1):
        """ConvTranspose1d(k 4, stride 2, padding 1), matcha's Upsample1D."""
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


def _mish(x):
    import jax
    import jax.numpy as jnp

    return x * jnp.tanh(jax.nn.softplus(x))


def chunk_mask(t: int, chunk: int) -> np.ndarray:
    """Upstream's `subsequent_chunk_mask(t, chunk)` (all left chunks): `[t, t]` bool, frame i
    sees frame j iff `j < (i // chunk + 1) * chunk`."""
    i = np.arange(t)
    return i[None, :] < ((i // chunk + 1) * chunk)[:, None]


def _rel_positions(t: int, d: int) -> np.ndarray:
    """ESPnet's relative positional encoding (`EspnetRelPositionalEncoding`) for `t` frames:
    `[2t - 1, d]`, relative positions t - 1 down to -(t - 1), float32 as upstream computes it."""
    pos = np.arange(t, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, d, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d)))
    pe = np.zeros((2, t, d), np.float32)
    pe[0, :, 0::2], pe[0, :, 1::2] = np.sin(pos * div), np.cos(pos * div)
    pe[1, :, 0::2], pe[1, :, 1::2] = (
        np.sin(np.float32(-1) * pos * div),
        np.cos(np.float32(-1) * pos * div),
    )
    return np.concatenate([pe[0, ::-1], pe[1, 1:]], 0)


def _linear_embed(ops, p, x, d):
    """LinearNoSubsampling with ESPnet relative positions: linear, LayerNorm, times sqrt(d)."""
    return ops.layer_norm(f"{p}.out.1", ops.dense(f"{p}.out.0", x), 1e-5) * np.float32(math.sqrt(d))


def _conformer_stack(ops, cfg, prefix, n_blocks, x, allowed, n_valid):
    """`n_blocks` of upstream's ConformerEncoderLayer (rel_selfattn, pre-norm, SiLU
    feed-forward, no macaron, no conv module); `allowed [T, T]` bool: which frames each frame
    attends to; frames at and past `n_valid` (traced) are padding, attended by none. (Relative
    positions do not depend on the padded length: the real frames' scores are upstream's.)"""
    import jax
    import jax.numpy as jnp

    b, n, d = x.shape
    h = cfg.encoder_heads
    dk = d // h
    pe = jnp.asarray(_rel_positions(n, d))
    # rel_shift: score[i, k] reads the position column n - 1 - i + k (relative position i - k)
    shift = (n - 1 - np.arange(n)[:, None] + np.arange(n)[None, :]).astype(np.int32)
    ok = jnp.asarray(allowed)[None, None] & (jnp.arange(n) < n_valid)[None, None, None, :]
    for i in range(n_blocks):
        p = f"{prefix}.{i}"
        a = f"{p}.self_attn"
        y = ops.layer_norm(f"{p}.norm_mha", x, 1e-12)
        q = ops.dense(f"{a}.linear_q", y).reshape(b, n, h, dk)
        k = ops.dense(f"{a}.linear_k", y).reshape(b, n, h, dk)
        v = ops.dense(f"{a}.linear_v", y).reshape(b, n, h, dk)
        pos = ops.dense(f"{a}.linear_pos", pe, bias=False).reshape(2 * n - 1, h, dk)
        ac = jnp.einsum("bihd,bjhd->bhij", q + ops.p[f"{a}.pos_bias_u"], k, precision=ops.prec)
        bd = jnp.einsum("bihd,jhd->bhij", q + ops.p[f"{a}.pos_bias_v"], pos, precision=ops.prec)
        bd = jnp.take_along_axis(bd, jnp.broadcast_to(shift, bd.shape[:2] + shift.shape), -1)
        scores = jnp.where(ok, (ac + bd) / np.float32(math.sqrt(dk)), -jnp.inf)
        att = jnp.where(ok, jax.nn.softmax(scores, -1), 0.0)
        o = jnp.einsum("bhij,bjhd->bihd", att, v, precision=ops.prec).reshape(b, n, d)
        x = x + ops.dense(f"{a}.linear_out", o)
        y = ops.layer_norm(f"{p}.norm_ff", x, 1e-12)
        x = x + ops.dense(
            f"{p}.feed_forward.w_2", jax.nn.silu(ops.dense(f"{p}.feed_forward.w_1", y))
        )
    return x


def encoder(
    params: dict,
    cfg: CausalFlowConfig,
    units,
    context=None,
    streaming: bool = False,
    precision: str = "highest",
):
    """`UpsampleConformerEncoder` and the projection: `units [1, N]` (ids; every one gives
    frames), `context [1, pre_lookahead_len]` (ids of the held-back units, or None: zeros) ->
    `h [1, token_mel_ratio * N, 80]`; traceable."""
    import jax.numpy as jnp

    n = units.shape[1]
    ids = (
        units if context is None else jnp.concatenate([jnp.asarray(units), jnp.asarray(context)], 1)
    )
    n_ctx = 0 if context is None else context.shape[1]
    h = encode_padded(params, cfg, ids, n, n_ctx, streaming, precision)
    return h[:, : cfg.token_mel_ratio * n]


def encode_padded(
    params: dict,
    cfg: CausalFlowConfig,
    ids,
    n_main,
    n_ctx: int,
    streaming: bool = False,
    precision: str = "highest",
):
    """The encoder on a padded row: `ids [1, U]` holds the `n_main` units that give frames
    (traced: one program serves every length up to U), then `n_ctx` (static: 0 or
    `pre_lookahead_len`) units of right context, then padding. Returns `h [1, 2U, 80]`, whose
    first `2 n_main` frames are upstream's (the rest are padding: no real frame sees them)."""
    import jax
    import jax.numpy as jnp

    ops = _Ops(params, precision)
    d, s, look = cfg.encoder_size, cfg.token_mel_ratio, cfg.pre_lookahead_len
    x = _linear_embed(ops, "encoder.embed", params["input_embedding.w"][ids], d)
    b, n, _ = x.shape
    pos = jnp.arange(n)
    # PreLookaheadLayer: conv k (look + 1) over each frame and the next `look` (the context's
    # embedding, zeros past it: upstream pads the embedded units), a causal conv k3, a residual
    right = jnp.where((pos < n_main + n_ctx)[None, :, None], x, 0.0)
    right = jnp.concatenate([right, jnp.zeros((b, look, d), x.dtype)], 1)
    y = ops.conv("encoder.pre_lookahead_layer.conv1", right, (0, 0))
    y = ops.causal_conv("encoder.pre_lookahead_layer.conv2", jax.nn.leaky_relu(y, 0.01))
    x = x + y
    full = np.ones((n, n), bool)
    x = _conformer_stack(
        ops,
        cfg,
        "encoder.encoders",
        cfg.encoder_blocks,
        x,
        chunk_mask(n, cfg.encoder_chunk) if streaming else full,
        n_main,
    )
    # Upsample1D: nearest x s, 2 s zeros in front, a conv k (2 s + 1)
    x = ops.conv("encoder.up_layer.conv", jnp.repeat(x, s, axis=1), (2 * s, 0))
    x = _linear_embed(ops, "encoder.up_embed", x, d)
    full = np.ones((s * n, s * n), bool)
    x = _conformer_stack(
        ops,
        cfg,
        "encoder.up_encoders",
        cfg.up_blocks,
        x,
        chunk_mask(s * n, cfg.encoder_chunk * s) if streaming else full,
        s * n_main,
    )
    x = ops.layer_norm("encoder.after_norm", x, 1e-5)
    return ops.dense("encoder_proj", x)


# -- the estimator (CausalConditionalDecoder) -----------------------------------------------------


def _time_embedding(t, dim: int):
    """matcha's SinusoidalPosEmb (scale 1000): t [B] -> [B, dim]."""
    import jax.numpy as jnp

    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-(math.log(10000) / (half - 1))))
    e = (np.float32(1000.0) * t)[:, None] * freq[None, :]
    return jnp.concatenate([jnp.sin(e), jnp.cos(e)], -1)


def _causal_block(ops, p, x, mask):
    """CausalBlock1D: causal conv k3, LayerNorm over the channels, Mish, masked."""
    y = ops.causal_conv(f"{p}.block.0", x * mask)
    return _mish(ops.layer_norm(f"{p}.block.2", y, 1e-5)) * mask


def _resnet(ops, p, x, mask, temb):
    h = _causal_block(ops, f"{p}.block1", x, mask)
    h = h + ops.dense(f"{p}.mlp.1", _mish(temb))[:, None, :]
    h = _causal_block(ops, f"{p}.block2", h, mask)
    return h + ops.conv(f"{p}.res_conv", x * mask, (0, 0))


def _transformer(ops, cfg, p, x, bias):
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
    cfg: CausalFlowConfig,
    x,
    mask,
    mu,
    t,
    spks,
    cond,
    streaming: bool = False,
    precision: str = "highest",
):
    """`CausalConditionalDecoder.forward`: x, mu, cond `[B, T, 80]`, mask `[B, T]` (1 / 0),
    t `[B]`, spks `[B, 80]` -> the velocity `[B, T, 80]`; with `streaming` the attention within
    chunks of `decoder_chunk` frames at every level; traceable."""
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
        t_ = h.shape[1]
        allowed = m[:, None, :, 0] > 0  # [B, 1, T]
        if streaming:
            allowed = allowed & jnp.asarray(chunk_mask(t_, cfg.decoder_chunk))[None]
        bias = jnp.where(allowed, np.float32(0.0), np.float32(-1.0e10))[:, None]  # [B,1,*,T]
        for j in range(cfg.n_blocks):
            h = _transformer(ops, cfg, f"{prefix}.{j}", h, bias)
        return h

    ch = cfg.channels
    hiddens, masks = [], [m]
    for i in range(len(ch)):
        md = masks[-1]
        h = _resnet(ops, f"{e}.down_blocks.{i}.0", h, md, temb)
        h = blocks(f"{e}.down_blocks.{i}.1", h, md)
        hiddens.append(h)
        if i == len(ch) - 1:
            h = ops.causal_conv(f"{e}.down_blocks.{i}.2", h * md)
        else:
            h = ops.conv(f"{e}.down_blocks.{i}.2.conv", h * md, (1, 1), stride=2)
        masks.append(md[:, ::2])
    masks = masks[:-1]
    mm = masks[-1]
    for i in range(cfg.num_mid_blocks):
        h = _resnet(ops, f"{e}.mid_blocks.{i}.0", h, mm, temb)
        h = blocks(f"{e}.mid_blocks.{i}.1", h, mm)
    for i in range(len(ch)):
        mu_ = masks.pop()
        skip = hiddens.pop()
        h = jnp.concatenate([h[:, : skip.shape[1]], skip], -1)
        h = _resnet(ops, f"{e}.up_blocks.{i}.0", h, mu_, temb)
        h = blocks(f"{e}.up_blocks.{i}.1", h, mu_)
        if i == len(ch) - 1:
            h = ops.causal_conv(f"{e}.up_blocks.{i}.2", h * mu_)
        else:
            h = ops.conv_transpose(f"{e}.up_blocks.{i}.2.conv", h * mu_)
    h = _causal_block(ops, f"{e}.final_block", h, mu_)
    return ops.conv(f"{e}.final_proj", h * mu_, (0, 0)) * m


# -- the CFM solver ------------------------------------------------------------------------------


def cfm(
    params: dict,
    cfg: CausalFlowConfig,
    mu,
    mask,
    spks,
    cond,
    noise,
    streaming: bool = False,
    n_steps: int | None = None,
    cfg_rate: float | None = None,
    precision: str = "highest",
):
    """`CausalConditionalCFM.forward` (temperature 1) from `noise [B, T, 80]` (the buffer's
    first T frames): `n_steps` Euler steps (v1's schedule, `flow.time_steps`), each one
    estimator call on the conditional and unconditional rows as one batch, merged with guidance
    `cfg_rate`; traceable. Returns mel `[B, T, 80]`."""

    def velocity(x, mask, mu, t, spks, cond):
        return estimator(params, cfg, x, mask, mu, t, spks, cond, streaming, precision)

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


# -- inference ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def upstream_noise() -> np.ndarray:
    """Upstream's fixed noise buffer in our layout, `[1, NOISE_FRAMES, 80]` float32: what
    `CausalConditionalCFM.__init__` draws (`torch.manual_seed(0)`, then `torch.randn([1, 80,
    15000])`), transposed. Needs torch (drawn with torch's own generator, which JAX does not
    reproduce); torch's global generator is left as it was."""
    try:
        import torch
    except ImportError:
        raise Token2WavError(
            "noise 'upstream' (CosyVoice 2's fixed noise buffer) is drawn with "
            "torch's generator: install torch (the CPU build is enough) or "
            "give 'zero', a PRNG key or an array"
        ) from None
    g = torch.Generator().manual_seed(NOISE_SEED)
    z = torch.randn([1, 80, NOISE_FRAMES], generator=g).numpy()
    return np.ascontiguousarray(z.transpose(0, 2, 1), np.float32)


def _forward(
    params,
    ids,
    n_main,
    cond,
    embedding,
    noise,
    *,
    cfg,
    n_ctx,
    streaming,
    n_steps,
    cfg_rate,
    precision,
):
    """ids [1, U] (n_main traced), cond and noise [1, 2U, 80] -> mel [1, 2U, 80] (the first
    2 n_main frames real)."""
    import jax.numpy as jnp

    spks = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    spks = _Ops(params, precision).dense("spk_embed_affine_layer", spks)
    mu = encode_padded(params, cfg, ids, n_main, n_ctx, streaming, precision)
    mask = (jnp.arange(mu.shape[1]) < cfg.token_mel_ratio * n_main)[None].astype(mu.dtype)
    return cfm(params, cfg, mu, mask, spks, cond, noise, streaming, n_steps, cfg_rate, precision)


@functools.lru_cache(maxsize=None)
def _jitted(cfg, n_ctx, streaming, n_steps, cfg_rate, precision):
    import jax

    return jax.jit(
        functools.partial(
            _forward,
            cfg=cfg,
            n_ctx=n_ctx,
            streaming=streaming,
            n_steps=n_steps,
            cfg_rate=cfg_rate,
            precision=precision,
        )
    )


def _noise(noise, total: int) -> np.ndarray:
    if isinstance(noise, str):
        if noise == "zero":
            return np.zeros((1, total, 80), np.float32)
        if noise == "upstream":
            z = upstream_noise()
        else:
            raise Token2WavError(
                f"noise {noise!r}: give 'zero', 'upstream', a PRNG key or an array"
            )
    elif isinstance(noise, (np.ndarray, list)) or (hasattr(noise, "shape") and np.ndim(noise) == 3):
        z = np.asarray(noise, np.float32)
        if z.ndim != 3 or z.shape[0] != 1 or z.shape[2] != 80:
            raise Token2WavError(f"noise has shape {z.shape}, expected [1, frames, 80]")
    else:
        import jax

        z = np.asarray(jax.random.normal(noise, (1, NOISE_FRAMES, 80), np.float32))
    if z.shape[1] < total:
        raise Token2WavError(
            f"noise has {z.shape[1]} frames, this call needs {total} (prompt "
            f"and answer frames; upstream's buffer holds {NOISE_FRAMES})"
        )
    return z[:, :total]


def causal_flow_inference(
    params: dict,
    cfg: CausalFlowConfig,
    units,
    embedding,
    prompt_units=None,
    prompt_mel=None,
    noise="zero",
    streaming: bool = False,
    finalize: bool = True,
    pad_to: int | None = None,
    n_steps: int | None = None,
    cfg_rate: float | None = None,
    precision: str = "highest",
):
    """What upstream's `CausalMaskedDiffWithXvec.inference(..., streaming, finalize)` computes,
    for one utterance: `units [N]` (or `[1, N]`), the speaker's x-vector `embedding [192]` (or
    `[1, 192]`), an optional zero-shot prompt (`prompt_units [Np]` and its mel `prompt_mel
    [Mp, 80]` or `[1, Mp, 80]`, frames first; upstream's frontend gives `Mp = 2 Np`), `noise`
    (see the module: "zero", "upstream", a PRNG key, or an array `[1, F, 80]`), `streaming`
    (chunked attention), `finalize` (False: the last `pre_lookahead_len` units are right
    context only). Returns numpy `mel [1, 80, M]`, `M = 2 (Np + N') - Mp` with `N' = N` or
    `N - pre_lookahead_len`. Compiled once per (padded length, flags, steps, guidance,
    precision): `pad_to` pads the units (prompt, answer and context) to that many, so that calls
    of different lengths - a streamer's growing prefix - share one program (the padding changes
    no frame: no real frame sees it); default the exact length."""
    check_params(cfg, params)
    u, pu, pm, emb = check_utterance(cfg, units, embedding, prompt_units, prompt_mel)
    look = 0 if finalize else cfg.pre_lookahead_len
    if len(u) <= look or len(u) < 1:
        raise Token2WavError(
            f"{len(u)} units: a call that is not finalized needs more than "
            f"{cfg.pre_lookahead_len} (the last {cfg.pre_lookahead_len} are "
            f"look-ahead only)"
            if look
            else "no units to synthesise"
        )
    allu = np.concatenate([pu, u])
    n_main = len(allu) - look
    total = cfg.mel_len(n_main)
    if total - len(pm) < 1:
        raise Token2WavError(
            f"prompt mel of {len(pm)} frames leaves no frames of the answer "
            f"({total} frames in all for {n_main} units)"
        )
    width = len(allu) if pad_to is None else int(pad_to)
    if width < len(allu):
        raise Token2WavError(
            f"pad_to {pad_to}: this call has {len(allu)} units (prompt, "
            f"answer and look-ahead); pad to at least that"
        )
    frames = cfg.mel_len(width)
    z = np.zeros((1, frames, cfg.output_size), np.float32)
    z[:, :total] = _noise(noise, total)
    cond = np.zeros((1, frames, cfg.output_size), np.float32)
    cond[0, : len(pm)] = pm
    ids = np.zeros((1, width), np.int32)
    ids[0, : len(allu)] = allu
    fn = _jitted(
        cfg,
        look,
        bool(streaming),
        cfg.n_timesteps if n_steps is None else n_steps,
        cfg.cfg_rate if cfg_rate is None else float(cfg_rate),
        precision,
    )
    mel = np.asarray(fn(params, ids, np.int32(n_main), cond, emb[None], z))
    return np.ascontiguousarray(mel[:, len(pm) : total].transpose(0, 2, 1))


@functools.lru_cache(maxsize=None)
def _jitted_batch(cfg, n_ctx, streaming, n_steps, cfg_rate, precision):
    import jax

    one = functools.partial(
        _forward,
        cfg=cfg,
        n_ctx=n_ctx,
        streaming=streaming,
        n_steps=n_steps,
        cfg_rate=cfg_rate,
        precision=precision,
    )
    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0)))


def causal_flow_batch(
    params: dict,
    cfg: CausalFlowConfig,
    units,
    embeddings,
    prompt_units=None,
    prompt_mels=None,
    noise="zero",
    streaming: bool = False,
    finalize: bool = True,
    rows: int | None = None,
    unit_bucket: int = 16,
    n_steps: int | None = None,
    cfg_rate: float | None = None,
    precision: str = "highest",
):
    """Several utterances of different lengths in one compiled call (the rows vmapped, each
    padded as `pad_to` pads), row i what `causal_flow_inference` gives it alone (float32
    rounding aside). `units`: a list of unit sequences; `embeddings`: one x-vector for every row
    or one per row (a list or `[B, 192]`); `prompt_units` / `prompt_mels`: None or per-row
    lists (None entries for rows without a prompt); `noise`: "zero", "upstream", a PRNG key (row
    i draws its buffer from `jax.random.fold_in(key, i)`), or a list with one entry per row (any
    form `causal_flow_inference` takes). Units (prompt + answer + look-ahead) are padded to a
    multiple of `unit_bucket`, the batch to `rows` rows (copies of row 0, dropped), so that
    nearby batches share a program. Returns numpy (`mel [B, 80, F]`: each row's answer frames
    from frame 0, zero after; `mel_len [B]`). Errors name the row."""
    import jax

    check_params(cfg, params)
    units = list(units)
    n = len(units)
    if n < 1:
        raise Token2WavError("no utterances to synthesise")
    if unit_bucket < 1:
        raise Token2WavError(f"unit_bucket {unit_bucket}: must be >= 1")

    def per_row(x, what):
        if x is None:
            return [None] * n
        x = list(x)
        if len(x) != n:
            raise Token2WavError(f"{what}: {len(x)} entries for {n} utterances")
        return x

    embs = (
        np.asarray(embeddings, np.float32)
        if not isinstance(embeddings, (list, tuple))
        else np.stack([np.asarray(e, np.float32).reshape(-1) for e in embeddings])
    )
    if embs.ndim == 1:
        embs = np.broadcast_to(embs, (n,) + embs.shape)
    pus, pms = per_row(prompt_units, "prompt units"), per_row(prompt_mels, "prompt mels")
    if isinstance(noise, str):
        noises = [noise] * n
    elif isinstance(noise, (list, tuple)):
        noises = per_row(noise, "noise")
    else:
        noises = [jax.random.fold_in(noise, i) for i in range(n)]
    look = 0 if finalize else cfg.pre_lookahead_len
    prepared = []
    for i in range(n):
        try:
            u, pu, pm, _ = check_utterance(cfg, units[i], embs[i], pus[i], pms[i])
            if len(u) <= look or len(u) < 1:
                raise Token2WavError(
                    f"{len(u)} units: a call that is not finalized needs more than {look}"
                    if look
                    else "no units to synthesise"
                )
            allu = np.concatenate([pu, u])
            total = cfg.mel_len(len(allu) - look)
            if total - len(pm) < 1:
                raise Token2WavError(
                    f"prompt mel of {len(pm)} frames leaves no frames of the answer"
                )
            prepared.append((allu, pm, total, _noise(noises[i], total)))
        except Token2WavError as e:
            raise Token2WavError(f"row {i}: {e}") from None
    width = -(-max(len(p[0]) for p in prepared) // unit_bucket) * unit_bucket
    frames = cfg.mel_len(width)
    b = max(n, rows or 0)
    ids = np.zeros((b, 1, width), np.int32)
    n_main = np.zeros((b,), np.int32)
    cond = np.zeros((b, 1, frames, cfg.output_size), np.float32)
    z = np.zeros_like(cond)
    emb = np.zeros((b, 1, cfg.spk_embed_dim), np.float32)
    for i in range(b):
        allu, pm, total, zi = prepared[i if i < n else 0]
        ids[i, 0, : len(allu)] = allu
        n_main[i] = len(allu) - look
        cond[i, 0, : len(pm)] = pm
        z[i, 0, :total] = zi
        emb[i, 0] = embs[i if i < n else 0]
    fn = _jitted_batch(
        cfg,
        look,
        bool(streaming),
        cfg.n_timesteps if n_steps is None else n_steps,
        cfg.cfg_rate if cfg_rate is None else float(cfg_rate),
        precision,
    )
    mel = np.asarray(fn(params, ids, n_main, cond, emb, z))[:, 0]  # [b, frames, 80]
    lens = np.array([p[2] - len(p[1]) for p in prepared], np.int32)
    out = np.zeros((n, cfg.output_size, int(lens.max())), np.float32)
    for i, (_, pm, total, _) in enumerate(prepared):
        out[i, :, : lens[i]] = mel[i, len(pm) : total].T
    return out, lens


def new_frames(cfg: CausalFlowConfig, mel, token_offset: int):
    """The frames of a streamed call's `mel [1, 80, M]` not given before: from
    `token_mel_ratio * token_offset` on (upstream's `CosyVoice2Model.token2wav`), where
    `token_offset` is the number of units whose frames earlier calls gave."""
    return mel[:, :, cfg.token_mel_ratio * int(token_offset) :]


def stretch(mel, n_frames: int) -> np.ndarray:
    """`mel [B, 80, M]` linearly resampled to `n_frames` frames: upstream's speed change
    (`F.interpolate(mel, size=int(M / speed), mode="linear")`, align_corners False, in
    `CosyVoice2Model.token2wav`), here with `n_frames` given; float32 as PyTorch computes the
    source positions."""
    x = np.asarray(mel, np.float32)
    n_in = x.shape[2]
    scale = np.float32(n_in) / np.float32(n_frames)
    src = np.maximum(
        scale * (np.arange(n_frames, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
        np.float32(0.0),
    )
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = (src - i0.astype(np.float32)).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return (x[:, :, i0] * (np.float32(1.0) - l1) + x[:, :, i1] * l1).astype(np.float32)


__all__ = [
    "CausalFlowConfig",
    "PRESETS",
    "NOISE_FRAMES",
    "layers",
    "param_shapes",
    "init_random",
    "check_params",
    "chunk_mask",
    "encoder",
    "encode_padded",
    "estimator",
    "cfm",
    "upstream_noise",
    "causal_flow_inference",
    "causal_flow_batch",
    "new_frames",
    "stretch",
]
