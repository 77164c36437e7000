"""`cslm-jax serve` under load (issue 28): 1, 4, 8 and 16 concurrent WebSocket clients on
loopback against the demo's stage-2 model, its random token2wav speaking every answer.

The server is the real command (`python -m cslm_jax.cli.main serve ... --port 0`, a subprocess;
the URL from its "listening on" line), `--slots 8` by default, so 16 clients queue. Questions:
the demo's held-out spoken questions as units (`data/s2s_<q>2<a>.validation.jsonl`, the first
`--per-direction` of each of en->en, zh->zh, en->zh, zh->en, with their languages), greedy.

1. Reference: one client asks every question in turn; its answers are the single-client
   greedy answers (this also compiles each prompt length and speech window once).
2. Warm-up: unmeasured passes over the levels until one compiles nothing (at most
   `--warmup`): prefill is compiled per number of prompts admitted together, speech synthesis
   per rows of a batched flow call and bucket, each on first use. The server runs with
   JAX_LOG_COMPILES=1; every level reports the compiles it waited for (JAX's log lines).
3. `--rounds` rounds of the levels, the order reversed every other round (1 4 8 16, 16 8 4 1,
   ...), so a level's neighbours in time differ between rounds on this shared machine. At a
   level of C clients each client asks max(`--turns`, `--answers` / C) questions in turn
   (client i's j-th question is question (i + j*C + round) mod Q, so clients ask different
   questions at once).

Every answer is checked: an `end` message with a finish, audio received (samples > 0), the
transcript and the answer's text chunks equal to the same question's reference answer.
Per level and round: answers/s (answers / wall seconds from the first start to the last end),
generated tokens/s (`cslm_generated_tokens_total` of /metrics before and after), p50 / p95 of
time to first audio (each `end` message's `timing.first_audio_s`: seconds from the question's
end to its first audio, queueing included) and the load average. The summary takes each
level's median over rounds, and the issue's ratios per round (8 clients vs 1, measured minutes
apart) with their median: throughput at 8 vs 1 (target >= 4x) and p95 time to first audio at 8
vs 1 (target <= 2x).

    cslm-jax demo --out /tmp/demo_bench   # once: the model, its data config, a token2wav
    python benchmarks/serve_load.py [--demo /tmp/demo_bench] [--levels 1,4,8,16] [--answers 48]
        [--turns 2] [--rounds 3] [--warmup 6] [--per-direction 4] [--slots 8] [--json out.json]

`--repo DIR`: serve the cslm_jax of another checkout (cwd of `python -m`).
`--demo`: a `cslm-jax demo --out DIR` folder (its stage2 run, data/data.yaml, token2wav);
`--ckpt`, `--data-config`, `--token2wav` override its parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parents[1]
DIRECTIONS = (("en", "en"), ("zh", "zh"), ("en", "zh"), ("zh", "en"))
TARGET_THROUGHPUT = 4.0  # throughput at 8 clients / 1, at least
TARGET_TTFA = 2.0  # p95 time to first audio at 8 clients / 1, at most


def demo_questions(data_dir: Path, per_direction: int) -> list[dict]:
    """The demo's held-out spoken questions: start fields and units text."""
    out = []
    for q, a in DIRECTIONS:
        path = data_dir / f"s2s_{q}2{a}.validation.jsonl"
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        for line in lines[:per_direction]:
            r = json.loads(line)
            units = "".join(f"<{u}>" for u in r["question_units"])
            out.append({"lang": q, "answer_lang": a, "units": units})
    return out


class Server:
    """`cslm-jax serve` as a subprocess; its output kept (a reader thread drains the pipe)."""

    def __init__(self, argv: list[str], repo: Path = REPO, timeout: float = 600):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cslm_jax.cli.main", "serve", *argv, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=repo,  # `python -m` imports cslm_jax from here
            env={
                **os.environ,
                "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                "JAX_LOG_COMPILES": "1",  # counted per level: `compiles`
            },
        )
        self.lines: list[str] = []
        self.compiles: list[tuple[str, float]] = []  # (function, seconds) as JAX logs them
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(timeout) or self.url is None:
            self.stop()
            raise SystemExit("serve did not start:\n" + "".join(self.lines[-30:]))

    def _read(self):
        for line in self.proc.stdout:
            mark = "Finished XLA compilation of "  # "[logger:]... of jit(f) in 0.5 sec"
            if mark in line:
                name, _, secs = line.split(mark, 1)[1].rpartition(" in ")
                self.compiles.append((name, float(secs.split()[0])))
                continue
            if any(m in line for m in ("Finished tracing", "Compiling ", "Finished jaxpr")):
                continue
            self.lines.append(line)
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                self.ready.set()
        self.ready.set()  # the process ended

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return 0.0  # not exported (e.g. synthesis counters without --token2wav)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def ask(ws, q: dict) -> dict:
    """One greedy turn: start, units, every message to `end` (or `error`)."""
    start = {"type": "start", "lang": q["lang"], "answer_lang": q["answer_lang"], "greedy": True}
    await ws.send(json.dumps(start))
    await ws.send(json.dumps({"type": "units", "units": q["units"]}))
    out = {"texts": [], "transcript": None, "samples": 0, "queued": False, "end": None}
    while True:
        m = json.loads(await ws.recv())
        if m["type"] == "transcript":
            out["transcript"] = m["text"]
        elif m["type"] == "text":
            out["texts"].append(m["text"])
        elif m["type"] == "queued":
            out["queued"] = True
        elif m["type"] == "audio":
            data = await ws.recv()
            if not isinstance(data, bytes) or len(data) != 2 * m["samples"]:
                raise AssertionError(f"audio message of {m['samples']} samples, got {len(data)} B")
            out["samples"] += m["samples"]
        elif m["type"] in ("end", "error"):
            out["end"] = m
            return out


def check(answer: dict, ref: dict | None, speech: bool = True) -> str | None:
    """Why an answer is wrong, or None (speech: audio expected)."""
    end = answer["end"]
    if end is None or end["type"] != "end":
        return f"no end: {end}"
    if end.get("finish") not in ("eoa", "stop", "length"):
        return f"finish {end.get('finish')!r}"
    if speech and (answer["samples"] <= 0 or end["timing"].get("first_audio_s") is None):
        return "no audio"
    if ref is not None and (answer["texts"], answer["transcript"]) != (
        ref["texts"],
        ref["transcript"],
    ):
        return f"text {answer['texts']} != single-client {ref['texts']}"
    return None


async def run_level(
    server: Server, questions, clients: int, turns: int, shift: int, refs, speech: bool = True
):
    """One level: `clients` clients each asking `turns` questions in turn; its figures."""
    ws_url = server.url.replace("http", "ws", 1) + "/v1/s2s"
    answers: list[tuple[int, dict]] = []

    async def client(i):
        async with connect(ws_url, max_size=2**26, open_timeout=60, ping_interval=None) as ws:
            for j in range(turns):
                k = (i + j * clients + shift) % len(questions)
                answers.append((k, await ask(ws, questions[k])))

    tokens0 = server.metric("cslm_generated_tokens_total")
    steps0 = server.metric("cslm_decode_steps_total")
    rounds0 = server.metric("cslm_synthesis_rounds_total")
    windows0 = server.metric("cslm_synthesis_windows_total")
    load0 = os.getloadavg()[0]
    compiles0 = len(server.compiles)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    tokens = server.metric("cslm_generated_tokens_total") - tokens0
    steps = server.metric("cslm_decode_steps_total") - steps0
    rounds = server.metric("cslm_synthesis_rounds_total") - rounds0
    windows = server.metric("cslm_synthesis_windows_total") - windows0
    compiled = server.compiles[compiles0:]
    bad = [(k, why) for k, a in answers if (why := check(a, refs and refs[k], speech))]
    first = "first_audio_s" if speech else "first_text_s"
    ttfa = sorted(a["end"]["timing"][first] for _, a in answers if not check(a, None, speech))
    return {
        "clients": clients,
        "answers": len(answers),
        "wrong": bad,
        "queued": sum(a["queued"] for _, a in answers),
        "wall_s": wall,
        "answers_per_s": len(answers) / wall,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "steps": steps,
        "synthesis_rounds": rounds,
        "synthesis_windows": windows,
        "first_token_p50": quantile(
            [a["end"]["timing"]["first_token_s"] for _, a in answers if not check(a, None, speech)],
            0.5,
        ),
        "ttfa_p50": quantile(ttfa, 0.5),
        "ttfa_p95": quantile(ttfa, 0.95),
        "load": (load0, os.getloadavg()[0]),
        "compiles": len(compiled),
        "compile_s": sum(t for _, t in compiled),
        "compiled": sorted({n for n, _ in compiled}),
    }


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def row(r: dict) -> str:
    return (
        f"{r['clients']:>3} clients: {r['answers']:>3} answers in {r['wall_s']:6.1f}s = "
        f"{r['answers_per_s']:5.2f} answers/s, {r['tokens_per_s']:7.1f} tokens/s "
        f"({r['tokens'] / max(r['steps'], 1):.1f} a step); first token p50 "
        f"{r['first_token_p50']:5.2f}s; {r['synthesis_windows'] / max(r['synthesis_rounds'], 1):.1f} "
        f"speech windows a synthesis round; first audio "
        f"p50 {r['ttfa_p50']:5.2f}s p95 {r['ttfa_p95']:5.2f}s; {r['queued']} queued; wrong "
        f"{len(r['wrong'])}; load {r['load'][0]:.2f} -> {r['load'][1]:.2f}; compiled "
        f"{r['compiles']} ({r['compile_s']:.1f}s{': ' if r['compiled'] else ''}"
        f"{', '.join(r['compiled'][:4])})"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", default="/tmp/demo_bench", help="a cslm-jax demo --out folder")
    p.add_argument("--ckpt", default=None, help="default: DEMO/stage2")
    p.add_argument("--data-config", default=None, help="default: DEMO/data/data.yaml")
    p.add_argument("--token2wav", default=None, help="default: DEMO/token2wav")
    p.add_argument("--levels", default="1,4,8,16")
    p.add_argument("--turns", type=int, default=2, help="questions per client per level, at least")
    p.add_argument(
        "--answers",
        type=int,
        default=16,
        help="answers per level, at least (more turns for fewer clients)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--warmup",
        type=int,
        default=6,
        help="unmeasured passes over the levels first, until one compiles nothing (prefill "
        "compiles per number of prompts admitted together, synthesis per rows and bucket)",
    )
    p.add_argument("--per-direction", type=int, default=4)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument(
        "--text-only",
        action="store_true",
        help="a diagnostic: serve without --token2wav (decoding alone); the latency "
        "columns are then time to first text",
    )
    p.add_argument(
        "--repo",
        default=str(REPO),
        help="serve the cslm_jax of this checkout (e.g. a `git archive` of a commit)",
    )
    args = p.parse_args(argv)
    demo = Path(args.demo)
    levels = [int(x) for x in args.levels.split(",")]
    questions = demo_questions(demo / "data", args.per_direction)
    serve_argv = [
        "--ckpt", args.ckpt or str(demo / "stage2"),
        "--data-config", args.data_config or str(demo / "data" / "data.yaml"),
        *([] if args.text_only else
          ["--token2wav", args.token2wav or str(demo / "token2wav"), "--voice", "random"]),
        "--slots", str(args.slots), "--max-length", "1024",
        "--max-new-tokens", str(args.max_new_tokens), "--max-queue", "64",
    ]  # fmt: skip

    def turns(clients: int) -> int:
        return max(args.turns, -(-args.answers // clients))

    print(f"nproc {os.cpu_count()}; load average {os.getloadavg()}", flush=True)
    print(f"serve {' '.join(serve_argv)}", flush=True)
    if args.text_only:
        print("text only: the 'first audio' figures below are times to first text", flush=True)
    t_start = time.perf_counter()
    server = Server(serve_argv, Path(args.repo))
    print("".join(server.lines).rstrip(), flush=True)
    results = {"levels": levels, "questions": len(questions), "rounds": []}
    try:
        t0 = time.perf_counter()
        refs = asyncio.run(_reference(server, questions, not args.text_only))
        print(
            f"reference: 1 client, each of {len(questions)} questions once (compiling each "
            f"prompt length and speech window): {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        for w in range(args.warmup):  # until a pass compiles nothing
            compiled = 0
            for c in levels:
                r = asyncio.run(
                    run_level(server, questions, c, turns(c), w + 7, refs, not args.text_only)
                )
                print(f"warm-up {w + 1} {row(r)}", flush=True)
                compiled += r["compiles"]
            if not compiled:
                break
        for rnd in range(args.rounds):
            order = levels if rnd % 2 == 0 else levels[::-1]
            measured = []
            for c in order:
                r = asyncio.run(
                    run_level(server, questions, c, turns(c), rnd, refs, not args.text_only)
                )
                print(f"round {rnd + 1} {row(r)}", flush=True)
                for k, why in r["wrong"]:
                    print(f"  WRONG question {k}: {why}", flush=True)
                measured.append(r)
            results["rounds"].append(sorted(measured, key=lambda r: r["clients"]))
    finally:
        alive = server.proc.poll() is None
        code = server.stop()
        tail = "".join(server.lines[-3 if alive and code == 0 else -40 :]).rstrip()
        print(f"serve {'' if alive else 'had '}exited {code}: {tail}", flush=True)
    summary(results, levels)
    print(f"benchmark {time.perf_counter() - t_start:.0f}s; load average {os.getloadavg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    wrong = sum(len(r["wrong"]) for rs in results["rounds"] for r in rs)
    return 1 if wrong else 0


async def _reference(server: Server, questions, speech: bool = True) -> list[dict]:
    """Each question's single-client greedy answer (one client, one question at a time)."""
    ws_url = server.url.replace("http", "ws", 1) + "/v1/s2s"
    out = []
    async with connect(ws_url, max_size=2**26, ping_interval=None) as ws:
        for q in questions:
            a = await ask(ws, q)
            if (why := check(a, None, speech)) is not None:
                raise SystemExit(f"reference answer to {q}: {why}")
            out.append(a)
    return out


def summary(results: dict, levels: list[int]) -> None:
    rounds = results["rounds"]
    by = {c: [next(r for r in rs if r["clients"] == c) for rs in rounds] for c in levels}
    print(f"\nmedians over {len(rounds)} rounds:")
    print(
        "| clients | answers/s | tokens/s | first audio p50 | first audio p95 | wrong | compiles |"
    )
    print("|---|---|---|---|---|---|---|")
    for c in levels:
        rs = by[c]

        def med(key, rs=rs):
            return statistics.median(r[key] for r in rs)

        print(
            f"| {c} | {med('answers_per_s'):.2f} | {med('tokens_per_s'):.1f} | "
            f"{med('ttfa_p50'):.2f} s | {med('ttfa_p95'):.2f} s | "
            f"{sum(len(r['wrong']) for r in rs)} of {sum(r['answers'] for r in rs)} | "
            f"{sum(r['compiles'] for r in rs)} |"
        )
    if 1 in by and 8 in by:
        thr = [b["answers_per_s"] / a["answers_per_s"] for a, b in zip(by[1], by[8])]
        tok = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(by[1], by[8])]
        lat = [b["ttfa_p95"] / a["ttfa_p95"] for a, b in zip(by[1], by[8])]
        fmt = ", ".join
        print(
            f"8 vs 1 clients, per round: answers/s {fmt(f'{x:.2f}x' for x in thr)} (median "
            f"{statistics.median(thr):.2f}x, target >= {TARGET_THROUGHPUT:g}x); tokens/s "
            f"{fmt(f'{x:.2f}x' for x in tok)} (median {statistics.median(tok):.2f}x); p95 first "
            f"audio {fmt(f'{x:.2f}x' for x in lat)} (median {statistics.median(lat):.2f}x, "
            f"target <= {TARGET_TTFA:g}x)"
        )


if __name__ == "__main__":
    sys.exit(main())
