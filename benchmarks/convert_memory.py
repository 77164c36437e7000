"""Peak host memory of `cslm-jax import-hf` and `export-hf` on a synthetic bf16 Llama checkpoint.

Writes a random Llama-3-shaped HF folder (sharded safetensors, bf16) without ever holding it whole,
then runs import and export each in a fresh process and reports its peak resident memory
(ru_maxrss) next to the size of one full copy of the weights. The target: peak < 2 copies.

    python benchmarks/convert_memory.py --layers 16 --hidden 2048 --mlp 8192   # ~1.2B (Llama-3.2-1B shape)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np


def write_synthetic_hf(
    out: Path,
    layers: int,
    hidden: int,
    mlp: int,
    heads: int,
    kv_heads: int,
    vocab_tokens: int,
    shard_bytes: int = 2 * 1024**3,
) -> int:
    """A bf16 HF Llama folder with a BPE tokenizer sized to its vocabulary; returns weight bytes."""
    from safetensors.numpy import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cslm_jax.model.vocab import llama3_tokenizer

    tok = llama3_tokenizer()
    vocab = len(tok)
    assert vocab_tokens in (0, vocab)
    dh = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * dh, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * dh, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * dh, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * dh),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (mlp, hidden),
                p + "mlp.up_proj.weight": (mlp, hidden),
                p + "mlp.down_proj.weight": (hidden, mlp),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    shard, size, k, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, size, k
        k += 1
        name = f"model-{k:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        a = rng.standard_normal(shape, dtype=np.float32)
        a = (a * 0.02).astype(ml_dtypes.bfloat16)
        shard[name] = a
        size += a.nbytes
        total += a.nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": vocab,
                "hidden_size": hidden,
                "intermediate_size": mlp,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "head_dim": dh,
                "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 32.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "max_position_embeddings": 131072,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
                "bos_token_id": 128000,
                "eos_token_id": [128001, 128008, 128009],
            }
        )
    )
    tok.save_pretrained(str(out))
    return total


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak resident memory in GiB, seconds) of a command run in a fresh process."""
    t0 = time.time()
    code = f"""
import runpy, sys
sys.argv = {cmd!r}
try:
    runpy.run_module('cslm_jax.cli.main', run_name='__main__')
except SystemExit as e:
    if e.code: raise
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child would report the
# parent's peak if that was higher.
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]
print('PEAK_KB', int(hwm.split()[1]))
"""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    if res.returncode:
        sys.exit(f"{cmd} failed:\n{res.stdout}\n{res.stderr}")
    kb = int(res.stdout.rsplit("PEAK_KB", 1)[1].split()[0])
    return kb / 1024**2, time.time() - t0


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where to write (needs ~3 copies of disk)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cslm_convert_bench_"))
    try:
        hf = work / "hf"
        t0 = time.time()
        total = write_synthetic_hf(
            hf, args.layers, args.hidden, args.mlp, args.heads, args.kv_heads, 0
        )
        copy_gib = total / 1024**3
        print(
            f"synthetic HF Llama: {total / 2 / 1e9:.2f}B parameters, one bf16 copy = "
            f"{copy_gib:.2f} GiB (written in {time.time() - t0:.0f}s)"
        )
        # fixed cost of the process (Python, JAX, the 128K-token tokenizer): a 1-layer toy model
        write_synthetic_hf(work / "toy", 1, 64, 128, 4, 2, 0)
        base_i, _ = peak_rss_of(
            [
                "cslm-jax",
                "import-hf",
                "--hf-dir",
                str(work / "toy"),
                "--out",
                str(work / "toy_ckpt"),
                "--speech-units",
                "4096",
            ]
        )
        base_e, _ = peak_rss_of(
            [
                "cslm-jax",
                "export-hf",
                "--ckpt",
                str(work / "toy_ckpt"),
                "--out",
                str(work / "toy_export"),
            ]
        )
        print(
            f"fixed process overhead (toy model): import {base_i:.2f} GiB, export {base_e:.2f} GiB"
        )
        peak_i, t_i = peak_rss_of(
            [
                "cslm-jax",
                "import-hf",
                "--hf-dir",
                str(hf),
                "--out",
                str(work / "ckpt"),
                "--speech-units",
                "4096",
            ]
        )
        print(
            f"import-hf (+4096 units): peak RSS {peak_i:.2f} GiB; above the fixed overhead "
            f"{peak_i - base_i:.2f} GiB = {(peak_i - base_i) / copy_gib:.2f} x one copy; {t_i:.0f}s"
        )
        peak_e, t_e = peak_rss_of(
            [
                "cslm-jax",
                "export-hf",
                "--ckpt",
                str(work / "ckpt"),
                "--out",
                str(work / "export"),
                "--max-shard-size-mb",
                "2048",
            ]
        )
        print(
            f"export-hf (bf16, 2 GiB shards): peak RSS {peak_e:.2f} GiB; above the fixed overhead "
            f"{peak_e - base_e:.2f} GiB = {(peak_e - base_e) / copy_gib:.2f} x one copy; {t_e:.0f}s"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
