"""CosyVoice's HiFT vocoder (80-bin mel -> waveform) in JAX, computing what upstream's
`cosyvoice.hifigan.generator.HiFTGenerator.inference` (CosyVoice at FunAudioLLM, as the wheel
`cosyvoice-minicpmo==0.1.0` ships it) computes.

Versions (`HiFTConfig(version=...)`; the defaults are the official sizes: 20.45M parameters for
v1, 20.81M for v2, weight norm folded in):

- `v1` (CosyVoice-300M, `hift.pt`): 22,050 Hz, upsampling [8, 8] (kernels [16, 16]), source
  res-blocks of kernels [7, 11]; 256 samples per mel frame. Source: upstream's `SineGen`.
- `v2` (CosyVoice2-0.5B): 24,000 Hz, upsampling [8, 5, 3] (kernels [16, 11, 7]), source
  res-blocks of kernels [7, 7, 11]; 480 samples per mel frame. Source: upstream's `SineGen2`
  (upstream picks it for every rate but 22,050 Hz; so does `HiFTConfig.source_kind`).

One utterance, `mel [80, T]`:
1. F0 (`ConvRNNF0Predictor`): five conv(k3) + ELU layers (512 wide), a linear layer to one value
   per frame, its absolute value: `f0 [T]` in Hz. Frames with f0 > 10 Hz are voiced.
2. Source (`SourceModuleHnNSF` / `...2`): f0 repeated to the sample rate (`R` samples per frame),
   the fundamental and 8 harmonics as sines of amplitude 0.1 (unvoiced samples: no sine),
   Gaussian noise added (std 0.003 voiced, 0.1/3 unvoiced), merged by a linear layer and tanh:
   `source [T * R]`. v1 accumulates the phase sample by sample and adds a random initial phase
   per harmonic; v2 accumulates it frame by frame and interpolates it linearly to the samples.
3. Generator: conv(k7) to 512 channels; per upsampling stage: leaky ReLU (0.1), a transposed
   conv halving the channels, (last stage) a one-sample reflection on the left; the source's STFT
   (n_fft 16, hop 4; real and imaginary parts, 18 channels) brought to the stage's rate by a
   strided conv and a Snake res-block, added; the mean of three Snake res-blocks (kernels
   3, 7, 11, dilations 1, 3, 5). Then leaky ReLU (0.01), conv(k7) to 18 channels: magnitude
   `exp(x[:9])` (clipped at 100) and phase `sin(x[9:])`.
4. iSTFT (n_fft 16, hop 4, periodic Hann window, centred), clipped to +-0.99: `T * R` samples.

Noise is an input, never drawn behind the caller's back: `noise=None` ("zero" in `vocode`) gives
the deterministic output (initial phases 0, no additive noise); a PRNG key draws the initial
phases and the noise; a dict `{"phase": [B, 9], "noise": [B, L, 9]}` gives upstream's own draws
(`phase`: v1 `SineGen`'s uniform initial phases in radians in [-pi, pi); v2 `SineGen2`'s
`rand_ini` in cycles in [0, 1), which upstream adds to the first sample only, where its linear
1/R downsampling never reads it, so it has no effect at the official sizes; `noise`: standard
normal, samples x harmonics, before the 0.003 / 0.1/3 scaling). Upstream's third draw (the noise
branch of the source module) is never used by `inference` and has no counterpart.

Batches: `mel [B, 80, T]` with `mel_len [B]`; row `b` gives `mel_len[b] * R` samples, equal to
upstream run on that row alone: every conv's input is zeroed past the row's length (upstream's zero
padding at the row's end), the source's STFT reflects at the row's own end, the phase
interpolation clamps at the row's last frame, and the iSTFT's overlap-add and window envelope
stop at the row's last frame. Samples past a row's length are 0.

Float32 rounding, where upstream is ill-conditioned: v2's phase reaches tens of thousands of
radians in float32 (one ulp: a few thousandths of a radian), v1's is a running sum over every
sample. So the source computes upstream's float32 values, not just the same formula: the running
sums are correctly rounded (PyTorch's CPU cumsum accumulates in float64), divisions by the sample
rate are correctly rounded (XLA:CPU rewrites a division by a scalar into a multiplication by its
reciprocal), v2's linear interpolation uses PyTorch's CPU kernel's index, weights and fused
multiply-add (as it runs on x86-64 with FMA), and `* 2 * pi` then `* R` round three times (XLA
would fold the constants into one) - all in float32 arithmetic, so it runs on TPUs too. Given
upstream's f0, the source agrees with upstream's to ~1e-7 (the merging layer's summation order);
given upstream's source, the waveform to ~1e-6. What cannot agree bit for bit is the F0
predictor's convs (summation order, ~1e-7 relative), and the phase integrates f0 along the
utterance: end to end, the waveform differs from upstream's by ~1e-5 at 0.2 s and ~1e-3 at 4 s
(v2's phase moves ~1 rad per Hz of f0 per frame) - as much as upstream's own output moves between
two float32 convolution libraries.

Parameters are a flat dict of arrays named by upstream's module paths with `.w` / `.b` / `.alpha`
(`conv_pre.w`, `ups.0.w`, `resblocks.3.convs1.2.w`, `f0_predictor.condnet.0.w`, ...) in JAX
layouts (conv and transposed conv [k, in, out], linear [in, out]); weight norm is folded in.
`cslm_jax.speech.token2wav_weights` maps them to and from upstream's state dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from cslm_jax.errors import CslmError


class Token2WavError(CslmError):
    """A token-to-waveform model (flow, vocoder) cannot be built, loaded or run on this input; the
    message says why."""


PRESETS = {
    "v1": dict(
        sampling_rate=22050,
        upsample_rates=(8, 8),
        upsample_kernel_sizes=(16, 16),
        source_resblock_kernel_sizes=(7, 11),
        source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
    ),
    "v2": dict(
        sampling_rate=24000,
        upsample_rates=(8, 5, 3),
        upsample_kernel_sizes=(16, 11, 7),
        source_resblock_kernel_sizes=(7, 7, 11),
        source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    ),
}
F0_LAYERS = 5  # ConvRNNF0Predictor's conv + ELU layers


def fill_preset(cfg, preset: dict) -> None:
    """In `__post_init__` of a frozen config: the fields left None take the preset's values,
    and every list becomes a (nested) tuple."""
    for k, v in preset.items():
        if getattr(cfg, k) is None:
            object.__setattr__(cfg, k, v)
    for f in dataclasses.fields(cfg):
        object.__setattr__(cfg, f.name, nested_tuple(getattr(cfg, f.name)))


def nested_tuple(v):
    """Lists (a YAML or JSON config's) as tuples, nested: frozen configs stay hashable."""
    return tuple(nested_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class HiFTConfig:
    """Sizes of one HiFT vocoder: the official ones by default; fields left None take the
    version's preset (`PRESETS`), so `HiFTConfig("v2", base_channels=32, cond_channels=16)` is v2
    at a reduced width."""

    version: str = "v1"
    in_channels: int = 80
    base_channels: int = 512
    cond_channels: int = 512  # the F0 predictor's width
    nb_harmonics: int = 8
    sampling_rate: int | None = None
    upsample_rates: tuple | None = None
    upsample_kernel_sizes: tuple | None = None
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple | None = None
    source_resblock_dilation_sizes: tuple | None = None
    n_fft: int = 16
    hop_len: int = 4
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std on voiced samples
    nsf_voiced_threshold: float = 10.0  # Hz
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99

    def __post_init__(self):
        if self.version not in PRESETS:
            raise Token2WavError(
                f"unknown HiFT version {self.version!r}; choose one of {', '.join(PRESETS)}"
            )
        fill_preset(self, PRESETS[self.version])
        n = len(self.upsample_rates)
        for name in (
            "upsample_kernel_sizes",
            "source_resblock_kernel_sizes",
            "source_resblock_dilation_sizes",
        ):
            if len(getattr(self, name)) != n:
                raise Token2WavError(
                    f"HiFT {name} has {len(getattr(self, name))} entries, upsample_rates {n}"
                )
        if len(self.resblock_dilation_sizes) != len(self.resblock_kernel_sizes):
            raise Token2WavError(
                "HiFT resblock_dilation_sizes and resblock_kernel_sizes differ in length"
            )
        if self.base_channels % (2**n):
            raise Token2WavError(
                f"HiFT base_channels {self.base_channels} is not a multiple of "
                f"2**{n} (each upsampling stage halves it)"
            )
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            if (k - u) % 2:
                raise Token2WavError(
                    f"HiFT upsample kernel {k} and rate {u}: k - rate must be "
                    f"even (the stage must give exactly rate x its input)"
                )
        if self.n_fft % self.hop_len or self.n_fft % 2:
            raise Token2WavError(
                f"HiFT n_fft {self.n_fft} must be even and a multiple of hop_len {self.hop_len}"
            )
        for i, u in enumerate(self.source_down_rates):
            frames = 2 * self.frame_rate + 1
            got = frames if u == 1 else (frames + 2 * (u // 2) - 2 * u) // u + 1
            if got != 2 * self.frame_rate // u + (u == 1):
                raise Token2WavError(
                    f"HiFT stage {i}: the source's downsampling by {u} does not "
                    f"meet the upsampled length; check upsample_rates"
                )

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame (256 for v1, 480 for v2)."""
        return int(np.prod(self.upsample_rates)) * self.hop_len

    @property
    def frame_rate(self) -> int:
        """Generator frames (STFT frames) per mel frame, less the one of the final reflection."""
        return int(np.prod(self.upsample_rates))

    @property
    def source_kind(self) -> str:
        """`sine` (upstream's SineGen, chosen for 22,050 Hz) or `sine2` (SineGen2, other rates)."""
        return "sine" if self.sampling_rate == 22050 else "sine2"

    @property
    def source_down_rates(self) -> tuple:
        """Per stage: the stride that brings the source's STFT frames to the stage's rate."""
        rates = np.cumprod([1] + list(self.upsample_rates[::-1][:-1]))[::-1]
        return tuple(int(u) for u in rates)

    def stage_channels(self, i: int) -> int:
        return self.base_channels // (2 ** (i + 1))

    def wave_lengths(self, mel_len):
        return np.asarray(mel_len) * self.samples_per_frame


# -- parameters -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    """One of upstream's layers: its module path, kind, weight shape in upstream's layout (conv
    [out, in, k], transposed conv [in, out, k], linear [out, in], Snake [channels]) and whether
    upstream wraps it in weight norm."""

    name: str
    kind: str  # conv | convT | linear | snake
    shape: tuple
    weight_norm: bool


def _resblock_layers(prefix: str, ch: int, k: int, dilations) -> list[Layer]:
    out = []
    for j in range(len(dilations)):
        out += [
            Layer(f"{prefix}.convs1.{j}", "conv", (ch, ch, k), True),
            Layer(f"{prefix}.convs2.{j}", "conv", (ch, ch, k), True),
            Layer(f"{prefix}.activations1.{j}", "snake", (ch,), False),
            Layer(f"{prefix}.activations2.{j}", "snake", (ch,), False),
        ]
    return out


def layers(cfg: HiFTConfig) -> list[Layer]:
    """Every layer of upstream's HiFTGenerator of these sizes (with its F0 predictor)."""
    c, nk = cfg.cond_channels, len(cfg.resblock_kernel_sizes)
    out = [
        Layer(
            f"f0_predictor.condnet.{2 * i}", "conv", (c, cfg.in_channels if i == 0 else c, 3), True
        )
        for i in range(F0_LAYERS)
    ]
    out.append(Layer("f0_predictor.classifier", "linear", (1, c), False))
    out.append(Layer("m_source.l_linear", "linear", (1, cfg.nb_harmonics + 1), False))
    out.append(Layer("conv_pre", "conv", (cfg.base_channels, cfg.in_channels, 7), True))
    for i, k in enumerate(cfg.upsample_kernel_sizes):
        out.append(
            Layer(f"ups.{i}", "convT", (cfg.base_channels // 2**i, cfg.stage_channels(i), k), True)
        )
    for i, u in enumerate(cfg.source_down_rates):
        out.append(
            Layer(
                f"source_downs.{i}",
                "conv",
                (cfg.stage_channels(i), cfg.n_fft + 2, 1 if u == 1 else 2 * u),
                False,
            )
        )
    for i, (k, d) in enumerate(
        zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)
    ):
        out += _resblock_layers(f"source_resblocks.{i}", cfg.stage_channels(i), k, d)
    for i in range(len(cfg.upsample_rates)):
        for j, (k, d) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            out += _resblock_layers(f"resblocks.{i * nk + j}", cfg.stage_channels(i), k, d)
    out.append(
        Layer(
            "conv_post",
            "conv",
            (cfg.n_fft + 2, cfg.stage_channels(len(cfg.upsample_rates) - 1), 7),
            True,
        )
    )
    return out


def jax_shape(layer: Layer) -> tuple:
    """The weight's shape in our layout: conv / transposed conv [k, in, out], linear (with or
    without bias: `linear_nb`) [in, out]; other kinds as upstream's."""
    s = layer.shape
    if layer.kind == "conv":
        return (s[2], s[1], s[0])
    if layer.kind == "convT":
        return (s[2], s[0], s[1])
    if layer.kind in ("linear", "linear_nb"):
        return (s[1], s[0])
    return s


def param_shapes(cfg: HiFTConfig) -> dict:
    """Our parameter names -> shapes."""
    out = {}
    for layer in layers(cfg):
        if layer.kind == "snake":
            out[f"{layer.name}.alpha"] = layer.shape
            continue
        out[f"{layer.name}.w"] = jax_shape(layer)
        out[f"{layer.name}.b"] = (layer.shape[1] if layer.kind == "convT" else layer.shape[0],)
    return out


def init_random(version: str = "v1", seed: int = 0, **sizes) -> tuple[HiFTConfig, dict]:
    """A random-weight vocoder (tests, benchmarks, the demo): `sizes` override `HiFTConfig`
    fields (default: the official sizes). Scaled so that the signals stay in range: conv weights
    ~ N(0, gain^2 / fan_in) (res-block convs smaller, as upstream initialises them small), Snake
    alphas in [0.5, 1.5], an F0 of tens to hundreds of Hz (its level follows the input's; a few
    frames unvoiced for inputs around 0) and a waveform of a few hundredths to tenths, unclipped.
    Random weights give noise, not speech."""
    cfg = HiFTConfig(version=version, **sizes)
    rng = np.random.default_rng(seed)
    params = {}

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    for layer in layers(cfg):
        n = layer.name
        if layer.kind == "snake":
            params[f"{n}.alpha"] = rng.uniform(0.5, 1.5, layer.shape).astype(np.float32)
            continue
        shape = jax_shape(layer)
        fan_in = int(np.prod(shape[:-1]))
        gain, bias = 1.0, 0.1
        if ".convs" in n:
            gain = 0.3
        if n == "f0_predictor.classifier":
            gain, bias = 150.0, 0.0
        if n == "conv_post":
            gain = 0.5
        params[f"{n}.w"] = normal(shape, gain / math.sqrt(fan_in))
        params[f"{n}.b"] = normal((shape[-1],), bias)
    params["f0_predictor.classifier.b"] = np.full((1,), 100.0, np.float32)
    b = params["conv_post.b"]
    b[: cfg.n_fft // 2 + 1] += 1.0  # magnitudes around e
    return cfg, params


def check_params(cfg: HiFTConfig, params: dict, where: str = "parameters") -> None:
    """Every expected tensor present with its shape; names the first that is not."""
    check_shapes(param_shapes(cfg), params, where)


def check_shapes(expected: dict, params: dict, where: str) -> None:
    """Every tensor of `expected` (name -> shape) present in `params` with its shape; names the
    first that is not (the flow's check too)."""
    for k, shape in expected.items():
        if k not in params or params[k] is None:
            raise Token2WavError(f"{where}: missing tensor {k}")
        if tuple(np.shape(params[k])) != tuple(shape):
            raise Token2WavError(
                f"{where}: tensor {k} has shape {tuple(np.shape(params[k]))}, "
                f"expected {tuple(shape)}"
            )


# -- float32 arithmetic as upstream rounds it -----------------------------------------------------
# Error-free transformations (Knuth's TwoSum, Dekker's product with Veltkamp's split): plain
# float32 operations, which XLA keeps as written (it does not reassociate sums; it does fold
# chains of products by constants, hence the barriers in `source`).


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _split(a):
    c = a * np.float32(4097.0)
    hi = c - (c - a)
    return hi, a - hi


def _two_prod(a, b):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _fma(a, b, c):
    """a * b + c rounded once (as a fused multiply-add)."""
    p, e = _two_prod(a, b)
    s, t = _two_sum(p, c)
    return s + (t + e)


def _div(x, d):
    """x / d correctly rounded, d a scalar (XLA:CPU computes x * (1 / d), which is not)."""
    q = x / d
    p, e = _two_prod(q, d)
    return q + ((x - p) - e) / d


def _frame_sums(x):
    """Running sums over the frames (axis 1) of `x [B, T, H]`, exactly (a float32 value and its
    error): (before each frame: hi, lo; through each frame: hi, which is the sum correctly
    rounded to float32, as PyTorch's CPU cumsum gives it: it accumulates in float64). A loop
    over frames: small to compile, T short steps to run."""
    import jax
    import jax.numpy as jnp

    def step(carry, v):
        hi, lo = carry
        s, e = _two_sum(hi, v)
        e = e + lo
        new = s + e
        return (new, e - (new - s)), (hi, lo, new)

    zero = jnp.zeros_like(x[:, 0])
    _, (hi, lo, incl) = jax.lax.scan(step, (zero, zero), jnp.swapaxes(x, 0, 1))
    return tuple(jnp.swapaxes(a, 0, 1) for a in (hi, lo, incl))


def _torch_linear_index(n_out: int, scale: float):
    """PyTorch's CPU `interpolate(mode="linear", align_corners=False, scale_factor=1/scale)` for
    output positions 0..n_out-1: (index of the left input, its weight, the right one's weight),
    the source position computed as `fma(scale, n + 0.5, -0.5)` in float32 (as it runs on
    x86-64 with FMA; tests/test_hift.py compares the result with PyTorch's)."""
    import jax.numpy as jnp

    n = jnp.arange(n_out, dtype=jnp.float32)
    src = _fma(jnp.float32(np.float32(scale)), n + np.float32(0.5), jnp.float32(-0.5))
    src = jnp.maximum(src, np.float32(0.0))
    i0 = jnp.floor(src).astype(jnp.int32)
    l1 = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    return i0, np.float32(1.0) - l1, l1


def _torch_lerp(x0, l0, x1, l1):
    """`x0 * l0 + x1 * l1` as PyTorch's CPU kernel rounds it: fma(x0, l0, x1 * l1)."""
    return _fma(x0, l0, x1 * l1)


# -- the model -------------------------------------------------------------------------------------


def matmul_precision(name: str):
    """`jax.lax.Precision` by name (highest, high, default)."""
    import jax

    return {
        "highest": jax.lax.Precision.HIGHEST,
        "high": jax.lax.Precision.HIGH,
        "default": jax.lax.Precision.DEFAULT,
    }[name]


def _mask(x, length):
    """Zero the frames of `x [B, N, C]` at and past each row's `length [B]`."""
    import jax.numpy as jnp

    keep = jnp.arange(x.shape[1])[None, :] < length[:, None]
    return jnp.where(keep[..., None], x, 0.0)


class _Ops:
    """Convs on `[B, N, C]` at one precision, zeroing each input past its row's length first
    (what upstream's zero padding sees at the end of a row run alone)."""

    def __init__(self, params: dict, precision: str):
        self.p = params
        self.prec = matmul_precision(precision)

    def conv(self, name, x, length, stride=1, padding=0, dilation=1):
        import jax

        w = self.p[f"{name}.w"]
        y = jax.lax.conv_general_dilated(
            _mask(x, length),
            w,
            window_strides=(stride,),
            padding=[(padding, padding)],
            rhs_dilation=(dilation,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.prec,
        )
        return y + self.p[f"{name}.b"]

    def conv_transpose(self, name, x, length, stride, padding):
        import jax

        w = self.p[f"{name}.w"][::-1]  # [k, in, out], flipped
        k = w.shape[0]
        y = jax.lax.conv_general_dilated(
            _mask(x, length),
            w,
            window_strides=(1,),
            padding=[(k - 1 - padding,) * 2],
            lhs_dilation=(stride,),
            dimension_numbers=("NWC", "WIO", "NWC"),
            precision=self.prec,
        )
        return y + self.p[f"{name}.b"]

    def dense(self, name, x):
        import jax.numpy as jnp

        return jnp.dot(x, self.p[f"{name}.w"], precision=self.prec) + self.p[f"{name}.b"]

    def snake(self, name, x):
        import jax.numpy as jnp

        a = self.p[f"{name}.alpha"]
        return x + (np.float32(1.0) / (a + np.float32(1e-9))) * jnp.square(jnp.sin(x * a))

    def resblock(self, prefix, x, length, k, dilations):
        for j, d in enumerate(dilations):
            xt = self.snake(f"{prefix}.activations1.{j}", x)
            xt = self.conv(f"{prefix}.convs1.{j}", xt, length, padding=d * (k - 1) // 2, dilation=d)
            xt = self.snake(f"{prefix}.activations2.{j}", xt)
            xt = self.conv(f"{prefix}.convs2.{j}", xt, length, padding=(k - 1) // 2)
            x = xt + x
        return x


def f0_predict(params: dict, cfg: HiFTConfig, mel, mel_len, precision: str = "highest"):
    """`mel [B, 80, T]`, `mel_len [B]` -> f0 `[B, T]` in Hz (ConvRNNF0Predictor); traceable."""
    import jax
    import jax.numpy as jnp

    ops = _Ops(params, precision)
    x = jnp.swapaxes(jnp.asarray(mel, jnp.float32), 1, 2)
    for i in range(F0_LAYERS):
        x = jax.nn.elu(ops.conv(f"f0_predictor.condnet.{2 * i}", x, mel_len, padding=1))
    return jnp.abs(ops.dense("f0_predictor.classifier", x)[..., 0])


def _draw(key, cfg: HiFTConfig, batch: int, n: int) -> dict:
    import jax
    import jax.numpy as jnp

    kp, kn = jax.random.split(key)
    h = cfg.nb_harmonics + 1
    if cfg.source_kind == "sine":
        phase = jax.random.uniform(kp, (batch, h), jnp.float32, -np.pi, np.pi)
    else:
        phase = jax.random.uniform(kp, (batch, h), jnp.float32)
    return {"phase": phase, "noise": jax.random.normal(kn, (batch, n, h), jnp.float32)}


def draw_noise(key, cfg: HiFTConfig, batch: int, n: int) -> dict:
    """The source's random draws from one PRNG key, as `forward` and `vocode` draw them for a
    key: `{"phase": [batch, H], "noise": [batch, n, H]}`; traceable (token2wav's batched
    synthesis draws each row from its own key)."""
    return _draw(key, cfg, batch, n)


def source(params: dict, cfg: HiFTConfig, f0, mel_len, noise=None, precision: str = "highest"):
    """f0 `[B, T]` (Hz) -> the merged sine source `[B, T * R]` (SourceModuleHnNSF for v1,
    SourceModuleHnNSF2 for v2); `noise` as `forward`'s. Traceable."""
    import jax
    import jax.numpy as jnp

    f32 = jnp.float32
    ops = _Ops(params, precision)
    b, t = f0.shape
    r, h = cfg.samples_per_frame, cfg.nb_harmonics + 1
    n = t * r
    if noise is not None and not isinstance(noise, dict):
        noise = _draw(noise, cfg, b, n)
    phase0 = None if noise is None else jnp.asarray(noise["phase"], f32).at[:, 0].set(0.0)
    harm = jnp.arange(1, h + 1, dtype=f32)
    sr = jnp.float32(cfg.sampling_rate)
    # f0 at the sample rate: upstream's nearest upsampling by R, floor(n * float32(1 / R)),
    # which is n // R (below 2^24 samples)
    frame = jnp.arange(n) // r
    f0s = f0[:, frame]  # [B, N]
    if cfg.source_kind == "sine":
        # phase: the running sum over samples of f0 h / sr (one value per frame, R samples
        # each), from the exact sums before each frame plus (k + 1) times the frame's value
        rad = _div(f0[..., None] * harm, sr)  # [B, T, H]
        hi, lo = _two_prod(rad, np.float32(r))
        p_hi, p_lo, _ = _frame_sums(hi)
        q_hi, _, _ = _frame_sums(lo)  # 0 where R is a power of two
        k = (jnp.arange(n) % r + 1).astype(f32)[None, :, None]
        t_hi, t_lo = _two_prod(rad[:, frame], k)
        s_, e = _two_sum(p_hi[:, frame], t_hi)
        cum = s_ + (e + ((p_lo + q_hi)[:, frame] + t_lo))
        theta = np.float32(2 * np.pi) * jnp.remainder(cum, np.float32(1.0))
        if phase0 is not None:
            theta = theta + phase0[:, None, :]
        sines = np.float32(cfg.nsf_alpha) * jnp.sin(theta)
    else:
        # per-sample rad = (f0 h / sr) % 1 (plus rand_ini on sample 0), linearly downsampled
        # by R (samples R/2 - 1 and R/2 of each frame), summed over frames, linearly upsampled
        rad_f = jnp.remainder(_div(f0[..., None] * harm, sr), np.float32(1.0))  # [B, T, H]
        i0, l0, l1 = _torch_linear_index(t, float(np.float32(1.0 / (1.0 / r))))
        in_len = (mel_len * r)[:, None]
        j1 = jnp.minimum(i0[None, :] + 1, in_len - 1)
        j0 = jnp.broadcast_to(i0[None, :], j1.shape)

        def at(j):  # [B, T, H]
            x = jnp.take_along_axis(rad_f, (j // r)[..., None], axis=1)
            if phase0 is not None:
                x = x + jnp.where(j == 0, 1.0, 0.0)[..., None] * phase0[:, None, :]
            return x

        down = _torch_lerp(at(j0), l0[:, None], at(j1), l1[:, None])
        # three roundings, as upstream's `cumsum * 2 * np.pi`, then `* R`: barriers keep XLA
        # from folding the constants into one product
        ph = jax.lax.optimization_barrier(_frame_sums(down)[2] * np.float32(2.0))
        ph = jax.lax.optimization_barrier(ph * np.float32(np.pi)) * np.float32(r)
        i0, l0, l1 = _torch_linear_index(n, float(np.float32(1.0 / r)))
        k1 = jnp.minimum(i0[None, :] + 1, mel_len[:, None] - 1)  # [B, N]
        k0 = jnp.minimum(i0[None, :], mel_len[:, None] - 1)
        x0 = jnp.take_along_axis(ph, k0[..., None], axis=1)
        x1 = jnp.take_along_axis(ph, k1[..., None], axis=1)
        sines = jnp.sin(_torch_lerp(x0, l0[:, None], x1, l1[:, None])) * np.float32(cfg.nsf_alpha)
    uv = (f0s > np.float32(cfg.nsf_voiced_threshold))[..., None]
    sines = jnp.where(uv, sines, 0.0)
    if noise is not None:
        amp = jnp.where(uv, np.float32(cfg.nsf_sigma), np.float32(cfg.nsf_alpha / 3))
        sines = sines + amp * jnp.asarray(noise["noise"], f32)[:, :n]
    return jnp.tanh(ops.dense("m_source.l_linear", sines)[..., 0])


def _hann(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _stft(cfg: HiFTConfig, s, s_len, prec):
    """torch.stft(center=True, reflect padding) of `s [B, N]` (rows of length `s_len`), real
    parts then imaginary parts: `[B, N / hop + 1, n_fft + 2]`."""
    import jax.numpy as jnp

    nf, hop = cfg.n_fft, cfg.hop_len
    pad = nf // 2
    b, n = s.shape
    p = jnp.abs(jnp.arange(n + 2 * pad) - pad)[None, :]
    last = (s_len - 1)[:, None]
    p = jnp.clip(jnp.where(p > last, 2 * last - p, p), 0, n - 1)
    x = jnp.take_along_axis(s, p, axis=1)  # [B, N + n_fft]
    blocks = x.reshape(b, -1, hop)
    frames = n // hop + 1
    k = nf // hop
    fr = jnp.concatenate([blocks[:, i : i + frames] for i in range(k)], axis=-1)  # [B, F, n_fft]
    ang = 2 * np.pi * np.outer(np.arange(nf), np.arange(nf // 2 + 1)) / nf
    win = _hann(nf).astype(np.float64)[:, None]
    basis = np.concatenate([win * np.cos(ang), -win * np.sin(ang)], 1).astype(np.float32)
    return jnp.dot(fr, basis, precision=prec)


def _istft(cfg: HiFTConfig, mag, phase, frames_len, prec):
    """torch.istft(center=True) of magnitude and phase `[B, F, n_fft/2 + 1]` with `frames_len [B]`
    frames per row -> `[B, hop * (F - 1)]`."""
    import jax.numpy as jnp

    nf, hop = cfg.n_fft, cfg.hop_len
    nb = nf // 2 + 1
    b, f, _ = mag.shape
    mag = jnp.minimum(mag, np.float32(100.0))
    re, im = mag * jnp.cos(phase), mag * jnp.sin(phase)
    ang = 2 * np.pi * np.outer(np.arange(nb), np.arange(nf)) / nf
    c = np.full((nb, 1), 2.0)
    c[0] = c[-1] = 1.0  # the DC and Nyquist bins count once
    basis = np.concatenate([c * np.cos(ang), -c * np.sin(ang)], 0) / nf  # [2 nb, n_fft]
    basis[nb] = basis[-1] = 0.0  # their imaginary parts are ignored
    win = _hann(nf)
    keep = (jnp.arange(f)[None, :] < frames_len[:, None])[..., None]
    y = jnp.where(
        keep,
        jnp.dot(jnp.concatenate([re, im], -1), basis.astype(np.float32), precision=prec) * win,
        0.0,
    )
    env = jnp.where(keep, win * win, 0.0)

    def overlap_add(fr):  # [B, F, n_fft] -> [B, (F + k - 1) hop]
        k = nf // hop
        parts = fr.reshape(b, f, k, hop)
        out = sum(jnp.pad(parts[:, :, i], ((0, 0), (i, k - 1 - i), (0, 0))) for i in range(k))
        return out.reshape(b, -1)

    start, n = nf // 2, hop * (f - 1)
    y = overlap_add(y)[:, start : start + n]
    env = overlap_add(env)[:, start : start + n]
    return y / jnp.where(env > 1e-11, env, 1.0)


def forward(
    params: dict,
    cfg: HiFTConfig,
    mel,
    mel_len,
    noise=None,
    cache_source=None,
    cache_len=None,
    precision: str = "highest",
):
    """`mel [B, in_channels, T]`, `mel_len [B]` -> (wave `[B, T * R]`, wave_len `[B]`, source
    `[B, T * R]`): upstream's `HiFTGenerator.inference(mel)` row by row. Traceable (jit it with
    `cfg` and `precision` static).

    `noise`: None (deterministic: initial phases 0, no noise), a PRNG key, or a dict
    `{"phase": [B, H], "noise": [B, >= T * R, H]}` (H = nb_harmonics + 1; see the module's
    docstring). `cache_source [B, C]` with `cache_len [B]` (default: C for every row): the
    first `cache_len` samples of each row's source replaced by the cache, as upstream's
    `inference(cache_source=...)` does in streaming. The source returned is the one used."""
    import jax.numpy as jnp

    f32 = jnp.float32
    prec = matmul_precision(precision)
    ops = _Ops(params, precision)
    mel = jnp.asarray(mel, f32)
    mel_len = jnp.asarray(mel_len, jnp.int32)
    b = mel.shape[0]
    r = cfg.samples_per_frame
    f0 = f0_predict(params, cfg, mel, mel_len, precision)
    s = source(params, cfg, f0, mel_len, noise, precision)
    if cache_source is not None:
        cache_source = jnp.asarray(cache_source, f32)
        c = cache_source.shape[1]
        clen = (
            jnp.full((b,), c, jnp.int32)
            if cache_len is None
            else jnp.minimum(jnp.asarray(cache_len, jnp.int32), c)
        )
        pos = jnp.arange(s.shape[1])[None, :]
        cached = jnp.pad(cache_source, ((0, 0), (0, max(0, s.shape[1] - c))))[:, : s.shape[1]]
        s = jnp.where(pos < clen[:, None], cached, s)
    wave_len = mel_len * r
    s = jnp.where(jnp.arange(s.shape[1])[None, :] < wave_len[:, None], s, 0.0)

    # decode: the source's STFT, then the generator
    s_stft = _stft(cfg, s, wave_len, prec)  # [B, F, 18]
    stft_len = wave_len // cfg.hop_len + 1
    x = ops.conv("conv_pre", jnp.swapaxes(mel, 1, 2), mel_len, padding=3)
    length = mel_len
    n_up, nk = len(cfg.upsample_rates), len(cfg.resblock_kernel_sizes)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        x = jnp.where(x >= 0, x, np.float32(cfg.lrelu_slope) * x)
        x = ops.conv_transpose(f"ups.{i}", x, length, u, (k - u) // 2)
        length = length * u
        if i == n_up - 1:
            x = jnp.concatenate([x[:, 1:2], x], axis=1)  # reflection (1, 0)
            length = length + 1
        d = cfg.source_down_rates[i]
        si = (
            ops.conv(f"source_downs.{i}", s_stft, stft_len)
            if d == 1
            else ops.conv(f"source_downs.{i}", s_stft, stft_len, stride=d, padding=d // 2)
        )
        si = ops.resblock(
            f"source_resblocks.{i}",
            si,
            length,
            cfg.source_resblock_kernel_sizes[i],
            cfg.source_resblock_dilation_sizes[i],
        )
        x = x + si
        xs = None
        for j, (kk, dd) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            y = ops.resblock(f"resblocks.{i * nk + j}", x, length, kk, dd)
            xs = y if xs is None else xs + y
        x = xs / np.float32(nk)
    x = jnp.where(x >= 0, x, np.float32(0.01) * x)
    x = ops.conv("conv_post", x, length, padding=3)
    nb = cfg.n_fft // 2 + 1
    wave = _istft(cfg, jnp.exp(x[..., :nb]), jnp.sin(x[..., nb:]), length, prec)
    wave = jnp.clip(wave, -np.float32(cfg.audio_limit), np.float32(cfg.audio_limit))
    wave = jnp.where(jnp.arange(wave.shape[1])[None, :] < wave_len[:, None], wave, 0.0)
    return wave, wave_len, s


@functools.lru_cache(maxsize=None)
def _jitted(cfg: HiFTConfig, precision: str):
    import jax

    return jax.jit(functools.partial(forward, cfg=cfg, precision=precision))


@functools.lru_cache(maxsize=None)
def _jitted_draw(cfg: HiFTConfig, batch: int, n: int):
    import jax

    return jax.jit(lambda key: _draw(key, cfg, batch, n))


def vocode(
    params: dict,
    cfg: HiFTConfig,
    mel,
    mel_len=None,
    noise="zero",
    cache_source=None,
    cache_len=None,
    precision: str = "highest",
    return_source: bool = False,
):
    """Compiled `forward`, once per `[B, T]` (and precision): `noise` is "zero", a PRNG key
    (drawn on the device) or a dict of arrays; zero noise and an absent source cache are passed
    as zero arrays and a zero cache length, so every call of one shape runs the same program.
    `mel_len` defaults to the full length for every row. Returns numpy (wave `[B, T * R]`,
    wave_len `[B]`) (and the source with `return_source`)."""
    import jax.numpy as jnp

    mel = np.asarray(mel, np.float32)
    if mel.ndim != 3 or mel.shape[1] != cfg.in_channels:
        raise Token2WavError(
            f"mel has shape {mel.shape}, expected [batch, {cfg.in_channels}, frames]"
        )
    b, _, t = mel.shape
    h, n = cfg.nb_harmonics + 1, t * cfg.samples_per_frame
    mel_len = np.full((b,), t, np.int32) if mel_len is None else np.asarray(mel_len, np.int32)
    if mel_len.shape != (b,) or (mel_len < 1).any() or (mel_len > t).any():
        raise Token2WavError(
            f"mel_len {mel_len.tolist()} must give 1..{t} frames for each of {b} rows"
        )
    if isinstance(noise, str):
        if noise != "zero":
            raise Token2WavError(f"noise {noise!r}: give 'zero', a PRNG key or arrays")
        noise = {
            "phase": jnp.zeros((b, h), jnp.float32),
            "noise": jnp.zeros((b, n, h), jnp.float32),
        }
    elif isinstance(noise, dict):
        ph, nz = np.shape(noise.get("phase")), np.shape(noise.get("noise"))
        if ph != (b, h) or len(nz) != 3 or nz[0] != b or nz[1] < n or nz[2] != h:
            raise Token2WavError(
                f"noise arrays phase {ph} / noise {nz}: expected phase "
                f"[{b}, {h}] and noise [{b}, >= {n}, {h}]"
            )
        noise = {"phase": noise["phase"], "noise": noise["noise"][:, :n]}
    else:
        noise = _jitted_draw(cfg, b, n)(noise)
    if cache_source is None:
        cache, clen = jnp.zeros((b, n), jnp.float32), np.zeros((b,), np.int32)
    else:
        c = np.asarray(cache_source, np.float32)
        if c.ndim != 2 or c.shape[0] != b or c.shape[1] > n:
            raise Token2WavError(f"cache_source has shape {c.shape}, expected [{b}, <= {n}]")
        clen = (
            np.full((b,), c.shape[1], np.int32)
            if cache_len is None
            else np.minimum(np.asarray(cache_len, np.int32), c.shape[1])
        )
        cache = np.pad(c, ((0, 0), (0, n - c.shape[1])))
    wave, wave_len, s = _jitted(cfg, precision)(
        params, mel=mel, mel_len=mel_len, noise=noise, cache_source=cache, cache_len=clen
    )
    out = (np.asarray(wave), np.asarray(wave_len))
    return out + (np.asarray(s),) if return_source else out


__all__ = [
    "HiFTConfig",
    "Token2WavError",
    "PRESETS",
    "Layer",
    "layers",
    "param_shapes",
    "init_random",
    "check_params",
    "f0_predict",
    "source",
    "forward",
    "vocode",
    "draw_noise",
]
