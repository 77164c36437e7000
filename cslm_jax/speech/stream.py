"""Streamed token-to-waveform (issue 25, v1): a CSLM answer's speech chunks SA_1, SA_2, ... ->
audio, each chunk synthesised the moment its `<eosp>` closes, with CosyVoice's own streaming
scheme, so that the streamed audio equals upstream's streaming path fed the same unit windows.

Upstream (`cosyvoice.cli.model.CosyVoiceModel.token2wav(token, ..., uuid, finalize)`, as the
wheel `cosyvoice-minicpmo==0.1.0` ships it) keeps four caches per utterance; one call on a
window of `n` units (`M = int(n / 50 * 22050 / 256)` mel frames) computes:
1. The flow (`MaskedDiffWithXvec.inference(flow_cache=...)`): units -> mu as usual, then in
   `ConditionalCFM.forward(cache=...)` the first frames of the starting noise `z` and of `mu` are
   replaced by the cache (the previous call's last 34 frames of both, after its own replacement;
   34 is a literal there), the cache becomes this call's last 34 frames, and the Euler solver
   runs as usual: mel `[80, M]`.
2. The mel overlap: the first 34 mel frames (`int(20 / 50 * 22050 / 256)`) are cross-faded with
   the 34 frames the previous call held back, `new * w[:34] + old * w[34:]` with `w` the Hamming
   window of 68 (`cosyvoice.utils.common.fade_in_out`; float64 arithmetic, as a float32 tensor
   times a numpy float64 window is in PyTorch, rounded back to float32).
3. The HiFT cache: the previous call's last 20 vocoded mel frames are put in front, and HiFT
   (`inference(speech_feat, cache_source)`) runs with the first 20 * 256 samples of its source
   replaced by the previous call's last 20 * 256 source samples.
4. Not final: the last 34 mel frames are held back (the next mel overlap) before HiFT; the
   first 5120 samples of the waveform are cross-faded (Hamming window of 10240) with the 5120
   samples the previous call held back; the last 20 frames' mel, source and waveform (5120
   samples) become the HiFT cache and are held back. Final: everything is vocoded and returned.

Upstream's `tts(stream=True)` calls it on overlapping windows: units `[k h, k h + h + 20)` for
hops `h` of 100 units (20 units of look-ahead that the next window starts with), then the
remaining units (from the last hop on) with `finalize=True`. `SpeechStream` does the same with
the chunks CSLM gives: each `push(units)` (a closed chunk) makes a window of the 20 units carried
over from the previous window plus the new ones, and synthesises it at once; `finish()` (the
answer's end) synthesises the carried units plus any still pending with `finalize=True`. What is
held back at any time is exactly upstream's: the last 20 units' worth of mel (34 frames, not yet
cross-faded) and the HiFT cache's 20 frames (5120 samples, not yet cross-faded).

Short chunks: a window is synthesised before the end only if it has more than 40 units
(`min_window_units`): then upstream's regulator gives its first and last 20 units exactly 34 mel
frames each (`flow.regulate`), so the 34 cached noise / mu frames, the held-back mel overlap and
the 20 carried units all describe the same stretch of speech, and the next window, which starts
with those 20 units, lines up with them; it also leaves at least 20 frames for the HiFT cache.
With 40 units or fewer the regulator spreads the window's units evenly over its frames and the
caches would describe another stretch than the units carried over (upstream never calls a
non-final window that short: its windows have 120 units). So a shorter window is not
synthesised: its units wait for the next chunk (`push` returns no audio), and at the answer's
end they go into the final window, which any length may be (as upstream's last window).

Totals: windows of `n_1 .. n_K` units (`M_k` mel frames each) give `sum(M_k) - 34 (K - 1)` mel
frames of audio, `* 256` samples (`expected_samples`): each window's first 34 frames replace the
previous one's last 34.

Merged units (`speech_rate` > 1): the window's mel length scales with the rate, as in
`token2wav.synthesize`; the regulator's seams (20 units -> 34 frames) are upstream's whatever
the rate, so the caches line up as above. Rates below 1 are refused (a mean run length is at
least 1, and 20 units must give at least the 34 cached frames).

Noise: "zero" (deterministic), a PRNG key (window `k` draws from `fold_in(key, k)`, split between
the flow's start and HiFT's source), or a callable `noise(k, flow_frames, hift_frames)`
returning `{"flow": z [1, flow_frames, 80], "hift": {"phase": [1, 9], "noise": [1, >= N, 9]}}`
(another implementation's draws, for tests). As upstream, each window draws its own noise, of
which the flow's first (cached) frames are replaced.

Shapes: the flow runs each window padded to the batched flow's buckets (`flow.bucket`: units to
a multiple of `UNIT_BUCKET`, mel frames of `FRAME_BUCKET`; `window_buckets`) with its masked
steps (`regulate_rows`, `cfm(valid_only=True)`: the window's frames as unpadded), and HiFT on
the mel padded to a multiple of `HIFT_BUCKET` frames with its length mask; so a decode's chunks
of ever new lengths compile once per bucket, not once per window length.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cslm_jax.speech.causal_stream import (  # HiFT runs on the mel padded to HIFT_BUCKET frames
    cross_fade,
    hift_padded,
    vocode_held,
)
from cslm_jax.speech.hift import Token2WavError

TOKEN_OVERLAP = 20  # upstream's token_overlap_len: units carried into the next window
FLOW_CACHE_FRAMES = 34  # upstream's literal in ConditionalCFM.forward (z / mu cache)
MEL_CACHE_FRAMES = 20  # upstream's mel_cache_len (the HiFT cache)


def _hamming(n: int) -> np.ndarray:
    """numpy's symmetric Hamming window (upstream's `np.hamming`), float64."""
    return np.hamming(n)


def _flow_window(params, units, unit_len, emb, z, mu_cache, cache_len, mel_len, *, cfg, precision):
    """Windows of the flow with upstream's cache, padded, one row per window (B rows, of one
    answer or of several answers' streams): `units [B, U]` (row b's first `unit_len[b]` real),
    `emb [B, 192]`, `z [B, F, 80]` (its cached frames already in, zero past the window's
    `mel_len[b]` frames), the first `cache_len[b]` frames of mu replaced by `mu_cache [B, F,
    80]`'s -> (mel, mu), both `[B, F, 80]`, each window's frames first. The batched flow's
    masked functions (`flow.regulate_rows`, `flow.cfm(valid_only=True)`): the padding changes
    nothing of a window's frames, and every window of one (U, F) bucket runs one compiled
    program per row count."""
    import jax.numpy as jnp

    from cslm_jax.speech.flow import cfm, encoder, regulate_rows
    from cslm_jax.speech.hift import matmul_precision

    prec = matmul_precision(precision)
    spks = emb / jnp.maximum(jnp.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    spks = (
        jnp.dot(spks, params["spk_embed_affine_layer.w"], precision=prec)
        + params["spk_embed_affine_layer.b"]
    )
    frames = z.shape[1]
    none = jnp.zeros_like(unit_len)
    h = encoder(params, cfg, units, unit_len, precision)
    mu = regulate_rows(params, cfg, h, none, unit_len, none, mel_len, frames, precision)
    pos = jnp.arange(frames)[None, :]
    mu = jnp.where(pos[..., None] < cache_len[:, None, None], mu_cache, mu)
    mask = (pos < mel_len[:, None]).astype(mu.dtype)
    mel = cfm(
        params,
        cfg,
        mu,
        mask,
        spks,
        jnp.zeros_like(mu),
        z * mask[..., None],
        precision=precision,
        valid_only=True,
    )
    return mel, mu


@functools.lru_cache(maxsize=None)
def _jitted_flow(cfg, precision: str):
    import jax

    return jax.jit(functools.partial(_flow_window, cfg=cfg, precision=precision))


# Window shapes compiled in this process: the flow's compiled executables by (config, unit
# bucket, frame bucket, precision), and the HiFT shapes (config, frames, precision) warmed up.
_FLOW_COMPILED: dict = {}
_HIFT_WARM: set = set()


def window_buckets(n_units: int, mel_len: int) -> tuple[int, int]:
    """The padded (units, frames) a window of `n_units` units and `mel_len` mel frames runs at:
    the batched flow's buckets (`flow.bucket` of `UNIT_BUCKET`, `FRAME_BUCKET`)."""
    from cslm_jax.speech.flow import FRAME_BUCKET, UNIT_BUCKET, bucket

    return bucket(n_units, UNIT_BUCKET), bucket(mel_len, FRAME_BUCKET)


def compiled_window_programs() -> int:
    """How many flow window programs streaming has compiled in this process (one per bucket of
    units and frames, and per config / precision)."""
    return len(_FLOW_COMPILED)


def _flow_program(cfg, units: int, frames: int, precision: str, args) -> tuple[object, float]:
    """The compiled flow window for the bucket of `units` padded units and `frames` padded mel
    frames (and the rows of `args`), and the seconds spent compiling it now (0 when compiled
    before)."""
    key = (cfg, units, frames, precision, args[1].shape[0])
    if key in _FLOW_COMPILED:
        return _FLOW_COMPILED[key], 0.0
    t0 = time.perf_counter()
    prog = _jitted_flow(cfg, precision).lower(*args).compile()
    _FLOW_COMPILED[key] = prog
    return prog, time.perf_counter() - t0


def _warm_hift(t2w, frames: int, precision: str) -> float:
    """Compile HiFT for `frames` mel frames (one call on zeros, with a source cache as streaming
    passes one) unless done before; the seconds it took."""
    from cslm_jax.speech.hift import vocode

    key = (t2w.hift_cfg, frames, precision)
    if key in _HIFT_WARM:
        return 0.0
    t0 = time.perf_counter()
    vocode(
        t2w.hift_params,
        t2w.hift_cfg,
        np.zeros((1, t2w.hift_cfg.in_channels, frames), np.float32),
        cache_source=np.zeros((1, 0), np.float32),
        precision=precision,
        return_source=True,
    )
    _HIFT_WARM.add(key)
    return time.perf_counter() - t0


class SpeechStream:
    """One answer's streamed speech (v1). `push(units)` for each closed speech chunk returns the
    audio ready now (float32 at `t2w.sample_rate`, possibly empty); `finish()` at the answer's
    end returns the rest. The concatenation of everything returned is the answer's audio.

    `voice`: a voice name, `.npy` file or x-vector (`token2wav.voice`); `noise`: "zero", a PRNG
    key or a callable (module docstring); `speech_rate`: the mean run length of merged units
    (>= 1). `windows` lists the (units, finalize) windows synthesised so far; `synthesis_s` the
    seconds spent synthesising, `compile_s` those spent compiling a window shape first seen
    (the flow compiled ahead of its call; HiFT warmed by one call on zeros, counted in), apart;
    `samples` the samples returned. The flow runs on the window padded to the batched flow's
    buckets of units and frames (`window_buckets`, masked as `flow.flow_batch` is: the same
    mel), so it compiles once per process for each new bucket, not each window length; HiFT
    runs on the mel padded to a multiple of `HIFT_BUCKET` frames with its length mask (the
    output of the unpadded mel), so once per bucket too."""

    def __init__(
        self,
        t2w,
        voice="random",
        noise="zero",
        speech_rate: float = 1.0,
        precision: str = "highest",
    ):
        from cslm_jax.speech import token2wav as t2w_mod

        if t2w.version != "v1":
            raise Token2WavError(
                f"streaming: token2wav version {t2w.version!r}; only v1's "
                f"streaming scheme is ported"
            )
        if not (np.isfinite(speech_rate) and speech_rate >= 1.0):
            raise Token2WavError(
                f"speech rate {speech_rate}: streaming needs a rate >= 1 (the "
                f"mean run length of merged units is at least 1)"
            )
        if isinstance(noise, str) and noise != "zero":
            raise Token2WavError(f"noise {noise!r}: give 'zero', a PRNG key or a callable")
        self.t2w = t2w
        self.emb = (
            t2w_mod.voice(t2w, voice)
            if isinstance(voice, (str, Path))
            else t2w_mod.voice(t2w, np.asarray(voice, np.float32))
        )
        self.noise = noise
        self.speech_rate = float(speech_rate)
        self.precision = precision
        self.overlap = int(t2w.flow_cfg.seam_frames)  # 34 mel frames
        self.cache_samples = MEL_CACHE_FRAMES * t2w.samples_per_frame
        self.mel_window = _hamming(2 * self.overlap)
        self.speech_window = _hamming(2 * self.cache_samples)
        self.pending: list[int] = []
        self.windows: list[tuple[list[int], bool]] = []
        self.synthesis_s = 0.0
        self.compile_s = 0.0
        self._compiling = 0.0
        self.samples = 0
        self.finished = False
        self._flow_cache = None  # (z [c, 80], mu [c, 80])
        self._mel_overlap = None  # [80, 34]
        self._hift_cache = None  # (mel [80, 20], source [5120], speech [5120])

    # -- the windowing policy ------------------------------------------------------------------

    @property
    def min_window_units(self) -> int:
        """The fewest units a window synthesised before the answer's end has (module
        docstring): 2 * 20 + 1."""
        return 2 * TOKEN_OVERLAP + 1

    def mel_frames(self, n_units: int) -> int:
        from cslm_jax.speech.token2wav import mel_frames

        return mel_frames(n_units, self.speech_rate, self.t2w.units_per_second)

    def push(self, units: Iterable[int]) -> np.ndarray:
        """A closed speech chunk's units: synthesises the pending window (the 20 units carried
        over plus these) unless it is too short (then they wait). Returns the audio ready."""
        t0 = time.perf_counter()
        return self._timed(self.push_job(units), t0)

    def finish(self) -> np.ndarray:
        """The answer's end: the units still pending (the 20 carried over and any short chunk's)
        as upstream's final window; returns the rest of the audio (empty if none)."""
        t0 = time.perf_counter()
        return self._timed(self.finish_job(), t0)

    def _timed(self, job, t0: float) -> np.ndarray:
        if job is None:
            return np.zeros((0,), np.float32)
        [(mel, mu)] = run_flows([job])
        out = self.complete(job, mel, mu)
        self.synthesis_s += time.perf_counter() - t0 - self._compiling
        return out

    def expected_samples(self) -> int:
        """Samples the windows synthesised so far give in all, once finished (module docstring)."""
        frames = [self.mel_frames(len(w)) for w, _ in self.windows]
        return (sum(frames) - self.overlap * max(0, len(frames) - 1)) * self.t2w.samples_per_frame

    # -- one call of upstream's token2wav --------------------------------------------------------

    def _noise(self, k: int, m: int, t: int):
        if isinstance(self.noise, str):
            return np.zeros((1, m, 80), np.float32), "zero"
        if callable(self.noise):
            d = self.noise(k, m, t)
            z = np.asarray(d["flow"], np.float32)
            if z.shape != (1, m, 80):
                raise Token2WavError(
                    f"noise callable: flow noise of shape {z.shape}, expected [1, {m}, 80]"
                )
            return z, d["hift"]
        import jax

        k_flow, k_hift = jax.random.split(jax.random.fold_in(self.noise, k))
        # with JAX's partitionable threefry (its default) a draw's elements depend on their flat
        # index only: drawn over the window's frame bucket, its first m frames are the draw of
        # m frames, and the draw compiles once per bucket, not per window length
        f = window_buckets(1, m)[1] if jax.config.jax_threefry_partitionable else m
        return np.asarray(jax.random.normal(k_flow, (1, f, 80), np.float32))[:, :m], k_hift

    def step(self, window, finalize: bool) -> np.ndarray:
        """Upstream's `token2wav(window, finalize=...)` with this answer's caches; returns the
        audio it releases. (`push` / `finish` choose the windows; a test may drive this
        directly with upstream's.)"""
        job = self.prepare(window, finalize)
        [(mel, mu)] = run_flows([job])
        return self.complete(job, mel, mu)

    def prepare(self, window, finalize: bool) -> "WindowJob":
        """The flow's inputs for the next window (its noise drawn, the flow cache put in): the
        first half of `step`; `run_flows` runs the flows of many jobs (of any streams) together,
        then `complete` finishes each."""
        from cslm_jax.speech.flow import check_lengths, check_units

        cfg = self.t2w.flow_cfg
        u = check_units(cfg, np.asarray(window, np.int64), "speech window")
        m = self.mel_frames(len(u))
        check_lengths(cfg, len(u), m)
        k = len(self.windows)
        self._compiling = 0.0
        self.windows.append((u.tolist(), bool(finalize)))
        c = 0 if self._flow_cache is None else len(self._flow_cache[0])
        if c > m:
            raise Token2WavError(
                f"streaming: a window of {len(u)} units gives {m} mel frames, "
                f"fewer than the {c} cached from the previous window"
            )
        hift_frames = (
            m
            + (0 if self._hift_cache is None else MEL_CACHE_FRAMES)
            - (0 if finalize else self.overlap)
        )
        z, hift_noise = self._noise(k, m, hift_frames)
        nu, nf = window_buckets(len(u), m)
        zp = np.zeros((nf, 80), np.float32)
        zp[:m] = z[0]
        mu_cache = np.zeros((nf, 80), np.float32)
        if c:
            zp[:c] = self._flow_cache[0]
            mu_cache[:c] = self._flow_cache[1]
        return WindowJob(self, u, m, c, bool(finalize), hift_noise, zp, mu_cache, nu, nf)

    def complete(self, job: "WindowJob", mel: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """The second half of `step`: the window's flow output `mel`, `mu` [F, 80] -> the caches
        for the next window, the mel cross-fade, HiFT with its cache; the audio released."""
        m = job.m
        self._flow_cache = (
            job.z[m - FLOW_CACHE_FRAMES : m].copy(),
            mu[m - FLOW_CACHE_FRAMES : m].copy(),
        )
        mel = mel[:m].T  # [80, M]
        if self._mel_overlap is not None:
            mel = cross_fade(mel, self._mel_overlap, self.mel_window)
        if self._hift_cache is not None:
            mel = np.concatenate([self._hift_cache[0], mel], 1)
        if not job.finalize:
            self._mel_overlap = mel[:, -self.overlap :]
            mel = mel[:, : -self.overlap]
        self._compiling += _warm_hift(self.t2w, hift_padded(mel.shape[1]), self.precision)
        self.compile_s += self._compiling
        speech, self._hift_cache = vocode_held(
            self.t2w,
            mel,
            self._hift_cache,
            MEL_CACHE_FRAMES,
            self.speech_window,
            job.hift_noise,
            job.finalize,
            self.precision,
        )
        self.samples += len(speech)
        return speech

    # -- windows of many answers at once (a server's sessions) ----------------------------------

    def push_job(self, units: Iterable[int]) -> "WindowJob | None":
        """`push` split for batching: the chunk's window as a job (None: too short, its units
        wait); run it with `run_flows` and `complete`."""
        from cslm_jax.speech.flow import check_units

        if self.finished:
            raise Token2WavError("streaming: push after finish (one SpeechStream per answer)")
        u = check_units(self.t2w.flow_cfg, np.asarray(list(units), np.int64), "speech chunk")
        self.pending += u.tolist()
        if len(self.pending) < self.min_window_units:
            return None
        window = self.pending
        self.pending = window[-TOKEN_OVERLAP:]
        return self.prepare(window, False)

    def finish_job(self) -> "WindowJob | None":
        """`finish` split for batching: the final window as a job (None: nothing pending)."""
        if self.finished:
            return None
        self.finished = True
        window, self.pending = self.pending, []
        return self.prepare(window, True) if window else None


@dataclasses.dataclass(eq=False)
class WindowJob:
    """One window's flow inputs (`SpeechStream.prepare`): its units `u`, `m` mel frames, `c`
    cached frames, the noise `z` [F, 80] (cache in) and `mu_cache` [F, 80] padded to the
    bucket (`nu` units, `nf` frames), HiFT's noise."""

    stream: SpeechStream
    u: np.ndarray
    m: int
    c: int
    finalize: bool
    hift_noise: object
    z: np.ndarray
    mu_cache: np.ndarray
    nu: int
    nf: int


ROW_BUCKETS = (1, 2, 4, 8, 16)


def run_flows(jobs: list[WindowJob]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The flow of every job, those of one (token2wav, precision, unit bucket, frame bucket)
    as rows of one call (rows padded to a power of two up to 16, so a few programs serve any
    number of answers): [(mel, mu) [F, 80] per job], each row as the window alone gives it
    (the masked batched flow). The compile time is charged to the first job of its group."""
    out: list = [None] * len(jobs)
    groups: dict = {}
    for i, j in enumerate(jobs):
        s = j.stream
        key = (id(s.t2w), s.precision, j.nu, j.nf)
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), ROW_BUCKETS[-1]):
            part = idx[start : start + ROW_BUCKETS[-1]]
            rows = next(r for r in ROW_BUCKETS if r >= len(part))
            first = jobs[part[0]]
            t2w, nu, nf = first.stream.t2w, first.nu, first.nf
            tok = np.zeros((rows, nu), np.int32)
            unit_len = np.zeros(rows, np.int32)
            mel_len = np.ones(rows, np.int32)  # filler rows: one frame (masked, dropped)
            cache_len = np.zeros(rows, np.int32)
            emb = np.zeros((rows, first.stream.emb.shape[0]), np.float32)
            z = np.zeros((rows, nf, 80), np.float32)
            mu_cache = np.zeros((rows, nf, 80), np.float32)
            unit_len[:] = 1
            for r, i in enumerate(part):
                j = jobs[i]
                tok[r, : len(j.u)] = j.u
                unit_len[r], mel_len[r], cache_len[r] = len(j.u), j.m, j.c
                emb[r], z[r], mu_cache[r] = j.stream.emb, j.z, j.mu_cache
            args = (t2w.flow_params, tok, unit_len, emb, z, mu_cache, cache_len, mel_len)
            fn, secs = _flow_program(t2w.flow_cfg, nu, nf, first.stream.precision, args)
            first.stream._compiling += secs
            mel, mu = fn(*args)
            mel, mu = np.asarray(mel), np.asarray(mu)
            for r, i in enumerate(part):
                out[i] = (mel[r], mu[r])
    return out


def speak(events: Iterable, stream: SpeechStream) -> Iterator[tuple[object, np.ndarray]]:
    """Decode events (`cslm_jax.infer.decode`: Transcript, TextChunk, SpeechChunk, End) -> (event,
    audio ready after it) pairs: a SpeechChunk pushes its units, End finishes the answer (so does
    the events' end without an End); other events give no audio. For a server: play each
    non-empty chunk as it comes."""
    from cslm_jax.infer.decode import End, SpeechChunk

    for ev in events:
        if isinstance(ev, SpeechChunk):
            yield ev, stream.push(ev.units)
        elif isinstance(ev, End):
            yield ev, stream.finish()
        else:
            yield ev, np.zeros((0,), np.float32)
    if not stream.finished:
        yield None, stream.finish()


def open_stream(
    t2w, voice="random", noise="zero", speech_rate: float = 1.0, precision: str = "highest"
):
    """One answer's stream for the token2wav folder's version, both with `push(units)` /
    `finish()`: v1 `SpeechStream`, v2 `causal_stream.CausalSpeechStream` (the causal flow on the
    growing prefix, as CosyVoice2Model.token2wav streams)."""
    if t2w.version == "v2":
        from cslm_jax.speech.causal_stream import CausalSpeechStream

        return CausalSpeechStream(t2w, voice, noise, speech_rate, precision)
    return SpeechStream(t2w, voice, noise, speech_rate, precision)


class SpeechOut:
    """`cslm-jax decode --speech-out DIR`: every answer synthesised while it is decoded, each
    speech chunk the moment it closes (`open_stream`), written to `DIR/<line>.wav` (4 digits,
    PCM 16-bit mono at the token2wav's rate; atomically, when the answer ends; an answer without
    speech gets an empty wav). `<line>` is the answer's line in responses.jsonl (0-based):
    `position` (set by `decode_unit_file`: the line of question 0's answer, after those of
    earlier runs in the folder) plus the question's index, so an --append run adds wavs beside
    the earlier answers' and a resumed run names its answers as the interrupted run did. `cslm_jax.infer.responses.decode_questions` calls `begin(index,
    t0)` when an answer's batch starts decoding (`t0`: its `time.perf_counter()`), `event(index,
    ev)` for each event as it completes; `timing(index)` gives the fields added to the answer's
    `timing`: `time_to_first_audio_s` (the first samples ready, from `t0`, as the other timings;
    None without speech), `speech_rtf` (synthesis seconds / audio seconds), `audio_s` and
    `speech_compile_s`. As decode's other timings, these leave compilation out: the seconds
    spent compiling a window shape first seen (by any answer of the batch since `t0`) are taken
    off the time to first audio and are not synthesis seconds (decode's own clock takes them off
    its timings too: `compile_total`); `speech_compile_s` says how many this answer's windows
    took.

    `open` checks the folder (`storage.outputs.check_output_place`, apart from the inputs), loads
    the token2wav folder and resolves the voice: bad ones fail before any model loads."""

    TOOL = "decode --speech-out"

    def __init__(self, out_dir, t2w, voice, speech_rate: float = 1.0, noise="zero"):
        self.out_dir, self.t2w, self.voice = Path(out_dir), t2w, voice
        self.speech_rate, self.noise = float(speech_rate), noise
        self.streams: dict[int, SpeechStream] = {}
        self.audio: dict[int, list] = {}
        self.t0: dict[int, float] = {}
        self.compile_total = 0.0  # seconds compiling, all streams of this run
        self.compile_base: dict[int, float] = {}
        self.first_audio: dict[int, float] = {}
        self.done: dict[int, dict] = {}
        self.position = 0  # responses.jsonl's line of question 0's answer

    @classmethod
    def open(cls, out_dir, token2wav, voice, speech_rate: float = 1.0, inputs=()):
        from cslm_jax.speech import token2wav as t2w_mod
        from cslm_jax.storage.outputs import (
            OutputPathError,
            check_output_place,
            foreign_entries,
            read_marker,
        )

        if not (np.isfinite(speech_rate) and speech_rate >= 1.0):
            raise Token2WavError(
                f"--speech-rate {speech_rate}: streaming needs a rate >= 1 (the "
                f"mean run length of merged units)"
            )
        if not Path(token2wav).is_dir():
            raise Token2WavError(
                f"--token2wav {token2wav}: no such folder (make one with cslm-jax import-token2wav)"
            )
        ins = list(inputs) + [("--token2wav", token2wav)]
        if str(voice).endswith(".npy"):
            ins.append(("--voice", voice))
        path = check_output_place(out_dir, inputs=ins, flag="--speech-out", inside_ok=True)
        if path.is_dir():  # never write over wavs another run or the user put there
            marker = read_marker(path)
            if marker is not None and marker.get("tool") != cls.TOOL:
                raise OutputPathError(
                    f"--speech-out {path}: written by {marker.get('tool')}, not by decode "
                    f"--speech-out; give an empty or new folder"
                )
            foreign = foreign_entries(path)
            if foreign:
                shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                raise OutputPathError(
                    f"--speech-out {path}: holds {shown}, which decode --speech-out did not "
                    f"write; give an empty or new folder (its wavs would be replaced)"
                )
        t2w = t2w_mod.load_token2wav(token2wav)
        vec = t2w_mod.voice(t2w, voice)
        open_stream(t2w, vec, speech_rate=speech_rate)  # the version and rate checked
        return cls(path, t2w, vec, speech_rate)

    def wav_name(self, index: int) -> str:
        """The wav of question `index`'s answer: named by its line in responses.jsonl."""
        return f"{self.position + index:04d}.wav"

    def begin(self, index: int, t0: float) -> None:
        self.t0[index] = t0
        self.compile_base[index] = self.compile_total
        self.streams[index] = open_stream(self.t2w, self.voice, self.noise, self.speech_rate)
        self.audio[index] = []

    def event(self, index: int, ev) -> None:
        from cslm_jax.infer.decode import End, SpeechChunk

        stream = self.streams.get(index)
        if stream is None or stream.finished:
            return
        before = stream.compile_s
        if isinstance(ev, SpeechChunk):
            audio = stream.push(ev.units)
        elif isinstance(ev, End):
            audio = stream.finish()
        else:
            return
        self.compile_total += stream.compile_s - before
        if len(audio) and index not in self.first_audio:
            self.first_audio[index] = (
                time.perf_counter()
                - self.t0[index]
                - (self.compile_total - self.compile_base[index])
            )
        self.audio[index].append(audio)
        if stream.finished:
            self._write(index)

    def _write(self, index: int) -> None:
        import io

        import soundfile as sf

        from cslm_jax.storage import fs
        from cslm_jax.storage.outputs import read_marker, write_marker

        stream = self.streams.pop(index)
        audio = np.concatenate(self.audio.pop(index) + [np.zeros((0,), np.float32)])
        buf = io.BytesIO()
        sf.write(buf, audio, self.t2w.sample_rate, subtype="PCM_16", format="WAV")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if read_marker(self.out_dir) is None:  # marked as this command's (open refused others)
            write_marker(self.out_dir, self.TOOL)
        with fs.atomic_open(self.out_dir / self.wav_name(index), "wb") as f:
            f.write(buf.getvalue())
        seconds = len(audio) / self.t2w.sample_rate
        self.done[index] = {
            "time_to_first_audio_s": self.first_audio.pop(index, None),
            "speech_rtf": stream.synthesis_s / seconds if seconds else None,
            "audio_s": seconds,
            "speech_compile_s": stream.compile_s,
        }

    def timing(self, index: int) -> dict:
        """The answer's speech timings (once its End went through `event`)."""
        return self.done.pop(
            index,
            {
                "time_to_first_audio_s": None,
                "speech_rtf": None,
                "audio_s": None,
                "speech_compile_s": None,
            },
        )


__all__ = [
    "SpeechStream",
    "SpeechOut",
    "speak",
    "open_stream",
    "window_buckets",
    "compiled_window_programs",
    "TOKEN_OVERLAP",
    "FLOW_CACHE_FRAMES",
    "MEL_CACHE_FRAMES",
]
