"""Fail clean (issue 15): every interruption keeps its work, every mistake gets one line (exit
code 2, naming the path, flag or field), nothing is left half-made. One test per point of the
issue: 1 Ctrl-C, 2 resuming with a changed config, 3 missing or wrong paths, 4 tokenizers
without the CSLM tokens, 5 checks before heavy work, 6 failed starts leave nothing, 7 file
modes follow the umask, 8 empty corpora, decode --append, export-hf of a run folder."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO
from cslm_jax.cli.main import build_parser
from cslm_jax.cli.main import main as cli
from cslm_jax.config import load_run_config
from cslm_jax.errors import CslmError
from cslm_jax.train.loop import EXIT_OK, EXIT_PREEMPTED, TrainError, train

CONFIG = REPO / "configs" / "demo.yaml"
CLI = [
    sys.executable,
    "-c",
    "import sys; from cslm_jax.cli.main import main; sys.exit(main(sys.argv[1:]))",
]


def env():
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")


def quiet(*_):
    pass


def one_error_line(err: str, command: str) -> str:
    """The single line a CslmError prints (no traceback around it)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"cslm-jax {command}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(base_ckpt):
    """The tiny random HF Llama with the demo's 256 speech units that test_train builds (once per
    session; its HF folder is the checkpoint's sibling `hf/`)."""
    return base_ckpt


def overrides(demo, ckpt, *extra):
    data_dir, _ = demo
    return [
        f"init_from={ckpt}",
        f"data.config={data_dir / 'data.yaml'}",
        "data.max_length=128",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.progress_bar=false",
        "optimizer.learning_rate=1e-2",
        "train.steps=2",
        "checkpoint.every=1000",
        "checkpoint.keep=5",
        "train.num_devices=1",
        *extra,
    ]


def run_cfg(demo, ckpt, *extra):
    return load_run_config(CONFIG, overrides(demo, ckpt, *extra))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo, ckpt):
    """A finished 2-step run, trained under umask 0022."""
    run_dir = tmp_path_factory.mktemp("failclean_run") / "run"
    old = os.umask(0o022)
    try:
        assert train(run_cfg(demo, ckpt), run_dir, log=quiet) == EXIT_OK
    finally:
        os.umask(old)
    return run_dir


# -- 1. Ctrl-C in train: a checkpoint and exit 75, as SIGTERM; a second Ctrl-C aborts at once ---


def test_1_ctrl_c_checkpoints_like_sigterm_and_a_second_one_aborts(demo, ckpt, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--config",
        CONFIG,
        "--run-dir",
        run_dir,
        *overrides(demo, ckpt, "train.steps=100000"),
    ]
    proc = subprocess.Popen(
        CLI + [str(a) for a in args],
        cwd=REPO,
        env=env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "training never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C at a terminal sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Ctrl-C (SIGINT): finishing this step and writing a checkpoint" in err
    [line] = [x for x in out.splitlines() if "checkpoint of step" in x]
    step = int(line.split("checkpoint of step ")[1].split()[0])
    assert line.startswith("train: SIGINT:") and step >= 2
    assert (run_dir / "checkpoints" / str(step)).is_dir()

    # a second Ctrl-C while the first is being handled: out at once, without a checkpoint
    aborted = tmp_path / "aborted"
    child = textwrap.dedent(f"""
        import os, signal, sys
        from cslm_jax.config import load_run_config
        from cslm_jax.train.loop import train
        cfg = load_run_config({str(CONFIG)!r}, {overrides(demo, ckpt, "train.steps=50")!r})
        def twice(step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        sys.exit(train(cfg, {str(aborted)!r}, on_step=twice))
    """)
    done = subprocess.run(
        [sys.executable, "-c", child],
        cwd=REPO,
        env=env(),
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 130, done.stderr[-3000:]
    assert "second Ctrl-C (SIGINT): aborting now, without a checkpoint" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(p.name.isdigit() for p in (aborted / "checkpoints").iterdir())


def test_1b_a_sigterm_after_the_last_step_finishes_the_model_write_and_exits_0(
    demo, ckpt, tmp_path
):
    """Issue 29: a SIGTERM during the final model write killed training with exit 143 (the run
    resumed, but a launcher read the wrong code). Now it is held until the model is written."""
    run_dir = tmp_path / "late"
    child = textwrap.dedent(f"""
        import os, signal, sys
        import cslm_jax.storage.checkpoint as ck
        from cslm_jax.config import load_run_config
        from cslm_jax.train.loop import train
        real = ck.save_model_checkpoint
        def signalled_write(*a, **k):      # the preemption notice lands during the final write
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        ck.save_model_checkpoint = signalled_write
        cfg = load_run_config({str(CONFIG)!r}, {overrides(demo, ckpt)!r})
        sys.exit(train(cfg, {str(run_dir)!r}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", child],
        cwd=REPO,
        env=env(),
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == EXIT_OK, (done.returncode, done.stderr[-3000:])
    assert "SIGTERM arrived after the last step; the final model was written first" in done.stdout
    assert (run_dir / "model" / "cslm_checkpoint.json").is_file()


# -- 2. Resuming with a changed config -------------------------------------------------------------


def test_2_resume_refuses_optimisation_changes_unless_allowed_and_keeps_every_config(
    demo, ckpt, finished_run, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    first = (run_dir / "config.yaml").read_text()
    changed = run_cfg(
        demo,
        ckpt,
        "train.steps=3",
        "optimizer.learning_rate=2e-2",
        "data.seed=7",
        "checkpoint.every=500",
    )
    with pytest.raises(TrainError) as refused:
        train(changed, run_dir, log=quiet)
    message = str(refused.value)
    for diff in (
        "train.steps: 2 -> 3",
        "optimizer.learning_rate: 0.01 -> 0.02",
        "data.seed: 0 -> 7",
        "--allow-config-change",
    ):
        assert diff in message
    assert "checkpoint.every" not in message  # may change: not a reason to refuse
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    assert (run_dir / "config.yaml").read_text() == first
    assert not (run_dir / "config.2.yaml").exists()

    # with the flag it resumes, says what changed, and keeps both configs
    logged = []
    assert train(changed, run_dir, log=logged.append, allow_config_change=True) == EXIT_OK
    [note] = [m for m in logged if "changed settings" in m]
    assert "train.steps: 2 -> 3" in note and "checkpoint.every: 1000 -> 500" in note
    assert (run_dir / "config.yaml").read_text() == first
    assert load_run_config(run_dir / "config.2.yaml").train.steps == 3
    assert load_run_config(run_dir / "config.yaml").train.steps == 2

    # a change that leaves the optimisation alone is shown, not refused
    logged = []
    logging_only = run_cfg(
        demo,
        ckpt,
        "train.steps=3",
        "optimizer.learning_rate=2e-2",
        "data.seed=7",
        "checkpoint.every=500",
        "train.log_every=2",
        "checkpoint.keep=4",
    )
    assert train(logging_only, run_dir, log=logged.append) == EXIT_OK
    [note] = [m for m in logged if "changed settings" in m]
    assert "train.log_every: 1 -> 2" in note and "checkpoint.keep: 5 -> 4" in note
    assert load_run_config(run_dir / "config.3.yaml").checkpoint.keep == 4

    # the command line has the flag
    args = build_parser().parse_args(
        ["train", "--config", "c.yaml", "--run-dir", "r", "--allow-config-change"]
    )
    assert args.allow_config_change


# -- 3. Missing paths, folders, non-UTF-8 files, files for folders, bad overrides -----------------


def test_3_bad_paths_and_values_are_one_line_naming_them(demo, ckpt, tmp_path, capsys):
    data_dir, tok_dir = demo
    data_cfg = str(data_dir / "data.yaml")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"src_lang": "en", "tgt_lang": "zh", "src": "caf\xe9", "tgt": "x"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    cases = [
        (
            ["validate-data", tmp_path / "missing.jsonl", "--data-config", data_cfg],
            f"{tmp_path / 'missing.jsonl'}: cannot read: No such file or directory",
        ),
        (["validate-data", tmp_path, "--data-config", data_cfg], f"{tmp_path}: cannot read"),
        (["validate-data", latin1, "--data-config", data_cfg], f"{latin1}:1: not UTF-8"),
        (
            ["inspect-data", "--tokenizer", tok_dir, "--jsonl", tmp_path, "--kind", "mt"],
            f"{tmp_path}: cannot read",
        ),
        (
            ["train", "--config", CONFIG, "--run-dir", a_file, *overrides(demo, ckpt)],
            f"--run-dir {a_file}: is a file, not a folder",
        ),
        (
            [
                "train",
                "--config",
                CONFIG,
                "--run-dir",
                tmp_path / "run",
                *overrides(demo, ckpt, "train.steps=abc"),
            ],
            "command-line override 'train.steps=abc': field 'train.steps' must be a positive integer",
        ),
        (
            ["decode", "--lang", "en", "--unit", latin1, "--ckpt", ckpt, "--output-dir", a_file],
            f"--output-dir {a_file}: is a file, not a folder",
        ),
        (
            ["export-hf", "--ckpt", ckpt, "--out", a_file],
            f"--out {a_file}: is a file, not a folder",
        ),
    ]
    for args, expected in cases:
        assert cli([str(a) for a in args]) == 2, args
        line = one_error_line(capsys.readouterr().err, args[0])
        assert expected in line, (args, line)
    assert a_file.read_text() == "not a folder\n" and not (tmp_path / "run").exists()


# -- 4. Tokenizers without the CSLM tokens ---------------------------------------------------------


def test_4_a_tokenizer_without_the_cslm_tokens_is_refused(
    demo, ckpt, make_hf_llama, tmp_path, capsys
):
    from cslm_jax.model.vocab import VocabError

    data_dir, _ = demo
    plain = data_dir / "tokenizer"  # the demo's base BPE, before import-hf extends it
    jsonl = data_dir / "s2s_en2en.train.jsonl"
    units = tmp_path / "q.txt"
    units.write_text("<1><2><3>\n")
    hf_dir, _ = make_hf_llama()  # a text Llama: no CSLM tokens
    capsys.readouterr()  # (its progress bar)
    cases = [
        [
            "inspect-data",
            "--tokenizer",
            plain,
            "--jsonl",
            jsonl,
            "--kind",
            "s2s",
            "-n",
            "1",
            "--data-config",
            data_dir / "data.yaml",
        ],
        [
            "decode",
            "--lang",
            "en",
            "--unit",
            units,
            "--hf-dir",
            hf_dir,
            "--output-dir",
            tmp_path / "out",
            "--data-config",
            data_dir / "data.yaml",
        ],
        [
            "evaluate",
            "--config",
            data_dir / "data.yaml",
            "--task",
            "cslm_pretrain_asr_en",
            "--ckpt",
            hf_dir,
            "--output",
            tmp_path / "eval.json",
        ],
    ]
    for args in cases:
        assert cli([str(a) for a in args]) == 2, args
        line = one_error_line(capsys.readouterr().err, args[0])
        assert "lacks the CSLM token(s) <sosp> <eosp> <eoa> [question] [answer] <0>" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "eval.json").exists()

    # train: a checkpoint whose tokenizer lost its CSLM tokens is refused at data registration
    broken = tmp_path / "broken_ckpt"
    shutil.copytree(ckpt, broken)
    shutil.rmtree(broken / "tokenizer")
    shutil.copytree(plain, broken / "tokenizer")
    with pytest.raises(VocabError, match=r"lacks the CSLM token\(s\) <sosp>"):
        train(run_cfg(demo, broken), tmp_path / "run", log=quiet)


# -- 5. Arguments and paths checked before any heavy work ------------------------------------------


def test_5_arguments_are_checked_before_any_heavy_work(demo, ckpt, tmp_path, capsys):
    data_dir, _ = demo
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    # import-hf: the output is checked before the (missing) model is even looked at
    assert cli(["import-hf", "--hf-dir", str(tmp_path / "no_model"), "--out", str(full)]) == 2
    assert "exists and is not empty" in one_error_line(capsys.readouterr().err, "import-hf")
    # --force replaces folders, never a file
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"precious")
    hf = Path(ckpt).parent / "hf"
    assert cli(["import-hf", "--hf-dir", str(hf), "--out", str(a_file), "--force"]) == 2
    assert "--force replaces folders only" in one_error_line(capsys.readouterr().err, "import-hf")
    assert a_file.read_bytes() == b"precious"
    # decode: the numbers are refused before the model (here: none at all) is looked at
    units = tmp_path / "q.txt"
    units.write_text("<1><2><3>\n")
    for flag, value in (("--batch-size", "0"), ("--max-new-tokens", "-1"), ("--top-p", "2")):
        assert (
            cli(
                [
                    "decode",
                    "--lang",
                    "en",
                    "--unit",
                    str(units),
                    "--ckpt",
                    str(tmp_path / "no_model"),
                    "--output-dir",
                    str(tmp_path / "out"),
                    "--data-config",
                    str(data_dir / "data.yaml"),
                    flag,
                    value,
                ]
            )
            == 2
        )
        assert flag in one_error_line(capsys.readouterr().err, "decode")
    # train: a bad init_from or data.stage fails before the config is printed or TensorFlow starts
    child = (
        "import sys; from cslm_jax.cli.main import main; code = main(sys.argv[1:]); "
        "print('tensorflow imported:', 'tensorflow' in sys.modules); sys.exit(code)"
    )
    for bad, named in (
        (f"init_from={tmp_path / 'no_model'}", "init_from"),
        ("data.stage=nope", "data.stage is 'nope'"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                child,
                "train",
                "--config",
                str(CONFIG),
                "--run-dir",
                str(tmp_path / "run"),
                *overrides(demo, ckpt, bad),
            ],
            cwd=REPO,
            env=env(),
            text=True,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert named in one_error_line(done.stderr, "train")
        assert done.stdout == "tensorflow imported: False\n"  # no config printed either
    assert not (tmp_path / "run").exists()


# -- 6. A failed start leaves the file system as it was -------------------------------------------


def test_6_a_failed_start_leaves_nothing_behind(demo, ckpt, tmp_path, capsys):
    data_dir, _ = demo
    truncated = tmp_path / "data"
    shutil.copytree(data_dir, truncated, ignore=shutil.ignore_patterns(".cslm_cache"))
    text = (truncated / "mt.train.jsonl").read_text()
    (truncated / "mt.train.jsonl").write_text(text[: len(text) // 2])  # cut mid-record

    new = tmp_path / "runs" / "new"  # neither folder exists
    existing = tmp_path / "existing"  # exists, empty
    existing.mkdir()
    for cfg in (
        run_cfg(demo, tmp_path / "no_model"),
        run_cfg(demo, ckpt, "data.stage=nope"),
        run_cfg(demo, ckpt, f"data.config={truncated / 'data.yaml'}"),
    ):
        for run_dir in (new, existing):
            with pytest.raises(CslmError):
                train(cfg, run_dir, log=quiet)
    assert not (tmp_path / "runs").exists()
    assert list(existing.iterdir()) == []

    # decode refusing its input (a unit outside the codebook) leaves no --output-dir
    units = tmp_path / "q.txt"
    units.write_text("<99999>\n")
    out = tmp_path / "answers" / "en"
    assert (
        cli(
            [
                "decode",
                "--lang",
                "en",
                "--unit",
                str(units),
                "--ckpt",
                str(ckpt),
                "--output-dir",
                str(out),
                "--data-config",
                str(data_dir / "data.yaml"),
            ]
        )
        == 2
    )
    assert "outside the codebook" in one_error_line(capsys.readouterr().err, "decode")
    assert not (tmp_path / "answers").exists()


# -- 7. Files follow the process umask -------------------------------------------------------------


def modes(root: Path) -> dict:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


def test_7_every_file_written_follows_the_umask(finished_run, tmp_path):
    old = os.umask(0o022)
    try:
        assert (
            cli(["export-hf", "--ckpt", str(finished_run / "model"), "--out", str(tmp_path / "hf")])
            == 0
        )
    finally:
        os.umask(old)
    exported = modes(tmp_path / "hf")
    assert exported["model.safetensors"] == 0o644
    for root, found in ((tmp_path / "hf", exported), (finished_run, modes(finished_run))):
        wrong = {
            name: oct(mode)
            for name, mode in found.items()
            if mode != (0o755 if (root / name).is_dir() else 0o644)
        }
        assert not wrong, wrong
    run = modes(finished_run)
    assert {"metrics.jsonl", "config.yaml", "checkpoints/2/state", "model/params"} <= set(run)


# -- 8. Empty corpora, decode into a folder with answers, export-hf of a run folder -------------


def test_8_empty_jsonl_decode_append_and_export_of_a_run_folder(
    demo, ckpt, finished_run, tmp_path, capsys
):
    data_dir, _ = demo
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli(["validate-data", str(empty), "--data-config", str(data_dir / "data.yaml")]) == 2
    assert f"{empty}: empty (no records)" in one_error_line(
        capsys.readouterr().err, "validate-data"
    )

    units = tmp_path / "q.txt"
    units.write_text("<1><2><3>\n<4><5>\n")
    out = tmp_path / "out"
    args = [
        "decode",
        "--lang",
        "en",
        "--unit",
        str(units),
        "--ckpt",
        str(ckpt),
        "--output-dir",
        str(out),
        "--data-config",
        str(data_dir / "data.yaml"),
        "--greedy",
        "--max-new-tokens",
        "3",
    ]
    assert cli(args) == 0
    capsys.readouterr()
    first = (out / "responses.jsonl").read_text()
    assert len(first.splitlines()) == 2
    assert cli(args) == 2
    line = one_error_line(capsys.readouterr().err, "decode")
    assert "already holds answers" in line and "--append" in line
    assert (out / "responses.jsonl").read_text() == first
    assert cli(args + ["--append"]) == 0
    assert len((out / "responses.jsonl").read_text().splitlines()) == 4
    assert len((out / "responses.json").read_text().splitlines()) == 4

    assert cli(["export-hf", "--ckpt", str(finished_run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    (tmp_path / "plain").mkdir()
    assert (
        cli(["export-hf", "--ckpt", str(tmp_path / "plain"), "--out", str(tmp_path / "hf2")]) == 2
    )
    assert "nor a finished train run folder" in one_error_line(capsys.readouterr().err, "export-hf")
