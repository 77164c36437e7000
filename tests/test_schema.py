"""The parameter table (cslm_jax.model.schema) is the one description of the weights: HF names and
shapes agree with a real `transformers` Llama, and a row added to the table reaches the module,
its shardings, checkpoints, conversion and the decoding layout without another edit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from cslm_jax.config import ModelConfig
from cslm_jax.model import schema
from cslm_jax.model.llama import decoding_params, forward, init_params, param_shardings


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        compute_dtype="float32",
    )
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("tied", [False, True])
def test_hf_names_and_shapes_match_transformers(tied):
    """Every row's HF tensor name and shape is what `LlamaForCausalLM` holds, one to one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny(tie_word_embeddings=tied)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            tie_word_embeddings=tied,
        )
    )
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if tied:
        theirs.pop("lm_head.weight")  # the same tensor as the embedding
    ours = {
        w.hf_name.format(i=i): schema.hf_shape(w, cfg, cfg.vocab_size)
        for w in schema.weights(cfg)
        for i in (range(cfg.num_layers) if w.per_layer else [None])
    }
    assert ours == theirs


def test_param_shapes_follow_the_axes():
    cfg = tiny()
    shapes = schema.param_shapes(cfg)
    assert shapes["layers"]["q_proj"] == ((2, 32, 4, 8), ("layers", "embed", "heads", "head_dim"))
    assert shapes["lm_head"] == ((32, 96), ("embed", "vocab"))
    assert "lm_head" not in schema.param_shapes(tiny(tie_word_embeddings=True))
    total = sum(int(np.prod(s)) for s, _ in jax.tree.leaves(shapes, is_leaf=schema.is_spec))
    assert total == cfg.num_params()


def test_a_new_row_reaches_every_consumer(monkeypatch, tmp_path):
    """One added row (a per-layer scale, used by no line of the computation yet) is created by the
    module with its logical axes, sharded, saved and restored by checkpoints, named for HF, and
    carried into the decoding layout, while the logits stay those of the model without it."""
    from cslm_jax.model.vocab import VocabInfo
    from cslm_jax.parallel.sharding import make_mesh
    from cslm_jax.storage.checkpoint import load_params, param_names, save_model_checkpoint

    cfg = tiny()
    before = init_params(cfg, seed=1)
    extra = schema.Weight(
        "layers/extra_scale", ("embed",), "ones", "model.layers.{i}.extra_scale.weight", "copy"
    )
    monkeypatch.setattr(schema, "WEIGHTS", schema.WEIGHTS + (extra,))

    params = init_params(cfg, seed=1)
    assert params["layers"]["extra_scale"].shape == (2, 32)
    np.testing.assert_array_equal(params["layers"]["extra_scale"], 1.0)
    np.testing.assert_array_equal(
        forward(cfg, params, jnp.arange(6)[None]), forward(cfg, before, jnp.arange(6)[None])
    )
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:2])
    assert param_shardings(cfg, mesh)["layers"]["extra_scale"].spec == PartitionSpec(None, "fsdp")
    assert "layers.extra_scale" in param_names(cfg)
    assert [n for n in (w.hf_name for w in schema.weights(cfg)) if "extra" in n] == [
        "model.layers.{i}.extra_scale.weight"
    ]
    packed = decoding_params(cfg, params)
    np.testing.assert_array_equal(packed["layers"][1]["extra_scale"], 1.0)

    vocab = VocabInfo(base_size=96, unit_count=0, control_tokens=(), padded_size=96)
    ckpt = save_model_checkpoint(tmp_path / "ckpt", params, cfg, vocab, tokenizer=None)
    np.testing.assert_array_equal(load_params(ckpt)["layers"]["extra_scale"], 1.0)


def test_rows_are_well_formed():
    names = [w.path for w in schema.WEIGHTS]
    assert len(names) == len(set(names))
    for w in schema.WEIGHTS:
        assert w.init in ("normal", "ones") and w.hf_layout in ("copy", "linear", "qkv", "out")
        assert 0 <= w.contracts < len(w.axes) or (w.contracts == 0 and len(w.axes) == 1)
        assert w.per_layer == ("{i}" in w.hf_name)
    for group, members in schema.FUSED.items():
        rows = [schema.weight("layers/" + m) for m in members]
        # fused weights share their input (the same contracted axes)
        assert len({r.axes[: r.contracts] for r in rows}) == 1, group
        assert rows[0].contracts >= 1
