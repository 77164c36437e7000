"""`cslm-jax serve`: HTTP and WebSocket routes (FastAPI on uvicorn) around `service.Service`.

Protocol (clients are written against these names):

WebSocket `/v1/s2s`, one question per turn, several turns per connection:
  client: `{"type": "start", "lang": "en", "answer_lang": "zh", "greedy": false,
  "temperature": 1.0, "top_p": 0.7, "seed": 0, "sample_rate": 44100}` (answer_lang defaults to
  lang; a different one uses that language's cross-lingual prompt), then either the question
  as binary PCM16 mono frames at sample_rate closed by `{"type": "end_of_audio"}`, or
  `{"type": "units", "units": "<12><907>..."}`.
  server, in order: `{"type": "queued", "position": n}` while every slot is busy;
  `{"type": "question", "units": "<12>...", "seconds": s}` (the units the answer is to: from
  the audio, or as sent); `{"type": "transcript", "text": ...}`; per answer chunk
  `{"type": "text", "index": i, "text": ...}` and, when its speech is synthesised,
  `{"type": "audio", "index": i, "sample_rate": r, "samples": n}` followed by one binary
  message of n PCM16 samples (a chunk too short to synthesise alone is spoken with the next);
  `{"type": "end", "finish": "eoa"|"stop"|"length", "timing": {"first_token_s",
  "first_text_s", "first_audio_s", "total_s", "rtf"}}` (seconds from the question's end;
  rtf = total_s / seconds of audio). Bad input: `{"type": "error", "message": ...}` and the
  connection waits for the next start; a full queue: an error with "retry_after" and close
  code 1013 (try again later).

`POST /v1/s2s` (a form: `audio` a sound file libsndfile reads, or `units`; the start fields):
the same answer as JSON `{"events": [...], "sample_rate": r, "wav": base64 PCM16 wav}`; 503
with Retry-After when the queue is full, 400 for bad input. `GET /healthz`; `GET /metrics`
(Prometheus text); `GET /` the web page (static/index.html).

`--api-key` (or CSLM_SERVE_API_KEY): every route needs `Authorization: Bearer KEY` (browsers,
which cannot set a WebSocket's headers, may pass `?key=KEY`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import time
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from cslm_jax.data.audio import AudioError, array_audio
from cslm_jax.infer.engine import QueueFull
from cslm_jax.infer.responses import format_unit_line
from cslm_jax.serve.service import SAMPLE_RATE_IN, ProtocolError, Service, Start

RETRY_AFTER_S = 5


def _authorized(headers, query, key: str | None) -> bool:
    if not key:
        return True
    auth = headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else query.get("key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def page() -> str:
    return resources.files("cslm_jax.serve").joinpath("static/index.html").read_text("utf-8")


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="cslm-jax serve", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if not _authorized(request.headers, request.query_params, api_key):
            return JSONResponse(
                {"error": "missing or wrong API key (Authorization: Bearer KEY)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page()

    @app.get("/healthz")
    async def healthz():
        e = service.engine
        ok = e.failure is None and not service.draining
        body = {
            "status": "ok" if ok else ("draining" if service.draining else "failed"),
            "model": service.model_name,
            "slots": e.slots,
            "busy_slots": e.busy,
            "queue": e.waiting,
            "speech_in": service.units is not None,
            "speech_out": service.t2w is not None,
            "languages": sorted(service.fmt.languages),
        }
        if e.failure:
            body["error"] = e.failure
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        e = service.engine
        lines = [
            f"cslm_slots {e.slots}",
            f"cslm_busy_slots {e.busy}",
            f"cslm_queue {e.waiting}",
            f"cslm_sessions {service.sessions}",
            f"cslm_decode_steps_total {e.steps}",
            f"cslm_generated_tokens_total {e.tokens}",
        ]
        if service.synth is not None:
            lines += [
                f"cslm_synthesis_rounds_total {service.synth.rounds}",
                f"cslm_synthesis_windows_total {service.synth.windows}",
            ]
        lines += [f"cslm_{k} {v}" for k, v in sorted(service.counters.items())]
        for name, h in service.hist.items():
            lines += h.lines(f"cslm_{name}")
        return "\n".join(lines) + "\n"

    @app.post("/v1/s2s")
    async def s2s_post(request: Request):
        service.count('requests_total{route="http"}')
        if service.draining:
            return JSONResponse(
                {"error": "the server is shutting down"},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        with service.turn():
            return await _post(service, request)

    @app.websocket("/v1/s2s")
    async def s2s(ws: WebSocket):
        if not _authorized(ws.headers, ws.query_params, api_key):
            await ws.close(code=1008, reason="missing or wrong API key")
            return
        await ws.accept()
        service.count('requests_total{route="ws"}')
        session = _Session(ws, service)
        try:
            await session.run()
        except WebSocketDisconnect:
            pass

    return app


async def _post(service: Service, request: Request):
    """POST /v1/s2s's body (the module docstring)."""
    form = await request.form()
    fields = {k: v for k, v in form.items() if k not in ("audio", "units")}
    try:
        start = Start.parse(_form_start(fields), service.fmt.languages)
        audio = form.get("audio")
        if audio is not None and hasattr(audio, "read"):
            units = await _file_units(service, await audio.read())
        elif form.get("units"):
            units = service.question_units(str(form.get("units")))
        else:
            raise ProtocolError("give the question as a file field 'audio' or a field 'units'")
        t0 = time.perf_counter()
        events, chunks = [], []
        async with contextlib.aclosing(service.answer(start, units, t0)) as answer:
            async for msg, data in answer:
                if msg["type"] != "queued":
                    events.append(msg)
                if data is not None:
                    chunks.append(data)
    except QueueFull as e:
        service.count('errors_total{kind="busy"}')
        return JSONResponse(
            {"error": f"busy: {e}"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    except ProtocolError as e:
        service.count('errors_total{kind="input"}')
        return JSONResponse({"error": str(e)}, status_code=400)
    rate = service.t2w.sample_rate if service.t2w is not None else None
    body = {
        "question": {"units": format_unit_line(units)},
        "events": events,
        "sample_rate": rate,
    }
    if rate is not None:
        body["wav"] = base64.b64encode(_wav(b"".join(chunks), rate)).decode()
    return body


def _form_start(fields: dict) -> dict:
    """Form fields (strings) -> the start message's types."""
    out: dict = {}
    for k, v in fields.items():
        v = str(v)
        if k in ("greedy",):
            out[k] = v.lower() in ("1", "true", "yes", "on")
        elif k in ("temperature", "top_p"):
            try:
                out[k] = float(v)
            except ValueError:
                raise ProtocolError(f"field {k!r}: not a number: {v!r}") from None
        elif k in ("seed", "sample_rate"):
            try:
                out[k] = int(v)
            except ValueError:
                raise ProtocolError(f"field {k!r}: not an integer: {v!r}") from None
        else:
            out[k] = v
    out.pop("sample_rate", None)  # a file carries its own rate
    return out


async def _file_units(service: Service, data: bytes) -> list[int]:
    if service.units is None:
        raise ProtocolError("audio: this server has no speech tokenizer (serve --speech-tokenizer)")
    try:
        wave = array_audio(data, 0, "field 'audio'")
    except AudioError as e:
        raise ProtocolError(str(e)) from None
    service.check_audio(2 * len(wave), SAMPLE_RATE_IN)
    return await asyncio.wrap_future(service.units.submit(np.asarray(wave)))


def _wav(pcm: bytes, rate: int) -> bytes:
    import soundfile as sf  # heavy: soundfile

    buf = io.BytesIO()
    sf.write(buf, np.frombuffer(pcm, "<i2"), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


class _Session:
    """One WebSocket connection: turns of start -> question -> answer."""

    def __init__(self, ws: WebSocket, service: Service):
        self.ws, self.service = ws, service
        self.pending: asyncio.Task | None = None  # a receive started while answering

    async def receive(self) -> dict:
        if self.pending is not None:
            task, self.pending = self.pending, None
            msg = await task
        else:
            msg = await self.ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        return msg

    async def receive_json(self, expect: str) -> dict:
        msg = await self.receive()
        if msg.get("text") is None:
            raise ProtocolError(f"expected a JSON {expect} message, got binary data")
        try:
            obj = json.loads(msg["text"])
        except json.JSONDecodeError as e:
            raise ProtocolError(f"not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise ProtocolError('a message must be a JSON object with a "type"')
        return obj

    async def error(self, message: str, **extra) -> None:
        self.service.count('errors_total{kind="input"}')
        await self.ws.send_json({"type": "error", "message": message, **extra})

    async def run(self) -> None:
        while True:
            try:
                msg = await self.receive_json("start")
                if msg["type"] != "start":
                    raise ProtocolError(f"expected a start message, got {msg['type']!r}")
                if self.service.draining:
                    await self.error("the server is shutting down", retry_after=RETRY_AFTER_S)
                    await self.ws.close(code=1012)
                    return
                with self.service.turn():
                    start = Start.parse(msg, self.service.fmt.languages)
                    units, seconds, t0 = await self.question(start)
                    await self.ws.send_json(
                        {"type": "question", "units": format_unit_line(units), "seconds": seconds}
                    )
                    if not await self.answer(start, units, t0):
                        return
            except ProtocolError as e:
                await self.error(str(e))

    async def question(self, start: Start):
        """The question after a start: PCM16 frames then end_of_audio, or units."""
        pcm = bytearray()
        while True:
            msg = await self.receive()
            if msg.get("bytes") is not None:
                pcm += msg["bytes"]
                self.service.check_audio(len(pcm), start.sample_rate)
                continue
            try:
                obj = json.loads(msg.get("text") or "")
            except json.JSONDecodeError:
                raise ProtocolError("not audio: expected PCM16 binary frames or JSON") from None
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "end_of_audio":
                t0 = time.perf_counter()
                units = await self.service.audio_units(bytes(pcm), start.sample_rate)
                return units, len(pcm) / 2 / start.sample_rate, t0
            if kind == "units":
                if pcm:
                    raise ProtocolError("units after audio frames: send one or the other")
                t0 = time.perf_counter()
                units = self.service.question_units(obj.get("units"))
                return units, len(units) / 50.0, t0
            raise ProtocolError(
                f"expected audio frames, end_of_audio or units after start, got {kind!r}"
            )

    async def answer(self, start: Start, units: list[int], t0: float) -> bool:
        """Stream the answer; False when the client went away (the answer is cancelled) or
        the queue was full (the connection is closed)."""
        if self.pending is None:
            self.pending = asyncio.ensure_future(self.ws.receive())
        async with contextlib.aclosing(self.service.answer(start, units, t0)) as gen:
            try:
                item = await self._next(gen)
            except QueueFull as e:
                self.service.count('errors_total{kind="busy"}')
                await self.error(f"busy: {e}", retry_after=RETRY_AFTER_S)
                await self.ws.close(code=1013)
                return False
            while item:
                msg, data = item
                await self.ws.send_json(msg)
                if data is not None:
                    await self.ws.send_bytes(data)
                if msg["type"] == "end":  # over: what the client sends next is its next turn
                    return True
                item = await self._next(gen)
            return item is None

    async def _next(self, gen):
        """The answer's next (message, data), None at its end, or False if the client
        disconnects first. A message the client sends meanwhile gets an error (ignored)."""
        nxt = asyncio.ensure_future(anext(gen, None))
        while True:
            done, _ = await asyncio.wait({nxt, self.pending}, return_when=asyncio.FIRST_COMPLETED)
            if nxt in done:  # first: a client's next start may come right after the end
                return nxt.result()
            if self.pending in done:
                msg = self.pending.result()
                if msg["type"] == "websocket.disconnect":
                    self.pending = None
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    return False
                self.pending = asyncio.ensure_future(self.ws.receive())
                await self.error("a message during an answer was ignored (wait for its end)")
