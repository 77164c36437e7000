"""HF -> import -> export -> transformers: identical tensors and logits; speech-unit extension."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from cslm_jax.cli.main import main as cli
from cslm_jax.demo.random_hf import llama3_rope_scaling


def load_hf(path):
    return LlamaForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    ).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_exact(make_hf_llama, tmp_path, tie):
    hf_dir, model = make_hf_llama(
        tie_word_embeddings=tie, num_layers=3, rope_scaling=llama3_rope_scaling(32)
    )
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "export-hf",
                "--ckpt",
                str(tmp_path / "ck"),
                "--out",
                str(tmp_path / "ex"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    back = load_hf(tmp_path / "ex")
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    restored = {k: v.numpy() for k, v in back.state_dict().items()}
    assert original.keys() == restored.keys()
    for name in original:
        np.testing.assert_array_equal(restored[name], original[name], err_msg=name)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 70))
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))
    # the saved file itself: same tensor names as transformers writes, nothing extra
    ours = load_file(str(tmp_path / "ex" / "model.safetensors"))
    theirs = load_file(str(hf_dir / "model.safetensors"))
    assert set(ours) == set(theirs)
    cfg = json.loads((tmp_path / "ex" / "config.json").read_text())
    assert (
        cfg["rope_scaling"]["rope_type"] == "llama3"
        and cfg["vocab_size"] == model.config.vocab_size
    )
    assert back.config.rope_parameters["original_max_position_embeddings"] == 32


def test_speech_unit_extension_exports_a_loadable_cslm_model(make_hf_llama, tmp_path):
    hf_dir, model = make_hf_llama(rope_scaling=llama3_rope_scaling(32))
    base = model.config.vocab_size
    units = 1024
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-units",
                str(units),
                "--pad-vocab-multiple",
                "128",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "ck" / "cslm_checkpoint.json").read_text())
    assert meta["vocab"]["base_size"] == base and meta["vocab"]["unit_offset"] == base
    assert meta["vocab"]["size"] == base + units + 5
    assert (
        meta["vocab"]["padded_size"] % 128 == 0 and meta["vocab"]["padded_size"] >= base + units + 5
    )

    assert (
        cli(
            [
                "export-hf",
                "--ckpt",
                str(tmp_path / "ck"),
                "--out",
                str(tmp_path / "ex"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    back = load_hf(tmp_path / "ex")
    assert back.config.vocab_size == base + units + 5
    assert back.get_input_embeddings().weight.shape[0] == base + units + 5
    ids = np.random.default_rng(1).integers(0, base, size=(2, 50))
    np.testing.assert_allclose(logits(back, ids)[..., :base], logits(model, ids), atol=1e-5, rtol=0)

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ex"))
    assert len(tok) == base + units + 5
    pieces = tok.encode("<sosp><12><907><eosp>", add_special_tokens=False)
    assert pieces == [tok.convert_tokens_to_ids(t) for t in ("<sosp>", "<12>", "<907>", "<eosp>")]
    assert pieces[1:3] == [base + 12, base + 907]
    gen = json.loads((tmp_path / "ex" / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<eoa>") in gen["eos_token_id"]

    # an exported CSLM model imports again with its layout recognised, no new tokens
    assert cli(["import-hf", "--hf-dir", str(tmp_path / "ex"), "--out", str(tmp_path / "ck2")]) == 0
    meta2 = json.loads((tmp_path / "ck2" / "cslm_checkpoint.json").read_text())
    assert meta2["vocab"] == meta["vocab"]


@pytest.mark.parametrize("new_rows", ["mean", "normal"])
def test_new_rows_initialisation(make_hf_llama, tmp_path, new_rows):
    from cslm_jax.storage.checkpoint import load_params

    hf_dir, model = make_hf_llama()
    base = model.config.vocab_size
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-units",
                "16",
                "--new-rows",
                new_rows,
            ]
        )
        == 0
    )
    emb = load_params(tmp_path / "ck")["embed"]
    old = model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(emb[:base], old)
    added = emb[base : base + 21]
    if new_rows == "mean":
        np.testing.assert_allclose(added, np.broadcast_to(old.mean(0), added.shape), atol=1e-6)
    else:
        assert added.std() > 0.5 * model.config.initializer_range
        assert len(np.unique(added[:, 0])) == 21
    assert not emb[base + 21 :].any()  # padding rows stay zero


def test_sharded_export_with_index_loads(make_hf_llama, tmp_path):
    hf_dir, model = make_hf_llama(num_layers=4)
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "export-hf",
                "--ckpt",
                str(tmp_path / "ck"),
                "--out",
                str(tmp_path / "ex"),
                "--dtype",
                "float32",
                "--max-shard-size-mb",
                "0.1",
            ]
        )
        == 0
    )
    index = json.loads((tmp_path / "ex" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "ex" / f).is_file() for f in files)
    back = load_hf(tmp_path / "ex")
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, 30))
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))
    # and a sharded HF folder imports too
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(tmp_path / "ex"),
                "--out",
                str(tmp_path / "ck2"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )


def test_bfloat16_export(make_hf_llama, tmp_path):
    hf_dir, model = make_hf_llama()
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )
    assert cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "ex")]) == 0
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "ex"))
    assert back.dtype == torch.bfloat16
    w = back.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_allclose(w, model.model.embed_tokens.weight.detach().numpy(), rtol=1e-2)


def test_export_refuses_non_empty_target_and_never_leaves_partial_output(
    make_hf_llama, tmp_path, monkeypatch, capsys
):
    hf_dir, _ = make_hf_llama()
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-units",
                "0",
            ]
        )
        == 0
    )
    target = tmp_path / "ex"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    assert cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(target)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "user data"

    # a failure half-way through writing leaves neither the target nor a temporary folder
    import safetensors.numpy

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError):
        cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "ex2")])
    assert not (tmp_path / "ex2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ex2")]
    monkeypatch.undo()

    # --force replaces only what cslm-jax wrote: a folder holding the user's file stays refused
    assert cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(target), "--force"]) == 2
    assert "has no .cslm_jax_output.json" in capsys.readouterr().err
    assert (target / "keep.txt").read_text() == "user data"
    (target / "keep.txt").unlink()
    assert cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(target)]) == 0
    assert cli(["export-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(target), "--force"]) == 0
    assert (target / "config.json").is_file()


def test_checkpoint_saves_an_array_larger_than_the_write_budget(tmp_path):
    """Orbax refuses a single array bigger than its bytes-in-flight budget; a real Llama-3
    embedding with CSLM rows (132480 x 4096 bf16 = 1.09 GB) is one. Found by the 8B benchmark."""
    import jax.numpy as jnp

    from cslm_jax.config import ModelConfig
    from cslm_jax.model.vocab import VocabInfo
    from cslm_jax.storage.checkpoint import SAVE_CONCURRENT_GB, load_params, save_model_checkpoint

    rows = int(SAVE_CONCURRENT_GB * 1e9 / (2 * 64)) + 1024  # just over the budget in bf16
    cfg = ModelConfig(
        vocab_size=rows,
        hidden_size=64,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=True,
        param_dtype="bfloat16",
    )
    from cslm_jax.model.llama import param_shapes

    params = {
        k: jnp.zeros(v[0], jnp.bfloat16) for k, v in param_shapes(cfg).items() if k != "layers"
    }
    params["layers"] = {
        k: jnp.zeros(v[0], jnp.bfloat16) for k, v in param_shapes(cfg)["layers"].items()
    }
    params["embed"] = params["embed"].at[-1, 0].set(3.0)
    save_model_checkpoint(tmp_path / "ck", params, cfg, VocabInfo(rows, 0, (), rows))
    back = load_params(tmp_path / "ck")
    assert back["embed"].nbytes > SAVE_CONCURRENT_GB * 1e9 and float(back["embed"][-1, 0]) == 3.0
