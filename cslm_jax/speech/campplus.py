"""Prompt-wav voices (issue 25 item 2): a speaker's x-vector from a recording, as CosyVoice's
frontend computes it (`CosyVoiceFrontEnd._extract_spk_embedding`):

- the recording as 16 kHz mono float32 samples in [-1, 1] (`cslm_jax.data.audio.load_audio`;
  upstream's `load_wav(wav, 16000)`);
- Kaldi's log mel filterbank, as `torchaudio.compliance.kaldi.fbank(speech, num_mel_bins=80,
  dither=0, sample_frequency=16000)` computes it (`kaldi_fbank` below, numpy);
- the features' mean over time subtracted (per bin);
- `[1, T, 80]` through the CAM++ speaker model `campplus.onnx` (onnxruntime, CPU; an optional
  dependency) -> `[1, 192]`, the x-vector the flow's speaker projection takes.

A token2wav folder holds `campplus.onnx` when `import-token2wav --campplus` copied CosyVoice's
file into it; `save_random_campplus` writes a small random ONNX graph with CAM++'s interface
(`[B, T, 80]` -> `[B, 192]`) for tests and the demo.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cslm_jax.speech.hift import Token2WavError

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
XVECTOR_DIM = 192
# Kaldi's defaults (torchaudio.compliance.kaldi.fbank's): 25 ms frames every 10 ms, the window
# zero-padded to a power of two (512 samples at 16 kHz), snip_edges (only whole frames).
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
PADDED = 512
PREEMPHASIS = np.float32(0.97)
LOW_FREQ = 20.0
EPS = np.float32(np.finfo(np.float32).eps)  # the log's floor: torch.finfo(torch.float).eps


def _mel(f):
    """Kaldi's mel scale: 1127 ln(1 + f / 700)."""
    return 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)


@functools.lru_cache(maxsize=None)
def kaldi_mel_banks(
    num_bins: int = NUM_MEL_BINS, sample_rate: int = SAMPLE_RATE, padded: int = PADDED
) -> np.ndarray:
    """`[num_bins, padded // 2 + 1]` float32: Kaldi's triangular mel filters (`MelBanks`;
    torchaudio's `get_mel_banks` without VTLN): `num_bins` triangles evenly spaced on the mel
    scale from 20 Hz to the Nyquist frequency, each rising from its left edge to its centre and
    falling to its right edge *in mel*, evaluated at the FFT bins' frequencies `k * rate /
    padded` for `k < padded / 2`; the Nyquist bin's column is zero (as torchaudio pads it)."""
    n_fft_bins = padded // 2
    lo, hi = _mel(LOW_FREQ), _mel(sample_rate / 2)
    delta = (hi - lo) / (num_bins + 1)
    left = lo + np.arange(num_bins)[:, None] * delta
    centre, right = left + delta, left + 2 * delta
    mel = _mel(np.arange(n_fft_bins) * (sample_rate / padded))[None, :]
    up, down = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = np.zeros((num_bins, n_fft_bins + 1), np.float32)
    banks[:, :n_fft_bins] = np.maximum(0.0, np.minimum(up, down))
    banks.setflags(write=False)
    return banks


@functools.lru_cache(maxsize=None)
def povey_window(n: int = FRAME_LENGTH) -> np.ndarray:
    """Kaldi's default window: a symmetric Hann window to the power 0.85,
    `(0.5 - 0.5 cos(2 pi i / (n - 1)))^0.85`."""
    i = np.arange(n, dtype=np.float64)
    w = (0.5 - 0.5 * np.cos(2 * np.pi * i / (n - 1))) ** 0.85
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def num_frames(n_samples: int) -> int:
    """Frames of `n_samples` samples with snip_edges: `1 + (n - 400) // 160` (0 below 400)."""
    return 0 if n_samples < FRAME_LENGTH else 1 + (n_samples - FRAME_LENGTH) // FRAME_SHIFT


def kaldi_fbank(wave, num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
    """`wave [N]` (16 kHz, float; the scale as given: upstream passes samples in [-1, 1]) ->
    `[frames, num_mel_bins]` float32 log mel energies, as `torchaudio.compliance.kaldi.fbank(
    wave[None], num_mel_bins=num_mel_bins, dither=0, sample_frequency=16000)` computes them:
    per 400-sample frame (every 160 samples, whole frames only), its mean subtracted (DC
    offset), pre-emphasis `x[i] - 0.97 x[i-1]` (the first sample against itself), the Povey
    window, zero-padded to 512, the power spectrum `|rfft|^2`, the mel filters, then
    `log(max(energy, float32 eps))`. No energy column, no mean subtraction."""
    x = np.asarray(wave, np.float32).reshape(-1)
    t = num_frames(len(x))
    if t < 1:
        raise Token2WavError(
            f"{len(x)} samples: Kaldi's fbank needs at least {FRAME_LENGTH} (25 ms at 16 kHz)"
        )
    idx = np.arange(t)[:, None] * FRAME_SHIFT + np.arange(FRAME_LENGTH)[None, :]
    frames = x[idx]  # [T, 400]
    frames = frames - frames.mean(axis=1, keepdims=True, dtype=np.float32)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - PREEMPHASIS * prev) * povey_window()
    spec = np.fft.rfft(frames, n=PADDED, axis=1)  # [T, 257]
    power = (spec.real**2 + spec.imag**2).astype(np.float32)
    energy = power @ kaldi_mel_banks(num_mel_bins).T  # [T, bins]
    return np.log(np.maximum(energy, EPS)).astype(np.float32)


def speaker_features(wave) -> np.ndarray:
    """CAM++'s input for one 16 kHz recording: `kaldi_fbank` minus its mean over time,
    `[1, T, 80]` float32 (upstream's `feat - feat.mean(dim=0, keepdim=True)`, unsqueezed)."""
    feat = kaldi_fbank(wave)
    return (feat - feat.mean(axis=0, keepdims=True))[None].astype(np.float32)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise Token2WavError(
            "a prompt-wav voice runs CosyVoice's campplus.onnx through onnxruntime, "
            "which is not installed: pip install onnxruntime (or give a voice name or "
            "a .npy x-vector)"
        ) from None
    return onnxruntime


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime: float):
    ort = _onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # upstream's setting; the model is small
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types (InvalidGraph, Fail, ...)
        text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise Token2WavError(f"{path}: not a usable ONNX speaker model ({text})") from None


def xvector(model_path, wave, dim: int = XVECTOR_DIM) -> np.ndarray:
    """The `[dim]` float32 x-vector of a 16 kHz recording `wave` by the CAM++ model at
    `model_path` (its first input fed `speaker_features(wave)`, its first output flattened, as
    upstream's frontend does)."""
    p = Path(model_path)
    if not p.is_file():
        raise Token2WavError(f"{p}: no such speaker model (campplus.onnx)")
    sess = _session(str(p), p.stat().st_mtime)
    inp = sess.get_inputs()[0]
    try:
        out = sess.run(None, {inp.name: speaker_features(wave)})[0]
    except Token2WavError:
        raise
    except Exception as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise Token2WavError(
            f"{p}: the speaker model failed on [1, T, 80] fbank features ({text}); give "
            f"CosyVoice's campplus.onnx"
        ) from None
    v = np.asarray(out, np.float32).reshape(-1)
    if v.shape != (dim,):
        raise Token2WavError(
            f"{p}: the speaker model gives {np.asarray(out).shape}, expected [1, {dim}] "
            f"(a {dim}-d x-vector); give CosyVoice's campplus.onnx"
        )
    if not np.isfinite(v).all():
        raise Token2WavError(f"{p}: the speaker model gave non-finite values")
    return v


def prompt_xvector(model_path, audio_path, dim: int = XVECTOR_DIM) -> np.ndarray:
    """The x-vector of the recording at `audio_path` (any format and rate `load_audio` reads:
    mono 16 kHz float32) by the CAM++ model at `model_path`. Errors name the file."""
    from cslm_jax.data.audio import AudioError, load_audio

    try:
        wave = load_audio(audio_path, SAMPLE_RATE)
    except AudioError as e:
        raise Token2WavError(f"voice {e}") from None
    if len(wave) < FRAME_LENGTH:
        raise Token2WavError(
            f"voice {audio_path}: {len(wave) / SAMPLE_RATE * 1000:.1f} ms of audio; a prompt "
            f"recording needs at least 25 ms (a few seconds of speech are best)"
        )
    return xvector(model_path, wave, dim)


def check_campplus(path, dim: int = XVECTOR_DIM) -> None:
    """`path` is an ONNX model with CAM++'s interface: a first input of rank 3 whose last
    dimension is 80 (or free), a first output whose last dimension is `dim` (or free). Reads the
    graph with `onnx` (no onnxruntime needed); errors name the file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, OSError
        raise Token2WavError(f"{path}: not an ONNX model ({type(e).__name__})") from None
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs or not graph.output:
        raise Token2WavError(f"{path}: the ONNX model has no input or no output")

    def dims(v):
        return [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]

    din, dout = dims(inputs[0]), dims(graph.output[0])
    if len(din) != 3 or din[2] not in (None, NUM_MEL_BINS):
        raise Token2WavError(
            f"{path}: input {inputs[0].name!r} has shape {din}, CAM++ takes [batch, frames, "
            f"{NUM_MEL_BINS}] fbank features; give CosyVoice's campplus.onnx"
        )
    if not dout or dout[-1] not in (None, dim):
        raise Token2WavError(
            f"{path}: output {graph.output[0].name!r} has shape {dout}, CAM++ gives "
            f"[batch, {dim}]; give CosyVoice's campplus.onnx"
        )


def save_random_campplus(path, seed: int = 0, hidden: int = 32) -> Path:
    """A small random ONNX graph with CAM++'s interface (input `input [B, T, 80]`, output
    `output [B, 192]`; tests and the demo): a 1-D convolution over time (80 -> `hidden`, k 3),
    ReLU, mean and standard-deviation pooling over time, a linear layer to 192. Not CAM++'s
    network (random weights give a random, but input-dependent, x-vector)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((hidden, NUM_MEL_BINS, 3)) / np.sqrt(3 * NUM_MEL_BINS)).astype(
        np.float32
    )
    b = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    proj = (rng.standard_normal((2 * hidden, XVECTOR_DIM)) / np.sqrt(2 * hidden)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "conv_w"),
        numpy_helper.from_array(b, "conv_b"),
        numpy_helper.from_array(proj, "proj"),
        numpy_helper.from_array(np.array([2], np.int64), "time_axis"),
    ]
    nodes = [
        helper.make_node("Transpose", ["input"], ["x_bct"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["x_bct", "conv_w", "conv_b"], ["h"], pads=[1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceMean", ["r", "time_axis"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["r", "r"], ["r2"]),
        helper.make_node("ReduceMean", ["r2", "time_axis"], ["mean2"], keepdims=0),
        helper.make_node("Mul", ["mean", "mean"], ["m2"]),
        helper.make_node("Sub", ["mean2", "m2"], ["var"]),
        helper.make_node("Relu", ["var"], ["var0"]),
        helper.make_node("Sqrt", ["var0"], ["std"]),
        helper.make_node("Concat", ["mean", "std"], ["stats"], axis=1),
        helper.make_node("MatMul", ["stats", "proj"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "campplus_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", NUM_MEL_BINS])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", XVECTOR_DIM])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


__all__ = [
    "NUM_MEL_BINS",
    "SAMPLE_RATE",
    "XVECTOR_DIM",
    "check_campplus",
    "kaldi_fbank",
    "kaldi_mel_banks",
    "num_frames",
    "povey_window",
    "prompt_xvector",
    "save_random_campplus",
    "speaker_features",
    "xvector",
]
