"""launch_tpu.sh without Google Cloud: --dry-run prints the gcloud commands (TPU VM or queued
resource, --spot, --worker=all, one identical train command for every worker); the worker-side
scripts it sends really start, log and stop training when run by bash in a sandbox home; a fake
`gcloud` drives the recreate-and-resume loop; and the script is shellcheck-clean."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_tpu.sh"
COMMON = [
    "--zone",
    "us-east5-a",
    "--type",
    "v5p-16",
    "--config",
    "configs/cslm_pretrain.yaml",
    "--run-dir",
    "/mnt/bkt/runs/stage1",
]
EXTRA = ["--", "--init-from", "/mnt/bkt/ckpt", "data.config=/mnt/bkt/my data.yaml", "train.steps=5"]


def launch(*args, env=None, check=True):
    out = subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=120,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


def gcloud_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if line.startswith("gcloud ")]


def command_of(argv: list[str]) -> str:
    [cmd] = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    return cmd


def jax_version() -> str:
    return re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)


# -- --help, usage errors, shellcheck ---------------------------------------------------------------


def test_help_and_usage_errors():
    out = launch("--help")
    for word in (
        "create",
        "setup",
        "train",
        "run",
        "status",
        "logs",
        "stop",
        "delete",
        "--dry-run",
        "--spot",
        "--queued",
        "--worker=all",
    ):
        assert word in out.stdout, word
    bad = launch("--zone", "z", "explode", check=False)
    assert bad.returncode == 2 and "unknown command 'explode'" in bad.stderr
    bad = launch("--type", "v5p-8", "create", check=False, env={"TPU_ZONE": ""})
    assert bad.returncode == 2 and "--zone" in bad.stderr
    bad = launch("--zone", "z", "--dry-run", "train", check=False)
    assert bad.returncode == 2 and "--config is required" in bad.stderr
    bad = launch("--zone", "z", "--type", "v9-8", "--dry-run", "create", check=False)
    assert bad.returncode == 2 and "--runtime" in bad.stderr


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).exists(), "shellcheck missing: pip install -r requirements-dev.txt"
    out = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


# -- --dry-run: the gcloud commands -----------------------------------------------------------------


def test_dry_run_create_tpu_vm_and_queued_spot():
    [vm] = gcloud_lines(launch("--dry-run", *COMMON, "--spot", "create").stdout)
    assert vm == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "cslm",
        "--zone=us-east5-a",
        "--accelerator-type=v5p-16",
        "--version=v2-alpha-tpuv5",
        "--spot",
    ]
    [qr] = gcloud_lines(
        launch(
            "--dry-run", *COMMON, "--queued", "--spot", "--name", "big", "--project", "p1", "create"
        ).stdout
    )
    assert qr == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "big",
        "--node-id=big",
        "--zone=us-east5-a",
        "--project=p1",
        "--accelerator-type=v5p-16",
        "--runtime-version=v2-alpha-tpuv5",
        "--spot",
    ]
    [v5e] = gcloud_lines(
        launch("--dry-run", "--zone", "z", "--type", "v5litepod-16", "create").stdout
    )
    assert "--version=v2-alpha-tpuv5-lite" in v5e and "--spot" not in v5e
    [delete] = gcloud_lines(launch("--dry-run", *COMMON, "--queued", "delete").stdout)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "cslm"]
    assert "--force" in delete


def test_dry_run_setup_copies_and_installs_on_every_worker():
    lines = gcloud_lines(launch("--dry-run", *COMMON, "--bucket", "gs://bkt", "setup").stdout)
    assert all("--worker=all" in argv for argv in lines) and len(lines) == 3
    scp, mount, install = lines
    assert (
        scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "cslm:cslm_jax.tgz"
    )
    assert "gcsfuse --implicit-dirs" in command_of(mount) and "bkt /mnt/bkt" in command_of(mount)
    cmd = command_of(install)
    assert "uv pip install -r requirements.txt" in cmd
    assert f"'jax[tpu]=={jax_version()}'" in cmd  # the same jax as requirements.txt
    assert "tar -xzf" in cmd and "uv pip install --no-deps -e ." in cmd
    [clone] = gcloud_lines(
        launch(
            "--dry-run", *COMMON, "--repo", "https://example.com/c.git", "--ref", "v1", "setup"
        ).stdout
    )
    assert "git clone --depth 1 --branch v1 https://example.com/c.git" in command_of(clone)


def test_dry_run_train_runs_one_command_on_all_workers():
    out = launch("--dry-run", *COMMON, "train", *EXTRA)
    [ssh] = gcloud_lines(out.stdout)  # one ssh: gcloud runs it on every worker
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cslm"]
    assert "--worker=all" in ssh
    cmd = command_of(ssh)
    assert (
        "cslm-jax train --config configs/cslm_pretrain.yaml --run-dir /mnt/bkt/runs/stage1" in cmd
    )
    assert cmd.count("cslm-jax train") == 1 and "$HOME/cslm_logs/train.log" in cmd
    # stop / status / logs also address every worker
    for sub in ("stop", "logs"):
        lines = gcloud_lines(launch("--dry-run", *COMMON, sub).stdout)
        assert lines and all("--worker=all" in argv for argv in lines if "ssh" in argv), sub
    # status: every worker's job, then the (mounted) run folder's progress through worker 0
    workers, progress = gcloud_lines(launch("--dry-run", *COMMON, "status").stdout)
    assert "--worker=all" in workers and "--worker=0" in progress
    assert "/mnt/bkt/runs/stage1/metrics.jsonl" in command_of(progress)
    [one] = gcloud_lines(launch("--dry-run", *COMMON, "--log-worker", "3", "logs").stdout)
    assert "--worker=3" in one


# -- the worker side, for real: bash runs the scripts launch_tpu.sh sends ---------------------------

FAKE_TRAIN = """\
#!{python}
import json, os, signal, sys, time
home = os.environ["HOME"]
with open(os.path.join(home, "argv.json"), "w") as f:
    json.dump(sys.argv[1:], f)
print("step 1: loss 5.0", flush=True)
def term(*_):
    print("train: SIGTERM: checkpoint written", flush=True)
    sys.exit(75)
signal.signal(signal.SIGTERM, term)
if os.environ.get("FAKE_TRAIN_SECONDS"):
    time.sleep(float(os.environ["FAKE_TRAIN_SECONDS"]))
sys.exit(0)
"""


@pytest.fixture
def worker_home(tmp_path):
    """A worker's home: ~/cslm_jax/.venv/bin/activate puts a fake cslm-jax on PATH."""
    home = tmp_path / "home"
    bin_dir = home / "cslm_jax" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    fake = bin_dir / "cslm-jax"
    fake.write_text(FAKE_TRAIN.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return home


def on_worker(home: Path, script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, HOME=str(home), **env),
    )


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text().strip()


def test_worker_scripts_start_log_and_exit(worker_home):
    [ssh] = gcloud_lines(launch("--dry-run", *COMMON, "train", *EXTRA).stdout)
    out = on_worker(worker_home, command_of(ssh))
    assert out.returncode == 0 and "training started" in out.stdout, out.stderr
    logs = worker_home / "cslm_logs"
    assert wait_for(logs / "exit_code") == "0"
    assert json.loads((logs.parent / "argv.json").read_text()) == [
        "train",
        "--config",
        "configs/cslm_pretrain.yaml",
        "--run-dir",
        "/mnt/bkt/runs/stage1",
        "--init-from",
        "/mnt/bkt/ckpt",
        "data.config=/mnt/bkt/my data.yaml",
        "train.steps=5",
    ]
    assert "step 1: loss 5.0" in (logs / "train.log").read_text()
    status, _ = gcloud_lines(launch("--dry-run", *COMMON, "status").stdout)
    assert "exited with 0" in on_worker(worker_home, command_of(status)).stdout


def test_stop_sends_sigterm_and_the_exit_code_survives(worker_home):
    [ssh] = gcloud_lines(launch("--dry-run", *COMMON, "train", *EXTRA).stdout)
    assert on_worker(worker_home, command_of(ssh), FAKE_TRAIN_SECONDS="60").returncode == 0
    wait_for(worker_home / "argv.json")
    # a second start while it runs does not launch a second job
    again = on_worker(worker_home, command_of(ssh), FAKE_TRAIN_SECONDS="60")
    assert "already training" in again.stdout
    [stop] = gcloud_lines(launch("--dry-run", *COMMON, "stop").stdout)
    out = on_worker(worker_home, command_of(stop))
    assert "SIGTERM sent" in out.stdout, out.stderr
    logs = worker_home / "cslm_logs"
    assert wait_for(logs / "exit_code") == "75"  # the wrapper outlived the SIGTERM
    assert (logs / "stopped").exists()
    assert "checkpoint written" in (logs / "train.log").read_text()


# -- the recreate-and-resume loop against a fake gcloud -------------------------------------------

FAKE_GCLOUD = """\
#!{python}
# A fake gcloud: a TPU VM whose state lives in a file; each training run ends as the scenario says.
import json, os, sys
from pathlib import Path
root = Path(os.environ["FAKE_GCLOUD_DIR"])
args = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\\n")
state, outcome = root / "state", root / "outcome"
verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] else None
if verb == "describe":
    if not state.exists():
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
    print(state.read_text())
elif verb == "create":
    state.write_text("READY")
elif verb == "delete":
    state.unlink()
elif verb == "ssh":
    cmd = [a.split("=", 1)[1] for a in args if a.startswith("--command=")][0]
    if "cslm-jax train" in cmd:
        runs = json.loads((root / "scenario.json").read_text())
        n = len(list(root.glob("train_*")))
        (root / f"train_{{n}}").write_text(cmd)
        outcome.write_text(runs[n])
        if runs[n] == "preempt":
            state.write_text("PREEMPTED")
    elif "exit_code" in cmd:                     # worker 0's job status
        print(outcome.read_text() if outcome.read_text().startswith("exit") else "running")
    elif "stopped" in cmd:                       # not stopped by the user
        sys.exit(1)
"""


def run_loop(tmp_path, scenario, *extra):
    fake_dir = tmp_path / "gcloud"
    fake_dir.mkdir(parents=True)
    (fake_dir / "scenario.json").write_text(json.dumps(scenario))
    fake = fake_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = launch(
        *COMMON,
        "--spot",
        "--poll",
        "0",
        *extra,
        "run",
        *EXTRA,
        check=False,
        env={"GCLOUD": str(fake), "FAKE_GCLOUD_DIR": str(fake_dir)},
    )
    calls = [json.loads(line) for line in (fake_dir / "calls.jsonl").read_text().splitlines()]
    verbs = [c[3] for c in calls if c[3] in ("create", "delete", "scp")]
    trains = [
        (fake_dir / f"train_{i}").read_text()
        for i in range(len(scenario))
        if (fake_dir / f"train_{i}").exists()
    ]
    return out, verbs, trains


def test_run_recreates_after_preemption_and_resumes(tmp_path):
    out, verbs, trains = run_loop(tmp_path, ["preempt", "exit 75", "exit 0"])
    assert out.returncode == 0, out.stderr
    # preempted slice: delete + create; SIGTERM notice (exit 75, not `stop`): the same again
    assert verbs == ["create", "scp", "delete", "create", "scp", "delete", "create", "scp"]
    assert len(trains) == 3 and len(set(trains)) == 1  # the same command resumes the run
    assert "recreating cslm and resuming (restart 2 of at most 20)" in out.stderr


def test_run_stops_on_a_training_error_or_too_many_preemptions(tmp_path):
    out, verbs, _ = run_loop(tmp_path / "a", ["exit 3"])
    assert out.returncode == 3 and verbs == ["create", "scp"]
    assert "training failed with 3" in out.stderr
    out, verbs, _ = run_loop(
        tmp_path / "b", ["preempt", "preempt", "preempt"], "--max-restarts", "1"
    )
    assert out.returncode == 1 and verbs.count("create") == 2
    assert "giving up (--max-restarts 1)" in out.stderr


def test_dry_run_of_run_prints_one_cycle():
    out = launch("--dry-run", *COMMON, "--spot", "run", *EXTRA)
    verbs = [argv[4] for argv in gcloud_lines(out.stdout)]
    assert verbs == ["create", "scp", "ssh", "ssh"]  # create, copy, install, train
    assert "dry run: would now poll" in out.stderr


# -- status reads the run folder's progress ---------------------------------------------------------

FAKE_GCLOUD_STORAGE = """\
#!{python}
# A fake gcloud: no TPU VM; `storage cat` / `storage ls` over a local folder standing for gs://.
import glob, os, sys
root = os.environ["FAKE_GCS_ROOT"]
args = sys.argv[1:]
if args[:2] == ["storage", "cat"]:
    sys.stdout.write(open(os.path.join(root, args[2][len("gs://"):])).read())
elif args[:2] == ["storage", "ls"]:
    hits = sorted(glob.glob(os.path.join(root, args[2][len("gs://"):])))
    if not hits:
        sys.exit("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
    print("\\n".join("gs://" + os.path.relpath(h, root) for h in hits))
elif args[3:4] == ["describe"]:
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
"""


def test_status_reads_progress_from_a_gs_run_folder(tmp_path):
    """With the slice gone, `status` still tells how far a gs:// run got: the last metrics line
    and the committed checkpoints (a step folder without Orbax's commit file is not one)."""
    root = tmp_path / "gcs"
    run = root / "bkt" / "runs" / "stage1"
    for step in (200, 400, 600):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
        if step != 600:  # 600: a save cut short
            (run / "checkpoints" / str(step) / "commit_success.txt").write_text("ok")
    (run / "metrics.jsonl").write_text('{"step": 599, "loss": 2.5}\n{"step": 600, "loss": 2.4}\n')
    fake = tmp_path / "gcloud"
    fake.write_text(FAKE_GCLOUD_STORAGE.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = launch(
        "--zone",
        "us-east5-a",
        "--run-dir",
        "gs://bkt/runs/stage1",
        "status",
        env={"GCLOUD": str(fake), "FAKE_GCS_ROOT": str(root)},
    )
    assert "cslm (us-east5-a): GONE" in out.stdout
    assert 'last metrics: {"step": 600, "loss": 2.4}' in out.stdout
    assert (
        "checkpoints:  200 400 " in out.stdout and "600 " not in out.stdout.split("checkpoints:")[1]
    )
    fresh = launch(
        "--zone",
        "us-east5-a",
        "--run-dir",
        "gs://bkt/runs/none",
        "status",
        env={"GCLOUD": str(fake), "FAKE_GCS_ROOT": str(root)},
    )
    assert "last metrics: (none yet)" in fresh.stdout and "(none committed yet)" in fresh.stdout
