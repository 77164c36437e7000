"""Input pipeline throughput on the demo stage-1 mixture.

Compares, in one run:
  * ours, preparation: validate + format + render + tokenize + mask every stage-1 record into the
    cached TFRecords the tasks read (done once per corpus/config/tokenizer) -> tokens/s, in this
    process on one core (the batched path, and the exact per-example Jinja path), alternated with
    the reference loop below (medians of --rounds);
  * `cslm-jax prepare-data` on Apache Beam's DirectRunner with 1 and 2 worker processes on the
    demo corpus repeated --scale times (wall time from submission, start-up included) -> tokens/s;
  * ours, serving: the SeqIO mixture `cslm_pretrain` (seeded mixture sampling, shuffling,
    packing, pure tf.data) -> packed non-padding tokens/s;
  * the reference's way: a Python loop calling the `transformers` tokenizer's
    `apply_chat_template` per example (same examples, no packing) -> tokens/s;
  * the consumer: forward+backward tokens/s of the demo model (configs/model/tiny.yaml with the
    demo vocabulary) on the same batch shape — the rate the pipeline must stay ahead of.

    python benchmarks/data_pipeline.py [--batches 40] [--batch-size 8] [--rounds 3] [--repeat 5]
        [--scale 30] [--beam-rounds 3] [--no-beam]

Each timed section starts after os.sync() (the previous side's file deletions otherwise leave
disk work to kernel threads during it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "TOKENIZERS_PARALLELISM", "false"
)  # per core: the Rust tokenizer on one thread
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shuffle-buffer", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of reference / ours")
    ap.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="preparations per round on our batched "
        "side, timed together, so that it runs about as long as one reference pass "
        "(a busy machine's time slices then weigh on both sides alike)",
    )
    ap.add_argument(
        "--scale",
        type=int,
        default=30,
        help="Beam corpus: the demo's stage-1 files repeated this many times",
    )
    ap.add_argument("--beam-rounds", type=int, default=1)
    ap.add_argument("--no-beam", action="store_true")
    args = ap.parse_args()
    import statistics

    import jax
    import jax.numpy as jnp

    from cslm_jax.config import load_model_config
    from cslm_jax.data.formats import examples, load_data_config, read_jsonl
    from cslm_jax.data.pipeline import BatchIterator
    from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
    from cslm_jax.model.llama import forward, init_params, token_cross_entropy
    from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer
    from cslm_jax.tasks.cslm import register

    work = Path(tempfile.mkdtemp(prefix="cslm_data_bench_"))
    make_demo_data(work / "data", REPO / "configs" / "data" / "demo.yaml", log=lambda *_: None)
    tok = load_tokenizer(work / "data" / "tokenizer")
    extend_tokenizer(tok, UNIT_COUNT, len(tok))
    tok.save_pretrained(str(work / "tok"))
    tok = load_tokenizer(work / "tok")  # the same files the pipeline loads
    # A small shuffle buffer, so that the timed batches are produced during the timing rather than
    # served from buffers filled during the warm-up.
    cfg = load_data_config(
        work / "data" / "data.yaml", [f"packing.shuffle_buffer={args.shuffle_buffer}"]
    )
    length = cfg.max_length

    # the reference's way: apply_chat_template per example, in Python. Run before any tf.data
    # pipeline exists: its background threads would slow a Python loop beside it. Alternated
    # with ours (same examples, one core each), medians over --rounds.
    import shutil

    from cslm_jax.data.prepare import prepare_task_local, read_stats

    def reference():
        os.sync()  # no writeback of the previous side's files now
        tokens, n, t0 = 0, 0, time.perf_counter()
        for spec in cfg.tasks("pretrain"):
            for where, _, record in read_jsonl(spec.train[0], None, cfg.format):
                for messages in examples(spec.kind, record, cfg.format, where):
                    ids = tok.apply_chat_template(messages, tokenize=True)
                    tokens += len(ids["input_ids"] if hasattr(ids, "keys") else ids)
                    n += 1
        return tokens / (time.perf_counter() - t0), n

    def ours(fast, root, repeat=1):
        roots = [root / str(k) for k in range(repeat)]
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)
        # the deletions' and earlier writes' disk work (ext4 here mounts with `discard`) done
        # before the clock starts: left to the kernel's threads it ran during the timing and
        # cost this side up to 25% on some runs
        os.sync()
        t0 = time.perf_counter()
        tokens = 0
        for r in roots:
            for spec in cfg.tasks("pretrain"):
                counts = prepare_task_local(
                    spec, cfg, str(work / "tok"), r / spec.name, fast=fast, tokenizer=tok
                )
                tokens += counts["train"]["targets_tokens"]
        return tokens / (time.perf_counter() - t0), tokens // repeat

    ref_runs, fast_runs, exact_runs = [], [], []
    for _ in range(args.rounds):
        ref_runs.append(reference()[0])
        fast_runs.append(ours(True, work / "prep_fast", args.repeat)[0])
        exact_runs.append(ours(False, work / "prep_exact")[0])
    ref, n = statistics.median(ref_runs), reference()[1]
    prep, prep_tokens = statistics.median(fast_runs), ours(True, work / "prep_fast")[1]
    exact = statistics.median(exact_runs)

    # Beam DirectRunner, 1 and 2 worker processes, on a larger copy of the stage-1 corpus
    beam_rates = {}
    if not args.no_beam:
        import yaml

        big = work / "big"
        big.mkdir()
        data = yaml.safe_load((work / "data" / "data.yaml").read_text())
        data["data_dir"] = str(big)
        data["tokenizer"] = str(work / "data" / "tokenizer")
        entries = []
        for spec in cfg.tasks("pretrain"):
            name = Path(spec.train[0]).name
            (big / name).write_text(Path(spec.train[0]).read_text() * args.scale)
            entry = {"kind": spec.kind, "name": spec.name, "train": [name]}
            if spec.lang:
                entry["lang"] = spec.lang
            entries.append(entry)
        data["stages"] = {"pretrain": entries}
        (big / "data.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
        big_cfg = load_data_config(big / "data.yaml")
        import subprocess

        beam_cpu, beam_wall, beam_load = {}, {}, []
        for r in range(args.beam_rounds):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                # the real command in its own process: os.wait4 gives the CPU time of the whole
                # job (driver and worker processes), which a busy machine does not distort
                out = work / f"beam_{workers}_{r}"
                os.sync()  # the previous run's deletions done before the clock
                t0 = time.perf_counter()
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cslm_jax.cli.main",
                        "prepare-data",
                        "--data-config",
                        str(big / "data.yaml"),
                        "--stage",
                        "pretrain",
                        "--tokenizer",
                        str(work / "tok"),
                        "--out",
                        str(out),
                        "--num-workers",
                        str(workers),
                    ],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                _, status, usage = os.wait4(proc.pid, 0)
                dt = time.perf_counter() - t0
                if status:
                    raise SystemExit(f"prepare-data with {workers} worker(s) failed ({status})")
                beam_tokens = sum(
                    read_stats(out / s.name, "train")["targets_tokens"]
                    for s in big_cfg.tasks("pretrain")
                )
                beam_rates.setdefault(workers, []).append(beam_tokens / dt)
                beam_cpu.setdefault(workers, []).append(usage.ru_utime + usage.ru_stime)
                beam_wall.setdefault(workers, []).append(dt)
                beam_load.append(os.getloadavg()[0])
                shutil.rmtree(out, ignore_errors=True)

    register(cfg, work / "tok", stages=["pretrain"])

    # ours, stage 2: serving packed batches from the prepared records (pure tf.data)
    it = BatchIterator("cslm_pretrain", max_length=length, batch_size=args.batch_size, seed=0)
    t0 = time.perf_counter()
    for _ in range(2):
        next(it)  # warm-up: graph build and shuffle buffers filling
    warm = time.perf_counter() - t0
    real = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        real += int((next(it)["segment_ids"] > 0).sum())
    ours_s = time.perf_counter() - t0
    ours = real / ours_s
    fill = real / (args.batches * args.batch_size * length)

    # the consumer: the demo model's forward+backward on the same batch shape
    mcfg = load_model_config(REPO / "configs" / "model" / "tiny.yaml").replace(
        vocab_size=((len(tok) + 127) // 128) * 128, unpadded_vocab_size=len(tok)
    )
    params = init_params(mcfg)
    batch = next(it)

    @jax.jit
    def step(p, b):
        def loss(p):
            logits = forward(mcfg, p, b["tokens"], b["positions"], b["segment_ids"])
            s, c = token_cross_entropy(logits, b["targets"], b["loss_weights"])
            return s / jnp.maximum(c, 1)

        return jax.value_and_grad(loss)(p)

    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    jax.block_until_ready(step(params, jb))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(step(params, jb))
    train = 5 * args.batch_size * length * fill / (time.perf_counter() - t0)

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()}; "
        f"batch {args.batch_size} x {length}, {args.batches} batches after 2 warm-up "
        f"({warm:.1f}s incl. graph build and buffers); medians of {args.rounds} alternated rounds"
    )
    print(
        f"reference (apply_chat_template loop):      {ref:9.0f} tokens/s  ({n} examples, unpacked, one core)"
    )
    print(
        f"ours, preparation (batched, one core):     {prep:9.0f} tokens/s  ({prep_tokens} tokens, "
        f"validate+render+tokenize+mask+write; {args.repeat} preparations per round)  runs "
        f"{[round(x) for x in fast_runs]} (the first pays the once-per-process chat plans and "
        f"checks)"
    )
    print(f"ours, preparation (exact Jinja path):      {exact:9.0f} tokens/s")
    print(
        f"ratio ours / reference (preparation):      {prep / ref:.2f}x (exact path {exact / ref:.2f}x)"
    )
    if beam_rates:
        one, two = statistics.median(beam_rates[1]), statistics.median(beam_rates[2])
        cpu1, cpu2 = statistics.median(beam_cpu[1]), statistics.median(beam_cpu[2])
        print(
            f"Beam DirectRunner, 1 worker:               {one:9.0f} tokens/s  ({beam_tokens} tokens, "
            f"demo x{args.scale}, start-up included; job CPU {cpu1:.0f} s; wall "
            f"{[round(x, 1) for x in beam_wall[1]]} s)"
        )
        print(
            f"Beam DirectRunner, 2 workers:              {two:9.0f} tokens/s  (job CPU {cpu2:.0f} s; "
            f"wall {[round(x, 1) for x in beam_wall[2]]} s)"
        )
        print(
            f"ratio 2 workers / 1 worker:                {two / one:.2f}x  (medians of "
            f"{args.beam_rounds} alternated rounds; 1-min load after each run "
            f"{[round(x, 2) for x in beam_load]})"
        )
    print(
        f"ours, serving (SeqIO cslm_pretrain packed): {ours:8.0f} tokens/s  (rows {fill:.0%} full)"
    )
    print(f"tiny demo model fwd+bwd consumes:          {train:9.0f} tokens/s")
    print(
        f"pipeline / training consumption:           {ours / train:.2f}x "
        f"({'ahead' if ours > train else 'BEHIND'})"
    )


if __name__ == "__main__":
    main()
