"""Data preparation, this checkout against another (before / after a change), in one run.

Each side runs in its own process from its own checkout (`--other`, e.g. a `git worktree` of the
commit before the change; its top-level `tasks/` is copied into its `cslm_jax/tasks` so that the
editable install's mapping of `cslm_jax.tasks` to this checkout does not leak into it). A
process prepares the demo's stage-1 tasks in-process (`prepare_task_local`, the batched fast
path, what `benchmarks/data_pipeline.py` times as "ours, preparation") once to warm up, then
`--repeat` times, each timed after `os.sync()`, and prints the times. The sides alternate for
`--rounds` rounds; the figure is the median per-preparation time of each side over all rounds,
and their ratio, with the load average before and after.

    git worktree add /tmp/before <commit>
    python benchmarks/prepare_ab.py --other /tmp/before [--rounds 4] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
repo, repeat = Path(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, str(repo))
from cslm_jax.data.formats import load_data_config
from cslm_jax.data.prepare import prepare_task_local
from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer
work = Path(tempfile.mkdtemp(prefix="prepare_ab_"))
make_demo_data(work / "data", repo / "configs" / "data" / "demo.yaml", log=lambda *_: None)
tok = load_tokenizer(work / "data" / "tokenizer")
extend_tokenizer(tok, UNIT_COUNT, len(tok))
tok.save_pretrained(str(work / "tok"))
tok = load_tokenizer(work / "tok")
cfg = load_data_config(work / "data" / "data.yaml")
def once(k):
    for spec in cfg.tasks("pretrain"):
        prepare_task_local(spec, cfg, str(work / "tok"), work / f"out{k}" / spec.name, fast=True,
                           tokenizer=tok)
once(0)
times = []
for k in range(1, repeat + 1):
    os.sync()
    t = time.perf_counter()
    once(k)
    times.append(time.perf_counter() - t)
print(json.dumps({"repo": str(repo), "times": times}))
"""


def side(repo: Path, repeat: int) -> list[float]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(repo),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(repo), str(repeat)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["times"]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--other",
        required=True,
        help="the other checkout (e.g. a worktree of the commit before the change)",
    )
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    other = Path(args.other).resolve()
    if (other / "tasks").is_dir() and not (other / "cslm_jax" / "tasks").exists():
        shutil.copytree(other / "tasks", other / "cslm_jax" / "tasks")
    load0 = os.getloadavg()
    ours, theirs = [], []
    for r in range(args.rounds):  # alternate which side goes first
        order = [(REPO, ours), (other, theirs)] if r % 2 == 0 else [(other, theirs), (REPO, ours)]
        for repo, sink in order:
            sink.extend(side(repo, args.repeat))
    load1 = os.getloadavg()
    a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    print(
        f"machine: {os.cpu_count()} cores, load average {load0[0]:.2f} before, "
        f"{load1[0]:.2f} after; {args.rounds} alternated rounds x {args.repeat} preparations"
    )
    print(
        f"this checkout ({REPO}): median {a:.1f} ms per preparation "
        f"(min {min(ours) * 1e3:.1f}, max {max(ours) * 1e3:.1f})"
    )
    print(
        f"other checkout ({other}): median {b:.1f} ms per preparation "
        f"(min {min(theirs) * 1e3:.1f}, max {max(theirs) * 1e3:.1f})"
    )
    print(f"this / other time: {a / b:.3f} ({(a / b - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
