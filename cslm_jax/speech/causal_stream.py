"""Streamed token-to-waveform for CosyVoice 2 (issue 25, v2): a CSLM answer's speech chunks SA_1,
SA_2, ... -> audio, each chunk synthesised the moment its `<eosp>` closes with the causal flow
(`cslm_jax.speech.causal_flow`), so that the streamed audio is what upstream's
`CosyVoice2Model.token2wav` gives when called at the same moments.

Upstream (`cosyvoice.cli.model.CosyVoice2Model`, as the wheel `cosyvoice-minicpmo==0.1.0` ships
it) keeps one cache per utterance, HiFT's, and one call `token2wav(token, ..., token_offset,
stream, finalize)` on the units so far computes:
1. The flow (`CausalMaskedDiffWithXvec.inference(streaming=stream, finalize=finalize)`) on every
   unit so far: not finalized, the last `pre_lookahead_len` (3) units are look-ahead only; the
   starting noise is the first frames of its fixed buffer, so earlier frames come out again the
   same (chunk-causal attention). Kept: the frames from `2 * token_offset` on (the new ones).
2. The HiFT cache (`mel_cache_len` 8 frames): the previous call's last 8 mel frames are put in
   front, and HiFT (`inference(speech_feat, cache_source)`) runs with the first 8 * 480 samples
   of its source replaced by the previous call's last 8 * 480 source samples.
3. The first 8 * 480 samples of the waveform are cross-faded (Hamming window of 2 * 8 * 480)
   with the 8 * 480 samples the previous call held back (`fade_in_out`: float64 arithmetic,
   rounded to float32). Not final: the last 8 frames' mel, source and waveform become the cache
   and those samples are held back. Final: everything is returned.

Upstream's `tts(stream=True)` calls it with `stream=True, finalize=False` whenever 25 more units
(the flow's attention chunk) plus the 3 of look-ahead have arrived, then once with
`finalize=True` (and `stream=False`: full attention) on every unit at the end. CSLM's chunks do
not arrive in hops of 25: `CausalSpeechStream.push(units)` (a closed chunk) calls it at once on
every unit so far (`hop=None`), so each chunk is heard as soon as it closes, less its last 3
units (their frames need the next units' look-ahead); `finish()` makes the finalized call. A
streamed call's last frames may then end inside an attention chunk, which a later call sees
whole (upstream's hops always end on a chunk): the frames already played stay as they were, and
HiFT's cache and cross-fade join them to the later call's. `hop=25` (the flow's chunk) instead
calls exactly as upstream's `tts` does: once per complete hop, the first lengthened by nothing
(no zero-shot prompt here).

A call is made only if it gives frames: a streamed call needs more than 3 units beyond those
given, and the first needs at least 8 mel frames (HiFT's cache: upstream's first hop gives 50);
otherwise the units wait for the next chunk or the end. Totals: `2 N` mel frames for `N` units,
`* 480` samples (`expected_samples`), as the one-call synthesis (`token2wav.synthesize`).

Compiled programs: every call recomputes the whole prefix (as upstream), padded (`pad_to`) to a
power of two of at least `MIN_UNITS_PAD` units, so a growing answer compiles one flow program
per power of two (streamed and finalized apart), not per call; HiFT runs on its mel padded to a
multiple of `HIFT_BUCKET` frames with its length mask. A shape first seen is compiled by one
call on zeros, counted in `compile_s`, not in `synthesis_s`.

Speech rate (merged units, `speech_rate` > 1; upstream refuses speed changes while streaming,
since its `F.interpolate(mel, size=int(M / speed))` needs the whole mel): the streamed mel is
resampled linearly at the fixed rate as it comes, output frame j taken at source position
`(j + 0.5) / rate - 0.5` (upstream's half-pixel linear interpolation, clamped at 0), released
once the source frames on both sides of it are given, the last frames at the end (clamped to the
last source frame); `int(2 N rate)` frames in all, as `token2wav.synthesize`. The mel is
continuous across calls, so no seam is added; against the one-call `stretch` (whose scale is
`M / int(M rate)`) the positions differ by less than `1 / rate` source frames over the
answer. Rate 1 is the identity (upstream's own frames). HiFT then runs on the resampled frames,
its cache as above.

Noise: "zero" (deterministic), a PRNG key (split as `token2wav.synthesize` splits it: the flow's
buffer drawn once from the first half, as upstream's one fixed buffer serves every call; call k's
HiFT draws from `fold_in(second half, k)`), or a callable `noise(k, hift_frames)` returning
`{"flow": z [1, F, 80], "hift": {"phase": [1, H], "noise": [1, >= hift_frames * 480, H]}}`
(another implementation's draws, for tests: the flow's `z` the same buffer every call, e.g.
`causal_flow.upstream_noise()`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

import numpy as np

from cslm_jax.speech.hift import Token2WavError

MEL_CACHE_FRAMES = 8  # upstream's CosyVoice2Model.mel_cache_len (the HiFT cache)
MIN_UNITS_PAD = 32  # the flow's prefix padded to a power of two of at least this many
HIFT_BUCKET = 32  # HiFT's mel padded to a multiple of this many frames

# Shapes compiled in this process: (flow config, padded units, look-ahead, streaming, precision)
# and (HiFT config, padded frames, precision).
_FLOW_WARM: set = set()
_HIFT_WARM: set = set()


def units_pad(n: int) -> int:
    """The padded prefix length (`pad_to`) of a call on `n` units: a power of two, at least
    `MIN_UNITS_PAD`."""
    return max(MIN_UNITS_PAD, 1 << max(0, int(n) - 1).bit_length())


def cross_fade(new: np.ndarray, old: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Upstream's `fade_in_out` on the last axis: the first `len(window) // 2` values of `new`
    become `new * w[:k] + old[-k:] * w[k:]` (float64, rounded to float32)."""
    k = len(window) // 2
    out = np.array(new, np.float32, copy=True)
    out[..., :k] = (
        new[..., :k].astype(np.float64) * window[:k] + old[..., -k:].astype(np.float64) * window[k:]
    ).astype(np.float32)
    return out


def hift_padded(frames: int) -> int:
    """HiFT's padded length for a streamed call's `frames` mel frames (a multiple of
    `HIFT_BUCKET`, so that calls of nearby lengths share one compiled program)."""
    return -(-max(int(frames), 1) // HIFT_BUCKET) * HIFT_BUCKET


def vocode_held(t2w, mel, held, keep: int, window, noise, finalize: bool, precision: str):
    """HiFT's half of one call of upstream's streaming `token2wav` (v1 and v2 alike): `mel
    [80, t]` (the held frames already in front) vocoded on `hift_padded(t)` frames with its length
    mask, the first samples of the source replaced by the held source and the first
    `len(window) // 2` samples of speech cross-faded with the held speech. Not final: the last
    `keep` frames' mel, source and speech are held back for the next call. `held`: None or
    (mel [80, keep], source, speech) from the previous call; `noise` as `hift.vocode` takes it
    (arrays for `t` frames are padded with zeros). Returns (samples ready, what is held now)."""
    from cslm_jax.speech.hift import vocode

    t = mel.shape[1]
    padded = hift_padded(t)
    spf = t2w.samples_per_frame
    n = t * spf
    if isinstance(noise, dict):
        nz = np.asarray(noise["noise"], np.float32)[:, :n]
        noise = {
            "phase": noise["phase"],
            "noise": np.pad(nz, ((0, 0), (0, padded * spf - nz.shape[1]), (0, 0))),
        }
    wave, _, source = vocode(
        t2w.hift_params,
        t2w.hift_cfg,
        np.pad(mel, ((0, 0), (0, padded - t)))[None],
        mel_len=np.array([t], np.int32),
        noise=noise,
        cache_source=None if held is None else held[1][None],
        precision=precision,
        return_source=True,
    )
    speech, source = wave[0, :n], source[0, :n]
    if held is not None:
        speech = cross_fade(speech, held[2], window)
    if finalize:
        return speech, None
    r = keep * spf
    return speech[:-r], (mel[:, -keep:], source[-r:].copy(), speech[-r:].copy())


def resample_positions(start: int, stop: int, rate: float):
    """Source positions of output frames `start..stop-1` at `rate` output frames per source
    frame (upstream's linear interpolation, half-pixel centres, float32): (left index, its
    right neighbour's weight)."""
    scale = np.float32(1.0) / np.float32(rate)
    src = np.maximum(
        scale * (np.arange(start, stop, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
        np.float32(0.0),
    )
    i0 = np.floor(src).astype(np.int64)
    return i0, (src - i0.astype(np.float32)).astype(np.float32)


class CausalSpeechStream:
    """One answer's streamed speech (v2), the interface of `stream.SpeechStream`: `push(units)`
    for each closed speech chunk returns the audio ready now (float32 at `t2w.sample_rate`,
    possibly empty); `finish()` at the answer's end returns the rest; the concatenation of
    everything returned is the answer's audio.

    `voice`: a voice name, `.npy` file or x-vector (`token2wav.voice`); `noise`: "zero", a PRNG
    key or a callable (module docstring); `speech_rate`: the mean run length of merged units
    (> 0; module docstring); `hop`: None (a call at every chunk) or upstream's hop in units.
    `windows` lists the calls made so far as (units so far, token_offset, finalize);
    `synthesis_s` the seconds spent synthesising, `compile_s` those spent compiling a shape
    first seen, apart; `samples` the samples returned."""

    def __init__(
        self,
        t2w,
        voice="random",
        noise="zero",
        speech_rate: float = 1.0,
        precision: str = "highest",
        hop: int | None = None,
    ):
        from cslm_jax.speech import token2wav as t2w_mod

        if t2w.version != "v2":
            raise Token2WavError(
                f"streaming: token2wav version {t2w.version!r}; "
                f"CausalSpeechStream streams v2 (v1: stream.SpeechStream)"
            )
        if not (np.isfinite(speech_rate) and speech_rate > 0):
            raise Token2WavError(f"speech rate {speech_rate}: must be a positive number")
        if isinstance(noise, str) and noise != "zero":
            raise Token2WavError(f"noise {noise!r}: give 'zero', a PRNG key or a callable")
        if hop is not None and int(hop) < 1:
            raise Token2WavError(
                f"hop {hop}: give None (a call per chunk) or a number of units >= 1"
            )
        self.t2w = t2w
        self.cfg = t2w.flow_cfg
        self.emb = (
            t2w_mod.voice(t2w, voice)
            if isinstance(voice, (str, Path))
            else t2w_mod.voice(t2w, np.asarray(voice, np.float32))
        )
        self.noise = noise
        self.speech_rate = float(speech_rate)
        self.precision = precision
        self.hop = None if hop is None else int(hop)
        self.look = int(self.cfg.pre_lookahead_len)
        self.cache_samples = MEL_CACHE_FRAMES * t2w.samples_per_frame
        self.speech_window = np.hamming(2 * self.cache_samples)
        self.units: list[int] = []
        self.token_offset = 0  # units whose frames were given
        self.windows: list[tuple[list[int], int, bool]] = []
        self.synthesis_s = 0.0
        self.compile_s = 0.0
        self.samples = 0
        self.finished = False
        self._compiling = 0.0
        self._flow_noise = None  # the flow's buffer (key noise: drawn once)
        self._hift_key = None
        self._mel = np.zeros((80, 0), np.float32)  # the flow's frames so far (rate != 1)
        self._out_frames = 0  # mel frames given to HiFT so far
        self._hift_cache = None  # (mel [80, 8], source [3840], speech [3840])

    # -- the calling policy --------------------------------------------------------------------

    def out_frames(self, source_frames: int, final: bool) -> int:
        """Mel frames (after the speech rate's resampling) ready when `source_frames` of the
        flow's frames are given (module docstring)."""
        if self.speech_rate == 1.0:
            return source_frames
        if final:
            return int(source_frames * self.speech_rate)
        # frame j is ready once its right neighbour is given (or it needs none)
        n = int(source_frames * self.speech_rate) + 2
        i0, w = resample_positions(0, n, self.speech_rate)
        ready = (i0 + (w > 0)) <= source_frames - 1
        return int(np.argmin(ready)) if not ready.all() else n

    def _callable(self, n_units: int) -> bool:
        """Whether a streamed call on the first `n_units` units gives frames."""
        n_main = n_units - self.look
        if n_main <= self.token_offset:
            return False
        new = self.out_frames(self.cfg.mel_len(n_main), False) - self._out_frames
        return new >= (1 if self._hift_cache is not None else MEL_CACHE_FRAMES)

    def push(self, units: Iterable[int]) -> np.ndarray:
        """A closed speech chunk's units: the streamed call(s) they allow (module docstring).
        Returns the audio ready."""
        from cslm_jax.speech.flow import check_units

        if self.finished:
            raise Token2WavError("streaming: push after finish (one stream per answer)")
        u = check_units(self.cfg, np.asarray(list(units), np.int64), "speech chunk")
        self.units += u.tolist()
        outs = []
        if self.hop is None:
            if self._callable(len(self.units)):
                outs.append(self._timed(len(self.units), False))
        else:
            while len(self.units) - self.token_offset >= self.hop + self.look and self._callable(
                self.token_offset + self.hop + self.look
            ):
                outs.append(self._timed(self.token_offset + self.hop + self.look, False))
        return np.concatenate(outs + [np.zeros((0,), np.float32)])

    def finish(self) -> np.ndarray:
        """The answer's end: the finalized call (every unit, full attention), unless no unit
        is left; returns the rest of the audio (empty if none)."""
        if self.finished:
            return np.zeros((0,), np.float32)
        self.finished = True
        if len(self.units) <= self.token_offset and self._hift_cache is None:
            return np.zeros((0,), np.float32)
        return self._timed(len(self.units), True)

    def _timed(self, n_units: int, finalize: bool) -> np.ndarray:
        t0 = time.perf_counter()
        self._compiling = 0.0
        out = self.step(n_units, finalize)
        self.compile_s += self._compiling
        self.synthesis_s += time.perf_counter() - t0 - self._compiling
        self.samples += len(out)
        return out

    def expected_samples(self) -> int:
        """Samples of the whole answer once finished: `int(2 N rate)` mel frames of
        `samples_per_frame` (the units pushed so far)."""
        return self.out_frames(self.cfg.mel_len(len(self.units)), True) * self.t2w.samples_per_frame

    # -- one call of upstream's token2wav ----------------------------------------------------------

    def _noise(self, k: int, hift_frames: int):
        if isinstance(self.noise, str):
            return "zero", "zero"
        if callable(self.noise):
            d = self.noise(k, hift_frames)
            return np.asarray(d["flow"], np.float32), d["hift"]
        if self._flow_noise is None:
            import jax

            from cslm_jax.speech.causal_flow import NOISE_FRAMES

            k_flow, self._hift_key = jax.random.split(self.noise)
            self._flow_noise = np.asarray(
                jax.random.normal(k_flow, (1, NOISE_FRAMES, 80), np.float32)
            )
        import jax

        return self._flow_noise, jax.random.fold_in(self._hift_key, k)

    def _warm(self, width: int, finalize: bool, hift_frames: int) -> float:
        """Compile the flow for `width` padded units (and the call's flags) and HiFT for
        `hift_frames` padded frames, each by one call on zeros unless done before; the seconds
        it took."""
        from cslm_jax.speech.causal_flow import causal_flow_inference
        from cslm_jax.speech.hift import vocode

        key = (self.cfg, width, finalize, self.precision)
        hkey = (self.t2w.hift_cfg, hift_frames, self.precision)
        if key in _FLOW_WARM and hkey in _HIFT_WARM:
            return 0.0
        t0 = time.perf_counter()
        if key not in _FLOW_WARM:
            causal_flow_inference(
                self.t2w.flow_params,
                self.cfg,
                np.zeros((width,), np.int32),
                self.emb,
                streaming=not finalize,
                finalize=finalize,
                pad_to=width,
                precision=self.precision,
            )
            _FLOW_WARM.add(key)
        if hkey not in _HIFT_WARM:
            vocode(
                self.t2w.hift_params,
                self.t2w.hift_cfg,
                np.zeros((1, self.t2w.hift_cfg.in_channels, hift_frames), np.float32),
                cache_source=np.zeros((1, 0), np.float32),
                precision=self.precision,
                return_source=True,
            )
            _HIFT_WARM.add(hkey)
        return time.perf_counter() - t0

    def _resampled(self, mel: np.ndarray, final: bool) -> np.ndarray:
        """The flow's new frames `mel [80, m]` -> the mel frames they release at the speech
        rate (module docstring)."""
        if self.speech_rate == 1.0:
            self._out_frames += mel.shape[1]
            return mel
        self._mel = np.concatenate([self._mel, mel], 1)
        stop = self.out_frames(self._mel.shape[1], final)
        i0, w = resample_positions(self._out_frames, stop, self.speech_rate)
        last = self._mel.shape[1] - 1
        i0 = np.minimum(i0, last)
        i1 = np.minimum(i0 + 1, last)
        out = (self._mel[:, i0] * (np.float32(1.0) - w) + self._mel[:, i1] * w).astype(np.float32)
        self._out_frames = max(self._out_frames, stop)
        return out

    def step(self, n_units: int, finalize: bool) -> np.ndarray:
        """Upstream's `token2wav(units[:n_units], token_offset, stream=not finalize, finalize)`
        with this answer's HiFT cache; returns the audio it releases. (`push` / `finish` choose
        the calls.)"""
        from cslm_jax.speech.causal_flow import causal_flow_inference, new_frames

        units = np.asarray(self.units[:n_units], np.int32)
        k = len(self.windows)
        self.windows.append((units.tolist(), self.token_offset, bool(finalize)))
        n_main = n_units - (0 if finalize else self.look)
        src = self.cfg.mel_len(n_main)
        new_out = self.out_frames(src, finalize) - self._out_frames
        cached = 0 if self._hift_cache is None else MEL_CACHE_FRAMES
        t = cached + new_out
        width = units_pad(n_units)
        padded = hift_padded(t)
        self._compiling += self._warm(width, finalize, padded)
        flow_noise, hift_noise = self._noise(k, t)
        mel = causal_flow_inference(
            self.t2w.flow_params,
            self.cfg,
            units,
            self.emb,
            noise=flow_noise,
            streaming=not finalize,
            finalize=finalize,
            pad_to=width,
            precision=self.precision,
        )
        mel = self._resampled(new_frames(self.cfg, mel, self.token_offset)[0], finalize)
        self.token_offset = n_main
        if self._hift_cache is not None:
            mel = np.concatenate([self._hift_cache[0], mel], 1)
        assert mel.shape[1] == t, (mel.shape, t)
        if t == 0:
            return np.zeros((0,), np.float32)
        speech, self._hift_cache = vocode_held(
            self.t2w,
            mel,
            self._hift_cache,
            MEL_CACHE_FRAMES,
            self.speech_window,
            hift_noise,
            finalize,
            self.precision,
        )
        return speech


__all__ = [
    "CausalSpeechStream",
    "cross_fade",
    "hift_padded",
    "vocode_held",
    "resample_positions",
    "units_pad",
    "MEL_CACHE_FRAMES",
    "MIN_UNITS_PAD",
    "HIFT_BUCKET",
]
