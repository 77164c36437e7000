"""Keep freed host memory in the process for XLA:CPU (and PyTorch CPU) training steps.

XLA:CPU allocates an executable's temporaries as one block per run (gigabytes for a 125M-parameter
Llama step) with posix_memalign from the calling thread's glibc arena. glibc serves blocks that
large with a fresh mmap and returns them with munmap when the run ends, so every step page-faults
its whole temporary block back in (the figures: `benchmarks/RESULTS.md`, measured with
`benchmarks/train_step.py`).

`keep_freed_memory()` sets glibc to serve every allocation from the main heap (one arena, no
mmap) and never to trim it: the second step reuses the first step's pages and faults nothing.
The process then holds on to its peak heap, which a training process reaches in its first step
anyway. It must run before JAX (or any library that starts threads and allocates) is imported:
glibc fixes the arena count the first time a second thread allocates. Only glibc (Linux) is
touched; elsewhere it does nothing and returns False. This module imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def keep_freed_memory() -> bool:
    """One glibc arena, no mmap-backed blocks, no trimming. True when all three were applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1 as the trim threshold is SIZE_MAX once glibc widens it to size_t: never trim
    return all(
        mallopt(param, value) == 1
        for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
    )
