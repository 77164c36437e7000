"""The multi-host path on CPU: two processes on 127.0.0.1 (gloo collectives, 2 fake devices each)
form one JAX job through `cslm-jax train --coordinator ...`; a SIGTERM to one process stops both
at the same step with a checkpoint, the same command resumes both, and the loss trace and final
parameters equal a single-process run on 4 devices reading the same 2 data shards (which can
also resume the 2-process checkpoint)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from cslm_jax.config import load_run_config
from cslm_jax.parallel.distributed import (
    DistributedError,
    ProcessInput,
    resolve_process_group,
    shards_of_process,
)
from cslm_jax.train.loop import EXIT_OK, EXIT_PREEMPTED, train
from test_train import losses, model_params, quiet

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import functools, os, signal, sys
    import cslm_jax.train.loop as T
    stop_at = int(os.environ.get("STOP_AT", "0"))
    if stop_at:        # this process alone gets the SIGTERM; the other must stop with it
        def sigterm(step):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
        T.train = functools.partial(T.train, on_step=sigterm)
    from cslm_jax.cli.main import main
    code = main(sys.argv[1:])
    # leave the job cleanly, then skip TensorFlow/XLA's native teardown (seconds per process)
    import jax
    jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(demo, base_ckpt):
    data_dir, _ = demo
    return [
        f"init_from={base_ckpt}",
        f"data.config={data_dir / 'data.yaml'}",
        "data.max_length=128",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.progress_bar=false",
        "optimizer.learning_rate=1e-2",
        "train.steps=6",
        "checkpoint.every=2",
        "checkpoint.keep=5",
        "train.peak_flops_per_device=1e9",
    ]


def run_two_processes(run_dir, args, stop_at=None, timeout=300, run_dir_arg=None):
    """Both processes of one job; returns their exit codes (stderr shown on failure).
    `run_dir` (local) holds the compile cache; `run_dir_arg` (default: run_dir) is the --run-dir
    the processes get (a gs:// one in tests/test_gcs.py)."""
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            # the restart reuses the first start's compiled steps, as a pod would
            JAX_COMPILATION_CACHE_DIR=str(run_dir.parent / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            STOP_AT=str(stop_at[1] if stop_at and stop_at[0] == i else 0),
        )
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            "train",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--run-dir",
            str(run_dir_arg or run_dir),
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            *args,
        ]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return communicate_all(procs, timeout, "the two-process run")


def communicate_all(procs, timeout: float, what: str) -> tuple[list[int], list[str]]:
    """(exit codes, outputs) of processes of one job; all are killed and the test fails if they
    are not done within `timeout` seconds together (one hung process would hang the others)."""
    deadline = time.time() + timeout
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what} hung")
    return [p.returncode for p in procs], outs


def test_two_processes_stop_resume_and_match_one_process(demo, base_ckpt, tmp_path):  # noqa: F811
    args = overrides(demo, base_ckpt)
    multi = tmp_path / "two_processes"
    # first start: process 1 is told to stop at step 3; both write checkpoint 3 and exit 75
    codes, outs = run_two_processes(multi, args, stop_at=(1, 3))
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], outs[0][-4000:] + outs[1][-4000:]
    ckpts = multi / "checkpoints"
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 3]
    assert sorted(p.name for p in (ckpts / "3" / "data").glob("shard_*")) == ["shard_0", "shard_1"]
    assert losses(multi)[0] == [1, 2, 3]
    assert "train: SIGTERM" in outs[0] and "train:" not in outs[1]  # process 0 logs
    shutil.copytree(multi, tmp_path / "resumed_by_one_process")
    # restart both with the same command: they resume from step 3 and finish
    codes, outs = run_two_processes(multi, args)
    assert codes == [EXIT_OK, EXIT_OK], outs[0][-4000:] + outs[1][-4000:]
    assert "resumed from" in outs[0] and "resumed from" not in outs[1]
    assert sorted(p.name for p in multi.iterdir() if p.name.startswith(".")) == []  # no leftovers
    steps, multi_loss = losses(multi)

    # the same run in one process on 4 devices, reading the same 2 data shards
    single = tmp_path / "one_process"
    cfg = load_run_config(REPO / "configs" / "demo.yaml", args + ["train.num_devices=4"])
    assert train(cfg, single, log=quiet, data_shards=2) == EXIT_OK
    ref_steps, ref_loss = losses(single)
    assert steps == ref_steps == list(range(1, 7))
    assert ref_loss[-1] < ref_loss[0]
    # the 2-process checkpoint of step 3 also resumes in one process: it reads both data shards
    one = tmp_path / "resumed_by_one_process"
    assert train(cfg, one, log=quiet) == EXIT_OK
    assert losses(one)[0] == ref_steps
    np.testing.assert_allclose(losses(one)[1], ref_loss, rtol=1e-6)
    # equal up to the last bit of float32: gloo adds the 4 devices' partial sums in another
    # order than XLA:CPU does in one process (measured: 1 ulp on 2 of 6 losses, 3e-7 on weights)
    np.testing.assert_allclose(multi_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(model_params(single)), jax.tree.leaves(model_params(multi))):
        np.testing.assert_allclose(a, b, atol=1e-5)
    meta = json.loads((multi / "model" / "cslm_checkpoint.json").read_text())
    assert (
        meta["vocab"]
        == json.loads((single / "model" / "cslm_checkpoint.json").read_text())["vocab"]
    )


# -- the pieces, without processes ------------------------------------------------------------------


def test_process_group_from_flags_environment_or_tpu_vm():
    env = {
        "CSLM_JAX_COORDINATOR": "10.0.0.2:1234",
        "CSLM_JAX_NUM_PROCESSES": "4",
        "CSLM_JAX_PROCESS_ID": "3",
    }
    assert resolve_process_group(environ=env, tpu_chips=0) == {
        "coordinator_address": "10.0.0.2:1234",
        "num_processes": 4,
        "process_id": 3,
    }
    # flags win over the environment
    assert resolve_process_group("h:1", 2, 0, environ=env)["coordinator_address"] == "h:1"
    assert resolve_process_group(environ={}, tpu_chips=0) is None  # one process
    assert resolve_process_group(environ={}, tpu_chips=4) == {}  # TPU VM: automatic
    assert resolve_process_group(environ={"JAX_PLATFORMS": "cpu"}, tpu_chips=4) is None
    with pytest.raises(DistributedError, match="--process-id missing"):
        resolve_process_group("h:1", 2, environ={})
    with pytest.raises(DistributedError, match="0..1"):
        resolve_process_group("h:1", 2, 2, environ={})
    with pytest.raises(DistributedError, match="HOST:PORT"):
        resolve_process_group("h", 2, 0, environ={})
    with pytest.raises(DistributedError, match="integer"):
        resolve_process_group(
            environ={
                "CSLM_JAX_COORDINATOR": "h:1",
                "CSLM_JAX_NUM_PROCESSES": "two",
                "CSLM_JAX_PROCESS_ID": "0",
            }
        )


def test_process_input_orders_rows_as_processes_would():
    """One process reading shards 0 and 1 yields, per micro-batch, shard 0's rows then shard
    1's: the layout two processes produce side by side in the global array."""

    class Shard:
        def __init__(self, shard, rows):
            self.shard, self.rows, self.position = shard, rows, 0

        def __next__(self):
            self.position += 1
            return {
                "tokens": np.arange(self.rows)[:, None] + 100 * self.shard + np.zeros((1, 3), int)
            }

    both = ProcessInput(Shard, num_shards=2, global_batch=8, accumulation=2)
    rows = next(both)["tokens"][:, 0].tolist()
    assert rows == [0, 1, 100, 101, 2, 3, 102, 103]  # micro 0: s0 0-1, s1 0-1; micro 1 ...
    per_process = [
        next(
            ProcessInput(
                Shard,
                num_shards=2,
                global_batch=8,
                accumulation=2,
                process_index=p,
                process_count=2,
            )
        )["tokens"][:, 0]
        for p in range(2)
    ]
    glued = np.concatenate([x.reshape(2, -1) for x in per_process], axis=1).reshape(-1)
    assert glued.tolist() == rows
    assert shards_of_process(8, 1, 4) == [2, 3]
    with pytest.raises(DistributedError, match="cannot be split evenly"):
        shards_of_process(2, 0, 4)
    with pytest.raises(DistributedError, match="whole rows"):
        ProcessInput(Shard, num_shards=2, global_batch=6, accumulation=2)
