"""The README's main job runs end to end and checks itself (exit 0 only when every check holds:
parities, falling losses, held-out ASR far below chance, streamed answers that reassemble)."""

import json

import pytest

from cslm_jax.cli.main import main as cli
from cslm_jax.eval.asr import save_random_whisper


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
    # the stage-2 model's speech scored on audio (issue 26): synthesised with the demo's random
    # token2wav, transcribed by a tiny random Whisper (the numbers are noise; the path is real)
    whisper = save_random_whisper(tmp_path / "whisper", seed=0)
    for task, keys in (
        ("cslm_pretrain_tts_en", ("asr_error_rate",)),
        ("cslm_sft_s2s_en", ("consistency_error_rate", "speech_answer_error_rate")),
    ):
        out = tmp_path / f"{task}.json"
        code = cli(
            ["evaluate", "--config", str(demo / "stage2"), "--task", task, "--output", str(out),
             "--max-examples", "2", "--token2wav", str(demo / "token2wav"), "--voice", "random",
             "--asr", f"whisper:{whisper}"]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
        r = json.loads(out.read_text(encoding="utf-8"))
        m = r["metrics"]
        assert all(m[k] is not None for k in keys), m
        assert m["audio"]["answers_with_audio"] >= 1
        for row in r["examples"]:
            if row.get("wav"):
                assert (out.parent / row["wav"]).is_file()
        for way in ("interleaved", "chain"):
            assert m["time_to_first_audio_s"][way]["mean"] > 0
            assert m["time_to_first_audio_s"][way]["median"] > 0
