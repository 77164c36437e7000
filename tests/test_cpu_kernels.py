"""The native CPU decoding kernel (cslm_jax/kernels/small_matmul.cc): built here with the
machine's compiler, equal to numpy's matmul over row counts, ragged panels and both x86 code
paths (AVX-512 and AVX2+FMA), safe with concurrent calls, and a clean fallback to XLA's dot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cslm_jax.config import ModelConfig
from cslm_jax.infer.decode import GREEDY, decoding_params, generate
from cslm_jax.kernels import cpu_matmul as cpu_kernels
from cslm_jax.model.llama import init_params


def test_kernel_is_built_on_a_supported_cpu():
    """Where the CPU has a code path and a compiler exists (this VM and CI), decoding uses the
    kernel; elsewhere status() names the reason."""
    ok, isa = cpu_kernels.cpu_supported()
    if ok and cpu_kernels.compilers():
        assert cpu_kernels.available(), cpu_kernels.status()
        assert isa in cpu_kernels.status()
    else:
        assert not cpu_kernels.available()
        assert "off" in cpu_kernels.status()


def reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17, 70])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 31), (64, 32), (33, 33), (130, 100), (512, 96)])
def test_matmul_equals_numpy(m, k, n):
    assert cpu_kernels.available(), cpu_kernels.status()
    rng = np.random.default_rng(m * 1000 + k + n)
    x = rng.standard_normal((m, k), np.float32)
    w = rng.standard_normal((k, n), np.float32)
    panels = cpu_kernels.panel_layout(w)
    assert panels.shape == (-(-n // 32), k, 32)
    np.testing.assert_array_equal(cpu_kernels.from_panels(panels, n), w)
    y = jax.jit(lambda a, b: cpu_kernels.matmul(a, b, n))(jnp.asarray(x), panels)
    np.testing.assert_allclose(np.asarray(y), reference(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_avx2_code_path(tmp_path):
    """The AVX2+FMA path (TPU v4 hosts, older x86) compiled with AVX-512 turned off gives the
    same products; registered under its own target name."""
    ok, isa = cpu_kernels.cpu_supported()
    flags = set(cpu_kernels._cpu_flags().split())
    assert ok and {"avx2", "fma"} <= flags, f"this test needs an AVX2 CPU ({isa})"
    lib = cpu_kernels.build(cpu_kernels.compilers()[0], tmp_path, extra_flags=("-mno-avx512f",))
    cpu_kernels.register(lib, "cslm_small_matmul_avx2_test")
    rng = np.random.default_rng(0)
    for m in (1, 2, 3, 4, 8, 11):
        x = rng.standard_normal((m, 200), np.float32)
        w = rng.standard_normal((200, 77), np.float32)
        y = cpu_kernels.matmul(
            jnp.asarray(x), cpu_kernels.panel_layout(w), 77, target="cslm_small_matmul_avx2_test"
        )
        np.testing.assert_allclose(np.asarray(y), reference(x, w), rtol=1e-5, atol=1e-4)


def test_concurrent_calls_finish_and_agree():
    """Independent kernel calls in one program may run at once on XLA's threads, each
    scheduling helpers on the same pool: they must neither deadlock nor mix results."""
    assert cpu_kernels.available(), cpu_kernels.status()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((8, 256), np.float32))
    ws = [rng.standard_normal((256, 32 * 40 + i), np.float32) for i in range(4)]
    panels = [cpu_kernels.panel_layout(w) for w in ws]

    @jax.jit
    def f(x, ps):
        return [cpu_kernels.matmul(x, p, w.shape[1]) for p, w in zip(ps, ws)]

    for _ in range(50):
        out = f(x, panels)
    for y, w in zip(out, ws):
        np.testing.assert_allclose(np.asarray(y), reference(x, w), rtol=1e-5, atol=1e-4)


def test_bad_arguments_are_refused():
    assert cpu_kernels.available(), cpu_kernels.status()
    panels = cpu_kernels.panel_layout(np.ones((16, 40), np.float32))
    with pytest.raises(TypeError, match="float32"):
        cpu_kernels.matmul(jnp.ones((2, 16), jnp.bfloat16), panels, 40)
    with pytest.raises(ValueError, match=r"\[15, 40\]"):
        cpu_kernels.matmul(jnp.ones((2, 15)), panels, 40)
    with pytest.raises(ValueError, match="do not hold"):
        cpu_kernels.matmul(jnp.ones((2, 16)), panels, 70)


def test_a_failed_build_names_the_compiler_and_leaves_nothing(tmp_path):
    with pytest.raises(cpu_kernels.KernelBuildError, match=r"false.*small_matmul\.cc"):
        cpu_kernels.build(["false"], tmp_path)
    with pytest.raises(cpu_kernels.KernelBuildError, match="no-such-compiler"):
        cpu_kernels.build(["/no-such-compiler"], tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fresh_state(monkeypatch):
    """cpu_kernels' per-process build state, emptied for the test and restored after."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    return monkeypatch


def test_turned_off_decodes_with_xla_dot_and_the_same_tokens(fresh_state):
    cfg = ModelConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        compute_dtype="float32",
    )
    params = init_params(cfg, 0)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    with_kernel = decoding_params(cfg, params)
    assert with_kernel["lm_head"].ndim == 3
    fresh_state.setattr(cpu_kernels, "_state", {})
    fresh_state.setenv(cpu_kernels.ENV, "0")
    assert not cpu_kernels.available() and "turned off" in cpu_kernels.status()
    plain = decoding_params(cfg, params)
    assert plain["lm_head"].shape == (64, 300) and plain["layers"][0]["qkv"].ndim == 2
    assert generate(cfg, plain, prompts, max_new_tokens=12, sampling=GREEDY) == generate(
        cfg, with_kernel, prompts, max_new_tokens=12, sampling=GREEDY
    )


def test_required_but_unbuildable_is_an_error(fresh_state, tmp_path):
    fresh_state.setenv(cpu_kernels.ENV, "1")
    fresh_state.setenv("CSLM_JAX_CACHE", str(tmp_path))
    fresh_state.setattr(cpu_kernels, "compilers", lambda: [["false"]])
    with pytest.raises(cpu_kernels.KernelBuildError, match="CSLM_JAX_CPU_KERNELS=1 but"):
        cpu_kernels.available()
    fresh_state.setattr(cpu_kernels, "_state", {})
    fresh_state.delenv(cpu_kernels.ENV)
    assert not cpu_kernels.available()  # falls back, saying why
    assert "false failed" in cpu_kernels.status()
