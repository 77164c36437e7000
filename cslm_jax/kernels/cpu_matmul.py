"""A native CPU kernel for decoding steps: y = x @ W for few rows, weights in panel layout.

A decoding step multiplies a handful of rows (the batch) by every weight matrix once, so it is
bound by reading the weights, and XLA:CPU's dot reads them far below memory bandwidth at a few
rows. This kernel (`small_matmul.cc`, an XLA FFI custom call run on XLA's intra-op threads) reads
weights stored once in its own layout, `panel_layout(w)` [ceil(N/32), K, 32]. Measured speeds
against XLA's dot: `benchmarks/cpu_matmul.py`, recorded in `benchmarks/RESULTS.md`.

The kernel is compiled at first use with the machine's C++ compiler (`$CXX`, else c++, g++,
clang++, else `python -m ziglang c++` when the `ziglang` package is installed) for the host CPU
(`-march=native`; x86-64 with AVX-512F, or AVX2 + FMA), and cached under
`$CSLM_JAX_CACHE/kernels` (default `~/.cache/cslm_jax/kernels`), keyed by the source, compiler
command, jaxlib version and CPU flags. Where it cannot be built (another architecture, no
compiler) decoding uses XLA's dot and `status()` says why.

`CSLM_JAX_CPU_KERNELS=0` turns the kernel off; `=1` makes a failed build an error instead of a
fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cslm_jax.errors import CslmError

TARGET = "cslm_small_matmul"
PANEL = 32  # columns per panel (NB in the C++ source)
SOURCE = Path(__file__).with_name("small_matmul.cc")
ENV = "CSLM_JAX_CPU_KERNELS"


class KernelBuildError(CslmError):
    """The kernel could not be compiled or loaded; the message says which step and why."""


_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_supported() -> tuple[bool, str]:
    """(True, isa) where the kernel has a code path for this CPU, else (False, why)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"no kernel for {platform.machine()} CPUs (x86-64 only)"
    flags = set(_cpu_flags().split())
    if "avx512f" in flags:
        return True, "avx512f"
    if {"avx2", "fma"} <= flags:
        return True, "avx2+fma"
    return False, "the CPU has neither AVX-512F nor AVX2+FMA"


def compilers() -> list[list[str]]:
    """C++ compiler commands to try, in order."""
    out = []
    if os.environ.get("CXX"):
        out.append(os.environ["CXX"].split())
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path and [path] not in out:
            out.append([path])
    if importlib.util.find_spec("ziglang") is not None:
        out.append([sys.executable, "-m", "ziglang", "c++"])
    return out


def cache_dir() -> Path:
    root = os.environ.get("CSLM_JAX_CACHE") or Path.home() / ".cache" / "cslm_jax"
    return Path(root) / "kernels"


def build(
    compiler: list[str], out_dir: Path | None = None, extra_flags: tuple[str, ...] = ()
) -> Path:
    """Compile the kernel with `compiler` into `out_dir` (default: the cache) and return the
    shared library's path; an existing build with the same key is reused. The library appears
    under its final name only when complete (written elsewhere, then renamed)."""
    import jaxlib

    source = SOURCE.read_bytes()
    flags = [
        "-O3",
        "-march=native",
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-w",
        "-I",
        str(jax.ffi.include_dir()),
        *extra_flags,
    ]
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(compiler + flags).encode(),
                jaxlib.__version__.encode(),
                _cpu_flags().encode(),
            ]
        )
    )
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    lib = out_dir / f"small_matmul-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [*compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            raise KernelBuildError(
                f"{' '.join(compiler)} failed on {SOURCE} (exit "
                f"{proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, lib)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"{' '.join(compiler)} could not compile {SOURCE}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def register(lib: Path, target: str = TARGET) -> None:
    """Load a built library and register its handler as the CPU FFI target `target`."""
    try:
        handle = ctypes.cdll.LoadLibrary(str(lib))
        capsule = jax.ffi.pycapsule(handle.CslmSmallMatmul)
    except (OSError, AttributeError) as e:
        raise KernelBuildError(f"could not load the kernel from {lib}: {e}") from e
    jax.ffi.register_ffi_target(target, capsule, platform="cpu")


def _load() -> dict:
    with _lock:
        if _state:
            return _state
        setting = os.environ.get(ENV, "").strip()
        if setting == "0":
            _state.update(ok=False, reason=f"turned off ({ENV}=0)")
            return _state
        ok, why = cpu_supported()
        reasons = [] if ok else [why]
        if ok:
            tried = compilers()
            if not tried:
                reasons.append("no C++ compiler found (set CXX, or pip install ziglang)")
            for compiler in tried:
                try:
                    lib = build(compiler)
                    register(lib)
                    _state.update(ok=True, reason=f"built with {' '.join(compiler)} for {why}")
                    return _state
                except KernelBuildError as e:
                    reasons.append(str(e))
        reason = "; ".join(reasons)
        if setting == "1":
            raise KernelBuildError(f"{ENV}=1 but the CPU decoding kernel is unavailable: {reason}")
        _state.update(ok=False, reason=reason)
        return _state


def available() -> bool:
    """True when the kernel is built and registered (builds it on the first call)."""
    return _load()["ok"]


def status() -> str:
    """One line: whether decoding on CPU uses the kernel, and why not when it does not."""
    s = _load()
    return (
        f"CPU decoding kernel: on ({s['reason']})"
        if s["ok"]
        else f"CPU decoding kernel: off, XLA's dot instead ({s['reason']})"
    )


def panel_layout(w) -> jax.Array:
    """[K, N] weights -> [ceil(N / 32), K, 32] float32 panels (zero columns past N)."""
    w = np.asarray(w, np.float32)
    k, n = w.shape
    p = -(-n // PANEL)
    padded = np.zeros((k, p * PANEL), np.float32)
    padded[:, :n] = w
    return jnp.asarray(np.ascontiguousarray(padded.reshape(k, p, PANEL).transpose(1, 0, 2)))


def from_panels(panels, n: int) -> np.ndarray:
    """The [K, n] matrix that `panel_layout` laid out (numpy)."""
    p, k, c = panels.shape
    return np.asarray(panels).transpose(1, 0, 2).reshape(k, p * c)[:, :n]


def matmul(x: jax.Array, panels: jax.Array, n: int, target: str = TARGET) -> jax.Array:
    """x [M, K] float32 @ W (as `panel_layout(W)`, N = n columns) -> [M, N] float32, by the
    kernel. Call `available()` first (it registers the target)."""
    if x.dtype != jnp.float32 or panels.dtype != jnp.float32:
        raise TypeError(f"the CPU kernel is float32 only, got {x.dtype} @ {panels.dtype}")
    if (
        panels.ndim != 3
        or panels.shape[2] != PANEL
        or panels.shape[1] != x.shape[-1]
        or not (panels.shape[0] - 1) * PANEL < n <= panels.shape[0] * PANEL
    ):
        raise ValueError(f"panels {panels.shape} do not hold a [{x.shape[-1]}, {n}] matrix")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, panels)
