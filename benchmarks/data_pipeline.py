"""Input pipeline throughput on the demo stage-1 mixture.

Compares, in one run:
  * ours, preparation: validate + format + render + tokenize + mask every stage-1 record into the
    cached TFRecords the tasks read (done once per corpus/config/tokenizer) -> tokens/s;
  * ours, serving: the SeqIO mixture `cslm_pretrain` (seeded mixture sampling, shuffling,
    packing, pure tf.data) -> packed non-padding tokens/s;
  * the reference's way: a Python loop calling the `transformers` tokenizer's
    `apply_chat_template` per example (same examples, no packing) -> tokens/s;
  * the consumer: forward+backward tokens/s of the demo model (configs/model/tiny.yaml with the
    demo vocabulary) on the same batch shape — the rate the pipeline must stay ahead of.

    python benchmarks/data_pipeline.py [--batches 40] [--batch-size 8]
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
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shuffle-buffer", type=int, default=16)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from cslm_jax.config import load_model_config
    from cslm_jax.data.pipeline import BatchIterator
    from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
    from cslm_jax.data.formats import examples, load_data_config, read_jsonl
    from cslm_jax.model.llama import forward, init_params, token_cross_entropy
    from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer
    from cslm_jax.tasks.cslm import register

    work = Path(tempfile.mkdtemp(prefix="cslm_data_bench_"))
    make_demo_data(work / "data", REPO / "configs" / "data" / "demo.yaml", log=lambda *_: None)
    tok = load_tokenizer(work / "data" / "tokenizer")
    extend_tokenizer(tok, UNIT_COUNT, len(tok))
    tok.save_pretrained(str(work / "tok"))
    tok = load_tokenizer(work / "tok")      # the same files the pipeline loads
    # A small shuffle buffer, so that the timed batches are produced during the timing rather than
    # served from buffers filled during the warm-up.
    cfg = load_data_config(work / "data" / "data.yaml", [f"packing.shuffle_buffer={args.shuffle_buffer}"])
    register(cfg, work / "tok", stages=["pretrain"])
    length = cfg.max_length

    # the reference's way: apply_chat_template per example, in Python. Run first: a live tf.data
    # pipeline's background threads would slow a Python loop beside it.
    ref_tokens, t0, n = 0, time.perf_counter(), 0
    budget = args.batches * args.batch_size * length // 2
    for spec in cfg.tasks("pretrain"):
        for where, _, record in read_jsonl(spec.train[0], None, cfg.format):
            for messages in examples(spec.kind, record, cfg.format, where):
                ids = tok.apply_chat_template(messages, tokenize=True)
                ref_tokens += len(ids["input_ids"] if hasattr(ids, "keys") else ids)
                n += 1
            if ref_tokens >= budget // len(cfg.tasks("pretrain")) * (1 + cfg.tasks("pretrain").index(spec)):
                break
    ref = ref_tokens / (time.perf_counter() - t0)

    # ours, stage 1: preparation (validate + format + render + tokenize + mask, once per corpus)
    from cslm_jax.data.pipeline import STATS, prepare_split
    t0 = time.perf_counter()
    for spec in cfg.tasks("pretrain"):
        prepare_split(spec, "train", cfg, str(work / "tok"), STATS)
    prep_s = time.perf_counter() - t0
    prep_tokens = sum(c["tokens"] for name, c in STATS.report().items()
                      if name.startswith("cslm_pretrain_"))
    prep = prep_tokens / prep_s

    # ours, stage 2: serving packed batches from the prepared records (pure tf.data)
    it = BatchIterator("cslm_pretrain", max_length=length, batch_size=args.batch_size, seed=0)
    t0 = time.perf_counter()
    for _ in range(2):
        next(it)                            # warm-up: graph build and shuffle buffers filling
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
        vocab_size=((len(tok) + 127) // 128) * 128, unpadded_vocab_size=len(tok))
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

    print(f"machine: {platform.machine()} {os.cpu_count()} cores; batch {args.batch_size} x {length}, "
          f"{args.batches} batches after 2 warm-up ({warm:.1f}s incl. graph build and buffers)")
    print(f"reference (apply_chat_template loop):      {ref:9.0f} tokens/s  ({n} examples, unpacked)")
    print(f"ours, preparation (validate+render+mask):  {prep:9.0f} tokens/s  ({prep_tokens} tokens, once)")
    print(f"ratio ours / reference (preparation):      {prep / ref:.2f}x")
    print(f"ours, serving (SeqIO cslm_pretrain packed): {ours:8.0f} tokens/s  (rows {fill:.0%} full)")
    print(f"tiny demo model fwd+bwd consumes:          {train:9.0f} tokens/s")
    print(f"pipeline / training consumption:           {ours / train:.2f}x "
          f"({'ahead' if ours > train else 'BEHIND'})")


if __name__ == "__main__":
    main()
