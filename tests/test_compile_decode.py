"""`cslm-jax compile --decode`: one decoding step (every KV-cache slot advances a token) compiled
ahead of time for a TPU slice on this CPU host, weights and cache split over `tensor`. Bad
input fails before libtpu or the compiler are reached; the per-chip weight and cache bytes are
the shards the rules give; the 8B CSLM in bfloat16 fits a v5e-4 with 8 slots of 4096
positions, and does not fit one v5e chip."""

import re

import pytest

import cslm_jax.tpu.decoding as decoding
from cslm_jax.cli.main import main
from cslm_jax.config import load_model_config
from cslm_jax.tpu.aot import libtpu_available

NEEDS_LIBTPU = pytest.mark.skipif(
    not libtpu_available(),
    reason="the libtpu package is not installed (pip install "
    "'libtpu==0.0.42.*', pinned in requirements-dev.txt)",
)
TINY = "configs/model/tiny.yaml"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--topology", "v5e:2x2", "--tensor", "3"], "--tensor 3: must divide the 4 chip(s)"),
        (
            ["--topology", "v5e:4x4", "--tensor", "16"],
            "--tensor 16: does not divide the model's 8 kv heads",
        ),
        (
            ["--topology", "v5e:2x2", "--tensor", "2", "--slots", "3"],
            "--slots 3: must be a positive multiple (at most 4096) of the mesh's data size 2",
        ),
        (["--topology", "v5e:2x2", "--max-length", "0"], "--max-length 0: give 1 to"),
        (["--topology", "v5e:2x2x1"], "v5e slices have 2-D shapes"),
        (
            ["--topology", "v5e:2x2", "--model", TINY, "--max-length", "128"],
            "does not divide the model's 2 kv heads",
        ),
    ],
)
def test_bad_input_is_refused_before_any_compile(argv, message, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("libtpu / the compiler was reached")

    monkeypatch.setattr(decoding, "topology_devices", never)
    monkeypatch.setattr(decoding, "compile_memory", never)
    assert main(["compile", "--decode", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--decode", "--config", "x.yaml"], "--decode compiles the decoding step: it takes no"),
        (["--decode", "--token2wav", "v1"], "it takes no --token2wav"),
        (["--decode", "model.remat_policy=full"], "it takes no key=value overrides"),
        (["--config", "x.yaml", "--tensor", "2"], "--slots, --max-length and --tensor go with"),
    ],
)
def test_flags_of_other_steps_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "--topology", "v5e:2x2", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def report_value(out: str, pattern: str) -> str:
    m = re.search(pattern, out)
    assert m, out
    return m.group(1)


@NEEDS_LIBTPU
def test_tiny_model_weights_and_cache_are_split_per_chip(capsys):
    """v5e:2x2 as data 2 x tensor 2: each chip holds half of every split weight and of the kv
    heads of its data shard's slots; the step fits and is memory-bound."""
    report = decoding.compile_decode_step(
        "v5e:2x2", slots=8, max_length=128, tensor=2, model_path=TINY, log=lambda *_: None
    )
    cfg = report.model
    assert report.mesh == {"data": 2, "fsdp": 1, "tensor": 2}
    d, v, f, h, k, dh = (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    base = load_model_config(TINY)
    assert v == -(-(base.vocab_size + 4096 + 5) // 128) * 128  # import-hf's CSLM vocabulary
    per_layer = 2 * d + (d * (h + 2 * k) * dh + h * dh * d + d * 2 * f + f * d) // 2
    weights = (2 * v * d // 2 + d + cfg.num_layers * per_layer) * 4  # float32
    assert report.weight_bytes == weights
    assert report.cache_bytes == cfg.num_layers * 2 * (8 // 2) * (k // 2) * 128 * dh * 4
    assert report.fits and report.argument_bytes >= weights + report.cache_bytes
    assert report.tokens_per_s == pytest.approx(
        8 * 819e9 / (weights + report.cache_bytes), rel=1e-6
    )
    argv = ["compile", "--decode", "--topology", "v5e:2x2", "--model", TINY, "--tensor", "2"]
    argv += ["--max-length", "128"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("FITS") and "memory-bound" in out


@NEEDS_LIBTPU
@pytest.mark.slow
def test_the_8b_model_fits_a_v5e_4_with_8_slots_of_4096(capsys):
    argv = ["compile", "--decode", "--topology", "v5e:2x2", "--slots", "8", "--max-length", "4096"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 4}" in out and "8.06B params" in out
    weights = float(report_value(out, r"weights ([\d.]+) GiB"))
    cache = float(report_value(out, r"KV cache ([\d.]+) GiB"))
    total = float(report_value(out, r"total ([\d.]+) GiB of 16.00 GiB"))
    assert 3.6 < weights < 3.9  # 8.06B x 2 bytes / 4 chips
    assert cache == 1.0  # 32 layers x k, v x 8 slots x 2 kv heads x 4096 x 128 x 2 bytes
    assert weights + cache <= total < 16
    tokens = float(report_value(out, r"bound\s+([\d,]+) tokens/s").replace(",", ""))
    assert 1000 < tokens < 1500  # 8 slots x 819 GB/s / 4.76 GiB
    assert out.rstrip().endswith("FITS")


@NEEDS_LIBTPU
def test_the_8b_model_on_one_v5e_chip_does_not_fit(capsys):
    argv = ["compile", "--decode", "--topology", "v5e:1x1", "--slots", "8"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "weights 15.0" in out  # the whole model on the chip
    assert out.rstrip().endswith("DOES NOT FIT")
    assert "RESOURCE_EXHAUSTED" in out or "total" in out
