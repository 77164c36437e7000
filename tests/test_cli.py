"""The command line's contract: a CslmError (bad input, configuration, data, checkpoint) is one
line on stderr and exit code 2, anything else is a bug with its traceback and exit code 1;
importing the package changes nothing in the process; and TensorFlow / JAX start-up notices do
not reach the user's terminal on a CPU machine."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from cslm_jax.cli.main import main as cli
from cslm_jax.data import checks

NOISE = (
    "oneDNN",
    "cuInit",
    "cuda drivers",
    "absl::InitializeLog",
    "libtpu",
    "TPU",
    "cpu_feature_guard",
    "Traceback",
)


def clean_env():
    """The environment of a user's shell: no JAX_PLATFORMS or fake devices set by the tests."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")
    }


def test_a_cslm_error_exits_2_with_its_message(demo, capsys):
    data_dir, _ = demo
    missing = data_dir / "nope.jsonl"
    assert cli(["validate-data", str(missing), "--data-config", str(data_dir / "data.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"cslm-jax validate-data: error: {missing}: cannot read: No such file or directory\n"
    )


def test_a_data_error_from_the_pipeline_exits_2(demo, monkeypatch, capsys):
    from cslm_jax.data.pipeline import DataError

    def stopped(*args, **kwargs):
        raise DataError("input pipeline cslm_pretrain (train): corrupt record")

    monkeypatch.setattr(checks, "validate_file", stopped)
    data_dir, _ = demo
    code = cli(
        [
            "validate-data",
            str(data_dir / "mt.train.jsonl"),
            "--data-config",
            str(data_dir / "data.yaml"),
        ]
    )
    assert code == 2
    assert capsys.readouterr().err == (
        "cslm-jax validate-data: error: input pipeline cslm_pretrain (train): corrupt record\n"
    )


def test_any_other_exception_is_a_bug_with_its_traceback(demo, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(checks, "validate_file", bug)
    data_dir, _ = demo
    args = [
        "validate-data",
        str(data_dir / "mt.train.jsonl"),
        "--data-config",
        str(data_dir / "data.yaml"),
    ]
    with pytest.raises(ValueError, match="a bug, not bad input"):
        cli(args)
    # as a program: the traceback and exit code 1
    child = textwrap.dedent(f"""
        import sys
        from cslm_jax.data import checks
        def bug(*args, **kwargs):
            raise ValueError("a bug, not bad input")
        checks.validate_file = bug
        from cslm_jax.cli.main import main
        sys.exit(main({args!r}))
    """)
    done = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: a bug, not bad input" in done.stderr
    assert "cslm-jax validate-data: error" not in done.stderr


def test_importing_the_package_changes_nothing_in_the_process():
    """No environment variable set, no log filter installed, no device hidden from TensorFlow,
    by importing every module (the third-party libraries are imported first, so that only our
    modules' effects are compared)."""
    code = textwrap.dedent("""
        import importlib, logging, os, pkgutil, sys
        import jax, numpy, orbax.checkpoint, seqio, tensorflow as tf, transformers, yaml
        import cslm_jax

        hidden = []
        tf.config.set_visible_devices = lambda *a, **k: hidden.append(a)

        def filters():
            loggers = [logging.getLogger()] + [logging.getLogger(n) for n in
                                               sorted(logging.Logger.manager.loggerDict)]
            return {lg.name: list(lg.filters) for lg in loggers}

        env, before = dict(os.environ), filters()
        names = ["tasks.cslm"] + [m.name for m in pkgutil.walk_packages(cslm_jax.__path__, "cslm_jax.")]
        for name in names:
            importlib.import_module(name)
        after = filters()
        assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
        changed = {n: f for n, f in after.items() if f != before.get(n, [])}
        assert not changed, changed
        assert not hidden, hidden
        print(len(names))
    """)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean_env(),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 30  # every module was imported


def test_no_start_up_noise_reaches_the_terminal(demo, tmp_path):
    """A command that starts TensorFlow (a SeqIO task: prepared, read) and one that does not
    print nothing on stderr on this CPU machine."""
    data_dir, tokenizer = demo
    runs = [
        [
            "inspect-data",
            "--tokenizer",
            str(tokenizer),
            "--data-config",
            str(data_dir / "data.yaml"),
            "--task",
            "cslm_pretrain_asr_en",
            "-n",
            "1",
        ],
        [
            "validate-data",
            str(data_dir / "mt.train.jsonl"),
            "--data-config",
            str(data_dir / "data.yaml"),
        ],
    ]
    for args in runs:
        done = subprocess.run(
            [sys.executable, "-m", "cslm_jax.cli.main", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=clean_env(),
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert not [n for n in NOISE if n in done.stderr], done.stderr
        assert done.stderr == "", done.stderr
        assert done.stdout.strip()


def test_the_package_never_reaches_back_into_the_command_line():
    """Core modules take explicit arguments: none imports cslm_jax.cli or argparse."""
    offenders = []
    for path in [*(REPO / "cslm_jax").rglob("*.py"), *(REPO / "tasks").rglob("*.py")]:
        if (REPO / "cslm_jax" / "cli") in path.parents:
            continue
        text = path.read_text(encoding="utf-8")
        if (
            "import argparse" in text
            or "from cslm_jax.cli" in text
            or "import cslm_jax.cli" in text
        ):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_version_prints_the_package_version(capsys):
    import tomllib

    import cslm_jax

    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    assert stop.value.code == 0
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cslm_jax.__version__ == want
    assert capsys.readouterr().out == f"cslm-jax {want}\n"


@pytest.mark.parametrize("content", [bytes(range(256)) * 2, b"hello, not weights"])
def test_a_garbage_pt_file_is_one_line_naming_it(tmp_path, capsys, content):
    """torch.load's own message for a file it cannot read safely advises weights_only=False
    (running the file's code): the user sees one line naming the file instead."""
    bad = tmp_path / "weights.pt"
    bad.write_bytes(content)
    out = tmp_path / "tok"
    assert (
        cli(["import-speech-tokenizer", "--from", str(bad), "--version", "v1", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"cslm-jax import-speech-tokenizer: error: {bad}: not a PyTorch state dict ("
        )
        and err.count("\n") == 1
    ), err
    assert "weights_only" not in err and not out.exists()
