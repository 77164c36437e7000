"""The speech rate of merged units (issue 25): `synthesize` and `decode --speech-out` take it from
the data config's `format.speech_rate` (the mean run length `extract-units` records) unless
`--speech-rate` is given, 1.0 where the units are not merged, and say which they used."""

import json

import numpy as np
import soundfile as sf

from conftest import REPO
from cslm_jax.cli.main import main as cli
from cslm_jax.speech import token2wav as t2w

DATA = REPO / "configs" / "data" / "demo.yaml"


def _config(tmp_path, extra: str):
    """The demo data config with `extra` lines added to its `format:` section."""
    text = DATA.read_text()
    assert "\nformat:\n" in text
    path = tmp_path / "data.yaml"
    path.write_text(text.replace("\nformat:\n", "\nformat:\n" + extra, 1))
    return path


def test_synthesize_takes_the_data_configs_rate(tmp_path, capsys):
    folder = t2w.save_random_token2wav(tmp_path / "t2w", seed=0)
    units = np.random.default_rng(0).integers(0, 4096, 30).tolist()
    f = tmp_path / "units.txt"
    f.write_text("".join(f"<{u}>" for u in units) + "\n")
    cases = [
        (
            "rated",
            ["--data-config", str(_config(tmp_path, "  speech_rate: 1.5\n"))],
            1.5,
            "format.speech_rate",
        ),
        (
            "given",
            [
                "--data-config",
                str(_config(tmp_path, "  speech_rate: 1.5\n")),
                "--speech-rate",
                "1.2",
            ],
            1.2,
            "--speech-rate",
        ),
        ("unset", ["--data-config", str(DATA)], 1.0, "format.speech_rate is not set"),
    ]
    for name, flags, rate, source in cases:
        out = tmp_path / name
        assert (
            cli(
                [
                    "synthesize",
                    "--units",
                    str(f),
                    "--token2wav",
                    str(folder),
                    "--voice",
                    "random",
                    "--out",
                    str(out),
                    *flags,
                ]
            )
            == 0
        )
        said = capsys.readouterr().out
        assert f"speech rate {rate:g} (" in said and source in said, said
        report = json.loads((out / "synthesize.json").read_text())
        assert report["speech_rate"] == rate and source in report["speech_rate_from"]
        wave, _ = sf.read(out / "0000.wav")
        assert len(wave) == t2w.mel_frames(30, rate) * 256
