"""Multi-host runs: starting JAX's multi-controller runtime, small agreements between processes,
and each process's share of the input.

On a TPU pod every worker runs the same `cslm-jax train` command; `initialize` joins them into
one JAX job (automatically on Cloud TPU VMs, from flags or environment variables elsewhere).
After that `jax.devices()` lists every chip of the slice, `jax.local_devices()` this host's.

The input is split into `data shards` (seqio.ShardInfo): a fixed number per run, chosen when the
run starts (default: one per process) and read back from its checkpoints. Each process reads
its own contiguous share of them, so the global batch a step sees depends on the shard count,
never on how many processes read it: a run written by 2 processes continues bit-for-bit on 1
process reading both shards (and the other way round).
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np

from cslm_jax.errors import CslmError
from cslm_jax.storage import fs

ENV_COORDINATOR = "CSLM_JAX_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "CSLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CSLM_JAX_PROCESS_ID"

_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}  # v4, v5p, v5e, v6e, 7x


class DistributedError(CslmError):
    """The processes of a multi-host run cannot be joined or disagree; the message says why."""


def tpu_chips_on_host(sys_root: str = "/sys") -> int:
    """TPU chips attached to this machine (Google PCI devices), without starting any runtime."""
    count = 0
    for vendor in glob.glob(f"{sys_root}/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() != _GOOGLE_PCI_VENDOR:
                continue
            device = (Path(vendor).parent / "device").read_text().strip()
        except OSError:
            continue
        count += device in _TPU_PCI_DEVICES
    return count


def resolve_process_group(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ=os.environ,
    tpu_chips: int | None = None,
) -> dict | None:
    """How this process joins the job, as keyword arguments for `jax.distributed.initialize`:

    - flags (`coordinator`, `num_processes`, `process_id`), each falling back to its environment
      variable (CSLM_JAX_COORDINATOR, CSLM_JAX_NUM_PROCESSES, CSLM_JAX_PROCESS_ID): all three are
      then required;
    - none given, on a Cloud TPU VM (TPU chips on the PCI bus, JAX_PLATFORMS allowing tpu): {}
      (JAX reads the slice's workers from the TPU metadata server);
    - otherwise None: a single-process run.
    """
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None

    def number(value, env, flag):
        raw = value if value is not None else environ.get(env)
        if raw is None or raw == "":
            return None
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise DistributedError(f"{flag} (or ${env}) must be an integer, got {raw!r}") from None

    count = number(num_processes, ENV_NUM_PROCESSES, "--num-processes")
    index = number(process_id, ENV_PROCESS_ID, "--process-id")
    if coordinator is None and count is None and index is None:
        platforms = environ.get("JAX_PLATFORMS", "")
        tpu_allowed = not platforms or "tpu" in platforms.split(",")
        chips = tpu_chips_on_host() if tpu_chips is None else tpu_chips
        return {} if tpu_allowed and chips > 0 else None
    missing = [
        name
        for name, v in (
            ("--coordinator", coordinator),
            ("--num-processes", count),
            ("--process-id", index),
        )
        if v is None
    ]
    if missing:
        raise DistributedError(
            f"multi-process run: {', '.join(missing)} missing (or the variables "
            f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); give "
            f"all three, or none for a single process / a Cloud TPU VM"
        )
    if ":" not in coordinator:
        raise DistributedError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0")
    if count < 1 or not 0 <= index < count:
        raise DistributedError(
            f"--process-id {index} must be in 0..{count - 1} (--num-processes {count})"
        )
    return {"coordinator_address": coordinator, "num_processes": count, "process_id": index}


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ=os.environ,
) -> str:
    """Join the multi-process JAX job if there is one (see `resolve_process_group`); must run
    before anything touches a JAX device. Returns a one-line description."""
    import jax  # lazy: cli.setup imports this module before JAX may load

    group = resolve_process_group(coordinator, num_processes, process_id, environ)
    if group is None:
        return "single process"
    if group:
        # CPU processes need a collectives backend to talk to each other; TPU/GPU ignore this
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**group)
    how = f"coordinator {group['coordinator_address']}" if group else "Cloud TPU VM metadata"
    return f"process {jax.process_index()} of {jax.process_count()} ({how})"


# -- agreements between processes -------------------------------------------------------------------


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process)."""
    import jax  # lazy: cli.setup imports this module before JAX may load

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # lazy, as jax above

        multihost_utils.sync_global_devices(name)


def broadcast_int(value: int) -> int:
    """Process 0's `value`, on every process."""
    import jax  # lazy: cli.setup imports this module before JAX may load

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils  # lazy, as jax above

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any."""
    import jax  # lazy: cli.setup imports this module before JAX may load

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils  # lazy, as jax above

    return bool(np.max(multihost_utils.process_allgather(np.int32(bool(flag)))))


def run_together(fn, error: Exception, only_primary: bool = False):
    """`fn()` on every process (or on process 0 alone) with one outcome for the job: if it raised
    a CslmError on any process, every process raises, the failed one its own error and the
    others `error` (which says another process failed and where to look). Returns what `fn`
    returned (None where it did not run)."""
    import jax  # lazy: cli.setup imports this module before JAX may load

    result, failed = None, None
    if not only_primary or jax.process_index() == 0:
        try:
            result = fn()
        except CslmError as e:
            failed = e
    if any_process(failed is not None):
        raise failed or error
    return result


def check_shared_dir(path: str | Path) -> None:
    """Multi-process runs write one checkpoint together: every process must see the same folder.
    Process 0 writes a token there; every process reads it back; all fail together if one cannot."""
    import jax  # lazy: cli.setup imports this module before JAX may load

    if jax.process_count() == 1:
        return
    path = fs.path(path)
    token = broadcast_int(int.from_bytes(os.urandom(7), "little"))
    probe = path / ".shared_dir_check"
    if jax.process_index() == 0:
        probe.write_text(str(token))
    barrier("cslm_jax: shared run dir probe written")
    try:
        seen = probe.read_text().strip() == str(token)
    except OSError:
        seen = False
    failed = any_process(not seen)
    barrier("cslm_jax: shared run dir probe read")
    if jax.process_index() == 0:
        if probe.exists():
            probe.unlink()
    if failed:
        raise DistributedError(
            f"{path}: not every process sees what process 0 wrote there; a multi-host run needs "
            f"a run folder on storage all hosts share (gs://bucket/path, NFS / Filestore, or a "
            f"bucket mounted with gcsfuse)"
        )


# -- this process's share of the input ---------------------------------------------------------------


def shards_of_process(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The contiguous data shards process `process_index` reads."""
    if num_shards < 1 or num_shards % process_count:
        raise DistributedError(
            f"{num_shards} data shard(s) cannot be split evenly over "
            f"{process_count} processes; the shard count is fixed when a run "
            f"starts (one per process): resume on a process count that "
            f"divides it"
        )
    per = num_shards // process_count
    return list(range(process_index * per, (process_index + 1) * per))


class ProcessInput:
    """This process's rows of every global batch, read from its data shards.

    Each shard yields `global_batch // num_shards` rows per step. Rows are interleaved per
    micro-batch (`accumulation` of them): micro-batch j of the local rows is shard a's micro-batch
    j followed by shard b's, which is exactly the order in which processes' rows are laid side
    by side in the global array. `save`/`restore` keep one position per shard (`shard_<s>/`).
    """

    def __init__(
        self,
        make_iterator,
        *,
        num_shards: int,
        global_batch: int,
        accumulation: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.shards = shards_of_process(num_shards, process_index, process_count)
        rows = global_batch // num_shards
        if global_batch % num_shards or rows % accumulation:
            raise DistributedError(
                f"train.global_batch_size ({global_batch}) must split into "
                f"{num_shards} data shard(s) x {accumulation} micro-batch(es) "
                f"of whole rows"
            )
        self.num_shards, self.accumulation = num_shards, accumulation
        self.iterators = [make_iterator(shard, rows) for shard in self.shards]

    @property
    def position(self) -> int:
        return self.iterators[0].position

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        if len(parts) == 1:
            return parts[0]
        k = self.accumulation
        out = {}
        for name in parts[0]:
            blocks = [p[name].reshape(k, -1, *p[name].shape[1:]) for p in parts]
            joined = np.concatenate(blocks, axis=1)
            out[name] = joined.reshape(-1, *joined.shape[2:])
        return out

    def save(self, directory) -> None:
        """Each shard's tf.data iterator checkpoint into `directory`/shard_<k> (TensorFlow writes
        local files: for a gs:// folder it writes locally first and uploads)."""
        for shard, it in zip(self.shards, self.iterators):
            dst = fs.path(directory) / f"shard_{shard}"
            if not fs.is_remote(dst):
                it.save(Path(os.fspath(dst)))
                continue
            with tempfile.TemporaryDirectory(prefix="cslm_jax-data-") as tmp:
                it.save(Path(tmp))
                fs.upload_dir(tmp, dst)

    def restore(self, directory) -> None:
        for shard, it in zip(self.shards, self.iterators):
            where = fs.path(directory) / f"shard_{shard}"
            if not where.is_dir():
                raise DistributedError(
                    f"{directory}: no position for data shard {shard}; the "
                    f"checkpoint was written with a different shard count"
                )
            if not fs.is_remote(where):
                it.restore(Path(os.fspath(where)))
                continue
            with tempfile.TemporaryDirectory(prefix="cslm_jax-data-") as tmp:
                fs.copytree(where, tmp)
                it.restore(Path(tmp))
