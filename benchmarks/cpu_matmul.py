"""Decoding-step matmuls on CPU: the native kernel (`cslm_jax.kernels.cpu_matmul`, its AVX-512 and its
AVX2+FMA code path) vs XLA's dot, in one run, ratio printed.

Each case multiplies M rows by a chain of distinct weight matrices (together larger than the
last-level cache, as in a decoding step, where every weight comes from memory), inside one jit;
the time per matrix is the median over repeats divided by the chain length. GB/s counts the
weights read.

    python benchmarks/cpu_matmul.py                 # 41M benchmark model's shapes, 1 and 8 rows
    python benchmarks/cpu_matmul.py --rows 1,4,8,16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", default="1,8", help="row counts M, comma-separated")
    ap.add_argument(
        "--shapes",
        default="512x768,512x3072,1536x512,512x16384",
        help="KxN weight shapes (the benchmark model's qkv, gate_up, down, head)",
    )
    ap.add_argument("--chain-mb", type=float, default=96, help="weights per chain, MB")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from cslm_jax.kernels import cpu_matmul as cpu_kernels

    if not cpu_kernels.available():
        sys.exit(f"cpu_matmul: {cpu_kernels.status()}")
    targets = {"kernel": cpu_kernels.TARGET}
    ok, isa = cpu_kernels.cpu_supported()
    if isa == "avx512f":
        lib = cpu_kernels.build(
            cpu_kernels.compilers()[0], Path(tempfile.mkdtemp()), extra_flags=("-mno-avx512f",)
        )
        cpu_kernels.register(lib, "cslm_small_matmul_avx2_bench")
        targets = {"avx512": cpu_kernels.TARGET, "avx2": "cslm_small_matmul_avx2_bench"}
    print(
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}; "
        f"{cpu_kernels.status()}",
        flush=True,
    )

    def timed(fn):
        fn()
        fn()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        chain = max(2, int(args.chain_mb * 1e6 // (4 * k * n)))
        weights = [rng.standard_normal((k, n), np.float32) * 0.02 for _ in range(chain)]
        dense = [jnp.asarray(w) for w in weights]
        panels = [cpu_kernels.panel_layout(w) for w in weights]

        def program(matmul):
            @jax.jit
            def f(x, ws):
                for w in ws:  # each output feeds the next input
                    y = matmul(x, w)
                    x = x + 1e-3 * jnp.tanh(y[:, :k] if n >= k else jnp.tile(y, (1, k // n)))
                return x

            return f

        for m in (int(v) for v in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k), np.float32))
            runs = {"xla": (program(lambda a, w: a @ w), dense)}
            for name, target in targets.items():
                runs[name] = (
                    program(lambda a, w, t=target: cpu_kernels.matmul(a, w, n, t)),
                    panels,
                )
            per = {
                name: timed(lambda: f(x, ws).block_until_ready()) / chain
                for name, (f, ws) in runs.items()
            }
            cells = [
                f"{name} {t * 1e6:7.1f} us ({4 * k * n / t / 1e9:4.1f} GB/s)"
                for name, t in per.items()
            ]
            ratios = ", ".join(f"{name} {per['xla'] / per[name]:.2f}x" for name in targets)
            print(
                f"[{m},{k}] x [{k},{n}] (chain of {chain}): "
                + " | ".join(cells)
                + f"  -> vs XLA's dot: {ratios}",
                flush=True,
            )


if __name__ == "__main__":
    main()
