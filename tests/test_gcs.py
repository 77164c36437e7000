"""Run folders, checkpoints and model folders in a GCS bucket, against a real GCS server
(fake-gcs-server, started here on 127.0.0.1; see tests/fake_gcs.py)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fake_gcs import FakeGcs
from test_train import base_ckpt, losses, model_params, quiet, run_cfg  # noqa: F401  (fixture reused)

from cslm_jax.storage import fs
from cslm_jax.train.loop import EXIT_OK, EXIT_PREEMPTED, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = FakeGcs(tmp_path_factory.mktemp("fake_gcs"))
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                             "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                                             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "EPATH_USE_TF")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(server.env())
    fs._ENV_DONE = False                  # derive the emulator defaults from this server
    fs.use_emulator_defaults()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fs._ENV_DONE = False


_buckets = iter(range(10_000))


@pytest.fixture
def bucket(gcs):
    name = f"bucket-{next(_buckets)}"
    return gcs.create_bucket(name), name


def gcs_losses(run_dir):
    rows = [json.loads(x) for x in fs.path(run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def gcs_params(run_dir):
    from cslm_jax.storage.checkpoint import load_params
    return load_params(fs.path(run_dir) / "model")


def steps_in_bucket(gcs, name, prefix):
    return sorted({int(o[len(prefix):].split("/")[0]) for o in gcs.objects(name, prefix)
                   if o[len(prefix):].split("/")[0].isdigit()})


def test_paths_refuse_what_is_not_local_or_gs():
    with pytest.raises(fs.StorageError, match="s3:// paths are not supported"):
        fs.path("s3://bucket/run", "--run-dir")
    with pytest.raises(fs.StorageError, match="lost a slash"):
        fs.path("gs:/bucket/run", "--run-dir")           # what pathlib makes of gs://bucket/run
    with pytest.raises(fs.StorageError, match="no bucket name"):
        fs.path("gs:///run")
    assert str(fs.path("gs://b/x/")) == "gs://b/x"
    assert str(fs.path("rel/x")) == os.path.abspath("rel/x")


def test_commit_file_mode_detects_gcsfuse_mounts(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\n"
                      "my-bucket /mnt/bucket fuse.gcsfuse rw,nosuid 0 0\n")
    monkeypatch.delenv("CSLM_JAX_ATOMICITY", raising=False)
    assert fs.commit_file_mode("/mnt/bucket/run/checkpoints", mounts_file=str(mounts))
    assert fs.commit_file_mode("/mnt/bucket", mounts_file=str(mounts))
    assert not fs.commit_file_mode("/mnt/bucket2/run", mounts_file=str(mounts))
    assert not fs.commit_file_mode(str(tmp_path), mounts_file=str(mounts))
    assert fs.commit_file_mode("gs://b/run")
    monkeypatch.setenv("CSLM_JAX_ATOMICITY", "commit_file")
    assert fs.commit_file_mode(str(tmp_path), mounts_file=str(mounts))
    monkeypatch.setenv("CSLM_JAX_ATOMICITY", "rename")
    assert not fs.commit_file_mode("/mnt/bucket/run", mounts_file=str(mounts))
    monkeypatch.setenv("CSLM_JAX_ATOMICITY", "atomic")
    with pytest.raises(fs.StorageError, match="CSLM_JAX_ATOMICITY"):
        fs.commit_file_mode(str(tmp_path))


def test_sigterm_and_resume_in_a_bucket_reproduce_a_local_run(demo, base_ckpt, tmp_path, gcs, bucket):
    url, name = bucket
    cfg = run_cfg(demo, base_ckpt, "train.num_devices=2", "checkpoint.keep=2")
    assert train(cfg, tmp_path / "local", log=quiet) == EXIT_OK
    steps, straight = losses(tmp_path / "local")

    def sigterm_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    run_dir = fs.path(f"{url}/runs/demo")
    assert train(cfg, run_dir, log=quiet, on_step=sigterm_at_4) == EXIT_PREEMPTED
    assert steps_in_bucket(gcs, name, "runs/demo/checkpoints/") == [3, 4]
    assert gcs_losses(run_dir)[0] == [1, 2, 3, 4]
    assert not (run_dir / "model").exists()
    assert train(cfg, run_dir, log=quiet) == EXIT_OK                 # automatic resume
    got_steps, resumed = gcs_losses(run_dir)
    assert got_steps == steps
    np.testing.assert_array_equal(resumed, straight)                # bit-identical trace
    for a, b in zip(jax.tree.leaves(model_params(tmp_path / "local")),
                    jax.tree.leaves(gcs_params(run_dir))):
        np.testing.assert_array_equal(a, b)
    # keep=2 deleted the older steps in the bucket too; every kept step is committed
    assert steps_in_bucket(gcs, name, "runs/demo/checkpoints/") == [6, 8]
    objects = gcs.objects(name, "runs/demo/")
    assert "runs/demo/checkpoints/8/commit_success.txt" in objects
    assert "runs/demo/config.yaml" in objects and "runs/demo/model/cslm_checkpoint.json" in objects
    assert any(o.startswith("runs/demo/tensorboard/") for o in objects)
    assert not any("/." in o or "orbax-checkpoint-tmp" in o for o in objects)
