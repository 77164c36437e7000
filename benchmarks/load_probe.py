"""What the machine was doing while a benchmark ran, and the knobs that explain the spread of
its figures on a shared machine (benchmarks/RESULTS.md, "Refactor (issue 18)").

Both stacks size their thread pools from the cores they may use (XLA:CPU's intra-op pool and
PyTorch's) and assume the cores are free. On a 2-core machine where other jobs run, a run's
speed depends on how much CPU the others took during it, which `Probe` measures per timed run:

- others: CPU time every other process used during the run (machine busy time from /proc/stat
  minus this process' own CPU time), in cores (1.0 = one core taken all along);
- wait: the time this process' threads were runnable but waiting for a core (sum over its
  threads of /proc/self/task/*/schedstat's run-queue delay), in seconds;
- steal: time the hypervisor gave to other guests, in cores.

Other helpers: `--repo` (import another checkout's `cslm_jax`, e.g. the code before a
refactor, with the same measuring code), `--xla-threads N` (XLA's intra-op pool size),
`--busy N` (N busy-looping processes for the run's duration, a controlled background load).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def add_arguments(ap):
    ap.add_argument(
        "--repo",
        default=None,
        help="import cslm_jax from this checkout (default: the one holding this script), "
        "e.g. a worktree of the code before a change, measured by the same script",
    )
    ap.add_argument(
        "--xla-threads",
        type=int,
        default=0,
        help="XLA:CPU intra-op threads (default: one per usable core, as XLA does)",
    )
    ap.add_argument(
        "--busy",
        type=int,
        default=0,
        help="run N busy-looping processes during the benchmark (controlled background "
        "load; killed at the end, and each stops by itself after --busy-seconds)",
    )
    ap.add_argument("--busy-seconds", type=float, default=1800.0)


def use_repo(repo: str | None) -> Path:
    """Put the chosen checkout first on sys.path (before anything imports cslm_jax)."""
    root = Path(repo).resolve() if repo else Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    return root


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def start_jax(xla_threads: int = 0):
    """Start JAX's CPU backend. XLA:CPU sizes its intra-op pool from the CPUs the process may run
    on when the backend starts (it reads the affinity mask): to get N threads the process is
    restricted to N cores while the backend starts, and every thread is let loose on all usable
    cores afterwards (the pool keeps its size)."""
    import jax

    if xla_threads:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:xla_threads])
        try:
            jax.devices()
            jax.numpy.zeros(8).block_until_ready()  # the pool's threads exist from here on
        finally:
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.sched_setaffinity(int(tid), allowed)
                except OSError:
                    pass
    else:
        jax.numpy.zeros(8).block_until_ready()
    return jax


def xla_pool_threads() -> int:
    """Threads of XLA:CPU's intra-op pool (named tf_XLAEigen) in this process. One pool of one
    thread per usable core with one CPU device; with `--xla_force_host_platform_device_count=8`
    (the tests' setting) 8 were counted on 2 cores."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            n += Path(f"/proc/self/task/{tid}/comm").read_text().startswith("tf_XLAEigen")
        except OSError:
            pass
    return n


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def psi_cpu() -> str:
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
        return "CPU pressure " + " ".join(some[1:3]) + " (% of time a runnable task waited)"
    except OSError:
        return "CPU pressure n/a"


def describe(torch=None) -> str:
    """One line: the machine, its load now, and the threads each side uses."""
    line = (
        f"cores: {os.cpu_count()} ({platform.machine()}), "
        f"{usable_cores()} usable (sched_getaffinity); load average {load_average()}; "
        f"{psi_cpu()}; XLA intra-op threads {xla_pool_threads()}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')!r}"
    )
    if torch is not None:
        line += (
            f"; torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})"
        )
    return line


def _machine_jiffies():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal


def _own_wait_ns() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            total += int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total


class Probe:
    """`with Probe() as p: work()`; then p.wall, p.cpu (this process, s), p.others (cores),
    p.wait (s), p.steal (cores), p.nivcsw (involuntary context switches of this process)."""

    HZ = os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._busy, self._steal = _machine_jiffies()
        self._wait = _own_wait_ns()
        self._nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        self._cpu, self._t = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._t
        self.cpu = time.process_time() - self._cpu
        busy, steal = _machine_jiffies()
        machine_busy = (busy - self._busy) / self.HZ
        self.others = max(0.0, machine_busy - self.cpu) / self.wall
        self.steal = (steal - self._steal) / self.HZ / self.wall
        self.wait = (_own_wait_ns() - self._wait) / 1e9
        self.nivcsw = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - self._nivcsw
        return False


def spread(values, fmt="{:.1f}") -> str:
    """min / median / max."""
    return "/".join(fmt.format(x) for x in (min(values), statistics.median(values), max(values)))


def probes_summary(probes) -> str:
    """Medians over the runs: this process' cores, the others' cores, run-queue wait, steal."""
    med = lambda f: statistics.median(f(p) for p in probes)  # noqa: E731
    return (
        f"own CPU {med(lambda p: p.cpu / p.wall):.2f} cores, others {med(lambda p: p.others):.2f} "
        f"cores (max {max(p.others for p in probes):.2f}), run-queue wait "
        f"{med(lambda p: p.wait / p.wall):.0%} of wall, steal {med(lambda p: p.steal):.2f} cores"
    )


class Busy:
    """N busy-looping child processes (a controlled background load), each bounded in time,
    killed on exit."""

    def __init__(self, n: int, seconds: float):
        self.n, self.seconds, self.procs = n, seconds, []

    def __enter__(self):
        code = f"import time\nend = time.time() + {self.seconds}\nwhile time.time() < end: pass\n"
        self.procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(self.n)]
        if self.n:
            print(
                f"background load: {self.n} busy-looping process(es), pids "
                f"{[p.pid for p in self.procs]}",
                flush=True,
            )
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()
        return False
