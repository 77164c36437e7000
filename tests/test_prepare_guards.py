"""`cslm-jax prepare-data` guards (issue 29): a cache prepared from input files that changed since
is refused by prepare-data and by `train --data-cache` (and so is one written before caches
recorded their inputs); bad runners, runner options and --range-mb are refused leaving nothing in
--out; Beam options whose value starts with '-' are taken; only the asked stage's files must
exist; skipped records are counted per file; both values of a differing setting are named; and
Beam's start-up chatter stays off stderr while its real warnings pass."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from cslm_jax.cli.main import build_parser, parse_args
from cslm_jax.cli.main import main as cli
from cslm_jax.data.formats import load_data_config
from cslm_jax.data.prepare import CacheError, check_cache, read_stats, task_key

IN_MEMORY = ["--num-workers", "1", "--pipeline-options=--direct_running_mode=in_memory"]
S2S = "s2s_en2en.train.jsonl"  # the demo's 120 en->en spoken questions


def write_config(root: Path, stages: dict, skip_bad: bool = False) -> Path:
    base = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    base.update(
        data_dir=str(root),
        stages=stages,
        packing={"max_length": 128, "shuffle_buffer": 64, "skip_bad": skip_bad},
    )
    (root / "data.yaml").write_text(yaml.safe_dump(base, allow_unicode=True))
    return root / "data.yaml"


def s2s_corpus(root: Path, demo) -> Path:
    """One s2s task (stage `s`) over a copy of the demo's 120-line s2s_en2en file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / S2S).write_bytes((demo[0] / S2S).read_bytes())
    return write_config(root, {"s": [{"kind": "s2s", "lang": "en", "name": "qa", "train": [S2S]}]})


def prepare(capsys, config, tokenizer, out, *extra, stage="s"):
    """`cslm-jax prepare-data` in this process: (exit code, stdout, stderr); argparse's own
    refusals (usage + one line) exit through SystemExit."""
    try:
        code = cli(
            [
                "prepare-data",
                "--data-config",
                str(config),
                "--stage",
                stage,
                "--tokenizer",
                str(tokenizer),
                "--out",
                str(out),
                "--num-shards",
                "2",
                *map(str, extra),
            ]
        )
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(err: str, command: str = "prepare-data") -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"cslm-jax {command}: error: "), err
    return lines[-1]


def test_a_changed_input_is_refused_by_prepare_data_and_by_train(demo, base_ckpt, tmp_path, capsys):  # noqa: F811
    config = s2s_corpus(tmp_path / "data", demo)
    out = tmp_path / "cache"
    # (the value of --pipeline-options starting with '-' is taken as given: issue 29 item 7)
    code, stdout, err = prepare(
        capsys,
        config,
        base_ckpt,
        out,
        "--num-workers",
        "1",
        "--pipeline-options",
        "--direct_running_mode=in_memory",
    )
    assert code == 0, err
    assert "qa: prepared" in stdout
    record = json.loads((out / "qa" / "COMPLETED").read_text())["inputs"]["train"]
    assert [(r["file"], r["lines"], r["size"]) for r in record] == [
        (S2S, 120, (tmp_path / "data" / S2S).stat().st_size)
    ]
    shards = {p.name: p.read_bytes() for p in (out / "qa").iterdir()}

    # unchanged: kept
    code, stdout, _ = prepare(capsys, config, base_ckpt, out, *IN_MEMORY)
    assert code == 0 and "qa: already prepared" in stdout

    # 120 lines cut to 30: refused, naming the file and both counts; nothing touched
    lines = (tmp_path / "data" / S2S).read_text().splitlines(keepends=True)
    (tmp_path / "data" / S2S).write_text("".join(lines[:30]))
    code, _, err = prepare(capsys, config, base_ckpt, out, *IN_MEMORY)
    line = error_line(err)
    assert code == 2
    assert f"prepared from an older {S2S}: 120 lines" in line and "now 30 lines" in line, line
    assert "--force" in line
    assert {p.name: p.read_bytes() for p in (out / "qa").iterdir()} == shards

    # train --data-cache refuses it too, before the model loads (the new run folder is gone)
    run_dir = tmp_path / "run"
    code = cli(
        [
            "train",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--run-dir",
            str(run_dir),
            "--data-cache",
            str(out),
            f"init_from={base_ckpt}",
            f"data.config={config}",
            "data.stage=s",
            "data.max_length=128",
            "train.num_devices=1",
            "train.steps=1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2, captured.err[-2000:]
    line = error_line(captured.err, "train")
    assert f"prepared from an older {S2S}: 120 lines" in line and "now 30 lines" in line, line
    assert "train: initialised from" not in captured.out and "step 1" not in captured.out
    assert not run_dir.exists()

    # --force prepares it again; then training's check passes
    code, stdout, err = prepare(capsys, config, base_ckpt, out, "--force", *IN_MEMORY)
    assert code == 0, err
    assert f"qa: prepared from an older {S2S}" in stdout and "(--force)" in stdout
    assert read_stats(out / "qa", "train")["records"] == 30
    cfg = load_data_config(config)
    check_cache(
        out / "qa", task_key(cfg.tasks("s")[0], cfg, base_ckpt / "tokenizer", 0), cfg.tasks("s")[0]
    )

    # same size, another modification time: refused, both times named
    st = (tmp_path / "data" / S2S).stat()
    os.utime(tmp_path / "data" / S2S, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    with pytest.raises(CacheError, match=rf"older {S2S}: modified .*, now .* \(same size"):
        check_cache(
            out / "qa",
            task_key(cfg.tasks("s")[0], cfg, base_ckpt / "tokenizer", 0),
            cfg.tasks("s")[0],
        )


def test_a_cache_without_an_input_record_is_refused_and_settings_name_both_values(
    demo, tmp_path, capsys
):
    config = s2s_corpus(tmp_path / "data", demo)
    out = tmp_path / "cache"
    assert prepare(capsys, config, demo[1], out, *IN_MEMORY)[0] == 0
    cfg = load_data_config(config)
    spec = cfg.tasks("s")[0]
    key = task_key(spec, cfg, demo[1], 0)

    # another max_length: both values, in prepare-data's refusal and in training's
    code, _, err = prepare(capsys, config, demo[1], out, "--max-length", "256", *IN_MEMORY)
    assert code == 2
    assert "prepared with other settings (max_length 128 in the cache, 256 here)" in error_line(err)
    other = load_data_config(config, ["packing.max_length=256"])
    with pytest.raises(
        CacheError,
        match=r"different max_length than .* \(max_length 128 in the "
        r"cache, 256 here\)",
    ):
        check_cache(out / "qa", task_key(spec, other, demo[1], 0), spec)

    # a COMPLETED written before caches recorded their inputs (no "inputs")
    completed = out / "qa" / "COMPLETED"
    old = json.loads(completed.read_text())
    del old["inputs"]
    completed.write_text(json.dumps(old, indent=1))
    code, _, err = prepare(capsys, config, demo[1], out, *IN_MEMORY)
    line = error_line(err)
    assert code == 2 and "prepared by an older cslm-jax" in line and "--force" in line, line
    with pytest.raises(CacheError, match="prepared by an older cslm-jax.*--force"):
        check_cache(out / "qa", key, spec)
    assert prepare(capsys, config, demo[1], out, "--force", *IN_MEMORY)[0] == 0
    check_cache(out / "qa", key, spec)


def test_runner_errors_leave_nothing_in_out(demo, tmp_path, capsys):
    config = s2s_corpus(tmp_path / "data", demo)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (
            ["--runner", "BogusRunner"],
            [
                "--runner BogusRunner: not a Beam runner",
                "DirectRunner",
                "DataflowRunner",
                "FlinkRunner",
            ],
        ),
        (
            ["--runner", "DataflowRunner"],
            ["--runner DataflowRunner: missing", "--temp_location", "--project", "--region"],
        ),
        (["--range-mb", "0"], ["--range-mb must be > 0", "got 0"]),
        (["--range-mb", "-5"], ["--range-mb must be > 0", "got -5"]),
    ]
    for extra, expected in cases:
        for out in (tmp_path / "absent", empty):
            code, _, err = prepare(capsys, config, demo[1], out, *extra)
            assert code == 2, (extra, err)
            last = err.strip().splitlines()[-1]
            for text in expected:
                assert text in last, (extra, last)
            assert "Traceback" not in err
            assert not (tmp_path / "absent").exists() and list(empty.iterdir()) == []


def test_pipeline_options_starting_with_a_dash_are_taken():
    base = [
        "prepare-data",
        "--data-config",
        "d.yaml",
        "--stage",
        "s",
        "--tokenizer",
        "t",
        "--out",
        "o",
    ]
    parser = build_parser()
    for extra, options in (
        (["--pipeline-options", "--direct_num_workers=1"], "--direct_num_workers=1"),
        (
            ["--pipeline-options=--direct_num_workers=1 --foo=bar"],
            "--direct_num_workers=1 --foo=bar",
        ),
        (["--pipeline-options", "--direct_num_workers=1", "--force"], "--direct_num_workers=1"),
    ):
        args = parse_args(base + extra, parser)
        assert args.pipeline_options == options
    args = parse_args(
        base + ["--pipeline-option", "project=p", "--pipeline-option", "--region=r", "--force"],
        parser,
    )
    assert args.pipeline_option == ["project=p", "--region=r"] and args.force
    with pytest.raises(SystemExit):  # an unknown option is still refused
        parse_args(base + ["--bogus"], parser)


def test_pipeline_option_flags_reach_beam(capsys, monkeypatch, demo, tmp_path):
    import cslm_jax.data.beam_prepare as beam_prepare

    seen = {}
    monkeypatch.setattr(beam_prepare, "prepare_data", lambda *a, **k: seen.update(k) or {})
    config = s2s_corpus(tmp_path / "data", demo)
    assert (
        prepare(
            capsys,
            config,
            demo[1],
            tmp_path / "c",
            "--pipeline-options",
            "--direct_num_workers=1 --a=b",
            "--pipeline-option",
            "project=p",
            "--pipeline-option=--region=r",
        )[0]
        == 0
    )
    assert seen["pipeline_args"] == ["--direct_num_workers=1", "--a=b", "--project=p", "--region=r"]


def test_only_the_asked_stage_must_have_its_files(demo, tmp_path, capsys):
    root = tmp_path / "data"
    config = s2s_corpus(root, demo)
    cfg = yaml.safe_load(config.read_text())
    cfg["stages"]["other"] = [{"kind": "asr", "lang": "en", "train": ["missing.jsonl"]}]
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    code, stdout, err = prepare(capsys, config, demo[1], tmp_path / "c", *IN_MEMORY)
    assert code == 0, err
    assert "qa: prepared" in stdout
    code, _, err = prepare(capsys, config, demo[1], tmp_path / "c2", *IN_MEMORY, stage="other")
    assert code == 2
    assert (
        f"field 'stages.other[0].train[0]': file {root / 'missing.jsonl'} does not exist"
        in error_line(err)
    )
    assert not (tmp_path / "c2").exists()


def test_skipped_records_are_counted_per_file(demo, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    good = {"lang": "en", "text": "hi", "units": [1, 2]}
    rows = [good, "{broken", good, dict(good, lang="xx"), good]
    (root / "a.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    )
    (root / "b.jsonl").write_text(json.dumps(good) + "\n")
    config = write_config(
        root, {"k": [{"kind": "asr", "lang": "en", "train": ["a.jsonl", "b.jsonl"]}]}, skip_bad=True
    )
    code, stdout, err = prepare(capsys, config, demo[1], tmp_path / "c", *IN_MEMORY, stage="k")
    assert code == 0, err
    skips = [x for x in stdout.splitlines() if "bad record(s)" in x]
    assert len(skips) == 1, stdout  # b.jsonl had nothing to skip
    assert f"skipped 2 bad record(s) of 5 line(s) in {root / 'a.jsonl'}" in skips[0]
    assert f"first: {root / 'a.jsonl'}:2:" in skips[0]


def test_beam_start_up_chatter_is_dropped_and_real_warnings_kept(demo, tmp_path):
    """Two DirectRunner worker processes (whose own start-up lines reach stderr directly): only
    our lines come out, and a real Beam warning (an option it does not know) still does."""
    config = s2s_corpus(tmp_path / "data", demo)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cslm_jax.cli.main",
            "prepare-data",
            "--data-config",
            str(config),
            "--stage",
            "s",
            "--tokenizer",
            str(demo[1]),
            "--out",
            str(tmp_path / "c"),
            "--num-shards",
            "2",
            "--num-workers",
            "2",
            "--pipeline-option",
            "no_such_option=1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("prepare-data:") == 2, done.stdout
    err = done.stderr.splitlines()
    assert err and all("no_such_option" in x for x in err), done.stderr
    for noise in ("INFO:", "apitools", "semi_persistent_directory", "pipeline_type_check'"):
        assert noise not in done.stderr


def test_stderr_filter_keeps_what_is_not_known_noise():
    from cslm_jax.data.beam_prepare import _forward_stderr

    lines = [
        b"INFO:__main__:Logging handler created.",
        (
            b"WARNING:root:apitools not found, and bigquery client libraries are not available "
            b"despite the import not raising an ImportError."
        ),
        (
            b"WARNING:apache_beam.options.pipeline_options:Discarding unparseable args: "
            b"['--direct_runner_use_stacked_bundle', '--pipeline_type_check']"
        ),
        (
            b"WARNING:apache_beam.runners.portability.local_job_service:Worker: severity: WARN "
            b"message: \"Discarding unparseable args: [\\'--pipeline_type_check\\', "
            b"\\'--direct_runner_use_stacked_bundle\\']\""
        ),
        (
            b"WARNING:apache_beam.options.pipeline_options:Discarding unparseable args: "
            b"['--pipeline_type_check', '--direct_runner_use_stacked_bundle', '--mine=1']"
        ),
        b"Traceback (most recent call last):",
        b"  raise ValueError('x')",
        b"CRITICAL:__main__:Python sdk harness failed: ",
        b"no newline at the end",
    ]
    source, sink = os.pipe()
    target_r, target_w = os.pipe()
    os.write(sink, b"\n".join(lines))
    os.close(sink)
    _forward_stderr(source, target_w)
    with os.fdopen(target_r, "rb") as f:
        assert f.read() == b"\n".join(lines[4:])


def test_objects_in_a_bucket_are_told_by_their_md5(gcs, bucket):  # noqa: F811
    """gs:// inputs: the object's md5 decides (the same bytes uploaded again are the same
    input; other bytes of the same size are not); an object missing here is not checked."""
    from cslm_jax.data.formats import TaskSpec
    from cslm_jax.data.prepare import input_record, input_stamp, inputs_changed
    from cslm_jax.storage import fs

    url, _ = bucket
    path = f"{url}/d/q.jsonl"
    fs.path(path).write_text('{"a": 1}\n{"a": 2}\n')
    stamp = input_stamp(path)
    assert stamp["size"] == 18 and stamp["md5"] and stamp["generation"]
    spec = TaskSpec("s", "mt", None, 1.0, (path, f"{url}/d/gone.jsonl"), (), "t", None)
    found = {"inputs": {"train": input_record(spec.train, [stamp, dict(stamp)], [2, 2])}}
    fs.path(path).write_text('{"a": 1}\n{"a": 2}\n')  # uploaded again: a new generation
    assert input_stamp(path)["generation"] != stamp["generation"]
    assert inputs_changed(found, spec) is None
    fs.path(path).write_text('{"a": 1}\n{"a": 3}\n')  # same size, other bytes
    assert inputs_changed(found, spec) == (
        f"prepared from an older q.jsonl: md5 {stamp['md5']}, "
        f"now {input_stamp(path)['md5']} (same size, 18 bytes)"
    )
    fs.path(path).write_text('{"a": 1}\n')
    assert (
        inputs_changed(found, spec)
        == "prepared from an older q.jsonl: 2 lines, 18 bytes, now 9 bytes"
    )
