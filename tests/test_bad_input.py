"""Bad input to import-hf / export-hf is refused with a message naming the file and tensor/field,
and nothing half-written is left behind."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cslm_jax.cli.main import main as cli
from cslm_jax.demo.random_hf import llama3_rope_scaling


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def import_error(hf_dir, out, capsys, *extra):
    code = cli(["import-hf", "--hf-dir", str(hf_dir), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a refused import must not leave a checkpoint folder"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def test_non_llama_architecture(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()

    def to_mistral(c):
        c["model_type"], c["architectures"] = "mistral", ["MistralForCausalLM"]

    edit_json(hf_dir / "config.json", to_mistral)
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "config.json" in err and "model_type" in err and "MistralForCausalLM" in err


def test_biases_are_refused(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    edit_json(hf_dir / "config.json", lambda c: c.update(attention_bias=True))
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "config.json" in err and "attention_bias" in err


def test_missing_tensor(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    edit_tensors(hf_dir / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "model.layers.1.mlp.up_proj.weight" in err and "missing" in err


def test_misshaped_tensor(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][
            :8
        ]

    edit_tensors(hf_dir / "model.safetensors", shrink)
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "model.safetensors" in err and "model.layers.0.self_attn.k_proj.weight" in err
    assert "(8, 64)" in err and "(32, 64)" in err


def test_unexpected_tensor(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    edit_tensors(
        hf_dir / "model.safetensors",
        lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
    )
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "model.layers.0.self_attn.q_proj.bias" in err and "unexpected" in err


@pytest.mark.parametrize("style", ["v5", "v4"])
def test_unknown_rope_scaling_type(make_hf_llama, tmp_path, capsys, style):
    hf_dir, _ = make_hf_llama(rope_scaling=llama3_rope_scaling(32))

    def to_yarn(c):
        if style == "v5":
            c["rope_parameters"]["rope_type"] = "yarn"
        else:
            c.pop("rope_parameters")
            c["rope_theta"] = 500000.0
            c["rope_scaling"] = {"type": "yarn", "factor": 4.0}

    edit_json(hf_dir / "config.json", to_yarn)
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "config.json" in err and "rope_scaling.rope_type" in err and "yarn" in err


def test_v4_and_v5_config_layouts_import_alike(make_hf_llama, tmp_path):
    hf_dir, _ = make_hf_llama(rope_scaling=llama3_rope_scaling(32))
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "v5"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )

    def to_v4(c):
        rope = c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope

    edit_json(hf_dir / "config.json", to_v4)
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "v4"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )
    model = lambda p: json.loads((p / "cslm_checkpoint.json").read_text())["model"]  # noqa: E731
    assert model(tmp_path / "v4") == model(tmp_path / "v5")
    assert model(tmp_path / "v4")["rope_scaling"]["original_max_position_embeddings"] == 32


def test_missing_tokenizer_and_existing_output(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    out = tmp_path / "ck"
    out.mkdir()
    (out / "x").write_text("x")
    code = cli(["import-hf", "--hf-dir", str(hf_dir), "--out", str(out)])
    assert code == 2 and "not empty" in capsys.readouterr().err
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / f).unlink()
    err = import_error(hf_dir, tmp_path / "ck2", capsys)
    assert "tokenizer.json" in err


def test_checkpoint_without_vocab_metadata(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    assert cli(["import-hf", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ck")]) == 0
    edit_json(tmp_path / "ck" / "cslm_checkpoint.json", lambda m: m.pop("vocab"))
    code = cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "ex")])
    err = capsys.readouterr().err
    assert code == 2 and "cslm_checkpoint.json" in err and "'vocab'" in err
    assert not (tmp_path / "ex").exists()


def test_checkpoint_with_wrong_parameter_shape(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    assert cli(["import-hf", "--hf-dir", str(hf_dir), "--out", str(tmp_path / "ck")]) == 0
    edit_json(
        tmp_path / "ck" / "cslm_checkpoint.json", lambda m: m["model"].update(intermediate_size=96)
    )
    code = cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "ex")])
    err = capsys.readouterr().err
    assert code == 2 and "down_proj" in err and "(2, 128, 64)" in err and "(2, 96, 64)" in err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli(["export-hf", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "ex")])
    assert code == 2 and "cslm_checkpoint.json" in capsys.readouterr().err


def test_truncated_safetensors(make_hf_llama, tmp_path, capsys):
    hf_dir, _ = make_hf_llama()
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    err = import_error(hf_dir, tmp_path / "ck", capsys)
    assert "model.safetensors" in err and "outside the file" in err
