"""Prepared caches in a GCS bucket, against a real GCS server (fake-gcs-server; tests/fake_gcs.py):
`prepare-data --out gs://...` writes the bytes a local --out gets, a rerun keeps it, each host
stages only its own shard files, and `train --data-cache gs://...` trains as from the local cache.
Every file goes through cslm_jax.storage.fs (TensorFlow's GCS client ignores the emulator)."""

import json
from pathlib import Path

import numpy as np
import pytest
import seqio

from cslm_jax.data.beam_prepare import prepare_data
from cslm_jax.data.formats import load_data_config
from cslm_jax.storage import fs
from test_train import losses, run_cfg

IN_MEMORY = ["--direct_running_mode=in_memory"]


def _prepare_cli(demo, tok, out, *extra):
    from cslm_jax.cli.main import main

    return main(
        [
            "prepare-data",
            "--data-config",
            str(demo[0] / "data.yaml"),
            "--stage",
            "pretrain",
            "--tokenizer",
            str(tok),
            "--out",
            out,
            "--num-shards",
            "2",
            "--max-length",
            "128",
            "--pipeline-option",
            "direct_running_mode=in_memory",
            *extra,
        ]
    )


def test_a_cache_in_a_bucket_is_the_local_bytes_kept_on_rerun_and_staged_per_host(
    demo, tmp_path, gcs, bucket, capsys
):  # noqa: F811
    url, name = bucket
    local = tmp_path / "cache"
    assert _prepare_cli(demo, demo[1], str(local)) == 0
    assert _prepare_cli(demo, demo[1], f"{url}/cache") == 0
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert any(f.endswith("train.tfrecord-00001-of-00002") for f in files)
    assert gcs.objects(name, "cache/") == [f"cache/{f}" for f in files]  # nothing else left
    for f in files:  # shards, info, stats and COMPLETED
        assert (fs.path(f"{url}/cache") / f).read_bytes() == (local / f).read_bytes(), f
    capsys.readouterr()
    assert _prepare_cli(demo, demo[1], f"{url}/cache") == 0
    assert "already prepared" in capsys.readouterr().out

    # each host copies its own shard files; the others are empty stand-ins of the same names
    from cslm_jax.tasks.cslm import register

    cfg = load_data_config(demo[0] / "data.yaml", ["packing.max_length=128"])
    register(cfg, demo[1], stages=["pretrain"], cache_dir=f"{url}/cache")
    spec = cfg.tasks("pretrain")[0]
    task = seqio.get_mixture_or_task(spec.name)
    staged = Path(task.stage(1, 2))
    shard0, shard1 = "train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"
    assert (staged / shard0).stat().st_size == 0
    assert (staged / shard1).read_bytes() == (local / spec.name / shard1).read_bytes()
    assert json.loads((staged / "COMPLETED").read_text()) == json.loads(
        (local / spec.name / "COMPLETED").read_text()
    )
    assert task.cache_dir == str(staged)
    assert (
        Path(task.stage(0, 1)) != staged
        and (Path(task.cache_dir) / shard0).read_bytes()
        == (local / spec.name / shard0).read_bytes()
    )


@pytest.mark.slow
def test_train_from_a_cache_in_a_bucket_equals_the_local_cache(
    demo, base_ckpt, tmp_path, gcs, bucket
):  # noqa: F811
    """`train --data-cache gs://...` (one host: every shard file staged) trains on the batches of
    the same cache prepared locally: the same losses, step by step."""
    from cslm_jax.train.loop import EXIT_OK, train

    url, _ = bucket
    cfg = run_cfg(demo, base_ckpt, "train.steps=3", "train.num_devices=1")
    data_cfg = load_data_config(demo[0] / "data.yaml", ["packing.max_length=128"])
    for out in (tmp_path / "cache", f"{url}/cache"):
        prepare_data(
            data_cfg,
            "pretrain",
            base_ckpt / "tokenizer",
            out,
            num_shards=1,
            pipeline_args=IN_MEMORY,
            log=lambda *_: None,
        )
    assert (
        train(cfg, tmp_path / "local", log=lambda *_: None, data_cache=str(tmp_path / "cache"))
        == EXIT_OK
    )
    assert (
        train(cfg, tmp_path / "bucket", log=lambda *_: None, data_cache=f"{url}/cache") == EXIT_OK
    )
    steps, a = losses(tmp_path / "local")
    assert steps == [1, 2, 3]
    np.testing.assert_array_equal(a, losses(tmp_path / "bucket")[1])
