"""Zero-shot prompts from a recording (issue 25 item 2), as CosyVoice's frontend makes them
(`CosyVoiceFrontEnd.frontend_zero_shot`): the recording at 16 kHz gives the prompt's speech
units (the speech tokenizer of the flow's units: `cslm_jax.speech.load_speech_tokenizer`) and,
resampled to the vocoder's rate, its mel (`flow_mel`: the feature extractor of CosyVoice's yaml,
`matcha.utils.audio.mel_spectrogram`); v2 cuts both so that the mel has 2 frames per unit.
The speaker's x-vector comes from the same recording through `campplus.onnx`
(`cslm_jax.speech.campplus`, `token2wav.prompt_voice`).

Feature extractors (CosyVoice's yamls): 80 mel bins from 0 to 8 kHz; v1 at 22,050 Hz with
n_fft = window = 1024 and hop 256; v2 at 24,000 Hz with n_fft = window = 1920 and hop 480.
"""

from __future__ import annotations

import functools

import numpy as np

from cslm_jax.speech.hift import Token2WavError

# version -> (sample rate, n_fft (= window), hop)
FEATURES = {"v1": (22050, 1024, 256), "v2": (24000, 1920, 480)}
N_MELS = 80
FMIN, FMAX = 0.0, 8000.0
LOG_FLOOR = 1e-5  # matcha's dynamic_range_compression clip value
MAG_EPS = 1e-9  # added to |X|^2 before the square root


def _hz_to_mel(f):
    """Slaney's mel scale (librosa's default, htk=False): linear to 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-300) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * 200.0 / 3)


@functools.lru_cache(maxsize=None)
def slaney_mel_filters(
    sr: int, n_fft: int, n_mels: int = N_MELS, fmin: float = FMIN, fmax: float = FMAX
) -> np.ndarray:
    """`[n_mels, n_fft // 2 + 1]` float32: what `librosa.filters.mel(sr=sr, n_fft=n_fft,
    n_mels=n_mels, fmin=fmin, fmax=fmax)` computes (Slaney scale and area normalisation):
    triangles between `n_mels + 2` points evenly spaced in mel from `fmin` to `fmax`, over the
    FFT bins' frequencies, each scaled by 2 / (its width in Hz)."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    pts = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(pts)
    ramps = pts[:, None] - freqs[None, :]
    w = np.zeros((n_mels, len(freqs)), np.float32)
    for i in range(n_mels):
        w[i] = np.maximum(0.0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    w *= (2.0 / (pts[2:] - pts[:n_mels]))[:, None]
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=None)
def _hann(n: int) -> np.ndarray:
    """`torch.hann_window(n)`: periodic."""
    w = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)
    w.setflags(write=False)
    return w


def flow_mel(wave, version: str) -> np.ndarray:
    """The flow's mel of `wave` (1-D float, at the version's vocoder rate, samples in [-1, 1]):
    `[frames, 80]` float32, frames first (the layout `Prompt.mel` takes), as
    `matcha.utils.audio.mel_spectrogram(y, n_fft, 80, sr, hop, n_fft, 0, 8000, center=False)`
    computes it: the wave reflect-padded by (n_fft - hop) / 2 at each end, frames of n_fft
    every hop under a periodic Hann window, the magnitude `sqrt(|X|^2 + 1e-9)`, the Slaney mel
    filters, then `log(max(x, 1e-5))`: `1 + (N + 2 pad - n_fft) // hop` frames."""
    if version not in FEATURES:
        raise Token2WavError(f"version {version!r}: no feature extractor (ported: v1, v2)")
    sr, n_fft, hop = FEATURES[version]
    x = np.asarray(wave, np.float32).reshape(-1)
    pad = (n_fft - hop) // 2
    if len(x) <= pad or len(x) + 2 * pad < n_fft:
        raise Token2WavError(
            f"{len(x)} samples: too short for the flow's mel ({version}: at least "
            f"{max(pad + 1, n_fft - 2 * pad)} at {sr} Hz)"
        )
    x = np.pad(x, (pad, pad), mode="reflect")
    t = 1 + (len(x) - n_fft) // hop
    frames = x[np.arange(t)[:, None] * hop + np.arange(n_fft)[None, :]] * _hann(n_fft)
    spec = np.fft.rfft(frames, axis=1)
    mag = np.sqrt((spec.real**2 + spec.imag**2).astype(np.float32) + np.float32(MAG_EPS))
    mel = mag @ slaney_mel_filters(sr, n_fft).T  # [T, 80]
    return np.log(np.maximum(mel, np.float32(LOG_FLOOR))).astype(np.float32)


def make_prompt(version: str, units, mel):
    """A `token2wav.Prompt` from a recording's units and flow mel, cut as upstream's frontend
    cuts them for v2 (`token_len = min(frames // 2, units)`: 2 frames per unit); v1 as given."""
    from cslm_jax.speech.token2wav import Prompt

    units = np.asarray(units, np.int32).reshape(-1)
    mel = np.asarray(mel, np.float32)
    if version == "v2":
        n = min(mel.shape[0] // 2, len(units))
        units, mel = units[:n], mel[: 2 * n]
    if not len(units):
        raise Token2WavError("the prompt recording gives no speech units (too short)")
    return Prompt(units, mel)


def zero_shot_prompt(t2w, audio, tokenizer):
    """The zero-shot `Prompt` of the recording `audio` (a path `data.audio.load_audio` reads)
    for the token2wav `t2w`: its units by `tokenizer` (a `SpeechTokenizer` of the flow's units:
    v1 `speech_tokenizer_v1`, v2 `speech_tokenizer_v2_25hz`) from the 16 kHz samples, its mel
    (`flow_mel`) from those samples resampled to the vocoder's rate, as upstream resamples
    `prompt_speech_16k`. Errors name the file."""
    from cslm_jax.data.audio import AudioError, load_audio, resample

    if tokenizer.codebook_size != t2w.flow_cfg.vocab_size or (
        tokenizer.units_per_second != t2w.units_per_second
    ):
        raise Token2WavError(
            f"speech tokenizer {tokenizer.version} ({tokenizer.codebook_size} codes, "
            f"{tokenizer.units_per_second} units/s) does not make the units of the token2wav "
            f"{t2w.version} flow ({t2w.flow_cfg.vocab_size} codes, {t2w.units_per_second} "
            f"units/s); give the tokenizer of its units"
        )
    try:
        wave16 = load_audio(audio, tokenizer.sample_rate)
    except AudioError as e:
        raise Token2WavError(f"voice {e}") from None
    if len(wave16) < tokenizer.min_samples:
        raise Token2WavError(
            f"voice {audio}: {len(wave16)} samples at 16 kHz; the speech tokenizer needs at "
            f"least {tokenizer.min_samples}"
        )
    units = np.asarray(tokenizer.encode([wave16])[0], np.int32)
    try:
        mel = flow_mel(resample(wave16, tokenizer.sample_rate, t2w.sample_rate), t2w.version)
        return make_prompt(t2w.version, units, mel)
    except Token2WavError as e:
        raise Token2WavError(f"voice {audio}: {e}") from None


__all__ = [
    "FEATURES",
    "flow_mel",
    "make_prompt",
    "slaney_mel_filters",
    "zero_shot_prompt",
]
