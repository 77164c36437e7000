"""Forward+backward tokens/s: cslm_jax's Flax Llama vs `transformers` LlamaForCausalLM (PyTorch),
same config, batch, length and weights, in one run; prints both and the ratio.

    python benchmarks/fwd_bwd.py                       # ~30M-parameter config, fp32, CPU
    python benchmarks/fwd_bwd.py --hidden 768 --layers 12 --batch 4 --length 512
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="none")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from cslm_jax.convert.hf import import_hf
    from cslm_jax.demo.random_hf import (
        llama3_rope_scaling,
        placeholder_tokenizer,
        write_random_hf_llama,
    )
    from cslm_jax.model.llama import forward, token_cross_entropy
    from cslm_jax.storage.checkpoint import load_params, read_metadata

    torch.set_num_threads(os.cpu_count())
    # a placeholder tokenizer of the right size: the benchmark feeds random ids
    tok = placeholder_tokenizer(args.vocab)
    work = Path(tempfile.mkdtemp(prefix="cslm_fwd_bwd_"))
    model = write_random_hf_llama(
        work / "hf",
        tok,
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        rope_scaling=llama3_rope_scaling(8192),
        max_position_embeddings=131072,
    )
    ckpt = import_hf(work / "hf", work / "ckpt", speech_units=0, log=lambda *_: None)
    _, cfg, _ = read_metadata(ckpt)
    cfg = cfg.replace(compute_dtype="float32", remat_policy=args.remat)
    params = jax.device_put(load_params(ckpt))
    n_params = cfg.num_params()

    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab, size=(args.batch, args.length + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    tokens = args.batch * args.length

    def jax_loss(p, x, y):
        total, count = token_cross_entropy(forward(cfg, p, x), y, jnp.ones_like(y))
        return total / count

    step = jax.jit(jax.value_and_grad(jax_loss))
    x, y = jnp.asarray(inputs), jnp.asarray(labels)

    def run_jax():
        loss, grads = step(params, x, y)
        jax.block_until_ready(grads)

    model.train()
    tx, ty = torch.tensor(inputs), torch.tensor(labels)

    def run_torch():
        model.zero_grad(set_to_none=True)
        logits = model(tx).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ty.reshape(-1)
        )
        loss.backward()

    t_jax = timed(run_jax, 2, args.steps)
    t_torch = timed(run_torch, 2, args.steps)
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"config: {n_params / 1e6:.1f}M params, hidden {args.hidden}, layers {args.layers}, "
        f"heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, batch {args.batch} x "
        f"length {args.length}, fp32, remat {args.remat}"
    )
    print(
        f"cslm_jax (Flax, jit):       {tokens / t_jax:9.0f} tokens/s  ({t_jax * 1e3:.0f} ms/step)"
    )
    print(
        f"transformers (PyTorch):     {tokens / t_torch:9.0f} tokens/s  ({t_torch * 1e3:.0f} ms/step)"
    )
    print(f"ratio cslm_jax / transformers: {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    main()
