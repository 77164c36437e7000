"""`SpeechTokenizer`: 16 kHz waveforms -> S3 speech unit codes, batched, jitted, optionally
data-parallel over a mesh. See `cslm_jax.speech` for the public API."""

from __future__ import annotations

import functools

import numpy as np

from cslm_jax.speech import mel as melmod
from cslm_jax.speech.s3 import (
    PRECISIONS,
    WINDOW_FRAMES,
    S3Config,
    SpeechTokenizerError,
    check_params,
    code_lengths,
    encode_mel,
    encoder,
    merge_windows,
    window_starts,
)

LONG_AUDIO_MODES = ("window", "window_package", "refuse")
# Samples that give exactly WINDOW_FRAMES mel frames at most: a batch of utterances all <= 30 s
# never needs more of its padded waveform than this.
_SHORT_MAX_SAMPLES = (WINDOW_FRAMES + 1) * melmod.HOP - 1
PACK_MULTIPLE = 256  # packed rows are rounded up to this (one compiled shape per size)
PACK_GAIN = 0.15  # pack a batch's frames when that cuts the dense rows by this much


def extraction_step(
    cfg: S3Config, precision: str = "highest", unroll: bool = False, packed: int = 0
):
    """The step `encode` (and so `cslm-jax extract-units`) compiles for a batch of utterances
    <= 30 s: `(params, wave [B, N] float32, lengths [B] int32) -> (codes [B, T'] int32,
    code_len [B])`, log-mel front end + encoder + quantizer. `cslm-jax compile --speech-tokenizer`
    compiles the same function for a TPU (`cslm_jax.tpu.extraction.compile_extraction_step`)."""

    def step(params, wave, lengths):
        mel, mel_len = melmod.log_mel(wave, lengths, cfg.n_mels)
        return encode_mel(params, cfg, mel, mel_len, precision, unroll, packed)

    return step


def jit_step(fn, mesh=None, batch_axis=None, n_batched_in: int = 2, n_out: int = 2):
    """`jax.jit(fn)`; with a mesh, weights (the first argument) replicated and the batch axis of
    the other arguments and of the outputs sharded over `batch_axis` (default: all mesh axes).
    With a mesh, numpy batch arguments are put on that sharding before the call: in a
    multi-process job `jax.jit` refuses host arrays with a non-trivial sharding, even on a mesh of
    this process's own devices (each host runs its own batches). `.lower` is the jitted one's."""
    import jax

    if mesh is None:
        return jax.jit(fn)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    axis = batch_axis if batch_axis is not None else tuple(mesh.axis_names)
    batch, replicated = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())
    return _PlacedStep(
        jax.jit(
            fn, in_shardings=(replicated,) + (batch,) * n_batched_in, out_shardings=(batch,) * n_out
        ),
        batch,
    )


class _PlacedStep:
    """A jitted step on a mesh whose host (numpy) batch arguments are placed first."""

    def __init__(self, jitted, sharding):
        self.jitted, self.sharding = jitted, sharding

    def __call__(self, params, *arrays):
        import jax

        return self.jitted(
            params,
            *(jax.device_put(a, self.sharding) if isinstance(a, np.ndarray) else a for a in arrays),
        )

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)


class SpeechTokenizer:
    """One S3 tokenizer: config, parameters (a pytree of arrays) and its compiled steps.

    Attributes: `version` ("v1", "v1_25hz", "v2_25hz"), `name` (the official model name),
    `codebook_size` (4096 or 6561), `units_per_second` (50 or 25), `sample_rate` (16000),
    `config` (`S3Config`), `params`, `precision` (matmul precision: "highest" matches the
    package's float32 on any backend; "default" is faster on TPU, at the cost of more codes that
    differ where two codewords nearly tie; "bfloat16" computes what a TPU's "default" does on
    any backend), `mesh`/`batch_axis` (None: one device).
    """

    sample_rate = melmod.SAMPLE_RATE
    min_samples = melmod.MIN_SAMPLES

    def __init__(
        self,
        config: S3Config,
        params: dict,
        *,
        precision: str = "highest",
        mesh=None,
        batch_axis: str | tuple | None = None,
    ):
        import jax

        check_params(config, params)
        if precision not in PRECISIONS:
            raise SpeechTokenizerError(
                f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        self.config = config
        self.version = config.version
        self.name = config.spec.name
        self.codebook_size = config.codebook_size
        self.units_per_second = config.units_per_second
        self.precision = precision
        self.mesh = mesh
        if mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            axis = batch_axis if batch_axis is not None else tuple(mesh.axis_names)
            self.batch_axis = axis
            self._batch_sharding = NamedSharding(mesh, P(axis))
            self._replicated = NamedSharding(mesh, P())
            self._rows_multiple = int(
                np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))])
            )
            self.params = jax.device_put(params, self._replicated)
        else:
            self.batch_axis = None
            self._batch_sharding = self._replicated = None
            self._rows_multiple = 1
            self.params = jax.device_put(params)

    # -- compiled steps (jax.jit caches one executable per input shape) --------------------------

    @functools.cached_property
    def _wave_step(self):
        """wave [B, N], lengths [B] -> codes [B, T'], code_len [B] (mel + encoder + quantizer)."""
        return self._jit(extraction_step(self.config, self.precision), 2, 2)

    @functools.cached_property
    def _mel_step(self):
        """mel [B, T, M], mel_len [B] -> codes, code_len (for windows of long audio)."""
        cfg, prec = self.config, self.precision
        return self._jit(
            lambda params, mel, mel_len: encode_mel(params, cfg, mel, mel_len, prec), 2, 2
        )

    @functools.cached_property
    def _hidden_step(self):
        cfg, prec = self.config, self.precision
        return self._jit(
            lambda params, mel, mel_len: encoder(params, cfg, mel, mel_len, prec), 2, 2
        )

    def _jit(self, fn, n_batched_in, n_out):
        return jit_step(fn, self.mesh, self.batch_axis, n_batched_in, n_out)

    # -- inputs --------------------------------------------------------------------------------

    def _batch(self, waves, lengths, pad_multiple: int) -> tuple[np.ndarray, np.ndarray]:
        if lengths is None:
            if isinstance(waves, np.ndarray) and waves.ndim == 2:
                raise SpeechTokenizerError("a padded [B, N] waveform array needs `lengths`")
            waves = [np.asarray(w, np.float32) for w in waves]
            for i, w in enumerate(waves):
                if w.ndim != 1:
                    raise SpeechTokenizerError(
                        f"utterance {i}: waveform of shape {w.shape}, expected 1-D mono samples"
                    )
            lengths = np.array([len(w) for w in waves], np.int64)
            n = int(lengths.max()) if len(waves) else 0
            n = -(-max(n, 1) // pad_multiple) * pad_multiple
            batch = np.zeros((len(waves), n), np.float32)
            for i, w in enumerate(waves):
                batch[i, : len(w)] = w
        else:
            batch = np.asarray(waves, np.float32)
            lengths = np.asarray(lengths, np.int64)
            if batch.ndim != 2 or lengths.shape != (batch.shape[0],):
                raise SpeechTokenizerError(
                    f"waveforms of shape {batch.shape} with lengths of "
                    f"shape {lengths.shape}; expected [B, N] and [B]"
                )
            if (lengths > batch.shape[1]).any():
                i = int(np.argmax(lengths > batch.shape[1]))
                raise SpeechTokenizerError(
                    f"utterance {i}: length {lengths[i]} exceeds the padded width {batch.shape[1]}"
                )
        for i, n in enumerate(lengths):
            if n < melmod.MIN_SAMPLES:
                raise SpeechTokenizerError(
                    f"utterance {i}: {n} samples; the S3 front end needs at least "
                    f"{melmod.MIN_SAMPLES} ({melmod.MIN_SAMPLES / self.sample_rate * 1000:.1f} ms)"
                )
            if not np.isfinite(batch[i, :n]).all():
                raise SpeechTokenizerError(f"utterance {i}: non-finite samples (NaN or inf)")
        return batch, lengths

    def _pad_rows(self, *arrays, rows: int | None = None, fill_len: int = 0):
        """Pad the leading axis to a multiple of the mesh's batch size (or to `rows`); padded rows
        have length `fill_len` in the last array (the lengths)."""
        b = arrays[0].shape[0]
        target = rows if rows is not None else -(-b // self._rows_multiple) * self._rows_multiple
        if target == b:
            return arrays
        out = []
        for a in arrays[:-1]:
            out.append(np.concatenate([a, np.zeros((target - b,) + a.shape[1:], a.dtype)]))
        out.append(np.concatenate([arrays[-1], np.full(target - b, fill_len, arrays[-1].dtype)]))
        return tuple(out)

    # -- public ----------------------------------------------------------------------------------

    def log_mel(self, waves, lengths=None, *, pad_multiple: int = 16000):
        """(mel [B, T, n_mels] np.float32, mel_len [B]) as the package's front end computes it."""
        batch, lengths = self._batch(waves, lengths, pad_multiple)
        mel, mel_len = melmod.log_mel_jit(batch, lengths.astype(np.int32), self.config.n_mels)
        return np.asarray(mel), np.asarray(mel_len)

    def hidden(self, mel, mel_len):
        """Encoder output (hidden [B, T', D], code_len [B]) for mels of <= 3000 frames."""
        mel, mel_len = np.asarray(mel, np.float32), np.asarray(mel_len, np.int32)
        b = mel.shape[0]
        mel, mel_len = self._pad_rows(mel, mel_len, fill_len=1)
        h, n = self._hidden_step(self.params, mel, mel_len)
        return np.asarray(h)[:b], np.asarray(n)[:b]

    def encode(
        self,
        waves,
        lengths=None,
        *,
        long_audio: str = "window",
        pad_multiple: int = 16000,
        pack: bool | None = None,
    ) -> list[np.ndarray]:
        """Codes of each utterance: `waves` is a padded `[B, N]` float32 array with `lengths[B]`
        (samples), or a list of 1-D arrays (padded here to a multiple of `pad_multiple` samples).
        16 kHz mono float32 in [-1, 1]. Returns B int32 arrays of raw codes (`units_per_second`
        per second, before any repeat merging), of lengths `code_lengths(N // 160)`.

        Utterances over 30 s (3000 mel frames): `long_audio="window"` encodes 30 s windows every
        26 s of the utterance's log-mel and stitches them as the package does, keeping the tail
        where the package's last window would be <= 4 s (see `s3.window_starts`);
        `"window_package"` reproduces the package exactly; `"refuse"` raises SpeechTokenizerError
        naming the utterance. Compiles once per padded shape (and once for the [B, 3000] window
        batch if there are long utterances).

        `pack` (default: True for a list of waveforms on CPU devices; False for a padded array,
        whose caller chose the padding, and on accelerators, where each packed size would be
        one more slow compile; extract-units asks for it on CPUs): for a batch of utterances
        <= 30 s of mixed lengths, the encoder's projections, MLP and quantizer run on the valid
        frames only, packed into rows (`s3.encoder(packed=...)`), where that cuts those rows by
        `PACK_GAIN` or more; attention and the convs keep the padded layout. On a mesh each
        device packs the frames of its own share of the batch (packed rows never cross a
        shard). The same codes; one compiled shape per packed size (a multiple of
        `PACK_MULTIPLE` frames per device).
        """
        if long_audio not in LONG_AUDIO_MODES:
            raise SpeechTokenizerError(
                f"long_audio {long_audio!r}: choose one of {', '.join(LONG_AUDIO_MODES)}"
            )
        list_input = lengths is None
        batch, lengths = self._batch(waves, lengths, pad_multiple)
        b = batch.shape[0]
        if b == 0:
            return []
        mel_len = lengths // melmod.HOP
        long = mel_len > WINDOW_FRAMES
        if long.any() and long_audio == "refuse":
            i = int(np.argmax(long))
            raise SpeechTokenizerError(
                f"utterance {i}: {lengths[i] / self.sample_rate:.2f} s, over "
                f"the tokenizer's 30 s window (long audio refused)"
            )
        if not long.any():
            wave = batch[:, : min(batch.shape[1], _SHORT_MAX_SAMPLES)]
            wave, lens = self._pad_rows(wave, lengths.astype(np.int32), fill_len=melmod.MIN_SAMPLES)
            if pack is None:
                pack = list_input and self.on_cpu
            packed = self._packed_rows(lens, wave.shape[1]) if pack else 0
            step = self._packed_step(packed) if packed else self._wave_step
            codes, code_len = step(self.params, wave, lens)
            codes, code_len = np.asarray(codes), np.asarray(code_len)
            return [codes[i, : code_len[i]].copy() for i in range(b)]
        return self._encode_long(batch, lengths, long_audio)

    def _packed_rows(self, lengths, width: int) -> int:
        """Rows of the packed layout of each device's share of this batch (the most valid
        encoder frames of a share, rounded up to `PACK_MULTIPLE`), or 0 where packing does not
        pay (under `PACK_GAIN` fewer rows than the share's padded layout). `lengths` holds a
        multiple of the mesh's batch size; device i's share is the i-th contiguous block of
        rows, as the batch sharding splits it."""
        stride = self.config.stride
        m = self._rows_multiple
        frames = code_lengths(np.asarray(lengths) // melmod.HOP, stride).reshape(m, -1)
        valid = int(frames.sum(1).max())
        padded = frames.shape[1] * int(code_lengths(width // melmod.HOP, stride))
        rows = -(-max(valid, 1) // PACK_MULTIPLE) * PACK_MULTIPLE
        return rows if rows <= (1 - PACK_GAIN) * padded else 0

    @functools.cached_property
    def on_cpu(self) -> bool:
        """Whether the weights live on CPU devices only (where packing pays)."""
        import jax

        leaf = jax.tree.leaves(self.params)[0]
        return all(d.platform == "cpu" for d in leaf.devices())

    def _packed_step(self, rows: int):
        steps = self.__dict__.setdefault("_packed_steps", {})
        if rows not in steps:
            fn = extraction_step(self.config, self.precision, packed=rows)
            if self.mesh is not None:  # each device packs its own rows: none crosses a shard
                import jax
                from jax.sharding import PartitionSpec as P

                share = P(self.batch_axis)
                fn = jax.shard_map(
                    fn, mesh=self.mesh, in_specs=(P(), share, share), out_specs=(share, share)
                )
            steps[rows] = self._jit(fn, 2, 2)
        return steps[rows]

    def _encode_long(self, batch, lengths, mode) -> list[np.ndarray]:
        mel, mel_len = self.log_mel(batch, lengths)
        rows, owners = [], []  # (start, end) of each window row, utterance index
        for i in range(len(lengths)):
            spans = (
                window_starts(int(mel_len[i]), mode)
                if mel_len[i] > WINDOW_FRAMES
                else [(0, int(mel_len[i]))]
            )
            for s, e in spans:
                rows.append((i, s, e))
            owners.append(len(spans))
        b = max(batch.shape[0], self._rows_multiple)
        b = -(-b // self._rows_multiple) * self._rows_multiple
        seg_codes = []
        for c in range(0, len(rows), b):
            chunk = rows[c : c + b]
            m = np.zeros((len(chunk), WINDOW_FRAMES, mel.shape[2]), np.float32)
            ml = np.zeros(len(chunk), np.int32)
            for j, (i, s, e) in enumerate(chunk):
                m[j, : e - s] = mel[i, s:e]
                ml[j] = e - s
            m, ml = self._pad_rows(m, ml, rows=b, fill_len=1)
            codes, code_len = self._mel_step(self.params, m, ml)
            codes, code_len = np.asarray(codes), np.asarray(code_len)
            seg_codes += [codes[j, : code_len[j]].copy() for j in range(len(chunk))]
        out, k = [], 0
        for i, n in enumerate(owners):
            segs = seg_codes[k : k + n]
            k += n
            out.append(
                segs[0].astype(np.int32)
                if mel_len[i] <= WINDOW_FRAMES
                else merge_windows(segs, self.units_per_second)
            )
        return out

    def code_lengths(self, n_samples):
        """Codes of utterances of `n_samples` samples (<= 30 s; longer ones are windowed)."""
        return code_lengths(np.asarray(n_samples) // melmod.HOP, self.config.stride)


def load_speech_tokenizer(
    path, *, precision: str = "highest", mesh=None, batch_axis=None
) -> SpeechTokenizer:
    """The tokenizer of a folder written by `cslm-jax import-speech-tokenizer` (or
    `save_random_tokenizer`)."""
    from cslm_jax.speech.weights import load_tokenizer_files

    cfg, params = load_tokenizer_files(path)
    return SpeechTokenizer(cfg, params, precision=precision, mesh=mesh, batch_axis=batch_axis)


def random_speech_tokenizer(version: str = "v1", seed: int = 0, **kwargs) -> SpeechTokenizer:
    """A random-weight tokenizer in memory (tests); `kwargs` go to `s3.init_random` (sizes) except
    precision / mesh / batch_axis."""
    from cslm_jax.speech.s3 import init_random

    opts = {k: kwargs.pop(k) for k in ("precision", "mesh", "batch_axis") if k in kwargs}
    cfg, params = init_random(version, seed, **kwargs)
    return SpeechTokenizer(cfg, params, **opts)
