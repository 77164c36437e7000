"""Decode tokens/s: cslm_jax's KV-cache decoder (`cslm_jax.infer.decode.generate`) vs `transformers`
`generate` (PyTorch) on the same exported model, at batch 1 and batch 8, in one run.

A random `transformers` Llama is imported (`import_hf`), exported again (`export_hf`, the folder
users take to GPUs) and both decoders load that exported folder. Both decode greedily, from the
same random prompts, exactly `--new` tokens per row (no stop token), fp32, all CPU cores. Timed:
the whole call, prefill included, median of `--repeats` (the runs alternate) after one warm-up
each (which compiles ours). PyTorch runs with all cores and with one thread; the faster counts.
The greedy tokens are compared too (they should agree: same weights, same arithmetic up to
rounding). On x86-64 CPUs ours multiplies with the native kernel (`cslm_jax.kernels.cpu_matmul`, built
at first use); `CSLM_JAX_CPU_KERNELS=0` measures XLA's own dot instead.

    python benchmarks/decode.py                                   # ~41M params, 2 cores: minutes
    python benchmarks/decode.py --hidden 768 --layers 12 --vocab 32000 --new 128
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_round_robin(fns: dict, repeats: int):
    """{name: (median wall time, output)}: the functions run in turn `repeats` times (a machine
    shared with other jobs slows all alike), after one warm-up call each (which compiles the JAX
    programs)."""
    outs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=128, help="generated tokens per row")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    from cslm_jax.kernels import cpu_matmul as cpu_kernels
    from cslm_jax.convert.hf import export_hf, import_hf
    from cslm_jax.infer.decode import GREEDY, decoding_params, generate, load_for_decoding
    from cslm_jax.demo.random_hf import llama3_rope_scaling, placeholder_tokenizer, write_random_hf_llama

    torch.set_num_threads(os.cpu_count())
    # a placeholder tokenizer of the right size: the benchmark feeds random ids
    tok = placeholder_tokenizer(args.vocab)
    work = Path(tempfile.mkdtemp(prefix="cslm_decode_bench_"))
    try:
        write_random_hf_llama(work / "hf", tok, hidden_size=args.hidden, intermediate_size=args.mlp,
                              num_layers=args.layers, num_heads=args.heads,
                              num_kv_heads=args.kv_heads, rope_scaling=llama3_rope_scaling(8192),
                              max_position_embeddings=131072, weight_std=0.02)
        ckpt = import_hf(work / "hf", work / "ckpt", speech_units=0, log=lambda *_: None)
        exported = export_hf(ckpt, work / "export", dtype="float32", log=lambda *_: None)
        cfg, params, _, _ = load_for_decoding(exported, compute_dtype="float32", tmp_dir=work)
        params = decoding_params(cfg, params)
        hf = LlamaForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        n_params = cfg.num_params()
        print(f"machine: {platform.machine()} {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f}, jax {jax.__version__}, torch {torch.__version__}, "
              f"transformers attention: {hf.config._attn_implementation}; {cpu_kernels.status()}",
              flush=True)
        print(f"model: {n_params / 1e6:.1f}M params, hidden {args.hidden}, layers {args.layers}, "
              f"heads {args.heads}/{args.kv_heads}, MLP {args.mlp}, vocab {args.vocab}, fp32; "
              f"prompt {args.prompt} tokens, {args.new} new tokens per row, greedy", flush=True)

        rng = np.random.default_rng(0)
        results = []
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = rng.integers(0, args.vocab - 1, size=(b, args.prompt))

            def ours():
                return generate(cfg, params, prompts.tolist(), max_new_tokens=args.new, sampling=GREEDY)

            ids = torch.tensor(prompts)
            mask = torch.ones_like(ids)

            def theirs(threads):
                def run():
                    torch.set_num_threads(threads)
                    with torch.no_grad():
                        out = hf.generate(ids, attention_mask=mask, do_sample=False,
                                          max_new_tokens=args.new, min_new_tokens=args.new,
                                          pad_token_id=0)
                    return out[:, args.prompt:].tolist()
                return run

            # PyTorch at its best: all cores, and one thread (its thread pool waits for every
            # thread at each op, which a core taken by another job stalls).
            fns = {"cslm_jax": ours} | {f"transformers, {t} thread(s)": theirs(t)
                                        for t in sorted({os.cpu_count(), 1}, reverse=True)}
            timed = timed_round_robin(fns, args.repeats)
            t_ours, out_ours = timed.pop("cslm_jax")
            best = min(timed, key=lambda k: timed[k][0])
            t_theirs, out_theirs = timed[best]
            same = sum(x == y for ra, rb in zip(out_ours, out_theirs) for x, y in zip(ra, rb))
            tokens = b * args.new
            results.append((b, tokens / t_ours, tokens / t_theirs))
            print(f"batch {b}: cslm_jax {tokens / t_ours:8.1f} tokens/s ({t_ours:.2f}s)", flush=True)
            for name, (t, _) in timed.items():
                print(f"         {name:<28} {tokens / t:8.1f} tokens/s ({t:.2f}s)"
                      f"{'  <- best' if name == best else ''}")
            print(f"         ratio cslm_jax / best transformers: {t_theirs / t_ours:.2f}x; greedy "
                  f"tokens equal: {same}/{tokens}", flush=True)
        print("summary: " + ", ".join(f"batch {b} {o / t:.2f}x" for b, o, t in results) +
              f" (load average at the end {os.getloadavg()[0]:.1f})")
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
