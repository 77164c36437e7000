"""The Whisper log-mel front end of the S3 speech tokenizer, batched, in JAX.

Computed as `s3tokenizer.log_mel_spectrogram` (0.3.0) computes it for one utterance, for a padded
batch of utterances of different lengths at once:

- STFT with n_fft 400, hop 160, a periodic Hann window, `center=True` framing with *reflect*
  padding of 200 samples at each end of each utterance (the right end reflects at the
  utterance's own last sample, not at the batch's padding);
- power spectrum |X|^2 of the 201 one-sided bins; the STFT's last frame is dropped, so an
  utterance of N samples has N // 160 frames;
- a 128-band Slaney mel filterbank (`mel_filters`, computed here as librosa computes it);
- log10 of max(mel, 1e-10), clamped from below at the utterance's own maximum minus 8, then
  (x + 4) / 4.

Frames past an utterance's length are zero (as the package's `padding` leaves them). The padded
sample count is a static shape: `log_mel` is jitted once per `[B, N]` shape.
"""

from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
# torch.stft's reflect padding needs more samples than the pad (200); the package fails below this.
MIN_SAMPLES = N_FFT // 2 + 1


def _hz_to_mel(f):
    """Slaney mel scale (librosa `hz_to_mel(htk=False)`): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = f / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-300) / min_log_hz) / logstep, mels
    )


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3
    freqs = f_sp * m
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int = N_MELS, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """`[n_mels, 1 + n_fft // 2]` float32 filterbank, as `librosa.filters.mel(sr=sr, n_fft=n_fft,
    n_mels=n_mels)` (Slaney scale, Slaney norm, 0 Hz to sr/2) computes it, float32 rounding steps
    included; the s3tokenizer package ships these numbers as assets/mel_filters.npz."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2.0), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights *= enorm[:, np.newaxis]
    weights.setflags(write=False)
    return weights


def num_frames(n_samples):
    """Mel frames of an utterance of `n_samples` samples (the STFT's last frame dropped)."""
    return np.asarray(n_samples) // HOP


@functools.lru_cache(maxsize=None)
def _hann() -> np.ndarray:
    n = np.arange(N_FFT, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)  # periodic


def log_mel(wave, lengths, n_mels: int = N_MELS):
    """`wave [B, N]` float32 (16 kHz, samples past `lengths[b]` ignored), `lengths [B]` int ->
    (`mel [B, N // 160, n_mels]` float32, `mel_len [B]` int32 = lengths // 160). Traceable:
    call it under `jax.jit` (see `log_mel_jit`)."""
    import jax
    import jax.numpy as jnp

    wave = jnp.asarray(wave, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    b, n = wave.shape
    t = n // HOP
    # Sample index of each (frame, tap) in the reflect-padded utterance: position p = 160 t + k
    # of the padded signal is sample p - 200, reflected at 0 and at the utterance's last sample.
    pos = (np.arange(t)[:, None] * HOP + np.arange(N_FFT)[None, :] - N_FFT // 2).astype(np.int32)
    pos = jnp.asarray(pos)[None]  # [1, T, 400]
    last = (lengths - 1)[:, None, None]
    idx = jnp.abs(pos)  # left reflection
    idx = jnp.where(idx > last, 2 * last - idx, idx)  # right reflection
    idx = jnp.clip(idx, 0, n - 1)  # frames past the utterance: masked below
    frames = jnp.take_along_axis(wave[:, None, :], idx.reshape(b, 1, -1), axis=2)
    frames = frames.reshape(b, t, N_FFT) * jnp.asarray(_hann())
    spec = jnp.fft.rfft(frames, n=N_FFT, axis=-1)  # [B, T, 201]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    filters = jnp.asarray(mel_filters(n_mels))  # [M, 201]
    mel = jnp.einsum("btf,mf->btm", power, filters, precision=jax.lax.Precision.HIGHEST)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    mel_len = lengths // HOP
    valid = (jnp.arange(t)[None, :] < mel_len[:, None])[..., None]  # [B, T, 1]
    peak = jnp.max(jnp.where(valid, log_spec, -jnp.inf), axis=(1, 2), keepdims=True)
    log_spec = jnp.maximum(log_spec, peak - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return jnp.where(valid, log_spec, 0.0), mel_len


@functools.lru_cache(maxsize=None)
def _log_mel_jit(n_mels: int):
    import jax

    return jax.jit(functools.partial(log_mel, n_mels=n_mels))


def log_mel_jit(wave, lengths, n_mels: int = N_MELS):
    """`log_mel` compiled once per `[B, N]` shape."""
    return _log_mel_jit(n_mels)(wave, lengths)
