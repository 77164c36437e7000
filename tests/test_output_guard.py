"""Never delete what the user gave us (issue 29, item 1 and the extract-units items 10, 11): an
output that is, holds or lies inside an input, or the current / home / repository folder, is
refused before anything is touched; `--force` replaces only what cslm-jax wrote (its marker
names it) and never foreign files."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cslm_jax.cli.main import main as cli
from cslm_jax.errors import CslmError
from cslm_jax.storage import outputs
from test_extract_units import speechlike

SR = 16000


def error_line(capsys, command):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith(f"cslm-jax {command}: error: "), err
    return lines[-1]


def tree(root: Path) -> dict:
    """Every file under root with its bytes: what must still be there, unchanged."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def user_folder(root: Path) -> Path:
    """The issue's folder: a manifest, its wav/ and an unrelated notes.txt."""
    (root / "wav").mkdir(parents=True)
    for i in range(2):
        sf.write(root / "wav" / f"u{i}.wav", speechlike(0.6 + 0.3 * i, SR, i), SR)
    (root / "m.jsonl").write_text(
        "".join(
            json.dumps({"audio": f"wav/u{i}.wav", "text": "t", "lang": "en"}) + "\n"
            for i in range(2)
        )
    )
    (root / "notes.txt").write_text("mine")
    return root


def test_extract_units_into_the_folder_of_its_inputs_is_refused(
    tmp_path, tokdir, monkeypatch, capsys
):
    d = user_folder(tmp_path / "d")
    tok = tmp_path / "tok"
    shutil.copytree(tokdir, tok)
    before, tok_before = tree(d), tree(tok)
    monkeypatch.chdir(d)
    # the first reproduction: --out . (the current folder, holding the manifest)
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                "m.jsonl",
                "--tokenizer",
                "../tok",
                "--out",
                ".",
                "--force",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "is the current folder" in error_line(capsys, "extract-units")
    monkeypatch.chdir(tmp_path)
    # --out the manifest's folder named otherwise, and the tokenizer's parent
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(d / "m.jsonl"),
                "--tokenizer",
                str(tok),
                "--out",
                str(d),
                "--force",
                "--no-progress",
            ]
        )
        == 2
    )
    assert f"--out {d}: contains the input --manifest" in error_line(capsys, "extract-units")
    shutil.copytree(tok, d / "tok")
    shutil.copy(d / "m.jsonl", tmp_path / "elsewhere.jsonl")
    (tmp_path / "wav").symlink_to(d / "wav")
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                "elsewhere.jsonl",
                "--tokenizer",
                "d/tok",
                "--out",
                "d",
                "--force",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "contains the input --tokenizer d/tok" in error_line(capsys, "extract-units")
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "gone.jsonl"),
                "--tokenizer",
                str(tok),
                "--out",
                str(tok / "units"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "no such file" in error_line(capsys, "extract-units")
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "elsewhere.jsonl"),
                "--tokenizer",
                str(tok),
                "--out",
                str(tok / "units"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert f"lies inside the input --tokenizer {tok}" in error_line(capsys, "extract-units")
    shutil.rmtree(d / "tok")
    assert tree(d) == before and tree(tok) == tok_before
    assert (tmp_path / "elsewhere.jsonl").is_file()


def test_extract_units_force_removes_only_its_own_files(tmp_path, tokdir, capsys):
    d = user_folder(tmp_path / "d")
    out = tmp_path / "units"
    args = [
        "extract-units",
        "--manifest",
        str(d / "m.jsonl"),
        "--tokenizer",
        str(tokdir),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli(args) == 0
    (out / "notes.txt").write_text("mine too")
    theirs = tree(out)
    assert cli([*args, "--force"]) == 2
    line = error_line(capsys, "extract-units")
    assert "--force removes only the files extract-units writes" in line and "notes.txt" in line
    assert tree(out) == theirs
    (out / "notes.txt").unlink()
    assert cli([*args, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "COMPLETE.json",
        "extract.json",
        "skipped.jsonl",
        "units-00000-of-00001.done.json",
        "units-00000-of-00001.jsonl",
    ]


def test_a_strict_run_stopped_before_its_first_shard_does_not_block_the_fixed_rerun(
    tmp_path, tokdir, capsys
):
    d = user_folder(tmp_path / "d")
    (d / "m.jsonl").write_text((d / "m.jsonl").read_text() + '{"audio": "wav/gone.wav"}\n')
    out = tmp_path / "units"
    args = [
        "extract-units",
        "--manifest",
        str(d / "m.jsonl"),
        "--tokenizer",
        str(tokdir),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli(args) == 2
    assert "gone.wav: missing" in error_line(capsys, "extract-units")
    lines = (d / "m.jsonl").read_text().splitlines()
    (d / "m.jsonl").write_text("\n".join(lines[:2]) + "\n")  # the user fixes the manifest
    assert cli(args) == 0
    plan = json.loads((out / "extract.json").read_text())
    assert plan["manifest_entries"] == 2
    assert json.loads((out / "COMPLETE.json").read_text())["records"] == 2


def test_a_shard_whose_every_line_is_bad_writes_no_empty_file(tmp_path, tokdir, capsys):
    """--on-bad skip: an all-bad shard leaves its marker but no empty JSONL (which validate-data
    and training refuse); the output validates, and a rerun finds it complete."""
    d = user_folder(tmp_path / "d")
    good = (d / "m.jsonl").read_text().splitlines()
    bad = ['{"audio": "wav/gone%d.wav", "text": "t", "lang": "en"}' % i for i in range(2)]
    (d / "m.jsonl").write_text("\n".join(good + bad) + "\n")  # shard 1 (lines 3-4): all bad
    out = tmp_path / "units"
    args = [
        "extract-units",
        "--manifest",
        str(d / "m.jsonl"),
        "--tokenizer",
        str(tokdir),
        "--out",
        str(out),
        "--no-progress",
        "--on-bad",
        "skip",
        "--shard-size",
        "2",
    ]
    assert cli(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "units-00001-of-00002.done.json" in names
    assert "units-00001-of-00002.jsonl" not in names
    done = json.loads((out / "COMPLETE.json").read_text())
    assert done["shards"] == ["units-00000-of-00002.jsonl"]
    assert done["records"] == 2 and done["skipped"] == 2
    for s in done["shards"]:  # every listed shard holds records
        assert (out / s).read_text().strip()
    capsys.readouterr()
    assert cli(args) == 0
    assert "already complete" in capsys.readouterr().out


def test_export_hf_into_the_checkpoints_folder_is_refused(tmp_path, base_ckpt, capsys):
    ex = tmp_path / "ex"
    shutil.copytree(base_ckpt, ex / "ckpt")
    before = tree(ex)
    assert cli(["export-hf", "--ckpt", str(ex / "ckpt"), "--out", str(ex), "--force"]) == 2
    assert f"--out {ex}: contains the input --ckpt" in error_line(capsys, "export-hf")
    assert cli(["export-hf", "--ckpt", str(ex / "ckpt"), "--out", str(ex / "ckpt" / "hf")]) == 2
    assert "lies inside the input --ckpt" in error_line(capsys, "export-hf")
    assert tree(ex) == before


def test_force_replaces_only_what_cslm_jax_wrote(tmp_path, base_ckpt, capsys):
    out = tmp_path / "hf_out"
    args = ["export-hf", "--ckpt", str(base_ckpt), "--out", str(out), "--dtype", "float32"]
    assert cli(args) == 0
    marker = json.loads((out / outputs.MARKER).read_text())
    assert marker["entries"] == sorted(p.name for p in out.iterdir() if p.name != outputs.MARKER)
    assert "config.json" in marker["entries"]
    # its own output: --force replaces it
    assert cli([*args, "--force"]) == 0
    # a foreign file inside: refused even with --force, nothing deleted
    (out / "notes.txt").write_text("mine")
    before = tree(out)
    assert cli([*args, "--force"]) == 2
    line = error_line(capsys, "export-hf")
    assert "holds files cslm-jax did not write: notes.txt" in line
    assert tree(out) == before
    # a folder cslm-jax did not write (a user's own HF model): refused even with --force
    user_hf = Path(base_ckpt).parent / "hf"
    before = tree(user_hf)
    assert cli([*args[:-4], "--out", str(user_hf), "--force"]) == 2
    assert f"and has no {outputs.MARKER}: written by another program" in error_line(
        capsys, "export-hf"
    )
    assert tree(user_hf) == before


def test_import_speech_tokenizer_next_to_its_source_is_refused(tmp_path, tokdir, capsys):
    x = tmp_path / "X"
    x.mkdir()
    src = x / "weights.safetensors"  # refused before it is read: any bytes will do
    src.write_bytes(b"\0" * 64)
    before = tree(x)
    assert (
        cli(
            [
                "import-speech-tokenizer",
                "--from",
                str(src),
                "--version",
                "v1",
                "--out",
                str(x),
                "--force",
            ]
        )
        == 2
    )
    assert f"--out {x}: contains the input --from {src}" in error_line(
        capsys, "import-speech-tokenizer"
    )
    assert (
        cli(
            [
                "import-speech-tokenizer",
                "--from",
                str(x),
                "--version",
                "v1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is a folder; give the weights file" in error_line(capsys, "import-speech-tokenizer")
    assert tree(x) == before


def test_make_demo_data_force_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "data"
    assert cli(["make-demo-data", "--out", str(out)]) == 0
    assert json.loads((out / outputs.MARKER).read_text())["tool"] == "make-demo-data"
    assert cli(["make-demo-data", "--out", str(out), "--force", "--seed", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    assert cli(["make-demo-data", "--out", str(out), "--force"]) == 2
    assert "notes.txt" in error_line(capsys, "make-demo-data")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "data.yaml").is_file()
    # a user's folder that is no output of ours: refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert cli(["demo", "--out", str(mine), "--force"]) == 2
    assert "has no .cslm_jax_output.json" in error_line(capsys, "demo")
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_protected_folders_and_output_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad, what in (
        (".", "is the current folder"),
        ("..", "contains the current folder"),
        (str(Path.home()), "is your home folder"),
        ("/", "is the file system root"),
    ):
        with pytest.raises(CslmError, match=what):
            outputs.check_output_dir(bad, force=True)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub").mkdir()
    monkeypatch.chdir(repo / "sub")
    with pytest.raises(CslmError, match=f"is the repository root {repo}"):
        outputs.check_output_dir(repo, force=False)
    outputs.check_output_dir(repo / "sub" / "out", force=False)  # inside: fine
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CslmError, match="afile is a file, so the folder cannot be created"):
        outputs.check_output_dir(tmp_path / "afile" / "out", force=False)
    with pytest.raises(CslmError, match=": is a folder; --output names a file"):
        outputs.check_output_file(tmp_path, force=True)
    with pytest.raises(CslmError, match="afile: exists; pass --force"):
        outputs.check_output_file(tmp_path / "afile", force=False)
    with pytest.raises(CslmError, match="--output .*afile.*is the input --records"):
        outputs.check_output_file(
            tmp_path / "afile", force=True, inputs=[("--records", tmp_path / "afile")]
        )
    if os.geteuid() == 0 or not os.access("/sys", os.W_OK):
        with pytest.raises(CslmError, match="cannot write in /sys"):
            outputs.check_output_file("/sys/x.json", force=False)
    # symlinked inputs are compared where they point
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CslmError, match="lies inside the input --ckpt"):
        outputs.check_output_dir(
            tmp_path / "link" / "out", force=False, inputs=[("--ckpt", tmp_path / "real")]
        )


def test_manifest_messages(tmp_path, tokdir, capsys):
    """A folder given as --manifest, a file as --tokenizer, a BOM before a path list's first
    path, a JSON line cut short: each said as what it is."""
    from cslm_jax.data.audio import read_manifest

    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path),
                "--tokenizer",
                str(tokdir),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "is a folder; give the file" in error_line(capsys, "extract-units")
    (tmp_path / "t.txt").write_text("x")
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "t.txt"),
                "--tokenizer",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "--tokenizer" in (line := error_line(capsys, "extract-units")) and "is a file" in line
    assert (
        cli(
            [
                "extract-units",
                "--manifest",
                str(tmp_path / "t.txt"),
                "--tokenizer",
                str(tokdir),
                "--out",
                str(tmp_path / "o"),
                "--tfds-split",
                "train",
            ]
        )
        == 2
    )
    assert "go with --tfds, not with --manifest" in error_line(capsys, "extract-units")
    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), SR)
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfa.wav\n")
    assert read_manifest(tmp_path / "list.txt")[0].audio["audio"] == str(tmp_path / "a.wav")
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "text": "cut\n')
    with pytest.raises(
        CslmError,
        match=r"m\.jsonl:1: field '<json>': invalid JSON: the line "
        r"ends before the record does",
    ):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav",, "text": "x"}\n')
    with pytest.raises(CslmError, match="at column 19"):
        read_manifest(tmp_path / "m.jsonl")


def test_output_paths_are_checked_before_any_work(tmp_path, tokdir, demo, capsys):
    """Issue 29 item 5 for the commands without a model: a file where a folder is meant, a folder
    where a file is, a parent that is a file: exit 2, nothing written."""
    data_dir, tok_dir = demo
    a_file = tmp_path / "file"
    a_file.write_text("x")
    d = user_folder(tmp_path / "d")
    cases = [
        (
            [
                "extract-units",
                "--manifest",
                str(d / "m.jsonl"),
                "--tokenizer",
                str(tokdir),
                "--out",
                str(a_file / "units"),
            ],
            "so the folder cannot be created under it",
        ),
        (
            [
                "import-speech-tokenizer",
                "--from",
                str(d / "notes.txt"),
                "--version",
                "v1",
                "--out",
                str(a_file),
            ],
            f"--out {a_file}: is a file, not a folder",
        ),
        (
            [
                "prepare-data",
                "--data-config",
                str(data_dir / "data.yaml"),
                "--stage",
                "pretrain",
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(a_file),
            ],
            f"--out {a_file}: is a file, not a folder",
        ),
        (
            [
                "prepare-data",
                "--data-config",
                str(data_dir / "data.yaml"),
                "--stage",
                "pretrain",
                "--tokenizer",
                str(tok_dir),
                "--out",
                str(data_dir),
            ],
            "contains the input --data-config",
        ),
        (
            [
                "join-timings",
                "--records",
                str(d / "m.jsonl"),
                "--alignments",
                str(d),
                "--format",
                "mfa",
                "--out",
                str(tmp_path),
            ],
            "is a folder; --out names a file",
        ),
        (
            [
                "join-timings",
                "--records",
                str(d / "m.jsonl"),
                "--alignments",
                str(d),
                "--format",
                "mfa",
                "--out",
                str(d / "m.jsonl"),
                "--force",
            ],
            "is the input --records",
        ),
    ]
    before = tree(tmp_path)
    for args, message in cases:
        assert cli(args) == 2, args
        line = error_line(capsys, args[0])
        assert message in line, (args, line)
    assert tree(tmp_path) == before


def test_train_run_dir_apart_from_its_inputs(tmp_path, base_ckpt, demo, capsys):
    from conftest import REPO

    data_dir, _ = demo
    before = tree(Path(base_ckpt))

    def train(run_dir):
        return cli(
            [
                "train",
                "--config",
                str(REPO / "configs" / "demo.yaml"),
                "--run-dir",
                str(run_dir),
                "--init-from",
                str(base_ckpt),
                f"data.config={data_dir / 'data.yaml'}",
            ]
        )

    assert train(Path(base_ckpt).parent) == 2
    assert "contains the input --init-from" in error_line(capsys, "train")
    exp = tmp_path / "exp"  # no run: a new one would replace model/ at its end
    (exp / "model").mkdir(parents=True)
    (exp / "model" / "notes.txt").write_text("mine")
    assert train(exp) == 2
    assert "holds model/ but no checkpoint" in error_line(capsys, "train")
    assert (exp / "model" / "notes.txt").read_text() == "mine"
    assert train(data_dir) == 2
    assert "contains the input data.config" in error_line(capsys, "train")
    assert tree(Path(base_ckpt)) == before


def test_train_checks_only_its_stages_files(tmp_path, base_ckpt, demo):
    """Issue 29 item 9 for train: the sft stage runs without the pretrain stage's files, and a
    missing file of its own stage is named."""
    from conftest import REPO
    from cslm_jax.train.loop import preflight

    data = tmp_path / "data"
    shutil.copytree(demo[0], data)
    (data / "paired_zh.train.jsonl").unlink()  # pretrain only
    over = [f"data.config={data / 'data.yaml'}", f"init_from={base_ckpt}"]
    assert preflight(REPO / "configs" / "demo_sft.yaml", over, tmp_path / "run").data.stage == "sft"
    with pytest.raises(
        CslmError,
        match=r"field 'stages.pretrain\[1\].train\[0\]': file .*"
        r"paired_zh.train.jsonl does not exist",
    ):
        preflight(REPO / "configs" / "demo.yaml", over, tmp_path / "run")
    (data / "s2s_en2en.train.jsonl").unlink()
    with pytest.raises(CslmError, match=r"stages.sft\[0\].train\[0\]': file .*s2s_en2en"):
        preflight(REPO / "configs" / "demo_sft.yaml", over, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_force_replaces_only_the_same_commands_output(tmp_path, base_ckpt, tokdir, capsys):
    """An import-hf checkpoint is not export-hf's to replace, and an import-hf reading a speech
    tokenizer folder may not write over it (it carries import-speech-tokenizer's marker)."""
    ck = tmp_path / "ck"
    shutil.copytree(base_ckpt, ck)
    assert json.loads((ck / outputs.MARKER).read_text())["tool"] == "import-hf"
    before = tree(ck)
    assert cli(["export-hf", "--ckpt", str(base_ckpt), "--out", str(ck), "--force"]) == 2
    assert (
        "holds the output of `cslm-jax import-hf`; export-hf replaces only its own"
        in error_line(capsys, "export-hf")
    )
    assert tree(ck) == before
    st = tmp_path / "st"
    shutil.copytree(tokdir, st)
    before = tree(st)
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(Path(base_ckpt).parent / "hf"),
                "--speech-tokenizer",
                str(st),
                "--out",
                str(st),
                "--force",
            ]
        )
        == 2
    )
    assert f"--out {st}: is the input --speech-tokenizer" in error_line(capsys, "import-hf")
    assert tree(st) == before


def test_an_existing_folder_must_be_writable_and_json_cut_short_is_said_once():
    from cslm_jax.errors import json_error

    if os.geteuid() == 0 or not os.access("/sys/kernel", os.W_OK):
        with pytest.raises(CslmError, match="cannot write in /sys/kernel"):
            outputs.check_output_place("/sys/kernel", flag="--output-dir")
    for line, said in (
        ('{"a": "b', "the line ends before the record does; is it cut short?"),
        ('{"a": "x\ty"}\n', "Invalid control character at column 9"),
    ):
        with pytest.raises(json.JSONDecodeError) as e:
            json.loads(line)
        assert json_error(e.value, line) == f"invalid JSON: {said}"
        assert "at at" not in json_error(e.value, line)
