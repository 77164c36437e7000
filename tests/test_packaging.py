"""Packaging: pyproject.toml's dependencies agree with the pinned requirements*.txt, and the wheel
installs (not editable) into a fresh environment where `cslm-jax` works from any folder: only
`cslm_jax` at the top level, tasks/ as `cslm_jax.tasks`, configs/ as package data."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BUILD_INPUTS = ("pyproject.toml", "README.md", "cslm_jax", "tasks", "configs")


def _pins(path: Path) -> dict[str, Requirement]:
    """name -> requirement of a requirements file's own lines (`-r` includes are not followed)."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        pins[canonicalize_name(req.name)] = req
    return pins


def _specs(lines: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def _check_pins_satisfy(pins: dict[str, Requirement], specs: dict[str, Requirement], where: str):
    assert sorted(pins) == sorted(specs), (
        f"{where}: names differ; only in requirements: {sorted(set(pins) - set(specs))}, "
        f"only in pyproject: {sorted(set(specs) - set(pins))}"
    )
    for name, pin in pins.items():
        (spec,) = pin.specifier  # an exact pin: the install list CI uses
        assert spec.operator == "==", f"{pin}: requirements files pin exact versions"
        assert specs[name].specifier.contains(spec.version, prereleases=True), (
            f"{where}: pinned {pin} does not satisfy pyproject's {specs[name]}"
        )
        assert not specs[name].marker and not specs[name].extras, specs[name]


def test_pyproject_dependencies_match_the_pinned_requirements():
    runtime = _pins(REPO / "requirements.txt")
    dev = _pins(REPO / "requirements-dev.txt")
    assert "-r requirements.txt" in (REPO / "requirements-dev.txt").read_text()
    project = PYPROJECT["project"]
    _check_pins_satisfy(runtime, _specs(project["dependencies"]), "dependencies")
    _check_pins_satisfy(dev, _specs(project["optional-dependencies"]["dev"]), "[dev] extra")

    tpu = _specs(project["optional-dependencies"]["tpu"])
    assert sorted(tpu) == ["jax", "libtpu"], tpu
    jax_pin = next(iter(runtime["jax"].specifier)).version
    assert tpu["jax"].extras == {"tpu"} and str(tpu["jax"].specifier) == f"=={jax_pin}", tpu["jax"]
    assert str(tpu["libtpu"].specifier) == str(dev["libtpu"].specifier), (
        tpu["libtpu"],
        dev["libtpu"],
    )
    # jaxlib moves with jax: both exact, the same release
    assert str(_specs(project["dependencies"])["jaxlib"].specifier) == f"=={jax_pin}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline (no build isolation: the environment's setuptools) from a copy of
    the build inputs, so no stale build/ folder of the checkout can leak into it."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(
                REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = root / "dist"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("cslm_jax-*.whl")
    return whl


def _expected_files() -> set[str]:
    """Every module and config of the checkout, at its installed path."""
    files = {
        f"cslm_jax/{p.relative_to(REPO / 'cslm_jax').as_posix()}"
        for p in (REPO / "cslm_jax").rglob("*")
        if p.suffix in (".py", ".cc") and "__pycache__" not in p.parts
    }
    files |= {
        f"cslm_jax/tasks/{p.relative_to(REPO / 'tasks').as_posix()}"
        for p in (REPO / "tasks").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    files |= {
        f"cslm_jax/configs/{p.relative_to(REPO / 'configs').as_posix()}"
        for p in (REPO / "configs").rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    return files


def test_wheel_holds_only_cslm_jax_with_configs_tasks_kernels_and_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = f"cslm_jax-{PYPROJECT['project']['version']}.dist-info"
        meta = email.parser.Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    stray = sorted(n for n in names if not n.startswith(("cslm_jax/", f"{dist_info}/")))
    assert not stray, f"installed outside cslm_jax: {stray}"
    assert top_level == ["cslm_jax"]
    missing = sorted(_expected_files() - names)
    assert not missing, (
        f"not in the wheel (a new subpackage or configs subfolder must be listed "
        f"in pyproject.toml [tool.setuptools] packages): {missing}"
    )
    for name in (
        "cslm_jax/tasks/cslm.py",
        "cslm_jax/configs/data/demo.yaml",
        "cslm_jax/configs/model/llama3_1_8b.yaml",
        "cslm_jax/configs/demo_sft.yaml",
        "cslm_jax/kernels/small_matmul.cc",
        "cslm_jax/resources.py",
    ):
        assert name in names, name
    assert "cslm-jax = cslm_jax.cli.main:main" in entry_points

    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    runtime = {canonicalize_name(r.name): str(r.specifier) for r in requires if not r.marker}
    assert runtime == {
        canonicalize_name(r.name): str(r.specifier)
        for r in map(Requirement, PYPROJECT["project"]["dependencies"])
    }
    assert set(meta.get_all("Provides-Extra")) >= {"dev", "tpu"}
    tpu = [
        r
        for r in requires
        if r.marker and r.marker.evaluate({"extra": "tpu"}) and not r.marker.evaluate({"extra": ""})
    ]
    assert sorted(f"{r.name}{sorted(r.extras)}{r.specifier}" for r in tpu) == sorted(
        f"{r.name}{sorted(r.extras)}{r.specifier}"
        for r in map(Requirement, PYPROJECT["project"]["optional-dependencies"]["tpu"])
    )
    dev = {
        canonicalize_name(r.name)
        for r in requires
        if r.marker and r.marker.evaluate({"extra": "dev"}) and not r.marker.evaluate({"extra": ""})
    }
    assert {"torch", "pytest", "libtpu"} <= dev


def test_wheel_installed_in_a_fresh_venv_runs_outside_the_checkout(wheel, tmp_path):
    """Not editable: a new venv gets the wheel; the dependencies come from this environment's
    site-packages through a .pth line (a .pth file inside a directory added that way is not run,
    so this environment's editable finder for the checkout stays out)."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    py = venv / "bin" / "python"
    # installed before the .pth exists, so pip sees no other cslm-jax (it must not touch ours)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    ours = sysconfig.get_paths()
    (site / "_dev_dependencies.pth").write_text(
        "\n".join(dict.fromkeys([ours["purelib"], ours["platlib"]])) + "\n"
    )

    work = tmp_path / "elsewhere"  # not the checkout, not below it
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["JAX_PLATFORMS"] = "cpu"
    env["COLUMNS"] = "1000"  # argparse's help unwrapped: paths in one piece

    def run(*args, exe=venv / "bin" / "cslm-jax"):
        p = subprocess.run(
            [str(exe), *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p.stdout

    where = run(
        "-c",
        "import cslm_jax, cslm_jax.tasks.cslm as t\n"
        "from cslm_jax.resources import config_path\n"
        "print(cslm_jax.__file__, t.__file__, config_path('data', 'demo.yaml'), sep='\\n')",
        exe=py,
    ).split()
    for path in where:
        assert Path(path).resolve().is_relative_to(venv.resolve()), where
    assert "make-demo-data" in run("--help")
    help_text = run("validate-data", "--help")
    assert f"(default: {where[2]})" in help_text, help_text

    run("make-demo-data", "--out", "demo_data")
    data = work / "demo_data"
    assert (data / "data.yaml").is_file() and (data / "tokenizer").is_dir()
    out = run("validate-data", "demo_data/paired_zh.train.jsonl", "demo_data/s2s_en2zh.train.jsonl")
    assert "2 file(s) valid" in out, out
    # a user's data config is taken as given
    out = run("validate-data", "--data-config", "demo_data/data.yaml", "demo_data/mt.train.jsonl")
    assert "1 file(s) valid" in out, out
