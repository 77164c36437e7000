"""Decode tokens/s: cslm_jax's KV-cache decoder (`cslm_jax.infer.decode.generate`) vs `transformers`
`generate` (PyTorch) on the same exported model, at batch 1 and batch 8, in one run.

A random `transformers` Llama is imported (`import_hf`), exported again (`export_hf`, the folder
users take to GPUs) and both decoders load that exported folder. Both decode greedily, from the
same random prompts, exactly `--new` tokens per row (no stop token), fp32, all CPU cores. Timed:
the whole call, prefill included, median of `--repeats` (the runs alternate) after one warm-up
each (which compiles ours). PyTorch runs with all usable cores and with one thread
(`--torch-threads`); the faster counts.
The greedy tokens are compared too (they should agree: same weights, same arithmetic up to
rounding). On x86-64 CPUs ours multiplies with the native kernel (`cslm_jax.kernels.cpu_matmul`, built
at first use); `CSLM_JAX_CPU_KERNELS=0` measures XLA's own dot instead.

    python benchmarks/decode.py                                   # ~41M params, 2 cores: minutes
    python benchmarks/decode.py --hidden 768 --layers 12 --vocab 32000 --new 128
    python benchmarks/decode.py --repo /work/base     # another checkout's cslm_jax (before/after)
    python benchmarks/decode.py --busy 1              # with one busy-looping process alongside
    python benchmarks/decode.py --xla-threads 1       # XLA's intra-op pool at one thread

Each run prints the load average (1/5/15 min) at the start and the end, the usable cores, the
threads each side uses, and per side the min/median/max over the repeats with what the rest of
the machine took meanwhile (`load_probe.Probe`: other processes' CPU in cores, our threads'
run-queue wait), which is what the ratio depends on on a shared machine (RESULTS.md, "Refactor
(issue 18)").
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import load_probe  # noqa: E402  (benchmarks/load_probe.py, next to this script)


def timed_round_robin(fns: dict, repeats: int):
    """{name: (wall times, probes, output)}: the functions run in turn `repeats` times (a machine
    shared with other jobs slows all alike), after one warm-up call each (which compiles the JAX
    programs); each timed call with a `load_probe.Probe` (what the rest of the machine took)."""
    outs = {name: fn() for name, fn in fns.items()}
    probes = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with load_probe.Probe() as p:
                fn()
            probes[name].append(p)
    return {name: ([p.wall for p in probes[name]], probes[name], outs[name]) for name in fns}


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    ap.add_argument(
        "--torch-threads",
        default="all,1",
        help="PyTorch thread counts to time, comma-separated ('all': the usable cores); "
        "the fastest counts",
    )
    load_probe.add_arguments(ap)
    args = ap.parse_args()
    root = load_probe.use_repo(args.repo)
    with load_probe.Busy(args.busy, args.busy_seconds):
        run(args, root)


def run(args, root):
    print(f"load average at the start: {load_probe.load_average()}", flush=True)
    jax = load_probe.start_jax(args.xla_threads)
    import numpy as np
    import torch
    from transformers import LlamaForCausalLM

    import cslm_jax

    try:
        from cslm_jax.convert.hf import export_hf, import_hf
        from cslm_jax.demo.random_hf import (
            llama3_rope_scaling,
            placeholder_tokenizer,
            write_random_hf_llama,
        )
        from cslm_jax.infer.decode import decoding_params, generate, load_for_decoding
        from cslm_jax.kernels import cpu_matmul as cpu_kernels
    except ImportError:  # the flat layout before the packages (commit 059734b and earlier)
        from cslm_jax import cpu_kernels
        from cslm_jax.convert import export_hf, import_hf
        from cslm_jax.decode import decoding_params, generate, load_for_decoding
        from cslm_jax.random_hf import (
            llama3_rope_scaling,
            placeholder_tokenizer,
            write_random_hf_llama,
        )
    try:
        from cslm_jax.infer.decode import GREEDY

        greedy = {"sampling": GREEDY}
    except ImportError:  # before the Sampling config (5965149): a flag
        greedy = {"greedy": True}

    cores = load_probe.usable_cores()
    torch_threads = sorted(
        {cores if t == "all" else int(t) for t in args.torch_threads.split(",")}, reverse=True
    )
    torch.set_num_threads(torch_threads[0])
    # a placeholder tokenizer of the right size: the benchmark feeds random ids
    tok = placeholder_tokenizer(args.vocab)
    work = Path(tempfile.mkdtemp(prefix="cslm_decode_bench_"))
    try:
        write_random_hf_llama(
            work / "hf",
            tok,
            hidden_size=args.hidden,
            intermediate_size=args.mlp,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            rope_scaling=llama3_rope_scaling(8192),
            max_position_embeddings=131072,
            weight_std=0.02,
        )
        ckpt = import_hf(work / "hf", work / "ckpt", speech_units=0, log=lambda *_: None)
        exported = export_hf(ckpt, work / "export", dtype="float32", log=lambda *_: None)
        cfg, params, _, _ = load_for_decoding(exported, compute_dtype="float32", tmp_dir=work)
        params = decoding_params(cfg, params)
        hf = LlamaForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        n_params = cfg.num_params()
        print(
            f"cslm_jax: {Path(cslm_jax.__file__).parent} ({_git_head(root)}); jax {jax.__version__}, "
            f"torch {torch.__version__}, transformers attention: {hf.config._attn_implementation}; "
            f"{cpu_kernels.status()}",
            flush=True,
        )
        print(load_probe.describe(torch) + f" (timed with {torch_threads})", flush=True)
        print(
            f"model: {n_params / 1e6:.1f}M params, hidden {args.hidden}, layers {args.layers}, "
            f"heads {args.heads}/{args.kv_heads}, MLP {args.mlp}, vocab {args.vocab}, fp32; "
            f"prompt {args.prompt} tokens, {args.new} new tokens per row, greedy",
            flush=True,
        )

        rng = np.random.default_rng(0)
        results = []
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = rng.integers(0, args.vocab - 1, size=(b, args.prompt))

            def ours():
                return generate(cfg, params, prompts.tolist(), max_new_tokens=args.new, **greedy)

            ids = torch.tensor(prompts)
            mask = torch.ones_like(ids)

            def theirs(threads):
                def run():
                    torch.set_num_threads(threads)
                    with torch.no_grad():
                        out = hf.generate(
                            ids,
                            attention_mask=mask,
                            do_sample=False,
                            max_new_tokens=args.new,
                            min_new_tokens=args.new,
                            pad_token_id=0,
                        )
                    return out[:, args.prompt :].tolist()

                return run

            # PyTorch at its best: all cores, and one thread (its thread pool waits for every
            # thread at each op, which a core taken by another job stalls).
            fns = {"cslm_jax": ours} | {
                f"transformers, {t} thread(s)": theirs(t) for t in torch_threads
            }
            timed = timed_round_robin(fns, args.repeats)
            med = {name: statistics.median(ts) for name, (ts, _, _) in timed.items()}
            t_ours, out_ours = med["cslm_jax"], timed["cslm_jax"][2]
            best = min((k for k in timed if k != "cslm_jax"), key=med.get)
            t_theirs, out_theirs = med[best], timed[best][2]
            same = sum(x == y for ra, rb in zip(out_ours, out_theirs) for x, y in zip(ra, rb))
            tokens = b * args.new
            results.append((b, tokens / t_ours, tokens / t_theirs))
            # per round: ours against the faster PyTorch setting of the same round
            rounds = [
                min(timed[k][0][i] for k in timed if k != "cslm_jax") / timed["cslm_jax"][0][i]
                for i in range(args.repeats)
            ]
            print(
                f"batch {b}: tokens/s median (min/median/max over {args.repeats} runs) and the machine "
                f"meanwhile (medians over the runs)",
                flush=True,
            )
            for name, (ts, probes, _) in timed.items():
                print(
                    f"         {name:<28} {tokens / med[name]:8.1f} tokens/s "
                    f"({load_probe.spread([tokens / t for t in ts])}) "
                    f"{'<- best transformers ' if name == best else ''}"
                    f"[{load_probe.probes_summary(probes)}]"
                )
            print(
                f"         ratio cslm_jax / best transformers: {t_theirs / t_ours:.2f}x (per round "
                f"{load_probe.spread(rounds, '{:.2f}')}); greedy tokens equal: {same}/{tokens}",
                flush=True,
            )
        print(
            "summary: "
            + ", ".join(f"batch {b} {o / t:.2f}x" for b, o, t in results)
            + f" (load average at the end {load_probe.load_average()})"
        )
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _git_head(root: Path) -> str:
    import subprocess

    try:
        return (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                text=True,
                capture_output=True,
            ).stdout.strip()
            or "not a git checkout"
        )
    except OSError:
        return "git not found"


if __name__ == "__main__":
    main()
