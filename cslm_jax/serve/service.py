"""What `cslm-jax serve` does for one spoken question, apart from HTTP: audio -> units (batched
over sessions), the prompt `decode` builds, an answer from the continuous-batching engine
(`cslm_jax.infer.engine`), its events, and its speech synthesised chunk by chunk.

`Service.answer` is an async generator of protocol messages (dicts, see `cslm_jax.serve.app`
for the protocol) each with the binary payload that follows it (PCM16 audio) or None; the
WebSocket route and `POST /v1/s2s` both drive it. Three worker threads serve all sessions:

* the engine (decoding: one step for every busy slot at a time);
* `UnitsWorker`: the questions' audio through the speech tokenizer, every waiting question in
  one call (`SpeechTokenizer.encode` on the list);
* `SynthWorker`: the sessions' speech windows (`speech.stream.open_stream`, one stream per
  answer, `noise="zero"`: the audio is `decode --speech-out`'s for the same units), every
  window waiting taken at once and the flows of one bucket run as rows of one call (v1;
  `speech.stream.run_flows`), HiFT per window. JAX releases the GIL while it computes, so
  synthesis overlaps with decoding.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import queue
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import numpy as np

from cslm_jax.data.audio import AudioError, array_audio
from cslm_jax.data.formats import load_data_config
from cslm_jax.errors import CslmError
from cslm_jax.infer.decode import (
    End,
    EventParser,
    Sampling,
    SpeechChunk,
    TextChunk,
    Transcript,
    default_stop_ids,
    load_for_decoding,
    start_state,
)
from cslm_jax.infer.engine import Engine, Request
from cslm_jax.infer.responses import pad_token_id, parse_unit_line, question_prompt
from cslm_jax.model.vocab import require_model_cslm_tokens
from cslm_jax.speech import token2wav as t2w_mod
from cslm_jax.speech.hift import Token2WavError
from cslm_jax.speech.stream import open_stream, run_flows
from cslm_jax.speech.tokenizer import load_speech_tokenizer

SAMPLE_RATE_IN = 16000  # the speech tokenizer's rate: questions are resampled to it
SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


class ProtocolError(CslmError):
    """A client's message is malformed, out of order or names bad input; the message says which
    field and why. The session gets an `error` event; the server carries on."""


@dataclasses.dataclass(frozen=True)
class Start:
    """The `start` message: question and answer languages, sampling, the audio's rate."""

    lang: str
    answer_lang: str
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.7
    seed: int = 0
    sample_rate: int = 16000

    @classmethod
    def parse(cls, msg: dict, languages) -> "Start":
        def field(name, kind, default):
            value = msg.get(name, default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ProtocolError(f"start: field {name!r} must be {kind.__name__}, got {value!r}")
            return value

        unknown = sorted(set(msg) - {f.name for f in dataclasses.fields(cls)} - {"type"})
        if unknown:
            raise ProtocolError(f"start: unknown field(s) {', '.join(map(repr, unknown))}")
        lang = field("lang", str, None)
        answer_lang = field("answer_lang", str, lang)
        for name, value in (("lang", lang), ("answer_lang", answer_lang)):
            if value not in languages:
                raise ProtocolError(
                    f"start: field {name!r}: {value!r} is not a language of the data config "
                    f"({', '.join(sorted(languages))})"
                )
        start = cls(
            lang,
            answer_lang,
            field("greedy", bool, False),
            field("temperature", float, 1.0),
            field("top_p", float, 0.7),
            field("seed", int, 0),
            field("sample_rate", int, 16000),
        )
        if start.sample_rate not in SAMPLE_RATES:
            raise ProtocolError(
                f"start: field 'sample_rate': {start.sample_rate} Hz is not supported "
                f"({', '.join(map(str, SAMPLE_RATES))})"
            )
        if not start.greedy and not (
            math.isfinite(start.temperature) and start.temperature > 0 and 0 < start.top_p <= 1
        ):
            raise ProtocolError(
                f"start: sampling needs temperature > 0 and 0 < top_p <= 1, got "
                f"{start.temperature}, {start.top_p}"
            )
        return start

    @property
    def sampling(self) -> Sampling:
        return Sampling(
            greedy=self.greedy, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )


def pcm16(audio: np.ndarray) -> bytes:
    """float32 samples in [-1, 1] -> little-endian PCM16 bytes (as a PCM_16 wav stores them)."""
    return np.clip(np.rint(np.asarray(audio) * 32767.0), -32768, 32767).astype("<i2").tobytes()


class _Worker:
    """A daemon thread running submitted jobs; a job's exception goes to its future."""

    def __init__(self, name: str):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.handle(job)

    def handle(self, job):  # pragma: no cover - overridden
        raise NotImplementedError

    def drain(self, first, limit: int | None = None) -> list:
        """`first` and every job waiting now (at most `limit` in all): one batch."""
        batch = [first]
        while limit is None or len(batch) < limit:
            try:
                more = self.jobs.get_nowait()
            except queue.Empty:
                break
            if more is None:  # closing: leave the sentinel for the loop
                self.jobs.put(None)
                break
            batch.append(more)
        return batch

    def close(self):
        self.jobs.put(None)


class UnitsWorker(_Worker):
    """Questions' 16 kHz audio -> raw units; every question waiting is encoded in one call."""

    def __init__(self, tokenizer, max_batch: int = 16):
        self.tokenizer, self.max_batch = tokenizer, max_batch
        self.calls = self.waves = 0
        super().__init__("cslm-units")

    def submit(self, wave: np.ndarray) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self.jobs.put((wave, fut))
        return fut

    def handle(self, job):
        batch = self.drain(job, self.max_batch)
        try:
            codes = self.tokenizer.encode([w for w, _ in batch])
        except Exception as e:
            for _, fut in batch:
                fut.set_exception(e)
            return
        self.calls += 1
        self.waves += len(batch)
        for (_, fut), c in zip(batch, codes):
            fut.set_result([int(u) for u in np.asarray(c)])


class SynthWorker(_Worker):
    """Speech windows of all sessions: job (stream, units | None for the answer's end, done,
    alive). Every waiting job is taken at once; v1 streams' windows run their flows as rows of
    one call per bucket (`speech.stream.run_flows`), one window per stream per round (a
    stream's next window needs the previous one's caches); other streams (v2) one at a time.
    done(audio, error) gets each outcome; a job whose session has gone is skipped."""

    def __init__(self, name: str):
        self.rounds = self.windows = 0
        super().__init__(name)

    def submit(self, stream, units, done, alive=lambda: True):
        self.jobs.put((stream, units, done, alive))

    def handle(self, job):
        waiting = self.drain(job)
        while waiting:
            now, later, seen = [], [], set()
            for item in waiting:
                (later if id(item[0]) in seen else now).append(item)
                seen.add(id(item[0]))
            self._round([item for item in now if item[3]()])
            waiting = later

    def _round(self, items) -> None:
        batched = []
        for stream, units, done, _ in items:
            try:
                if hasattr(stream, "push_job"):
                    job = stream.push_job(units) if units is not None else stream.finish_job()
                    if job is None:
                        done(np.zeros((0,), np.float32), None)
                    else:
                        batched.append((job, done))
                else:
                    done(stream.push(units) if units is not None else stream.finish(), None)
            except Exception as e:
                done(None, e)
        if not batched:
            return
        self.rounds += 1
        self.windows += len(batched)
        try:
            flows = run_flows([job for job, _ in batched])
        except Exception as e:
            for _, done in batched:
                done(None, e)
            return
        for (job, done), (mel, mu) in zip(batched, flows):
            try:
                done(job.stream.complete(job, mel, mu), None)
            except Exception as e:
                done(None, e)


@dataclasses.dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    buckets: tuple = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
    counts: list = dataclasses.field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        counts = self.counts or [0] * len(self.buckets)
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, counts)]
        return out + [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.n}",
        ]


class Service:
    """The model, the workers and the counters behind `cslm-jax serve` (module docstring).

    t2w / voice: a loaded token2wav and a voice vector (None: answers without audio);
    speech_tokenizer: a `SpeechTokenizer` (None: questions must come as units)."""

    def __init__(
        self,
        cfg,
        params,
        tokenizer,
        vocab,
        data_format,
        *,
        speech_tokenizer=None,
        t2w=None,
        voice=None,
        speech_rate: float = 1.0,
        slots: int = 8,
        max_length: int = 4096,
        max_new_tokens: int = 2048,
        max_queue: int = 64,
        max_seconds: float = 60.0,
        model_name: str = "",
        log: Callable[[str], None] = lambda _: None,
    ):
        self.cfg, self.tok, self.vocab, self.fmt = cfg, tokenizer, vocab, data_format
        self.t2w, self.voice, self.speech_rate = t2w, voice, speech_rate
        self.max_new_tokens, self.max_seconds = max_new_tokens, max_seconds
        self.model_name, self.log = model_name, log
        self.stop_ids = default_stop_ids(tokenizer, vocab)
        self.engine = Engine(
            cfg,
            params,
            slots=slots,
            max_length=max_length,
            stop_ids=self.stop_ids,
            pad_id=pad_token_id(tokenizer, cfg),
            vocab=vocab,
            max_queue=max_queue,
            log=log,
        )
        self.units = UnitsWorker(speech_tokenizer) if speech_tokenizer is not None else None
        self.synth = SynthWorker("cslm-synth") if t2w is not None else None
        self.draining = False
        self.sessions = 0  # questions in flight: from their start to their answer's end
        self.counters: dict[str, int] = {}
        self.hist = {
            "first_token_seconds": Histogram(),
            "first_audio_seconds": Histogram(),
            "answer_seconds": Histogram(),
        }

    @contextlib.contextmanager
    def turn(self):
        """A question in flight, from its start message to its answer's end (a SIGTERM drain
        waits for these)."""
        self.sessions += 1
        try:
            yield
        finally:
            self.sessions -= 1

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def start(self) -> "Service":
        self.engine.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        self.engine.stop(drain=False, timeout=timeout)
        for w in (self.units, self.synth):
            if w is not None:
                w.close()

    # -- the question --

    def question_units(self, text: str) -> list[int]:
        """A `units` message's "<12><907>..." -> unit numbers, checked against the codebook."""
        if not isinstance(text, str):
            raise ProtocolError("units: field 'units' must be a string like <12><907>")
        try:
            units = parse_unit_line(text, "units: field 'units'")
        except CslmError as e:
            raise ProtocolError(str(e)) from None
        bad = [u for u in units if not 0 <= u < self.vocab.unit_count]
        if bad:
            raise ProtocolError(
                f"units: field 'units': unit {bad[0]} is outside the model's codebook "
                f"(0..{self.vocab.unit_count - 1})"
            )
        return units

    def check_audio(self, n_bytes: int, rate: int) -> None:
        """Raise once the question's audio so far is longer than `max_seconds`."""
        seconds = n_bytes / 2 / rate
        if seconds > self.max_seconds:
            raise ProtocolError(
                f"audio: longer than --max-seconds {self.max_seconds:g} s "
                f"({seconds:.1f} s received at {rate} Hz)"
            )

    async def audio_units(self, pcm: bytes, rate: int) -> list[int]:
        """PCM16 mono at `rate` -> units, resampled as `extract-units` reads a wav."""
        if self.units is None:
            raise ProtocolError(
                "audio: this server has no speech tokenizer (serve --speech-tokenizer); send "
                'the question as {"type": "units", ...}'
            )
        if not pcm:
            raise ProtocolError("audio: empty (no samples before end_of_audio)")
        if len(pcm) % 2:
            raise ProtocolError(f"audio: {len(pcm)} bytes: PCM16 frames hold 2 bytes a sample")
        self.check_audio(len(pcm), rate)
        try:
            wave = array_audio(np.frombuffer(pcm, "<i2"), rate, "audio", SAMPLE_RATE_IN)
        except AudioError as e:
            raise ProtocolError(str(e)) from None
        return await asyncio.wrap_future(self.units.submit(wave))

    def prompt_ids(self, units: list[int], start: Start) -> list[int]:
        """The prompt `cslm-jax decode --lang answer_lang [--cross-lingual]` builds (training
        style): the answer language's s2s prompt, its cross-lingual one when the question's
        language differs; units merged as the data config says."""
        spec = self.fmt.languages[start.answer_lang]
        template = spec.s2s_prompt if start.answer_lang == start.lang else spec.s2s_cross_prompt
        return question_prompt(self.tok, self.fmt, template, units, "serve")

    # -- the answer --

    async def answer(
        self, start: Start, units: list[int], t0: float
    ) -> AsyncIterator[tuple[dict, bytes | None]]:
        """Decode and speak one question's answer; messages as they happen (module docstring).
        t0: when the question was complete (time.perf_counter), the timings' origin. Raises
        `engine.QueueFull` before anything is yielded when the queue is full. Closing the
        generator early (a client gone) cancels the answer and its pending speech."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def post(*item):
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        prompt = self.prompt_ids(units, start)
        req = Request(
            prompt,
            self.max_new_tokens,
            start.sampling,
            on_token=lambda t: post("tok", t),
            on_done=lambda r: post("done", r),
        )
        position = self.engine.submit(req)
        alive = [True]
        stream = None
        if self.t2w is not None:
            stream = open_stream(self.t2w, self.voice, "zero", self.speech_rate)
        parser = EventParser(self.tok, self.vocab, self.stop_ids, start_state(prompt, self.vocab))
        timing = dict(first_token_s=None, first_text_s=None, first_audio_s=None)
        audio_samples, pending, finish, finished_decoding = 0, 0, None, False
        last_speech = -1

        def speak(units, index):
            """The chunk's units (None: the answer's end) to the synthesis worker."""
            nonlocal pending
            pending += 1
            self.synth.submit(
                stream,
                units,
                lambda out, err, i=index: post("audio", i, out, err),
                lambda: alive[0],
            )

        try:
            if position > 0:  # requests ahead of it wait for a slot too
                yield {"type": "queued", "position": position}, None
            while not (finished_decoding and pending == 0):
                item = await inbox.get()
                events = []
                if item[0] == "tok":
                    if timing["first_token_s"] is None:
                        timing["first_token_s"] = time.perf_counter() - t0
                    if parser.state != "ended":
                        events = parser.feed(item[1])
                elif item[0] == "done":
                    if item[1].startswith("error"):
                        raise ProtocolError(f"decoding failed: {item[1][7:]}")
                    events = parser.close()
                    finished_decoding = True
                else:  # audio
                    _, index, out, err = item
                    pending -= 1
                    if err is not None:
                        raise ProtocolError(f"speech synthesis failed: {err}")
                    if len(out):
                        if timing["first_audio_s"] is None:
                            timing["first_audio_s"] = time.perf_counter() - t0
                        audio_samples += len(out)
                        yield (
                            {
                                "type": "audio",
                                "index": index,
                                "sample_rate": self.t2w.sample_rate,
                                "samples": len(out),
                            },
                            pcm16(out),
                        )
                for ev in events:
                    if isinstance(ev, Transcript):
                        yield {"type": "transcript", "text": ev.text}, None
                    elif isinstance(ev, TextChunk):
                        if timing["first_text_s"] is None:
                            timing["first_text_s"] = time.perf_counter() - t0
                        yield {"type": "text", "index": ev.index, "text": ev.text}, None
                    elif isinstance(ev, SpeechChunk):
                        last_speech = ev.index
                        if stream is not None:
                            speak(ev.units, ev.index)
                    elif isinstance(ev, End):
                        finish = ev.reason
                        if stream is not None:
                            speak(None, max(last_speech, 0))
            total = time.perf_counter() - t0
            audio_s = audio_samples / self.t2w.sample_rate if self.t2w is not None else 0.0
            timing.update(total_s=total, rtf=total / audio_s if audio_s else None)
            self.count(f'answers_total{{finish="{finish}"}}')
            self.hist["answer_seconds"].observe(total)
            for name in ("first_token", "first_audio"):
                if timing[f"{name}_s"] is not None:
                    self.hist[f"{name}_seconds"].observe(timing[f"{name}_s"])
            yield {"type": "end", "finish": finish, "timing": timing}, None
        finally:
            alive[0] = False
            if not req.done:
                self.engine.cancel(req)
                self.count("answers_abandoned_total")


def load_service(
    *,
    model: str | Path,
    data_config: str | Path,
    speech_tokenizer: str | Path | None = None,
    token2wav: str | Path | None = None,
    voice: str | None = None,
    speech_rate: float | None = None,
    compute_dtype: str | None = None,
    tensor: int | None = None,
    log: Callable[[str], None] = print,
    **engine_kw,
) -> Service:
    """The service of `cslm-jax serve` from folders (every argument checked before the model
    loads): a model checkpoint, train run's model or HF folder; the data config (prompts,
    merging, speech rate); optional speech tokenizer and token2wav folders; `tensor` N splits
    the weights and the slots' cache over N devices (`load_for_decoding(tensor=)`)."""
    fmt = load_data_config(data_config, check_files=False).format
    require_model_cslm_tokens(Path(model))
    if (token2wav is None) != (voice is None):
        raise Token2WavError("--token2wav and --voice go together (speech out needs both)")
    t2w = vec = None
    rate = 1.0
    if token2wav is not None:
        if not Path(token2wav).is_dir():
            raise Token2WavError(f"--token2wav {token2wav}: no such folder")
        rate, why = t2w_mod.configured_rate(speech_rate, data_config)
        t2w = t2w_mod.load_token2wav(token2wav)
        vec = t2w_mod.voice(t2w, voice)
        log(
            f"serve: speech out with {token2wav} ({t2w.version}), voice {voice}, rate {rate:g} "
            f"({why})"
        )
    stok = None
    if speech_tokenizer is not None:
        stok = load_speech_tokenizer(speech_tokenizer)
    cfg, params, tok, vocab = load_for_decoding(
        model, compute_dtype=compute_dtype, log=log, tensor=tensor
    )
    if not vocab.unit_count or "<sosp>" not in vocab.control_tokens:
        raise ProtocolError(f"{model}: a text-only model (no speech units); serve a CSLM model")
    if stok is not None and stok.codebook_size != vocab.unit_count:
        raise ProtocolError(
            f"--speech-tokenizer {speech_tokenizer}: {stok.codebook_size} codes, the model "
            f"{model} has {vocab.unit_count} units"
        )
    if t2w is not None and vocab.unit_count > t2w.flow_cfg.vocab_size:
        raise Token2WavError(
            f"--token2wav {token2wav}: its flow knows {t2w.flow_cfg.vocab_size} units, the "
            f"model {model} answers with {vocab.unit_count}"
        )
    return Service(
        cfg,
        params,
        tok,
        vocab,
        fmt,
        speech_tokenizer=stok,
        t2w=t2w,
        voice=vec,
        speech_rate=rate,
        model_name=str(model),
        log=log,
        **engine_kw,
    )
