"""Process set-up at `cslm-jax` start, before a command imports JAX or TensorFlow. Importing
the package changes nothing (no environment variables, hidden devices or log filters); the
command line does it here, once:

* JAX on a machine without accelerators is asked for the CPU only, so that libtpu (installed
  for `cslm-jax compile`) does not probe for TPUs and print errors;
* glibc malloc keeps freed memory for commands that train (`cslm_jax.train.cpu_malloc`);
* TensorFlow (the input pipeline) is imported with its start-up notices filtered out of stderr
  (oneDNN, CUDA stubs, "failed call to cuInit": printed from C++ while it loads and sets up its
  devices, where no logging setting reaches them), kept off the accelerators JAX owns, and
  seqio's advice to cache our (already cached) sources is silenced.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile

# Lines TensorFlow prints from C++ while it loads and initialises its devices on a CPU machine.
TENSORFLOW_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "cudart_stub.cc",
    "Could not find cuda drivers",
    "failed call to cuInit",
    "cpu_feature_guard.cc",
    "rebuild TensorFlow with the appropriate compiler flags",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning",
)


def quiet_tpu_probe() -> None:
    """libtpu (installed for `cslm-jax compile`) makes JAX probe for TPUs at start-up and print
    initialisation errors on machines that have none. Where no TPU chip is attached, no CUDA
    plugin is installed and the user set no JAX_PLATFORMS, ask JAX for the CPU only: the same
    backend it would end up with, without the noise. `compile` reaches libtpu through its own
    topology API either way."""
    from cslm_jax.parallel.distributed import tpu_chips_on_host

    if os.environ.get("JAX_PLATFORMS") or tpu_chips_on_host():
        return
    if (
        any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
        if importlib.util.find_spec("jax_plugins")
        else False
    ):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


@contextlib.contextmanager
def filtered_stderr(noise=TENSORFLOW_NOISE):
    """Capture what is written to file descriptor 2 (C++ included) inside the block; on leaving,
    pass every line on to stderr except those containing one of `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not any(n in line for n in noise))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def start_tensorflow() -> None:
    """Import TensorFlow and set up its devices (CPU only) without its start-up notices."""
    with filtered_stderr():
        from cslm_jax.data.pipeline import QuietUncachedWarning, keep_tensorflow_off_accelerators

        keep_tensorflow_off_accelerators()
    absl = logging.getLogger("absl")
    if not any(isinstance(f, QuietUncachedWarning) for f in absl.filters):
        absl.addFilter(QuietUncachedWarning())


def add_multihost_arguments(parser, how: str):
    """The flags of a multi-process job outside a Cloud TPU VM (where JAX finds the workers
    itself); `how` ends the group's title: what each worker does on a slice. Returns the group."""
    g = parser.add_argument_group(
        f"multi-host (on a Cloud TPU VM slice nothing is needed: every "
        f"worker runs the same command and {how})"
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address, elsewhere (env CSLM_JAX_COORDINATOR)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes in the job (env CSLM_JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="this process, 0..N-1 (env CSLM_JAX_PROCESS_ID)",
    )
    return g


def prepare(*, trains: bool, tensorflow: bool) -> None:
    """Everything a command needs before it starts (see the module docstring)."""
    quiet_tpu_probe()  # before anything imports JAX
    if trains and os.environ.get("CSLM_JAX_KEEP_FREED_MEMORY", "1") != "0":
        from cslm_jax.train.cpu_malloc import keep_freed_memory

        keep_freed_memory()  # before JAX starts its threads; a no-op where it does not apply
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's run-time INFO/WARNING logs
    # gs:// through one client (gcsfs) whatever is imported first (cslm_jax.storage.fs)
    os.environ.setdefault("EPATH_USE_TF", "false")
    if tensorflow:
        start_tensorflow()
