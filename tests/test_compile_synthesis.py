"""`cslm-jax compile --token2wav`: the speech synthesis step (flow + HiFT) compiled ahead of time
for a TPU chip on this CPU host. Bad input fails before libtpu or the compiler are reached; the
FLOP count covers every CFM step (XLA counts a loop body once); a reduced model compiles for one
v5e chip and reports memory, FLOPs per second of audio and the compute bound."""

import re

import pytest

import cslm_jax.tpu.synthesis as synthesis
from cslm_jax.cli.main import main
from cslm_jax.tpu.aot import libtpu_available

NEEDS_LIBTPU = pytest.mark.skipif(
    not libtpu_available(),
    reason="the libtpu package is not installed (pip install "
    "'libtpu==0.0.42.*', pinned in requirements-dev.txt)",
)
TINY = [
    "flow.encoder_size=64",
    "flow.encoder_heads=2",
    "flow.encoder_linear_units=128",
    "flow.encoder_blocks=1",
    "flow.channels=64",
    "flow.num_mid_blocks=1",
    "flow.n_blocks=1",
    "flow.regulator_layers=1",
    "hift.base_channels=32",
    "hift.cond_channels=16",
]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--token2wav", "v3", "--topology", "v5e:1x1"], "--token2wav 'v3': compiles v1, v2"),
        (
            ["--token2wav", "v1", "--topology", "v5e:2x2", "--batch", "6"],
            "--batch 6: must be a positive multiple of the 4 chip(s)",
        ),
        (
            ["--token2wav", "v1", "--topology", "v5e:1x1", "--seconds", "61"],
            "--seconds 61: give 0.5 to 60 s",
        ),
        (
            ["--token2wav", "v1", "--topology", "v5e:1x1", "--precision", "bfloat16"],
            "--precision 'bfloat16': choose one of highest, high, default",
        ),
        (
            ["--token2wav", "v1", "--topology", "v5e:1x1", "n_state=4"],
            "'n_state=4': with --token2wav, overrides are model sizes flow.NAME=N or hift.NAME=N",
        ),
        (
            ["--token2wav", "v1", "--topology", "v5e:1x1", "flow.channels=a"],
            "'flow.channels=a': flow.channels must be a number",
        ),
        (
            ["--token2wav", "v1", "--topology", "v5e:1x1", "flow.encoder_heads=3"],
            "not a multiple of encoder_heads 3",
        ),
        (["--token2wav", "v1", "--topology", "v5p:1x1", "--batch", "4"], "3-D shapes"),
    ],
)
def test_bad_input_is_refused_before_any_compile(argv, message, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("libtpu / the compiler was reached")

    monkeypatch.setattr(synthesis, "topology_devices", never)
    monkeypatch.setattr(synthesis, "compile_memory", never)
    assert main(["compile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--token2wav", "v1", "--speech-tokenizer", "v1"], "compile different steps: give one"),
        (["--token2wav", "v1", "--config", "x.yaml"], "--token2wav compiles its own step"),
        (["--config", "x.yaml", "--batch", "4"], "--batch and --seconds go with"),
    ],
)
def test_flags_that_do_not_go_together(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--topology", "v5e:1x1", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


TINY_V2 = [
    "flow.input_size=64",
    "flow.encoder_size=64",
    "flow.encoder_heads=2",
    "flow.encoder_linear_units=128",
    "flow.encoder_blocks=1",
    "flow.up_blocks=1",
    "flow.channels=64",
    "flow.num_mid_blocks=1",
    "flow.n_blocks=1",
    "hift.base_channels=48",
    "hift.cond_channels=16",
]


@pytest.mark.parametrize("version, sizes, units", [("v1", TINY, 50), ("v2", TINY_V2, 25)])
def test_flops_count_every_cfm_step(version, sizes, units):
    """The step's FLOPs grow by exactly one estimator call per Euler step (lowered on CPU, not
    compiled), the estimator calls are most of the work, and the count is linear in the batch."""
    counts = {}
    for steps in (2, 5):
        flow_cfg, hift_cfg = synthesis.configs(version, sizes + [f"flow.n_timesteps={steps}"])
        frames = flow_cfg.mel_len(units)
        counts[steps] = synthesis.xla_flops(flow_cfg, hift_cfg, 2, units, frames, "highest")
    (two, est2), (five, est5) = counts[2], counts[5]
    assert est2 == est5 > 0
    assert five - two == pytest.approx(3 * est2, rel=1e-6)
    assert 5 * est5 / five > 0.5
    flow_cfg, hift_cfg = synthesis.configs(version, sizes + ["flow.n_timesteps=2"])
    four, _ = synthesis.xla_flops(flow_cfg, hift_cfg, 4, units, flow_cfg.mel_len(units), "highest")
    assert four == pytest.approx(2 * two, rel=0.02)


@NEEDS_LIBTPU
@pytest.mark.slow
def test_synthesis_step_compiles_for_one_v5e_chip(capsys):
    """The real synthesis step (flow encoder, regulator, 10 CFM steps, HiFT), reduced sizes,
    compiled for one v5e chip: memory per chip, FLOPs per second of audio, the bound (~75 s)."""
    code = main(
        [
            "compile",
            "--token2wav",
            "v1",
            "--topology",
            "v5e:1x1",
            "--batch",
            "2",
            "--seconds",
            "1",
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("FITS")
    assert (
        "batch      2 x 1 s (2 answer(s) per chip): 50 units -> 86 mel frames -> 22016 "
        "samples each" in out
    )
    total = float(re.search(r"total ([0-9.]+) MiB of", out).group(1))
    fpas = float(re.search(r"= ([0-9.e+]+) per second of audio", out).group(1))
    bound = float(
        re.search(r"bound      ([0-9,]+) s of audio per chip-second", out).group(1).replace(",", "")
    )
    assert total > 0 and fpas > 0 and bound > 0
    assert "/ 6 bf16 pass(es) per float32 product (highest)" in out
