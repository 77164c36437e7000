"""`cslm-jax compile`: ahead-of-time compilation of the real train step for a TPU topology on this
CPU host. Bad topologies and meshes fail before anything is compiled; with the `libtpu` package
installed (requirements-dev.txt) a tiny model compiles for a 4-chip v5e slice, reports per-chip
memory and FLOPs, and FITS, while a replicated 1.19B model on the same slice DOES NOT FIT."""

import re
import textwrap

import pytest

import cslm_jax.tpu.aot as aot
import cslm_jax.tpu.extraction as extraction
from cslm_jax.cli.main import main
from cslm_jax.config import ConfigError
from cslm_jax.tpu.aot import GENERATIONS, libtpu_available, parse_topology

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
NEEDS_LIBTPU = pytest.mark.skipif(
    not libtpu_available(),
    reason="the libtpu package is not installed (pip install "
    "'libtpu==0.0.42.*', pinned in requirements-dev.txt)",
)
TINY = """
    vocab_size: 1024
    hidden_size: 128
    intermediate_size: 384
    num_layers: 4
    num_heads: 4
    num_kv_heads: 2
    head_dim: 32
    max_position_embeddings: 1024
    compute_dtype: float32
"""


@pytest.fixture
def demo_args(tmp_path):
    """The demo run config with a 1.15M-parameter model (+256 speech units, vocab 1408)."""
    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(TINY))
    return [
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        "--model",
        str(tmp_path / "tiny.yaml"),
        "--speech-units",
        "256",
    ]


def test_topology_names():
    t = parse_topology("v5p:4x4x4")
    assert (t.name, t.chips, t.accelerator_type, t.hbm_bytes) == (
        "v5p:4x4x4",
        64,
        "v5p-128",
        95 * 2**30,
    )
    assert parse_topology("v5e:8x8").accelerator_type == "v5litepod-64"
    assert parse_topology("v4:2x2x4").accelerator_type == "v4-32"
    assert parse_topology("v5litepod:2x4").name == "v5e:2x4"
    for bad, message in [
        ("v7x:2x2", "unknown TPU generation 'v7x'"),
        ("v5p", "GENERATION:SHAPE"),
        ("v5p:2x2", "3-D shapes"),
        ("v5e:2x2x1", "2-D shapes"),
        ("v4:2x0x1", "positive chip counts"),
        ("", "GENERATION:SHAPE"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_topology(bad)
    assert set(GENERATIONS) == {"v4", "v5e", "v5p", "v6e"}


def test_bad_topology_and_mesh_fail_before_any_compile(demo_args, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("libtpu / the compiler was reached")

    monkeypatch.setattr(aot, "topology_devices", never)
    monkeypatch.setattr(aot, "compile_train_step", never)
    cases = [
        (["--topology", "v9:2x2"], "unknown TPU generation 'v9'"),
        (
            ["--topology", "v5e:2x2", "mesh.fsdp=3", "mesh.data=-1"],
            "the fixed axes (3 ways) do not divide the 4 chips of v5e:2x2",
        ),
        (
            ["--topology", "v5p:2x2x2", "mesh.fsdp=2", "mesh.tensor=2"],
            "needs 4 devices, but v5p:2x2x2 has 8 chips",
        ),
        (
            ["--topology", "v5e:4x4", "train.micro_batch_size=4"],
            "must be a multiple of the mesh's data x fsdp size (16) on v5e:4x4",
        ),
    ]
    for args, message in cases:
        assert main(["compile", *demo_args, *args]) == 2
        err = capsys.readouterr().err
        assert "cslm-jax compile: error:" in err and message in err, err


@NEEDS_LIBTPU
def test_tiny_model_compiles_for_v5e_2x2_and_fits(demo_args, capsys):
    code = main(["compile", *demo_args, "--topology", "v5e:2x2", "train.micro_batch_size=4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("FITS")
    assert "mesh       {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
    assert "v5litepod-4" in out and "16 GiB HBM each" in out
    assert "2 micro-batch(es) of 4" in out and "1.15M params, vocab 1408" in out
    mib = {k: float(v) for k, v in re.findall(r"(arguments|temporaries|total) ([0-9.]+) MiB", out)}
    # 1.15M float32 parameters + two Adam moments over 4 chips is 3.3 MiB; plus the batch
    assert 3.3 < mib["arguments"] < 8 and mib["temporaries"] > 0 and mib["total"] > mib["arguments"]
    assert re.search(r"total [0-9.]+ MiB of 16.00 GiB HBM \(0%\)", out)
    # remat none recomputes nothing: the ratio is what XLA counts beside the formula
    ratio = float(
        re.search(
            r"\(ratio ([0-9.]+): XLA counts [0-9.]+% (more|fewer) than the "
            r"formula\)",
            out,
        ).group(1)
    )
    assert 0.9 < ratio < 1.1  # XLA's count of the real step agrees with 6N + 12LHDhT
    assert "recompute" not in out.split("FLOPs/step")[1]
    # without --speech-units, --model takes the codebook of the run's data config (demo: 256)
    code = main(["compile", *demo_args[:4], "--topology", "v5e:2x2", "train.micro_batch_size=4"])
    assert code == 0 and "1.15M params, vocab 1408" in capsys.readouterr().out


@NEEDS_LIBTPU
def test_replicated_large_model_does_not_fit(tmp_path, capsys):
    """1.19B parameters with fp32 Adam state and gradients replicated on every chip
    (mesh.data=4): ~19 GB per chip against a v5e's 16 GiB."""
    model = tmp_path / "wide.yaml"
    model.write_text(
        textwrap.dedent("""
        vocab_size: 128000
        hidden_size: 4096
        intermediate_size: 8192
        num_layers: 1
        num_heads: 32
        num_kv_heads: 8
        head_dim: 128
        rope_theta: 500000.0
        max_position_embeddings: 1024
    """)
    )
    code = main(
        [
            "compile",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--model",
            str(model),
            "--speech-units",
            "0",
            "--topology",
            "v5e:2x2",
            "mesh.data=4",
            "mesh.fsdp=1",
            "data.max_length=64",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.rstrip().endswith("DOES NOT FIT")
    assert "1.19B params" in out
    assert "RESOURCE_EXHAUSTED" in out and "exceeds available HBM" in out  # the TPU compiler's word


@NEEDS_LIBTPU
def test_splash_attention_compiles_for_v5e(tmp_path, capsys):
    """model.attention=splash: the Pallas kernel compiles (Mosaic, inside shard_map) as part of
    the real train step for a v5e slice, and the report says which kernels the step uses."""
    model = tmp_path / "heads128.yaml"
    model.write_text(textwrap.dedent(TINY).replace("head_dim: 32", "head_dim: 128"))
    code = main(
        [
            "compile",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--model",
            str(model),
            "--speech-units",
            "256",
            "--topology",
            "v5e:2x2",
            "train.micro_batch_size=4",
            "model.attention=splash",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "attention splash (on TPU), cross-entropy full logits" in out
    assert out.rstrip().endswith("FITS")


def test_one_chip_table_serves_mfu_and_compile():
    """MFU's datasheet peak (by jax device_kind) and compile's HBM and peak come from the same
    entries of cslm_jax.tpu.chips.CHIPS; the longest device_kind prefix wins."""
    from cslm_jax.tpu.chips import CHIPS, chip_of_device_kind

    assert all(GENERATIONS[g].chip is CHIPS[g] for g in GENERATIONS)
    assert chip_of_device_kind("TPU v5 lite") is CHIPS["v5e"]  # not "TPU v5" (v5p)
    assert chip_of_device_kind("TPU v5") is CHIPS["v5p"]
    assert chip_of_device_kind("TPU v4") is CHIPS["v4"]
    assert chip_of_device_kind("NVIDIA H100 80GB HBM3").peak_bf16 == 989e12
    assert chip_of_device_kind("cpu") is None
    assert parse_topology("v5e:2x2").spec.peak_bf16 == CHIPS["v5e"].peak_bf16 == 197e12


def test_search_order_lightest_remat_then_largest_micro_batch(demo_args):
    """The search's order on a memory model (no compiler): a policy whose smallest micro-batch
    does not fit is skipped after one attempt; for the first that fits, the largest fitting
    micro-batch is found by bisection."""
    from types import SimpleNamespace

    from cslm_jax.tpu.aot import REMAT_ORDER, micro_batch_candidates, search_fit

    assert micro_batch_candidates(32, 4) == [32, 16, 8, 4]
    assert micro_batch_candidates(288, 16) == [288, 144, 96, 48, 32, 16]
    need = {"none": 9.0, "dots": 5.0, "dots_no_batch": 2.0, "qkv_proj": 1.5, "full": 1.0}

    def fit(extra):
        policy = extra[0].split("=")[1]
        micro = int(extra[1].split("=")[1])
        return SimpleNamespace(
            fits=need[policy] * micro <= 20, error=None, used_bytes=0, policy=policy, micro=micro
        )

    config, model = demo_args[1], demo_args[3]
    result = search_fit(
        config,
        "v5e:2x2",
        ["train.global_batch_size=32"],
        model_path=model,
        speech_units=256,
        fit=fit,
        log=lambda *_: None,
    )
    tried = [(p, m) for p, m, _ in result.attempts]
    assert tried[:2] == [("none", 4), ("dots", 4)]  # 36 and 20: dots fits at 4
    assert (result.best.policy, result.best.micro) == ("dots", 4)
    assert REMAT_ORDER[0] == "none" and REMAT_ORDER[-1] == "full"
    result = search_fit(
        config,
        "v5e:2x2",
        ["train.global_batch_size=32"],
        model_path=model,
        speech_units=256,
        fit=fit,
        policies=("dots_no_batch",),
        log=lambda *_: None,
    )
    assert (result.best.policy, result.best.micro) == ("dots_no_batch", 8)  # 2*8 <= 20 < 2*16
    assert [m for _, m, _ in result.attempts] == [4, 16, 8]
    # an attempt the compiler refuses says what it needed
    lines = []
    refused = SimpleNamespace(
        fits=False, error="RESOURCE_EXHAUSTED: Used 19.2G of 15.75G hbm", used_bytes=0
    )
    result = search_fit(
        config,
        "v5e:2x2",
        ["train.global_batch_size=32"],
        model_path=model,
        speech_units=256,
        fit=lambda extra: refused,
        log=lines.append,
    )
    assert result.best is None
    assert lines[0].endswith(
        "does not fit (compiler: RESOURCE_EXHAUSTED: Used 19.2G of 15.75G hbm)"
    )


@NEEDS_LIBTPU
def test_compile_search_on_v5e(demo_args, capsys):
    """A tiny model fits v5e:2x2 without remat at the whole global batch (8 rows)."""
    code = main(["compile", *demo_args, "--topology", "v5e:2x2", "--search"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "search: remat none          micro-batch     4: fits" in out
    assert "search: remat none          micro-batch     8: fits" in out
    assert "remat none" in out and "1 micro-batch(es) of 8" in out and out.rstrip().endswith("FITS")


# -- the speech-unit extraction step (cslm-jax compile --speech-tokenizer) ----------------------

SPEECH_TINY = ["n_state=128", "n_head=2", "n_layer=1"]


def test_extraction_compile_refuses_bad_input_before_any_compile(monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("libtpu / the compiler was reached")

    monkeypatch.setattr(aot, "topology_devices", never)
    monkeypatch.setattr(extraction, "topology_devices", never)
    cases = [
        (["--speech-tokenizer", "v3", "--topology", "v5e:1x1"], "unknown speech tokenizer version"),
        (
            ["--speech-tokenizer", "v1", "--topology", "v5e:2x2", "--batch", "6"],
            "--batch 6: must be a positive multiple of the 4 chip(s) of v5e:2x2",
        ),
        (
            ["--speech-tokenizer", "v1", "--topology", "v5p:1x1x1", "--seconds", "31"],
            "--seconds 31: the extraction step takes rows of 0.1 to 30 s",
        ),
        (["--speech-tokenizer", "v1", "--topology", "v5p:1x1", "--batch", "4"], "3-D shapes"),
        (
            ["--speech-tokenizer", "v1", "--topology", "v5e:1x1", "train.micro_batch_size=4"],
            "overrides are tokenizer sizes",
        ),
        (
            ["--speech-tokenizer", "v2", "--topology", "v5e:1x1", "n_state=128", "n_head=4"],
            "head dim must be 64",
        ),
    ]
    for args, message in cases:
        assert main(["compile", *args]) == 2, args
        err = capsys.readouterr().err
        assert "cslm-jax compile: error:" in err and message in err, err
    with pytest.raises(SystemExit):
        main(["compile", "--topology", "v5e:1x1"])  # neither --config nor speech
    assert "--config is required" in capsys.readouterr().err


@pytest.mark.parametrize("version", ["v1", "v2_25hz"])
def test_extraction_flops_xla_count_agrees_with_hand_count(version):
    """XLA's count of the whole step (blocks unrolled: a loop body counts once) against the
    matrix products counted by hand: XLA adds the FFT and elementwise work, a few percent."""
    from cslm_jax.tpu.extraction import hand_flops, speech_config, xla_flops

    cfg = speech_config(version, ["n_layer=3"])
    for batch, samples in [(2, 5 * 16000), (1, 30 * 16000)]:
        ratio = xla_flops(cfg, batch, samples, "highest") / hand_flops(cfg, batch, samples)
        assert 1.0 <= ratio < 1.1, (batch, samples, ratio)
    # linear in the layers: 3 blocks counted 3 times, not once
    one = speech_config(version, ["n_layer=1"])
    assert xla_flops(cfg, 2, 80000, "highest") - xla_flops(
        one, 2, 80000, "highest"
    ) == pytest.approx(hand_flops(cfg, 2, 80000) - hand_flops(one, 2, 80000), rel=0.05)


@NEEDS_LIBTPU
@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:1x1x1"])
def test_extraction_step_compiles_for_one_tpu_chip(topology, capsys):
    """The real extract-units step (log-mel + encoder + quantizer), small sizes, compiled for one
    v5e / v5p chip: positive memory, FLOPs per second of audio and hours per chip-hour."""
    code = main(
        [
            "compile",
            "--speech-tokenizer",
            "v1",
            "--topology",
            topology,
            "--batch",
            "2",
            "--seconds",
            "2",
            *SPEECH_TINY,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("FITS")
    assert "speech_tokenizer_v1 (v1): 1 x 128, 2 heads, 4096 codes" in out
    assert "batch      2 x 2 s (2 row(s) per chip): 4 s of audio per step" in out
    total = float(re.search(r"total ([0-9.]+) MiB of", out).group(1))
    assert total > 0
    fpas = float(re.search(r"= ([0-9.e+]+) per second of audio", out).group(1))
    ratio = float(re.search(r"\(XLA / hand ([0-9.]+)\)", out).group(1))
    hours = float(
        re.search(r"bound      ([0-9,]+) h of audio per chip-hour", out).group(1).replace(",", "")
    )
    assert fpas > 0 and 1.0 <= ratio < 1.2 and hours > 0
    assert "/ 6 bf16 pass(es) per float32 product (highest)" in out
