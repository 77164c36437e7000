"""Training metrics: FLOPs per token and MFU (against the chip's datasheet peak, or a matmul peak
measured on CPU), and the writer of `metrics.jsonl`, TensorBoard and the progress bar."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cslm_jax.config import ModelConfig
from cslm_jax.storage import fs
from cslm_jax.tpu.chips import chip_of_device_kind


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), as PaLM (Chowdhery et al. 2022,
    appendix B) and MaxText count them:

        6 * N_matmul + 12 * L * H * Dh * T

    N_matmul: parameters that take part in matmuls (every layer weight and the LM head; the
    embedding lookup is a gather, not a matmul, unless it is tied as the head). The attention
    term counts QK^T and PV over the full T x T square (not halved for causality), as PaLM does.
    Remat recomputation is not counted: MFU measures useful work.
    """
    d, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn_proj = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    n_matmul = l * (attn_proj + 3 * d * f) + cfg.vocab_size * d
    return 6.0 * n_matmul + 12.0 * l * cfg.num_heads * cfg.head_dim * seq_len


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n x n dense matmul on the default device, the fastest of `repeats` (the
    run least disturbed by other work on the machine: still a lower bound of the peak where
    other work runs)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times)


def peak_flops_per_device(configured: float | None, compute_dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if configured:
        return float(configured), "config"
    kind = jax.devices()[0].device_kind
    chip = chip_of_device_kind(kind)
    if chip is not None:
        return chip.peak_bf16, f"{kind} datasheet (bf16 dense)"
    peak = measure_matmul_peak(jnp.dtype(compute_dtype))
    # on CPU every fake device shares the same cores: the host's peak is split among them
    per_device = (
        peak / max(jax.local_device_count(), 1) if jax.devices()[0].platform == "cpu" else peak
    )
    return per_device, (
        f"measured {compute_dtype} 2048^2 matmul on {kind}, fastest of 5: a "
        f"lower bound of the peak, so MFU reads high if other work shares the "
        f"machine; set train.peak_flops_per_device to fix it"
    )


# -- metrics output ---------------------------------------------------------------------------------


class MetricsWriter:
    """JSON lines + TensorBoard + a progress bar (or plain lines when not on a terminal).
    Only process 0 writes; the others keep quiet.

    For a run folder in a bucket (gs://) both are written to a local staging folder and copied
    to the run folder every `sync_every_s` seconds and on close (an object cannot be appended
    to: metrics.jsonl is rewritten whole, TensorBoard event files likewise)."""

    def __init__(
        self,
        run_dir,
        total_steps: int,
        start_step: int,
        progress_bar: bool,
        log=print,
        sync_every_s: float = 30.0,
    ):
        self.enabled = jax.process_index() == 0
        self.log = log
        self.run_dir = fs.path(run_dir)
        self.remote = fs.is_remote(self.run_dir)
        self.sync_every_s = sync_every_s
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        if self.remote:
            self._stage = Path(tempfile.mkdtemp(prefix="cslm_jax-metrics-"))
            remote_metrics = self.run_dir / "metrics.jsonl"
            if remote_metrics.exists():
                (self._stage / "metrics.jsonl").write_text(remote_metrics.read_text())
            local_dir = self._stage
        else:
            local_dir = Path(os.fspath(self.run_dir))
        self.path = local_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        import tensorflow as tf  # heavy: TensorFlow

        self._tf = tf
        self._tb = tf.summary.create_file_writer(str(local_dir / "tensorboard"))
        self._last_sync = time.monotonic()
        if progress_bar and sys.stderr.isatty():
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their earlier lines."""
        if not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def sync(self) -> None:
        """Copy the staged files to a gs:// run folder (a no-op for a local one)."""
        if not (self.enabled and self.remote):
            return

        self._file.flush()
        self._tb.flush()
        fs.upload_dir(self._stage, self.run_dir)
        self._last_sync = time.monotonic()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        with self._tb.as_default():
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tf.summary.scalar(k, v, step=row["step"])
        short = (
            f"loss {row['loss']:.4f} (text {row['text_loss']:.3f}, units {row['unit_loss']:.3f}) "
            f"lr {row['learning_rate']:.2e} |g| {row['grad_norm']:.2f} "
            f"{row['tokens_per_s']:.0f} tok/s mfu {row['mfu']:.1%}"
        )
        if self._bar is not None:
            self._bar.n = row["step"]
            self._bar.set_postfix_str(short, refresh=True)
        else:
            self.log(f"step {row['step']}: {short}")
        if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def close(self) -> None:
        if not self.enabled:
            return
        self._tb.flush()
        self.sync()
        self._file.close()
        if self.remote:
            shutil.rmtree(self._stage, ignore_errors=True)
        if self._bar is not None:
            self._bar.close()


def metrics_row(
    step: int,
    m: dict,
    elapsed: float,
    skipped: int,
    task_names,
    tokens: int,
    flops_per_token: float,
    peak: float,
    devices: int,
) -> dict:
    """One line of metrics.jsonl: step `m` (host values of the step's metrics) that took
    `elapsed` seconds for `tokens` tokens on `devices` devices of `peak` FLOP/s each; the
    loss of each task that had tokens in the batch as `loss/<task>`."""
    row = {
        "step": step,
        "loss": float(m["loss"]),
        "text_loss": float(m["text_loss"]),
        "unit_loss": float(m["unit_loss"]),
        "learning_rate": float(m["learning_rate"]),
        "grad_norm": float(m["grad_norm"]),
        "trained_tokens": int(m["tokens_trained"]),
        "text_tokens": int(m["text_tokens"]),
        "unit_tokens": int(m["unit_tokens"]),
        "step_time_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "mfu": flops_per_token * tokens / elapsed / (peak * devices) if elapsed > 0 else 0.0,
        "skipped_steps": skipped,
        "finite": bool(m["finite"]),
    }
    for name, loss, count in zip(
        task_names, np.asarray(m["task_loss"]), np.asarray(m["task_tokens"])
    ):
        if count > 0:
            row[f"loss/{name}"] = float(loss)
    return row
