"""Training checkpoints on local disk vs a GCS server, in the same run (issue 13).

A train-state-like tree of float32 arrays (~1 GB by default) is saved and restored through
`cslm_jax.storage.checkpoint.train_checkpoint_manager` (the manager `cslm-jax train` uses: async
saves; a rename commit on local disk, Orbax's commit file on GCS) into a local folder and into a
bucket of a real GCS server (`fake-gcs-server`, the binary tests/test_gcs.py uses, on 127.0.0.1
with its filesystem backend on the same disk). Sides alternate each round; medians are printed
with the spread, the load average and what other processes took.

Per side and round:
  block    how long `manager.save` holds the training loop (async save: the device-to-host copy
           and the start of the write; the rest happens in a background thread)
  save     from the call until the save is committed (`wait_until_finished`)
  restore  `manager.restore` of the state into arrays, until they are ready

Usage: python benchmarks/checkpoint_storage.py [--gb 1.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (dev requirement) would probe for TPUs
import load_probe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (float32 arrays)")
    ap.add_argument("--arrays", type=int, default=8, help="split into this many arrays")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--workdir",
        default=None,
        help="where the local side and the server's files go (default: a temporary folder)",
    )
    load_probe.add_arguments(ap)
    args = ap.parse_args()
    load_probe.use_repo(args.repo)

    from fake_gcs import FakeGcs

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cslm_ckpt_bench_"))
    server = FakeGcs(work / "server")
    os.environ.update(server.env())
    jax = load_probe.start_jax(args.xla_threads)
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp

    from cslm_jax.storage import fs
    from cslm_jax.storage.checkpoint import train_checkpoint_manager

    fs.configure_gcs()
    server.create_bucket("bench")
    n = int(args.gb * 1e9 / 4 / args.arrays)
    state = {
        f"w{i}": jnp.asarray(np.random.default_rng(i).standard_normal(n, dtype=np.float32))
        for i in range(args.arrays)
    }
    nbytes = sum(a.nbytes for a in state.values())
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    print(f"# {load_probe.describe()}")
    print(
        f"# checkpoint: {args.arrays} float32 arrays, {nbytes / 1e9:.2f} GB; server: fake-gcs-server "
        f"(filesystem backend) on 127.0.0.1; local: {work}"
    )

    sides = {"local": lambda r: work / "local" / f"r{r}", "gcs": lambda r: f"gs://bench/r{r}"}
    results = {s: {"block": [], "save": [], "restore": []} for s in sides}
    probes = []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            where = sides[side](r)
            with load_probe.Probe() as probe:
                manager = train_checkpoint_manager(
                    f"{where}/checkpoints", every=1, keep=1, async_save=True
                )
                t0 = time.perf_counter()
                manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
                t1 = time.perf_counter()
                manager.wait_until_finished()
                t2 = time.perf_counter()
                restored = manager.restore(
                    1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                )
                jax.block_until_ready(restored["state"])
                t3 = time.perf_counter()
                manager.close()
            probes.append(probe)
            for k in state:
                np.testing.assert_array_equal(
                    np.asarray(restored["state"][k][:1000]), np.asarray(state[k][:1000])
                )
            del restored
            results[side]["block"].append(t1 - t0)
            results[side]["save"].append(t2 - t0)
            results[side]["restore"].append(t3 - t2)
            print(
                f"round {r} {side:5s}: block {t1 - t0:6.2f} s  save {t2 - t0:6.2f} s  "
                f"restore {t3 - t2:6.2f} s  (others {probe.others:.2f} cores: the server counts here)",
                flush=True,
            )
            if side == "local":
                shutil.rmtree(work / "local" / f"r{r}", ignore_errors=True)
            else:
                fs.rmtree(where)

    print(
        f"\n# medians over {args.rounds} rounds ({nbytes / 1e9:.2f} GB); load average {load_probe.load_average()}"
    )
    print(f"# {load_probe.probes_summary(probes)}")
    for what in ("block", "save", "restore"):
        loc, gcs = (statistics.median(results[s][what]) for s in ("local", "gcs"))
        print(
            f"{what:8s} local {loc:6.2f} s ({load_probe.spread(results['local'][what], '{:.2f}')})  "
            f"gcs {gcs:6.2f} s ({load_probe.spread(results['gcs'][what], '{:.2f}')})  "
            f"gcs/local {gcs / loc:5.2f}x"
            + (f"  [{nbytes / 1e9 / gcs:.2f} GB/s to the server]" if what != "block" else "")
        )
    server.stop()
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
