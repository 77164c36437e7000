"""glibc malloc tuning for training commands: applied before JAX is imported, and effective."""

import subprocess
import sys

import pytest


def run_py(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_cli_module_does_not_import_jax():
    """`main` must be able to call mallopt before any thread exists: importing the CLI (which
    parses arguments first) must not pull in JAX."""
    assert run_py("import sys, cslm_jax.cli.main; print('jax' in sys.modules)") == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """After the call a 64 MiB block comes from the main heap (below the program break) and is
    not returned on free; without it glibc maps and unmaps such a block."""
    code = """
import ctypes, sys
from cslm_jax.train.cpu_malloc import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p; libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]; libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[-1] == "tuned":
    assert keep_freed_memory()
p = libc.malloc(64 << 20)
in_heap = p < libc.sbrk(0)
libc.free(p)
print(in_heap)
"""
    plain = subprocess.run([sys.executable, "-c", code, "plain"], capture_output=True, text=True)
    tuned = subprocess.run([sys.executable, "-c", code, "tuned"], capture_output=True, text=True)
    assert plain.returncode == 0 and tuned.returncode == 0, plain.stderr + tuned.stderr
    assert (plain.stdout.strip(), tuned.stdout.strip()) == ("False", "True")


def test_cli_asks_for_the_cpu_only_where_no_accelerator_exists():
    """No TPU chip, no CUDA plugin, JAX_PLATFORMS unset -> cpu (libtpu stays quiet); a value the
    user set is kept."""
    from cslm_jax.parallel.distributed import tpu_chips_on_host

    if tpu_chips_on_host():
        pytest.skip("a TPU host: the CLI leaves JAX_PLATFORMS alone there")
    code = (
        "import os, sys; from cslm_jax.cli.setup import quiet_tpu_probe; quiet_tpu_probe(); "
        "print(os.environ.get('JAX_PLATFORMS'))"
    )
    import os

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    unset = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    kept = subprocess.run(
        [sys.executable, "-c", code],
        env=env | {"JAX_PLATFORMS": "cpu,tpu"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    import importlib.util

    cuda = importlib.util.find_spec("jax_plugins") is not None
    assert unset.stdout.strip() == ("None" if cuda else "cpu"), unset.stderr
    assert kept.stdout.strip() == "cpu,tpu", kept.stderr
