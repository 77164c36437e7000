"""The README's main job runs end to end and checks itself (exit 0 only when every check holds:
parities, falling losses, held-out ASR far below chance, streamed answers that reassemble)."""

import pytest

from cslm_jax.cli.main import main as cli


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "demo OK" in out and "[8/8]" in out and "transcript" in out and "speech 1" in out
    demo = tmp_path / "demo"
    assert (
        f"cslm-jax serve --ckpt {demo / 'stage2'} --data-config {demo / 'data' / 'data.yaml'} "
        f"--token2wav {demo / 'token2wav'} --voice random" in out
    )
    assert (tmp_path / "demo" / "hf_export" / "config.json").is_file()
    assert (tmp_path / "demo" / "stage1" / "model" / "cslm_checkpoint.json").is_file()
    assert cli(["demo", "--out", str(tmp_path / "demo")]) == 2  # refuses to overwrite
