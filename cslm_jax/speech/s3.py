"""The S3 supervised semantic speech tokenizers (CosyVoice) in JAX, as `s3tokenizer` 0.3.0
computes them.

Versions (`VERSIONS`, selected by name):

- `v1` (`speech_tokenizer_v1`, CosyVoice-300M): 50 units/s, 4096 codes. Whisper-style encoder:
  conv(k3, stride 1) + GELU, conv(k3, stride 2) + GELU, sinusoidal positions (a stored tensor),
  pre-LN blocks (1280 wide, 20 heads, key without bias, exact GELU MLP of 4x), no final LN; VQ
  picks the nearest of 4096 codewords to the L2-normalised output.
- `v1_25hz` (`speech_tokenizer_v1_25hz`, CosyVoice-300M-25Hz): v1 with a stride-2 first conv.
- `v2_25hz` (`speech_tokenizer_v2_25hz`, CosyVoice 2): stride 2 and 2, no absolute positions;
  rotary positions on q and k (rotate-half, theta 1e4, head dim 64), an FSMN memory (depthwise
  conv of width 31 over the masked values, plus the values) added to the attention output; FSQ:
  8 projections, tanh * 0.999, rounded to {-1, 0, 1}, read as a base-3 number (6561 codes).

Padded frames: inputs past an utterance's length are zeroed before each conv and are masked out
of attention keys (bias -1e10) and the FSMN memory, so an utterance's codes do not depend on what
it is batched with. `code_len = ((mel_len - 1) // s1 + 1 - 1) // 2 + 1` (s1 the first stride).

Parameters are a plain pytree (dict of arrays, the blocks stacked on a leading layer axis for a
`lax.scan`); `cslm_jax.speech.weights` maps them to and from the package's state-dict names.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from cslm_jax.errors import CslmError

WINDOW_FRAMES = 3000  # the package's 30 s window (mel frames at 100 Hz)
OVERLAP_FRAMES = 400  # its 4 s overlap
OVERLAP_SECONDS = 4
FSMN_KERNEL = 31
ROPE_HEAD_DIM = 64  # the package's precompute_freqs_cis(64, 2048)
ROPE_MAX_POS = 2048


class SpeechTokenizerError(CslmError):
    """A speech tokenizer cannot be built, loaded or run on this input; the message says why."""


@dataclasses.dataclass(frozen=True)
class Version:
    name: str  # the official model name
    arch: str  # "v1" | "v2"
    stride: int  # stride of the first conv (the second is always 2)
    codebook_size: int
    units_per_second: int


VERSIONS = {
    "v1": Version("speech_tokenizer_v1", "v1", 1, 4096, 50),
    "v1_25hz": Version("speech_tokenizer_v1_25hz", "v1", 2, 4096, 25),
    "v2_25hz": Version("speech_tokenizer_v2_25hz", "v2", 2, 3**8, 25),
}
ALIASES = {
    "v2": "v2_25hz",
    "speech_tokenizer_v1": "v1",
    "speech_tokenizer_v1_25hz": "v1_25hz",
    "speech_tokenizer_v2_25hz": "v2_25hz",
}


def canonical_version(version: str) -> str:
    v = ALIASES.get(version, version)
    if v not in VERSIONS:
        raise SpeechTokenizerError(
            f"unknown speech tokenizer version {version!r}; choose one of "
            f"{', '.join(VERSIONS)} (or {', '.join(ALIASES)})"
        )
    return v


@dataclasses.dataclass(frozen=True)
class S3Config:
    """Sizes of one tokenizer; the defaults are the official ones."""

    version: str = "v1"
    n_mels: int = 128
    n_state: int = 1280
    n_head: int = 20
    n_layer: int = 6
    n_ctx: int = 1500  # v1 positions (the stored table's length)

    def __post_init__(self):
        object.__setattr__(self, "version", canonical_version(self.version))
        if self.n_state % self.n_head:
            raise SpeechTokenizerError(
                f"n_state {self.n_state} is not a multiple of n_head {self.n_head}"
            )
        if self.arch == "v2" and self.n_state // self.n_head != ROPE_HEAD_DIM:
            raise SpeechTokenizerError(
                f"{self.version}: head dim must be {ROPE_HEAD_DIM} (the "
                f"package's rotary table), got {self.n_state // self.n_head}"
            )

    @property
    def spec(self) -> Version:
        return VERSIONS[self.version]

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def stride(self) -> int:
        return self.spec.stride

    @property
    def codebook_size(self) -> int:
        return self.spec.codebook_size

    @property
    def units_per_second(self) -> int:
        return self.spec.units_per_second


def code_lengths(mel_len, stride: int):
    """Codes per utterance from mel frames (the two k3/pad1 convs' output lengths)."""
    l1 = (np.asarray(mel_len) - 1) // stride + 1
    return (l1 - 1) // 2 + 1


# -- parameters -----------------------------------------------------------------------------------


def param_shapes(cfg: S3Config) -> dict:
    """The pytree of parameter shapes (JAX layout: linear [in, out], conv [k, in, out])."""
    d, m, L = cfg.n_state, cfg.n_mels, cfg.n_layer
    blocks = {
        "attn_ln_w": (L, d),
        "attn_ln_b": (L, d),
        "q_w": (L, d, d),
        "q_b": (L, d),
        "k_w": (L, d, d),
        "v_w": (L, d, d),
        "v_b": (L, d),
        "o_w": (L, d, d),
        "o_b": (L, d),
        "mlp_ln_w": (L, d),
        "mlp_ln_b": (L, d),
        "fc1_w": (L, d, 4 * d),
        "fc1_b": (L, 4 * d),
        "fc2_w": (L, 4 * d, d),
        "fc2_b": (L, d),
    }
    shapes = {"conv1_w": (3, m, d), "conv1_b": (d,), "conv2_w": (3, d, d), "conv2_b": (d,)}
    if cfg.arch == "v1":
        shapes["pos_emb"] = (cfg.n_ctx, d)
        shapes["codebook"] = (cfg.codebook_size, d)
    else:
        blocks["fsmn_w"] = (L, FSMN_KERNEL, d)
        shapes["proj_w"] = (d, 8)
        shapes["proj_b"] = (8,)
    shapes["blocks"] = blocks
    return shapes


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's sinusoidal table [length, channels] (sin | cos), float32."""
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float32)).astype(np.float32)
    t = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def init_random(version: str = "v1", seed: int = 0, **sizes) -> tuple[S3Config, dict]:
    """A random-weight tokenizer (for tests and benchmarks): `sizes` override `S3Config` fields
    (default: the official sizes). Weights ~ N(0, 1/fan_in), LayerNorm gains near 1, a random
    codebook of unit-norm rows (the package initialises its codebook to zeros, which would make every
    code 0), v1's sinusoidal position table."""
    cfg = S3Config(version=version, **sizes)
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)

    def leaf(name, shape):
        if name == "pos_emb":
            return sinusoids(*shape)
        if name.endswith("ln_w"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith("_b") or name.endswith("ln_b"):
            return (0.02 * rng.standard_normal(shape)).astype(np.float32)
        if name == "codebook":  # unit rows: the choice depends on direction only
            e = rng.standard_normal(shape)
            return (e / np.linalg.norm(e, axis=-1, keepdims=True)).astype(np.float32)
        fan_in = int(np.prod(shape[:-1])) if len(shape) <= 2 else int(np.prod(shape[1:-1]))
        if name in ("conv1_w", "conv2_w"):
            fan_in = shape[0] * shape[1]
        if name == "fsmn_w":
            fan_in = shape[1]
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    params = {k: leaf(k, v) for k, v in shapes.items() if k != "blocks"}
    params["blocks"] = {k: leaf(k, v) for k, v in shapes["blocks"].items()}
    return cfg, params


def check_params(cfg: S3Config, params: dict, where: str = "parameters") -> None:
    """Every expected tensor present with its shape; name the first that is not."""

    def walk(shapes, tree, prefix):
        for k, shape in shapes.items():
            if k not in tree:
                raise SpeechTokenizerError(f"{where}: missing tensor {prefix}{k}")
            if isinstance(shape, dict):
                walk(shape, tree[k], f"{prefix}{k}.")
            elif tuple(np.shape(tree[k])) != tuple(shape):
                raise SpeechTokenizerError(
                    f"{where}: tensor {prefix}{k} has shape "
                    f"{tuple(np.shape(tree[k]))}, expected {tuple(shape)}"
                )

    walk(param_shapes(cfg), params, "")


# -- the encoder ---------------------------------------------------------------------------------

PRECISIONS = ("highest", "high", "default", "bfloat16")


def _precision(name: str):
    import jax

    return {
        "highest": jax.lax.Precision.HIGHEST,
        "high": jax.lax.Precision.HIGH,
        "default": jax.lax.Precision.DEFAULT,
        "bfloat16": None,
    }[name]


class _Products:
    """The encoder's matrix products at one precision. `highest`/`high`/`default` are XLA
    precisions on float32 operands (XLA:CPU computes float32 at all three; a TPU computes
    `highest` in about six bfloat16 passes, `high` in three, `default` in one). `bfloat16` rounds
    the operands to bfloat16 and accumulates in float32 on every backend: what a TPU's one-pass
    `default` computes, so its effect on the codes can be measured on a CPU."""

    def __init__(self, name: str):
        import jax.numpy as jnp

        self.bf16 = name == "bfloat16"
        self.prec = _precision(name)
        self.kw = {"preferred_element_type": jnp.float32} if self.bf16 else {"precision": self.prec}

    def cast(self, *xs):
        import jax.numpy as jnp

        return tuple(x.astype(jnp.bfloat16) for x in xs) if self.bf16 else xs

    def dot(self, a, b):
        import jax.numpy as jnp

        return jnp.dot(*self.cast(a, b), **self.kw)

    def matmul(self, a, b):
        import jax.numpy as jnp

        return jnp.matmul(*self.cast(a, b), **self.kw)

    def einsum(self, spec, a, b):
        import jax.numpy as jnp

        return jnp.einsum(spec, *self.cast(a, b), **self.kw)

    def conv(self, x, w, **kw):
        import jax

        return jax.lax.conv_general_dilated(*self.cast(x, w), **kw, **self.kw)


def _rope_tables(t: int, dh: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [t, dh] as the package builds them (float32 frequencies, halves repeated)."""
    freqs = (
        1.0
        / (
            np.float32(10000.0)
            ** (np.arange(0, dh, 2, dtype=np.float32)[: dh // 2] / np.float32(dh))
        )
    ).astype(np.float32)
    ang = np.outer(np.arange(t, dtype=np.float32), freqs).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    return np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)


def encoder(
    params: dict,
    cfg: S3Config,
    mel,
    mel_len,
    precision: str = "highest",
    unroll: bool = False,
    packed: int = 0,
    _rows: bool = False,
):
    """`mel [B, T, n_mels]`, `mel_len [B]` -> (`hidden [B, T', n_state]` float32, `code_len [B]`).
    Rows past `code_len` hold values of no meaning. Traceable (use under jit). `unroll`: the
    blocks as straight-line code instead of a loop (same results; XLA's cost analysis counts a
    loop body once, so FLOP counts need it). `packed` (static; 0: off): the blocks' projections
    and MLP run on the valid frames only, gathered into `packed` rows (at least
    `sum(code_len)`), and attention on the padded [B, T'] layout: the same results with no
    dense work on padded frames."""
    import jax
    import jax.numpy as jnp

    pp = _Products(precision)
    f32 = jnp.float32
    x = jnp.asarray(mel, f32)
    mel_len = jnp.asarray(mel_len, jnp.int32)
    b, t, _ = x.shape

    def mask(lengths, n):
        return jnp.arange(n)[None, :] < lengths[:, None]

    def conv(x, w, bias, stride):
        y = pp.conv(
            x,
            w.astype(f32),
            window_strides=(stride,),
            padding=[(1, 1)],
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        return y + bias

    gelu = functools.partial(jax.nn.gelu, approximate=False)
    x = gelu(
        conv(x * mask(mel_len, t)[..., None], params["conv1_w"], params["conv1_b"], cfg.stride)
    )
    len1 = (mel_len - 1) // cfg.stride + 1
    x = gelu(conv(x * mask(len1, x.shape[1])[..., None], params["conv2_w"], params["conv2_b"], 2))
    len2 = (len1 - 1) // 2 + 1
    t2 = x.shape[1]
    valid = mask(len2, t2)  # [B, T']
    bias = jnp.where(valid, 0.0, -1.0e10).astype(f32)[:, None, None, :]
    h, d = cfg.n_head, cfg.n_state
    dh = d // h
    scale = float(dh) ** -0.25

    if cfg.arch == "v1":
        if t2 > params["pos_emb"].shape[0]:
            raise SpeechTokenizerError(
                f"{t2} encoder frames exceed the {params['pos_emb'].shape[0]}"
                f" positions of {cfg.version}; window long audio"
            )
        x = x + params["pos_emb"][:t2].astype(f32)
    else:
        if t2 > ROPE_MAX_POS:
            raise SpeechTokenizerError(
                f"{t2} encoder frames exceed the {ROPE_MAX_POS} rotary "
                f"positions of {cfg.version}; window long audio"
            )
        cos, sin = (jnp.asarray(a)[None, :, None, :] for a in _rope_tables(t2, dh))
    vmask = valid[..., None].astype(f32)  # [B, T', 1]
    if packed:
        flat = valid.reshape(-1)
        rows = jnp.nonzero(flat, size=packed, fill_value=0)[0]  # packed row -> padded frame
        slot = jnp.where(flat, jnp.cumsum(flat) - 1, packed)  # padded frame -> packed row

        def to_padded(a):  # [P, n] -> [B, T', n]
            a = jnp.concatenate([a, jnp.zeros((1, a.shape[-1]), a.dtype)])
            return a[slot].reshape(b, t2, a.shape[-1])

        def to_rows(a):  # [B, T', n] -> [P, n]
            return a.reshape(-1, a.shape[-1])[rows]
    else:

        def to_padded(a):
            return a.reshape(b, t2, a.shape[-1])

        def to_rows(a):
            return a.reshape(-1, a.shape[-1])

    x = to_rows(x)

    def ln(x, w, bb):
        mu = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * w + bb

    def dense(x, w, bb=None):
        # A 2-D matmul over all frames: XLA:CPU runs these faster than the batched 3-D einsum.
        y = pp.dot(x.reshape(-1, x.shape[-1]), w.astype(f32))
        y = y.reshape(x.shape[:-1] + (w.shape[-1],))
        return y if bb is None else y + bb

    def rot_half(x):
        return jnp.concatenate([-x[..., dh // 2 :], x[..., : dh // 2]], -1)

    def block(x, p):
        y = ln(x, p["attn_ln_w"], p["attn_ln_b"])
        q = to_padded(dense(y, p["q_w"], p["q_b"])).reshape(b, t2, h, dh)
        k = to_padded(dense(y, p["k_w"])).reshape(b, t2, h, dh)
        v = to_padded(dense(y, p["v_w"], p["v_b"]))
        if cfg.arch == "v2":
            q = q * cos + rot_half(q) * sin
            k = k * cos + rot_half(k) * sin
            vin = v * vmask
            mem = pp.conv(
                vin,
                p["fsmn_w"].astype(f32)[:, None, :],
                window_strides=(1,),
                padding=[((FSMN_KERNEL - 1) // 2, FSMN_KERNEL - 1 - (FSMN_KERNEL - 1) // 2)],
                dimension_numbers=("NWC", "WIO", "NWC"),
                feature_group_count=d,
            )
            mem = (mem + vin) * vmask
        # heads first, then plain batched matmuls (XLA:CPU runs these faster than the einsums)
        q = (q * scale).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
        k = (k * scale).transpose(0, 2, 3, 1)  # [B, H, Dh, T]
        v = v.reshape(b, t2, h, dh).transpose(0, 2, 1, 3)
        w = jax.nn.softmax(pp.matmul(q, k) + bias, axis=-1)
        o = pp.matmul(w, v).transpose(0, 2, 1, 3).reshape(b, t2, d)
        o = dense(to_rows(o), p["o_w"], p["o_b"])
        if cfg.arch == "v2":
            o = o + to_rows(mem)
        x = x + o
        y = ln(x, p["mlp_ln_w"], p["mlp_ln_b"])
        x = x + dense(gelu(dense(y, p["fc1_w"], p["fc1_b"])), p["fc2_w"], p["fc2_b"])
        return x, None

    x, _ = jax.lax.scan(block, x, params["blocks"], unroll=bool(unroll))
    if _rows:  # encode_mel: quantize the packed rows
        return x, len2, to_padded
    return to_padded(x), len2


def quantize(params: dict, cfg: S3Config, hidden, precision: str = "highest"):
    """`hidden [B, T', D]` -> codes `[B, T']` int32 (the package's VQ argmax or FSQ)."""
    import jax.numpy as jnp

    pp = _Products(precision)
    x = jnp.asarray(hidden, jnp.float32)
    if cfg.arch == "v1":
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        e = params["codebook"].astype(jnp.float32)  # [K, D]
        dist = -(
            jnp.sum(x * x, -1, keepdims=True)
            - 2.0 * pp.einsum("btd,kd->btk", x, e)
            + jnp.sum(e * e, -1)[None, None, :]
        )
        return jnp.argmax(dist, axis=-1).astype(jnp.int32)
    hproj = pp.einsum("btd,de->bte", x, params["proj_w"].astype(jnp.float32))
    hproj = jnp.tanh(hproj + params["proj_b"]) * 0.9990000128746033
    digits = jnp.round(hproj) + 1.0
    powers = jnp.asarray(3.0 ** np.arange(8), jnp.float32)
    return jnp.sum(digits * powers, -1).astype(jnp.int32)


def encode_mel(
    params: dict,
    cfg: S3Config,
    mel,
    mel_len,
    precision: str = "highest",
    unroll: bool = False,
    packed: int = 0,
):
    """mel -> (codes [B, T'] int32, code_len [B]); traceable. With `packed`, the quantizer too
    runs on the valid frames only."""
    if packed:
        rows, code_len, to_padded = encoder(
            params, cfg, mel, mel_len, precision, unroll, packed, _rows=True
        )
        codes = quantize(params, cfg, rows[None], precision)[0]
        return to_padded(codes[:, None])[..., 0], code_len
    hidden, code_len = encoder(params, cfg, mel, mel_len, precision, unroll, packed)
    return quantize(params, cfg, hidden, precision), code_len


# -- long audio ------------------------------------------------------------------------------------


def window_starts(mel_len: int, mode: str = "window") -> list[tuple[int, int]]:
    """(start, end) mel frames of the 30 s windows (stride 26 s) of an utterance over 30 s.

    `window_package`: exactly the package's loop (a window at every 2600 frames while the start
    is inside the utterance). `window` (default): the same windows, except that none is started
    after one has reached the end; where the package's last window is <= 4 s long, the package
    drops (up to) the last 2 s of the utterance or of the window before it when stitching, and
    this keeps them. Identical results otherwise."""
    out = []
    start = 0
    stride = WINDOW_FRAMES - OVERLAP_FRAMES
    while start < mel_len:
        end = min(start + WINDOW_FRAMES, mel_len)
        out.append((start, end))
        if mode == "window" and end == mel_len:
            break
        start += stride
    return out


def merge_windows(segments: list, units_per_second: int) -> np.ndarray:
    """Stitch window codes as the package's `merge_tokenized_segments(overlap=4)` does: drop the
    first 2 s of every window but the first and the last 2 s of every window but the last."""
    k = (OVERLAP_SECONDS // 2) * units_per_second
    out = []
    for i, s in enumerate(segments):
        s = np.asarray(s)
        out.append(s[(0 if i == 0 else k) : (-k if i != len(segments) - 1 else len(s))])
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)
