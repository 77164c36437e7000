"""Logit parity: our Flax model, fed weights through `import-hf`, against `transformers`."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cslm_jax.convert.hf import import_hf
from cslm_jax.demo.random_hf import llama3_rope_scaling
from cslm_jax.model.llama import forward
from cslm_jax.storage.checkpoint import load_params, read_metadata

ORIGINAL_MAX = 32  # llama3 rope scaling's original context; the test sequences are longer


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(ckpt, ids, **overrides):
    _, cfg, _ = read_metadata(ckpt)
    cfg = cfg.replace(**{"compute_dtype": "float32", **overrides})
    return np.asarray(forward(cfg, load_params(ckpt), jnp.asarray(ids)))


@pytest.mark.parametrize(
    "tie,layers,heads,kv_heads",
    [
        (False, 2, 4, 2),  # GQA, untied
        (True, 3, 4, 1),  # multi-query, tied
        (False, 4, 8, 2),  # GQA groups of 4
    ],
)
def test_logit_parity_with_transformers(make_hf_llama, tmp_path, tie, layers, heads, kv_heads):
    hf_dir, model = make_hf_llama(
        tie_word_embeddings=tie,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        rope_scaling=llama3_rope_scaling(ORIGINAL_MAX),
    )
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", speech_units=0, log=lambda *_: None)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(layers).integers(0, vocab, size=(2, 3 * ORIGINAL_MAX))
    ref = torch_logits(model, ids)
    ours = our_logits(ckpt, ids)
    assert ours.shape[-1] >= vocab
    np.testing.assert_array_less(np.abs(ours[..., :vocab] - ref).max(), 1e-4)
    # padding rows exist (vocab padded to 128) and can never win
    assert ours.shape[-1] % 128 == 0
    assert (ours[..., vocab:] < -1e30).all()


def test_rope_scaling_changes_long_positions(make_hf_llama, tmp_path):
    """The test above would be vacuous if llama3 scaling were a no-op at these lengths: compare
    against the same weights without scaling, which must differ beyond the original context."""
    hf_dir, model = make_hf_llama(rope_scaling=llama3_rope_scaling(ORIGINAL_MAX))
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", speech_units=0, log=lambda *_: None)
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, size=(1, 3 * ORIGINAL_MAX))
    scaled = our_logits(ckpt, ids)
    unscaled = our_logits(ckpt, ids, rope_scaling=None)
    assert np.abs(scaled - unscaled)[:, ORIGINAL_MAX:].max() > 1e-2


@pytest.mark.parametrize(
    "overrides", [{"scan_layers": False}, {"remat_policy": "full"}, {"remat_policy": "dots"}]
)
def test_scan_and_remat_do_not_change_logits(make_hf_llama, tmp_path, overrides):
    hf_dir, model = make_hf_llama(num_layers=3, rope_scaling=llama3_rope_scaling(ORIGINAL_MAX))
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", speech_units=0, log=lambda *_: None)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(2, 40))
    np.testing.assert_allclose(
        our_logits(ckpt, ids, **overrides), our_logits(ckpt, ids), atol=1e-5, rtol=0
    )


def test_bf16_compute_stays_close(make_hf_llama, tmp_path):
    """fp32 params with bf16 compute (the training default) tracks the fp32 reference."""
    hf_dir, model = make_hf_llama(rope_scaling=llama3_rope_scaling(ORIGINAL_MAX))
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", speech_units=0, log=lambda *_: None)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, size=(1, 48))
    ref = torch_logits(model, ids)
    ours = our_logits(ckpt, ids, compute_dtype="bfloat16")[..., : model.config.vocab_size]
    assert ours.dtype == np.float32
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() < 0.05 * scale
    # and agrees on the argmax almost everywhere
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
