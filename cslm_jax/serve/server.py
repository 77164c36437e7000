"""Running `cslm-jax serve`: load, warm up, listen (uvicorn), and shut down gracefully.

SIGTERM / SIGINT: the server stops taking questions (new starts and POSTs get an error saying
it is shutting down, /healthz turns 503 "draining"), lets the answers in flight finish for up
to `--grace-seconds`, then stops and exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import uvicorn

from cslm_jax.infer.responses import model_folder
from cslm_jax.serve.app import create_app
from cslm_jax.serve.service import Service, load_service
from cslm_jax.speech.stream import ROW_BUCKETS, open_stream, run_flows


def warm_up(service: Service, log, max_prompt: int = 512) -> float:
    """Compile what the first questions would otherwise wait for (call it before the service
    starts): prefill for every prompt bucket up to `max_prompt` tokens and the decoding step,
    the speech tokenizer on a second of audio, a speech window and the last one, and the
    flow's rows of several answers' windows (v1, one unit bucket: others compile when first
    met)."""
    t0 = time.perf_counter()
    buckets = service.engine.warm_up(max_prompt)
    if service.units is not None:
        service.units.submit(np.zeros(16000, np.float32)).result()
    if service.t2w is not None:
        stream = open_stream(service.t2w, service.voice, "zero", service.speech_rate)
        stream.push(list(range(60)))
        stream.finish()
        if hasattr(stream, "push_job"):  # the flow's batched rows for concurrent answers
            for rows in ROW_BUCKETS[1:]:
                if rows > 2 * service.engine.slots:
                    break
                streams = [
                    open_stream(service.t2w, service.voice, "zero", service.speech_rate)
                    for _ in range(rows)
                ]
                run_flows([s.push_job(list(range(60))) for s in streams])
    seconds = time.perf_counter() - t0
    log(f"serve: warmed up (compiled; prompts in {buckets} bucket(s)) in {seconds:.1f}s")
    return seconds


class _Server(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains the service first."""

    def __init__(self, config, service: Service, grace: float, log):
        super().__init__(config)
        self.service, self.grace, self.log = service, grace, log
        self.draining_since: float | None = None

    def handle_exit(self, sig, frame) -> None:  # called by uvicorn's signal handler
        if self.draining_since is not None:
            self.should_exit = True  # a second signal: now
            return
        self.draining_since = time.monotonic()
        self.service.draining = True
        self.log(
            f"serve: signal {sig}: not taking new questions; {self.service.sessions} answer(s) "
            f"in flight get up to {self.grace:g}s to finish"
        )

    async def on_tick(self, counter: int) -> bool:
        if self.draining_since is not None and not self.should_exit:
            late = time.monotonic() - self.draining_since > self.grace
            if self.service.sessions == 0 or late:
                if late:
                    self.log(f"serve: {self.service.sessions} answer(s) cut off after the grace")
                self.should_exit = True
        return await super().on_tick(counter)


def serve(args, api_key: str | None = None, log=lambda m: print(m, flush=True)) -> int:
    service = load_service(
        model=model_folder(args.ckpt, args.hf_dir),  # a run folder: its model/
        data_config=args.data_config,
        speech_tokenizer=args.speech_tokenizer,
        token2wav=args.token2wav,
        voice=args.voice,
        speech_rate=args.speech_rate,
        compute_dtype=args.compute_dtype,
        tensor=args.tensor,
        log=log,
        slots=args.slots,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        max_queue=args.max_queue,
        max_seconds=args.max_seconds,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(
            f"serve: warning: listening on {args.host}, reachable from other machines"
            + ("" if api_key else "; anyone who reaches it can use it (set --api-key)")
        )
    if not args.no_warmup:
        warm_up(service, log)
    service.start()
    app = create_app(service, api_key)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", ws_max_size=16 * 2**20
    )
    server = _Server(config, service, args.grace_seconds, log)

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            host = "[::1]" if args.host == "::1" else args.host
            e = service.engine
            log(
                f"serve: listening on http://{host}:{port} ({e.slots} slots of "
                f"{e.max_length} positions; speech in: {service.units is not None}, speech "
                f"out: {service.t2w is not None})"
            )
        await task

    try:
        asyncio.run(main())
    finally:
        service.close(timeout=5)
    log("serve: stopped")
    return 0
