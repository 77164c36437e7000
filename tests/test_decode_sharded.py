"""Decoding sharded over the mesh's `tensor` axis (issue 28 item 3) on the 8 fake CPU devices of
conftest.py: greedy tokens with tensor 2, 4 and 8 equal one device's, every weight and the KV
cache really are split (specs and per-device shard shapes), a tensor size that does not divide
the devices or the heads is refused naming --tensor, and `cslm-jax decode --tensor N` answers
exactly as without it."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cslm_jax.cli.main import main as cli
from cslm_jax.config import ConfigError, ModelConfig
from cslm_jax.convert.hf import import_hf
from cslm_jax.demo.random_hf import write_random_hf_llama
from cslm_jax.infer.decode import (
    GREEDY,
    decode_step,
    generate,
    generate_stream,
    load_for_decoding,
    prefill,
)
from cslm_jax.infer.responses import write_unit_file
from cslm_jax.model.llama import (
    decoding_params,
    init_params,
    kv_cache_sharding,
    params_mesh,
    tensor_mesh,
)
from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer

# kv heads and query heads divisible by 8: every tensor size up to the 8 devices splits them
CFG = ModelConfig.from_dict(
    dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=16,
        num_kv_heads=8,
        head_dim=8,
        max_position_embeddings=256,
        rope_theta=10000.0,
        param_dtype="float32",
        compute_dtype="float32",
    )
)
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [10, 11, 12, 13, 14, 15, 16]]
N = 12


def shard_shape(a):
    shapes = {s.data.shape for s in a.addressable_shards}
    assert len(shapes) == 1 and len(a.addressable_shards) == len(a.sharding.device_set)
    return shapes.pop()


def test_greedy_tokens_on_2_4_8_devices_equal_one_devices_and_everything_is_split():
    assert jax.device_count() == 8
    params = init_params(CFG, seed=1)
    ref = generate(CFG, params, PROMPTS, max_new_tokens=N, sampling=GREEDY, prompt_bucket=8)
    assert len({len(set(r)) for r in ref}) > 1 or len(set(ref[0])) > 1  # not one token repeated
    d, v, f, h, k, dh = 64, 256, 128, 16, 8, 8
    host = jax.tree.map(np.asarray, params)
    for t in (2, 4, 8):
        mesh = tensor_mesh(CFG, t)
        assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": t}
        # host arrays (as load_params gives them) for one size, device arrays for the others
        sharded = decoding_params(CFG, host if t == 4 else params, mesh)
        assert params_mesh(sharded) is mesh
        layer = sharded["layers"][1]
        expect = {
            "qkv": (P(None, "tensor"), (d, (h + 2 * k) * dh // t)),
            "o_proj": (P("tensor"), (h * dh // t, d)),
            "gate_up": (P(None, "tensor"), (d, 2 * f // t)),
            "down_proj": (P("tensor"), (f // t, d)),
            "attn_norm": (P(), (d,)),
        }
        for name, (spec, shape) in expect.items():
            assert layer[name].sharding.spec == spec, (t, name)
            assert shard_shape(layer[name]) == shape, (t, name)
        assert sharded["embed"].sharding.spec == P("tensor")
        assert shard_shape(sharded["embed"]) == (v // t, d)
        assert sharded["lm_head"].sharding.spec == P(None, "tensor")
        assert shard_shape(sharded["lm_head"]) == (d, v // t)

        assert (
            generate(CFG, sharded, PROMPTS, max_new_tokens=N, sampling=GREEDY, prompt_bucket=8)
            == ref
        ), t
        if t == 8:
            steps = generate_stream(
                CFG, sharded, PROMPTS, max_new_tokens=N, sampling=GREEDY, prompt_bucket=8
            )
            assert np.stack(list(steps), axis=1).tolist() == ref

        # the cache: kv heads over tensor, after prefill and after a step
        tokens = np.zeros((3, 8), np.int32)
        tokens[:, -2:] = 7
        pad = np.full(3, 6, np.int32)
        _, cache = prefill(CFG, sharded, tokens, pad, cache_len=12)
        cache_spec = kv_cache_sharding(CFG, mesh, slots=3).spec
        assert cache_spec == P(None, "tensor")
        for c in (cache.k[0], cache.v[1]):
            assert c.sharding.spec == cache_spec and shard_shape(c) == (3, k // t, 12, dh)
        _, cache = decode_step(CFG, sharded, cache, np.full(3, 9, np.int32), 8, pad)
        assert cache.k[1].sharding.spec == cache_spec
        assert shard_shape(cache.k[1]) == (3, k // t, 12, dh)


def test_a_tensor_size_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"--tensor 3: must divide the 8 device\(s\)"):
        tensor_mesh(CFG, 3)
    two_kv = CFG.replace(num_kv_heads=2, num_heads=4)
    with pytest.raises(ConfigError, match="--tensor 4: does not divide the model's 2 kv heads"):
        tensor_mesh(two_kv, 4)
    with pytest.raises(ConfigError, match="not divisible"):  # the rules table's own check
        kv_cache_sharding(CFG, tensor_mesh(CFG, 2), slots=3, rules={"batch": "tensor"})


@pytest.fixture(scope="module")
def cslm_ckpt(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("decode_sharded")
    tok = load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, 16, len(tok))
    write_random_hf_llama(
        root / "hf", tok, num_heads=8, num_kv_heads=4, intermediate_size=128, seed=5
    )
    ckpt = import_hf(root / "hf", root / "ck", log=lambda *_: None)
    units = root / "questions.txt"
    write_unit_file(units, [[1, 2, 3, 4], [15, 3], [7, 7, 0]])
    return ckpt, units


def test_decode_cli_with_tensor_answers_as_one_device(cslm_ckpt, tmp_path, capsys):
    ckpt, units = cslm_ckpt
    cfg, params, _, _ = load_for_decoding(ckpt, tensor=4)
    assert params_mesh(params).shape["tensor"] == 4
    assert shard_shape(params["layers"][0]["qkv"])[1] == params["layers"][0]["qkv"].shape[1] // 4

    def answers(*extra, out):
        argv = ["decode", "--lang", "en", "--unit", str(units), "--ckpt", str(ckpt), "--greedy"]
        argv += ["--max-new-tokens", "10", "--batch-size", "2", "--output-dir", str(tmp_path / out)]
        code = cli(argv + list(extra))
        captured = capsys.readouterr()
        assert code == 0, captured.err
        lines = (tmp_path / out / "responses.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["result"] for line in lines]

    one = answers(out="one")
    assert len(one) == 3 and all(one), one
    assert answers("--tensor", "4", out="four") == one
    argv = ["decode", "--lang", "en", "--unit", str(units), "--ckpt", str(ckpt), "--greedy"]
    assert cli(argv + ["--output-dir", str(tmp_path / "bad"), "--tensor", "8"]) == 2
    err = capsys.readouterr().err
    assert "--tensor 8: does not divide the model's 4 kv heads" in err, err
