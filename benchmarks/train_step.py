"""Train-step tokens/s and MFU: cslm_jax's jit-compiled step (make_train_step + make_optimizer:
optax AdamW + global-norm clipping, donated params/optimizer state) against the reference's
stack (`transformers` LlamaForCausalLM + torch.optim.AdamW + clip_grad_norm_), same config,
same weights (the HF model imported through `import-hf`), same batch and length, fp32, in one
run; also this machine's dense float32 matmul peak, measured in the same run, for MFU.

    python benchmarks/train_step.py          # ~125M params (100M in matmuls), batch 4 x 512, CPU

A step is forward + backward + clipping + AdamW update, on both sides. Prints tokens/s of each,
the ratio, the model FLOP/s of each and MFU against the measured matmul peak (one FLOP formula
for both stacks: `cslm_jax.train.metrics.flops_per_token`).

    python benchmarks/train_step.py --keep-freed-memory --repo /work/base   # another checkout
    python benchmarks/train_step.py --busy 1 --xla-threads 1 --torch-threads 1

Also printed: the load average (1/5/15 min) at the start and the end, the usable cores, the
threads each stack uses, and per stack the min/median/max over the steps with what the rest of
the machine took meanwhile (`load_probe.Probe`: other processes' CPU in cores, our threads'
run-queue wait); see RESULTS.md, "Refactor (issue 18)".
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import load_probe  # noqa: E402  (benchmarks/load_probe.py, next to this script)


def timed(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def torch_matmul_peak(n: int, repeats: int) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timed(lambda: a @ b, 1, repeats)
    return 2.0 * n**3 / statistics.median(t)


def git_head(root: Path) -> str:
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


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--mlp", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stack (median reported)")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-scan", action="store_true", help="unrolled layers (scan_layers=false)")
    ap.add_argument(
        "--torch-attn",
        default="sdpa",
        choices=("sdpa", "eager"),
        help="transformers attention (sdpa: transformers' default)",
    )
    ap.add_argument(
        "--torch-adamw",
        default="fused",
        choices=("fused", "foreach", "forloop"),
        help="torch AdamW implementation (fused: HF Trainer's default with torch>=2.8)",
    )
    ap.add_argument("--skip-torch", action="store_true", help="ours only (for quick iterations)")
    ap.add_argument("--skip-peak", action="store_true")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="cslm_jax.train.cpu_malloc.keep_freed_memory() before importing JAX and torch (one "
        "glibc arena, no mmap, no trim: steps stop page-faulting their temporaries; "
        "applies to the whole process, so to both stacks)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="all steps of one stack, then the other (default: interleaved A B A B)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="PyTorch intra-op threads (default: one per usable core)",
    )
    load_probe.add_arguments(ap)
    args = ap.parse_args()
    root = load_probe.use_repo(args.repo)
    with load_probe.Busy(args.busy, args.busy_seconds):
        run_benchmark(args, root)


def run_benchmark(args, root: Path):
    work = Path(tempfile.mkdtemp(prefix="cslm_train_step_"))
    try:
        _run_benchmark(args, root, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_benchmark(args, root: Path, work: Path):
    print(f"load average at the start: {load_probe.load_average()}", flush=True)
    malloc_tuned = False
    if args.keep_freed_memory:
        try:
            from cslm_jax.train.cpu_malloc import keep_freed_memory
        except ImportError:  # the flat layout before the packages (commit 059734b and earlier)
            from cslm_jax.cpu_malloc import keep_freed_memory
        malloc_tuned = keep_freed_memory()

    jax = load_probe.start_jax(args.xla_threads)
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    import cslm_jax
    from cslm_jax.config import OptimizerConfig

    try:
        from cslm_jax.convert.hf import import_hf
        from cslm_jax.demo.random_hf import (
            llama3_rope_scaling,
            placeholder_tokenizer,
            write_random_hf_llama,
        )
        from cslm_jax.storage.checkpoint import load_params, read_metadata
        from cslm_jax.train.step import make_optimizer, make_train_step

        try:
            from cslm_jax.train.metrics import flops_per_token, measure_matmul_peak
        except ImportError:  # before train/metrics.py (21c5896 and earlier)
            from cslm_jax.train.loop import flops_per_token, measure_matmul_peak
    except ImportError:  # the flat layout before the packages (commit 059734b and earlier)
        from cslm_jax.checkpoint import load_params, read_metadata
        from cslm_jax.convert import import_hf
        from cslm_jax.random_hf import (
            llama3_rope_scaling,
            placeholder_tokenizer,
            write_random_hf_llama,
        )
        from cslm_jax.train import flops_per_token, measure_matmul_peak
        from cslm_jax.train_step import make_optimizer, make_train_step

    torch.set_num_threads(args.torch_threads or load_probe.usable_cores())
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores; "
        f"python {platform.python_version()}; jax {jax.__version__} ({jax.devices()[0].platform}, "
        f"{jax.device_count()} device); torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads, {torch.get_num_interop_threads()} interop); transformers {transformers.__version__}"
    )
    print(f"cslm_jax: {Path(cslm_jax.__file__).parent} ({git_head(root)})")
    print(load_probe.describe(torch))
    print(
        f"env: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')!r}; glibc keep_freed_memory: "
        f"{'applied' if malloc_tuned else 'no'}"
    )

    # -- the machine's dense matmul peak, measured now ------------------------------------------
    peaks = {}
    if not args.skip_peak:
        for n in (2048, 4096):
            peaks[f"jax {n}^2"] = measure_matmul_peak(n=n, repeats=5)
            peaks[f"torch {n}^2"] = torch_matmul_peak(n, 5)
        for k, v in peaks.items():
            print(f"float32 matmul {k:11s}: {v / 1e9:6.1f} GFLOP/s (median of 5)")
    peak = max(peaks.get("jax 2048^2", 0), peaks.get("jax 4096^2", 0)) or float("nan")

    # -- the same random HF model for both stacks -----------------------------------------------
    # a placeholder tokenizer of the right size: the benchmark feeds random ids
    tok = placeholder_tokenizer(args.vocab)
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
    _, cfg, _ = read_metadata(ckpt)
    cfg = cfg.replace(
        compute_dtype="float32",
        param_dtype="float32",
        remat_policy=args.remat,
        scan_layers=not args.no_scan,
    )
    n_params = cfg.num_params()
    fpt = flops_per_token(cfg, args.length)  # the trainer's own formula, stated there
    tokens = args.batch * args.length
    print(
        f"config: {n_params / 1e6:.1f}M params ({(n_params - cfg.vocab_size * cfg.hidden_size) / 1e6:.1f}M "
        f"without the input embedding), hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads "
        f"{cfg.num_heads}/{cfg.num_kv_heads} x {cfg.head_dim}, MLP {cfg.intermediate_size}, vocab "
        f"{cfg.vocab_size}, untied; batch {args.batch} x length {args.length} = {tokens} tokens/step; "
        f"fp32; remat {args.remat}, scan_layers {cfg.scan_layers}"
    )
    print(
        f"model FLOPs: {fpt / 1e6:.1f} MFLOP/token (6 * N_matmul + 12 * L * H * Dh * T, attention "
        f"not halved for causality) = {fpt * tokens / 1e12:.3f} TFLOP/step"
    )

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.length + 1)).astype(np.int32)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    opt_cfg = OptimizerConfig(learning_rate=1e-4, total_steps=1000, warmup_ratio=0.0)

    # -- ours: jit(make_train_step), donated params and optimizer state --------------------------
    params = jax.device_put(load_params(ckpt))
    optimizer = make_optimizer(opt_cfg)
    opt_state = optimizer.init(params)
    step = jax.jit(
        make_train_step(cfg, optimizer, (args.vocab // 2, args.vocab)), donate_argnums=(0, 1)
    )
    B, T = args.batch, args.length
    batch = {
        "tokens": inputs,
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
        "segment_ids": np.ones((B, T), np.int32),
        "targets": labels,
        "loss_weights": np.ones((B, T), np.int32),
    }
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # one micro-batch: [1, B, T]
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, batch).compile()
    print(f"cslm_jax compile: {time.perf_counter() - t0:.1f} s")
    state = {"params": params, "opt": opt_state, "loss": None}
    del params, opt_state

    def run_jax():
        state["params"], state["opt"], m = compiled(state["params"], state["opt"], batch)
        state["loss"] = float(m["loss"])  # blocks until the step is done

    stacks = {"cslm_jax (jit, optax AdamW)": run_jax}

    # -- the reference's stack: transformers + torch AdamW + clip_grad_norm_ ---------------------
    if not args.skip_torch:
        model = LlamaForCausalLM.from_pretrained(
            str(work / "hf"), attn_implementation=args.torch_attn, dtype=torch.float32
        )
        model.train()
        kw = (
            {"fused": True}
            if args.torch_adamw == "fused"
            else {"foreach": args.torch_adamw == "foreach"}
        )
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=opt_cfg.learning_rate,
            betas=(opt_cfg.b1, opt_cfg.b2),
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            **kw,
        )
        tx, ty = torch.tensor(inputs, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
        tstate = {}

        def run_torch():
            opt.zero_grad(set_to_none=True)
            logits = model(tx).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), ty.reshape(-1)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
            opt.step()
            tstate["loss"] = loss.item()

        stacks[f"transformers ({args.torch_attn}) + torch AdamW ({args.torch_adamw})"] = run_torch

    # warm-up, then the stacks' steps interleaved (A B A B ...): a shared machine's background
    # load then falls on both alike
    for fn in stacks.values():
        for _ in range(args.warmup):
            fn()
    results = {name: [] for name in stacks}
    cpu = {name: [] for name in stacks}
    probes = {name: [] for name in stacks}
    round_peaks = []

    def one_step(name, fn):
        with load_probe.Probe() as p:
            fn()
        results[name].append(p.wall)
        cpu[name].append(p.cpu)
        probes[name].append(p)

    if args.sequential:
        for name, fn in stacks.items():
            for _ in range(args.steps):
                one_step(name, fn)
    else:
        for _ in range(args.steps):
            if not args.skip_peak:  # the peak too, under the same conditions as the steps
                round_peaks.append(measure_matmul_peak(n=2048, repeats=3))
            for name, fn in stacks.items():
                one_step(name, fn)
    print(
        f"losses after {args.warmup + args.steps} steps: cslm_jax {state['loss']:.4f}"
        + ("" if args.skip_torch else f", torch {tstate['loss']:.4f}")
    )
    print(f"load average at the end: {load_probe.load_average()}")
    if not args.skip_peak:
        round_peaks.append(
            max(measure_matmul_peak(n=2048, repeats=5), measure_matmul_peak(n=4096, repeats=5))
        )
        print(
            "float32 matmul jax, measured between the rounds and after: "
            + " ".join(f"{p / 1e9:.1f}" for p in round_peaks)
            + " GFLOP/s"
        )
        peak = max([peak] + round_peaks)

    # -- report ------------------------------------------------------------------------------------
    print()
    print(
        f"{'stack':48s} {'tokens/s':>9s} {'ms/step':>8s} {'GFLOP/s':>8s} {'MFU':>6s} {'CPU s':>6s}   steps (s)"
    )
    for name, times in results.items():
        t = statistics.median(times)
        flops = fpt * tokens / t
        print(
            f"{name:48s} {tokens / t:9.1f} {t * 1e3:8.0f} {flops / 1e9:8.1f} {flops / peak:6.1%} "
            f"{statistics.median(cpu[name]):6.1f}   " + " ".join(f"{x:.2f}" for x in times)
        )
    for name, times in results.items():
        print(
            f"{name:48s} tokens/s min/median/max {load_probe.spread([tokens / t for t in times])}; "
            f"{load_probe.probes_summary(probes[name])}"
        )
    if len(results) == 2:
        (a, ta), (b, tb) = results.items()
        print(
            f"ratio cslm_jax / transformers (tokens/s, median step times): "
            f"{statistics.median(tb) / statistics.median(ta):.2f}x (per round "
            f"{load_probe.spread([y / x for x, y in zip(ta, tb)], '{:.2f}')})"
        )
    print(
        f"MFU: model FLOP/s / the best JAX float32 matmul measured in this run, {peak / 1e9:.1f} GFLOP/s. "
        f"CPU s: process CPU time per step (both threads)"
    )


if __name__ == "__main__":
    main()
