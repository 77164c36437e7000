"""benchmarks/load_probe.py: the knobs and measurements the benchmarks use to explain their
spread on a shared machine (XLA's intra-op pool size, other processes' CPU during a run)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import load_probe  # noqa: E402


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 usable cores")
def test_xla_threads_sets_the_pool_size_and_leaves_the_process_on_every_core():
    code = (
        "import os, load_probe\n"
        "allowed = os.sched_getaffinity(0)\n"
        "load_probe.start_jax({n})\n"
        "tasks = os.listdir('/proc/self/task')\n"
        "print(load_probe.xla_pool_threads(), "
        "all(os.sched_getaffinity(int(t)) == allowed for t in tasks))\n"
    )
    for n, expected in ((1, 1), (0, len(os.sched_getaffinity(0)))):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device, one pool
        out = subprocess.run(
            [sys.executable, "-c", code.format(n=n)],
            cwd=BENCH,
            text=True,
            capture_output=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(expected), "True"], (n, out.stdout)


def test_probe_sees_a_busy_process_and_its_own_cpu():
    with load_probe.Busy(1, 30) as busy:
        time.sleep(0.5)  # the child starts its loop
        with load_probe.Probe() as p:
            time.sleep(1.5)
        pid = busy.procs[0].pid
    assert p.others >= 0.4, vars(p)  # the busy child held (at least part of) a core
    assert p.cpu < 0.3 * p.wall, vars(p)  # this process slept
    with pytest.raises(ProcessLookupError):  # the child was killed on exit
        os.kill(pid, 0)

    with load_probe.Probe() as q:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            pass
    assert q.cpu >= 0.5 * q.wall, vars(q)


def test_spread_is_min_median_max():
    assert load_probe.spread([3.0, 1.0, 2.0, 10.0, 4.0]) == "1.0/3.0/10.0"
