"""The README's main job runs end to end and checks itself (exit 0 only when every check holds)."""
from cslm_jax.cli import main as cli


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo OK" in out and "[6/6]" in out and "[question]" in out
    assert (tmp_path / "demo" / "hf_export" / "config.json").is_file()
    assert cli(["demo", "--out", str(tmp_path / "demo")]) == 2      # refuses to overwrite
