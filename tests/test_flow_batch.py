"""The batched flow (`cslm_jax.speech.flow.flow_batch`): answers of different lengths in one
compiled call equal each answer through `flow_inference` alone (zero noise, explicit per-row
noise arrays, a key folded per row), lengths padded to buckets that share one program, bad rows
named. Reduced sizes as test_flow.py's (the same config, so a run of both shares the one-row
programs); `flow_inference` itself is checked against upstream there.

Measured (float32, CPU): rows within ~5e-6 of the same rows alone; the bound is 1e-5."""

import functools

import numpy as np
import pytest

from cslm_jax.speech import flow
from cslm_jax.speech.hift import Token2WavError

SMALL = dict(
    input_size=32,
    encoder_size=64,
    encoder_heads=2,
    encoder_linear_units=128,
    encoder_blocks=2,
    channels=(32, 32),
    attention_head_dim=16,
    n_blocks=1,
    num_mid_blocks=2,
    num_heads=2,
)
TOL = 1e-5
_CACHE = {}


def _model():
    if "m" not in _CACHE:
        _CACHE["m"] = flow.init_random("v1", seed=0, **SMALL)
    return _CACHE["m"]


def _rows():
    """A long answer (45 units: the regulator's head / middle / tail split), a short one (12),
    one after a zero-shot prompt (10 units after 6, 10 prompt frames): test_flow.py's lengths,
    so that a run of both compiles the one-row programs once."""
    rng = np.random.default_rng(7)
    units = [rng.integers(0, 4096, n) for n in (45, 12, 10)]
    embs = (rng.standard_normal((3, 192)) * 3.0).astype(np.float32)
    pus = [None, None, rng.integers(0, 4096, 6)]
    pms = [None, None, rng.standard_normal((10, 80)).astype(np.float32)]
    return units, embs, pus, pms


def test_interp_weights_are_pytorchs_for_traced_lengths():
    import jax

    f = jax.jit(flow.interp_weights)
    n_in = np.array([1, 5, 20, 7, 259, 3])[:, None]
    n_out = np.array([1, 34, 34, 897, 897, 2])[:, None]
    got = [np.asarray(a) for a in f(n_in, n_out, np.arange(900)[None, :])]
    for r, (a, b) in enumerate(zip(n_in[:, 0], n_out[:, 0])):
        for g, want in zip(got, flow._interp_index(int(a), int(b))):
            np.testing.assert_array_equal(g[r, :b], want, err_msg=f"{a} -> {b}")


def test_regulate_rows_equals_regulate_per_row():
    import jax
    import jax.numpy as jnp

    cfg, params = _model()
    rng = np.random.default_rng(3)
    # (prompt units, prompt frames, answer units, answer frames): a long answer, a short one,
    # a prompted one, a long one after a prompt
    shapes = [(0, 0, 45, 77), (0, 0, 7, 12), (6, 51, 10, 17), (4, 9, 50, 90)]
    u_pad, t_pad = 64, 128
    h = rng.standard_normal((len(shapes), u_pad, 80)).astype(np.float32)
    np_, pml, nu, ml = (np.array(c) for c in zip(*shapes))
    mu = np.asarray(
        jax.jit(functools.partial(flow.regulate_rows, cfg=cfg, frames=t_pad))(
            params, h=jnp.asarray(h), n_prompt=np_, n_units=nu, prompt_mel_len=pml, mel_len=ml
        )
    )
    for i, (a, b, c, d) in enumerate(shapes):
        alone = np.asarray(
            jax.jit(
                functools.partial(flow.regulate, cfg=cfg, n_prompt=a, prompt_mel_len=b, mel_len=d)
            )(params, h=jnp.asarray(h[i : i + 1, : a + c]))
        )
        np.testing.assert_allclose(mu[i, : b + d], alone[0], atol=TOL, rtol=0, err_msg=str(i))
        assert not mu[i, b + d :].any()


def test_batch_rows_equal_rows_alone():
    import jax

    cfg, params = _model()
    units, embs, pus, pms = _rows()
    alone = [
        flow.flow_inference(params, cfg, u, e, pu, pm)
        for u, e, pu, pm in zip(units, embs, pus, pms)
    ]
    before = flow.compiled_batch_programs()
    got = flow.flow_inference_batch(params, cfg, units, embs, prompt_units=pus, prompt_mels=pms)
    for i, (g, a) in enumerate(zip(got, alone)):
        assert g.shape == a.shape == (1, 80, cfg.mel_len(len(units[i])))
        err = np.abs(g - a).max()
        print(f"row {i} ({len(units[i])} units): max |batched - alone| {err:.1e}")
        assert err <= TOL and a.std() > 0.1
    # explicit noise arrays, one per row (prompt and answer frames), as flow_inference takes
    rng = np.random.default_rng(11)
    zs = [
        rng.standard_normal((1, (0 if pm is None else len(pm)) + a.shape[2], 80)).astype(np.float32)
        for pm, a in zip(pms, alone)
    ]
    got = flow.flow_inference_batch(
        params, cfg, units, embs, prompt_units=pus, prompt_mels=pms, noise=zs
    )
    for i, z in enumerate(zs):
        a = flow.flow_inference(params, cfg, units[i], embs[i], pus[i], pms[i], noise=z)
        assert np.abs(got[i] - a).max() <= TOL and not np.allclose(a, alone[i], atol=1e-2)
    # one key: row i draws from fold_in(key, i), whatever its batch-mates
    key = jax.random.PRNGKey(5)
    got = flow.flow_inference_batch(
        params, cfg, units, embs, prompt_units=pus, prompt_mels=pms, noise=key
    )
    for i in range(len(units)):
        a = flow.flow_inference(
            params, cfg, units[i], embs[i], pus[i], pms[i], noise=jax.random.fold_in(key, i)
        )
        assert np.abs(got[i] - a).max() <= TOL
    # the three calls ran one program
    assert flow.compiled_batch_programs() == before + 1


def test_lengths_within_a_bucket_share_one_program():
    cfg, params = _model()
    units, embs, pus, pms = _rows()
    flow.flow_batch(params, cfg, units, embs, prompt_units=pus, prompt_mels=pms)
    n = flow.compiled_batch_programs()
    rng = np.random.default_rng(2)
    # other lengths in the same buckets (units <= 64, frames <= 128), two rows padded to three
    other = [rng.integers(0, 4096, k) for k in (44, 20)]
    mel, mel_len = flow.flow_batch(params, cfg, other, embs[0], rows=3)
    assert flow.compiled_batch_programs() == n
    assert mel.shape == (2, 80, 128) and mel_len.tolist() == [75, 34]
    assert not mel[1, :, 34:].any() and mel[1, :, :34].std() > 0.1
    fn = flow._jitted_batch(cfg, 3, 64, 128, 128, cfg.n_timesteps, cfg.cfg_rate, "highest")
    assert fn._cache_size() == 1


def test_bad_rows_are_named():
    cfg, params = _model()
    units, embs, pus, pms = _rows()
    bad = list(units)
    bad[2] = np.array([1, 5000, 3])
    with pytest.raises(
        Token2WavError,
        match=r"row 2: units: unit 5000 at position 1 is out "
        r"of range",
    ):
        flow.flow_batch(params, cfg, bad, embs)
    with pytest.raises(Token2WavError, match=r"row 1: speaker embedding has shape \(100,\)"):
        flow.flow_batch(params, cfg, units[:2], [embs[0], embs[1][:100]])
    with pytest.raises(Token2WavError, match=r"row 0: mel length 60 for 45 units"):
        flow.flow_batch(params, cfg, units, embs, mel_lens=[60, None, None])
    with pytest.raises(
        Token2WavError,
        match=r"row 2: noise has shape \(1, 5, 80\), expected "
        r"\[1, 27, 80\]",
    ):
        flow.flow_batch(
            params,
            cfg,
            units,
            embs,
            prompt_units=pus,
            prompt_mels=pms,
            noise=[None, None, np.zeros((1, 5, 80), np.float32)],
        )
    with pytest.raises(Token2WavError, match=r"row 2: zero-shot prompt: 6 prompt units and 0"):
        flow.flow_batch(params, cfg, units, embs, prompt_units=pus)
    with pytest.raises(Token2WavError, match=r"row 1: units: no units|row 1: no units"):
        flow.flow_batch(params, cfg, [units[0], []], embs[0])
    with pytest.raises(Token2WavError, match=r"mel lengths: 2 entries for 3 rows"):
        flow.flow_batch(params, cfg, units, embs, mel_lens=[10, 10])
    with pytest.raises(Token2WavError, match=r"embeddings have shape \(2, 192\)"):
        flow.flow_batch(params, cfg, units, embs[:2])
    with pytest.raises(Token2WavError, match="empty batch"):
        flow.flow_batch(params, cfg, [], embs[0])
