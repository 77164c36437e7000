"""Run folders, checkpoints and model folders in a GCS bucket, against a real GCS server
(fake-gcs-server, started here on 127.0.0.1; see tests/fake_gcs.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cslm_jax.storage import fs
from cslm_jax.storage.outputs import MARKER
from cslm_jax.train.loop import EXIT_OK, EXIT_PREEMPTED, train
from test_train import kill_overrides, losses, model_params, quiet, run_cfg, stalled_save_child

REPO = Path(__file__).resolve().parents[1]


def steps_in_bucket(gcs, name, prefix):
    return sorted(
        {
            int(o[len(prefix) :].split("/")[0])
            for o in gcs.objects(name, prefix)
            if o[len(prefix) :].split("/")[0].isdigit()
        }
    )


def test_paths_refuse_what_is_not_local_or_gs():
    with pytest.raises(fs.StorageError, match="s3:// paths are not supported"):
        fs.path("s3://bucket/run", "--run-dir")
    with pytest.raises(fs.StorageError, match="lost a slash"):
        fs.path("gs:/bucket/run", "--run-dir")  # what pathlib makes of gs://bucket/run
    with pytest.raises(fs.StorageError, match="no bucket name"):
        fs.path("gs:///run")
    assert str(fs.path("gs://b/x/")) == "gs://b/x"
    assert str(fs.path("rel/x")) == os.path.abspath("rel/x")


def test_commit_file_mode_detects_gcsfuse_mounts(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nmy-bucket /mnt/bucket fuse.gcsfuse rw,nosuid 0 0\n")
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


def test_sigterm_and_resume_in_a_bucket_reproduce_a_local_run(
    demo, base_ckpt, tmp_path, gcs, bucket
):
    url, name = bucket
    cfg = run_cfg(demo, base_ckpt, "train.num_devices=2", "checkpoint.keep=2")
    assert train(cfg, tmp_path / "local", log=quiet) == EXIT_OK
    steps, straight = losses(tmp_path / "local")

    def sigterm_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    # the bucket run reads its data config and JSONL files from the bucket too
    data_dir, _ = demo
    fs.upload_dir(data_dir, f"{url}/data")
    cfg = run_cfg(
        demo,
        base_ckpt,
        "train.num_devices=2",
        "checkpoint.keep=2",
        f"data.config={url}/data/data.yaml",
    )
    run_dir = fs.path(f"{url}/runs/demo")
    assert train(cfg, run_dir, log=quiet, on_step=sigterm_at_4) == EXIT_PREEMPTED
    assert steps_in_bucket(gcs, name, "runs/demo/checkpoints/") == [3, 4]
    assert losses(run_dir)[0] == [1, 2, 3, 4]
    assert not (run_dir / "model").exists()
    assert train(cfg, run_dir, log=quiet) == EXIT_OK  # automatic resume
    got_steps, resumed = losses(run_dir)
    assert got_steps == steps
    np.testing.assert_array_equal(resumed, straight)  # bit-identical trace
    for a, b in zip(
        jax.tree.leaves(model_params(tmp_path / "local")), jax.tree.leaves(model_params(run_dir))
    ):
        np.testing.assert_array_equal(a, b)
    # keep=2 deleted the older steps in the bucket too; every kept step is committed
    assert steps_in_bucket(gcs, name, "runs/demo/checkpoints/") == [6, 8]
    objects = gcs.objects(name, "runs/demo/")
    assert "runs/demo/checkpoints/8/commit_success.txt" in objects
    assert "runs/demo/config.yaml" in objects and "runs/demo/model/cslm_checkpoint.json" in objects
    assert any(o.startswith("runs/demo/tensorboard/") for o in objects)
    assert not any(
        ("/." in o and not o.endswith(MARKER)) or "orbax-checkpoint-tmp" in o for o in objects
    )


def test_sigkill_during_async_save_to_a_bucket_keeps_the_previous_checkpoint(
    demo, base_ckpt, tmp_path, gcs, bucket
):
    """The child stalls Orbax's commit of step 4 in the bucket (every object written, the commit
    file not) and is SIGKILLed there: step 2 stays the latest checkpoint, the uncommitted step 4
    is never restored, and the resume removes it and finishes the run."""
    url, name = bucket
    run_dir = f"{url}/killed"
    marker = tmp_path / "stalled"
    overrides = kill_overrides(demo, base_ckpt)
    child = stalled_save_child(run_dir, overrides, "CommitFileTemporaryPath", marker)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **gcs.env())
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, (
            f"child exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        )
        assert time.time() < deadline, "the child never reached the save of step 4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    objects = gcs.objects(name, "killed/checkpoints/4/")
    assert any("/state/" in o for o in objects)  # the data is in the bucket...
    assert "killed/checkpoints/4/commit_success.txt" not in objects  # ...but never committed

    from cslm_jax.config import load_run_config
    from cslm_jax.storage.checkpoint import train_checkpoint_manager

    manager = train_checkpoint_manager(f"{run_dir}/checkpoints", 2, 5)
    assert manager.latest_step() == 2 and list(manager.all_steps()) == [2]
    manager.close()
    cfg = load_run_config(REPO / "configs" / "demo.yaml", overrides + ["train.log_every=1"])
    logged = []
    assert train(cfg, run_dir, log=logged.append) == EXIT_OK
    assert any("removed" in line and "never committed" in line for line in logged)
    assert steps_in_bucket(gcs, name, "killed/checkpoints/") == [2, 4, 6, 8]
    assert all(
        f"killed/checkpoints/{s}/commit_success.txt" in gcs.objects(name, "killed/")
        for s in (2, 4, 6, 8)
    )
    assert losses(fs.path(run_dir))[0][0] == 3  # resumed after step 2


def test_import_export_and_decode_load_through_a_bucket(make_hf_llama, tmp_path, gcs, bucket):
    """import-hf writes into the bucket; export-hf from the bucket (to the bucket and to local
    disk) equals export-hf from the same checkpoint on local disk; decoding loads it."""
    from safetensors.numpy import load_file

    from cslm_jax.convert.hf import export_hf, import_hf
    from cslm_jax.infer.decode import load_for_decoding

    url, name = bucket
    hf_dir, _ = make_hf_llama()
    import_hf(hf_dir, tmp_path / "ckpt", speech_units=16, log=quiet)
    import_hf(hf_dir, f"{url}/ckpt", speech_units=16, log=quiet)
    objects = gcs.objects(name, "ckpt/")
    assert "ckpt/cslm_checkpoint.json" in objects and "ckpt/tokenizer/tokenizer.json" in objects

    export_hf(tmp_path / "ckpt", tmp_path / "hf_local", dtype="float32", log=quiet)
    export_hf(f"{url}/ckpt", tmp_path / "hf_from_bucket", dtype="float32", log=quiet)
    export_hf(f"{url}/ckpt", f"{url}/hf", dtype="float32", log=quiet)
    assert "hf/config.json" in gcs.objects(name, "hf/")
    hf_in_bucket = fs.local_dir(f"{url}/hf")
    for other in (tmp_path / "hf_from_bucket", hf_in_bucket):
        assert sorted(p.name for p in other.iterdir()) == sorted(
            p.name for p in (tmp_path / "hf_local").iterdir()
        )
        a, b = (
            load_file(tmp_path / "hf_local" / "model.safetensors"),
            load_file(other / "model.safetensors"),
        )
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert (other / "config.json").read_text() == (
            tmp_path / "hf_local" / "config.json"
        ).read_text()

    _, local_params, _, _ = load_for_decoding(tmp_path / "ckpt")
    _, bucket_params, tok, vocab = load_for_decoding(f"{url}/ckpt")
    assert vocab.unit_count == 16
    for x, y in zip(jax.tree.leaves(local_params), jax.tree.leaves(bucket_params)):
        np.testing.assert_array_equal(x, y)
    # replacing needs --force; the replaced checkpoint is whole again
    from cslm_jax.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        import_hf(hf_dir, f"{url}/ckpt", speech_units=16, log=quiet)
    import_hf(hf_dir, f"{url}/ckpt", speech_units=8, force=True, log=quiet)
    assert load_for_decoding(f"{url}/ckpt")[3].unit_count == 8


def cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "cslm_jax.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def test_missing_bucket_is_refused_before_any_step(demo, base_ckpt, gcs):
    data_dir, _ = demo
    r = cli(
        "train",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--run-dir",
        "gs://no-such-bucket/run",
        f"init_from={base_ckpt}",
        f"data.config={data_dir / 'data.yaml'}",
        env=gcs.env(),
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "gs://no-such-bucket does not exist" in r.stderr
    assert "Traceback" not in r.stderr and "step" not in r.stdout
    assert not Path("gs:").exists()
    r = cli(
        "export-hf",
        "--ckpt",
        "gs://no-such-bucket/ckpt",
        "--out",
        "/tmp/never-written",
        env=gcs.env(),
    )
    assert (
        r.returncode == 2
        and "--ckpt gs://no-such-bucket/ckpt: bucket gs://no-such-bucket does not exist" in r.stderr
    )


def test_a_bucket_without_permission_is_refused_with_a_clear_error(tmp_path):
    """A server that answers every request 403 (as GCS does without permission) stands in for a
    bucket we may not read: the command stops at once with an error naming the path."""
    import http.server
    import threading

    class Forbidden(http.server.BaseHTTPRequestHandler):
        def _deny(self):
            body = json.dumps(
                {
                    "error": {
                        "code": 403,
                        "message": "caller does not have storage.objects.list access",
                    }
                }
            ).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _deny

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = cli(
            "export-hf",
            "--ckpt",
            "gs://private/ckpt",
            "--out",
            str(tmp_path / "out"),
            env={"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{server.server_address[1]}"},
            timeout=120,
        )
    finally:
        server.shutdown()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--ckpt gs://private/ckpt: no permission to read gs://private" in r.stderr
    assert not (tmp_path / "out").exists()


def test_two_processes_share_one_run_folder_in_a_bucket(demo, base_ckpt, tmp_path, gcs, bucket):
    """A two-process job (one JAX job, gloo collectives) trains into one gs:// run folder: both
    join every Orbax save there, each writes its own data position, it stops on a SIGTERM to one
    process and resumes; the trace equals the same run in one process on local disk."""
    from cslm_jax.config import load_run_config
    from test_multihost import overrides, run_two_processes

    url, name = bucket
    args = overrides(demo, base_ckpt)
    run_dir = f"{url}/two"
    env = gcs.env()
    saved = os.environ.copy()
    os.environ.update(env)
    try:
        codes, outs = run_two_processes(tmp_path / "two", args, stop_at=(1, 3), run_dir_arg=run_dir)
        assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], outs[0][-3000:] + outs[1][-3000:]
        assert steps_in_bucket(gcs, name, "two/checkpoints/") == [2, 3]
        shards = {o.split("/")[4] for o in gcs.objects(name, "two/checkpoints/3/data/")}
        assert shards == {"shard_0", "shard_1", "commit_success.txt"}  # each process its own
        codes, outs = run_two_processes(tmp_path / "two", args, run_dir_arg=run_dir)
        assert codes == [EXIT_OK, EXIT_OK], outs[0][-3000:] + outs[1][-3000:]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    steps, multi_loss = losses(fs.path(run_dir))
    single = tmp_path / "one_process"
    cfg = load_run_config(REPO / "configs" / "demo.yaml", args + ["train.num_devices=4"])
    assert train(cfg, single, log=quiet, data_shards=2) == EXIT_OK
    ref_steps, ref_loss = losses(single)
    assert steps == ref_steps == list(range(1, 7))
    np.testing.assert_allclose(multi_loss, ref_loss, rtol=1e-6)  # gloo's sum order: 1 ulp
    assert not any(
        ("/." in o and not o.endswith(MARKER)) or "orbax-checkpoint-tmp" in o
        for o in gcs.objects(name, "two/")
    )


def test_a_data_config_in_a_bucket_resolves_and_checks_its_files(demo, gcs, bucket):
    from cslm_jax.config import ConfigError
    from cslm_jax.data.formats import load_data_config

    url, _ = bucket
    data_dir, _ = demo
    fs.upload_dir(data_dir, f"{url}/d")
    cfg = load_data_config(f"{url}/d/data.yaml")
    files = [f for specs in cfg.stages.values() for s in specs for f in s.train]
    assert files and all(f.startswith(f"{url}/d/") for f in files)
    text = (data_dir / "data.yaml").read_text()
    first = Path(files[0]).name if "://" not in files[0] else files[0].rsplit("/", 1)[1]
    fs.path(f"{url}/d/broken.yaml").write_text(text.replace(first, "missing.jsonl", 1))
    with pytest.raises(
        ConfigError,
        match=rf"{url}/d/broken.yaml: field 'stages\..*': file "
        rf"{url}/d/missing.jsonl does not exist",
    ):
        load_data_config(f"{url}/d/broken.yaml")


def test_commit_file_mode_on_a_mount_writes_in_place_and_marks_last(tmp_path, monkeypatch):
    """What a gcsfuse mount gets (forced here with CSLM_JAX_ATOMICITY on a local folder): model
    checkpoints written in place with their metadata last, a failed save removed; training steps
    committed by Orbax's commit file, uncommitted ones removed before a resume."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from cslm_jax.config import ModelConfig
    from cslm_jax.model.vocab import VocabInfo
    from cslm_jax.storage.checkpoint import (
        META_FILE,
        CheckpointError,
        read_metadata,
        remove_partial_checkpoints,
        save_model_checkpoint,
        train_checkpoint_manager,
    )

    monkeypatch.setenv("CSLM_JAX_ATOMICITY", "commit_file")
    cfg = ModelConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        unpadded_vocab_size=128,
    )
    vocab = VocabInfo(base_size=128, unit_count=0, control_tokens=(), padded_size=128)
    written = []

    def failing():
        written.append(sorted(p.name for p in (tmp_path / "model").iterdir()))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model_checkpoint(
            tmp_path / "model", {"embed": jnp.ones((128, 16)), "norm": failing}, cfg, vocab
        )
    # in place, no hidden sibling, no metadata yet (the output marker claims the folder first)
    assert written == [[MARKER, "params"]]
    assert not (tmp_path / "model").exists()  # the failed save is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    manager = train_checkpoint_manager(tmp_path / "ckpts", every=1, keep=3, async_save=False)
    manager.save(1, args=ocp.args.Composite(config=ocp.args.JsonSave({"a": 1})))
    manager.wait_until_finished()
    manager.close()
    assert (tmp_path / "ckpts" / "1" / "commit_success.txt").is_file()
    (tmp_path / "ckpts" / "2" / "config").mkdir(parents=True)  # a save cut short
    assert remove_partial_checkpoints(tmp_path / "ckpts") == ["2"]
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["1"]
    with pytest.raises(CheckpointError, match=f"{META_FILE}: missing"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "params").mkdir()
        read_metadata(tmp_path / "half")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (
            [
                "import-speech-tokenizer",
                "--from",
                "/tmp/x.onnx",
                "--version",
                "v1",
                "--out",
                "gs://b/t",
            ],
            "--out gs://b/t",
        ),
    ],
)
def test_commands_without_bucket_support_refuse_gs_paths(argv, flag, tmp_path):
    """What cannot write to a bucket yet says so instead of writing a local folder named gs:."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    r = cli(*[str(manifest) if a == "MANIFEST" else a for a in argv], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{flag}: " in r.stderr and "local paths only" in r.stderr
    assert not Path("gs:").exists()


def test_local_only_path_arguments_refuse_urls():
    r = cli(
        "decode",
        "--lang",
        "en",
        "--unit",
        "gs://b/q.txt",
        "--ckpt",
        "/tmp/x",
        "--output-dir",
        "/tmp/never",
        timeout=120,
    )
    assert (
        r.returncode == 2
        and "--unit gs://b/q.txt: `cslm-jax decode` reads and writes local" in r.stderr
    )
    r = cli("demo", "--out", "gs://b/demo", timeout=120)
    assert r.returncode == 2 and "--out gs://b/demo:" in r.stderr
    assert not Path("gs:").exists()


def test_extract_units_reads_and_writes_a_bucket(tmp_path, gcs, bucket):
    """Manifest, audio and tokenizer in a bucket, units written to it: the same records as a
    local run; the same command then finds the bucket's extraction complete; a missing bucket is
    refused before any work."""
    import soundfile as sf

    from cslm_jax.cli.main import main
    from cslm_jax.speech import save_random_tokenizer

    url, name = bucket
    local = tmp_path / "corpus"
    local.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, seconds in enumerate((0.6, 1.9, 1.1, 2.6, 0.9)):
        fname = f"u{i}.{'flac' if i % 2 else 'wav'}"
        sf.write(local / fname, 0.2 * rng.standard_normal(int(seconds * 16000)), 16000)
        lines.append({"id": f"u{i}", "audio": fname, "text": f"word {i}", "lang": "en"})
    (local / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    save_random_tokenizer(tmp_path / "tok", "v1", seed=0, n_state=64, n_head=2, n_layer=1)
    fs.upload_dir(local, f"{url}/corpus")
    fs.upload_dir(tmp_path / "tok", f"{url}/tok")
    common = ["--shard-size", "2", "--batch-size", "2", "--no-progress"]
    assert (
        main(
            [
                "extract-units",
                "--manifest",
                str(local / "m.jsonl"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "units"),
                *common,
            ]
        )
        == 0
    )
    remote = [
        "extract-units",
        "--manifest",
        f"{url}/corpus/m.jsonl",
        "--tokenizer",
        f"{url}/tok",
        "--out",
        f"{url}/units",
        *common,
    ]
    assert main(remote) == 0

    def records(root):
        done = json.loads(fs.path(f"{root}/COMPLETE.json").read_text())
        return [
            json.loads(line)
            for s in done["shards"]
            for line in fs.path(f"{root}/{s}").read_text().splitlines()
        ]

    here, there = records(tmp_path / "units"), records(f"{url}/units")
    assert here == there and all(r["units"] for r in there)  # fields passed on as written
    assert [r["audio"] for r in there] == [x["audio"] for x in lines]
    plan = json.loads(fs.path(f"{url}/units/extract.json").read_text())
    assert plan["tokenizer_dir"] == f"{url}/tok" and plan["manifest"] == f"{url}/corpus/m.jsonl"
    assert sorted(o.split("/", 1)[1] for o in gcs.objects(name, "units/")) == sorted(
        ["extract.json", "COMPLETE.json", "skipped.jsonl"]
        + [f"units-{i:05d}-of-00003.{k}" for i in range(3) for k in ("jsonl", "done.json")]
    )
    assert main(remote) == 0  # complete: nothing redone
    # a local list of gs:// audio URLs
    (tmp_path / "list.txt").write_text("".join(f"{url}/corpus/{x['audio']}\n" for x in lines))
    assert (
        main(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "list.txt"),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "units2"),
                *common,
            ]
        )
        == 0
    )
    assert [r["units"] for r in records(tmp_path / "units2")] == [r["units"] for r in here]
    (tmp_path / "list.txt").write_text(f"{url}/corpus/missing.wav\n")
    from cslm_jax.speech.extract import ExtractError, Options, extract, open_tokenizer

    with pytest.raises(ExtractError, match=f"{url}/corpus/missing.wav: missing"):
        extract(
            tmp_path / "list.txt",
            tmp_path / "units3",
            open_tokenizer(tmp_path / "tok"),
            tokenizer_dir=tmp_path / "tok",
            opts=Options(progress=False),
        )
    assert not Path("gs:").exists()
    r = cli(
        "extract-units",
        "--manifest",
        f"{url}/corpus/m.jsonl",
        "--tokenizer",
        f"{url}/tok",
        "--out",
        "gs://no-such-bucket/units",
        env=gcs.env(),
        timeout=120,
    )
    assert (
        r.returncode == 2
        and "--out gs://no-such-bucket/units: bucket gs://no-such-bucket does not exist" in r.stderr
    ), r.stderr[-2000:]
