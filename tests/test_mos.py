"""cslm_jax.eval.mos (issue 26): a `--mos module:function` predictor defined in this test module,
loaded, checked and applied; clear errors for bad specs and bad values."""

import numpy as np
import pytest

from cslm_jax.eval.metrics import EvaluationError
from cslm_jax.eval.mos import load_mos, predict_mos


def loudness_mos(wave, rate):
    """A stand-in predictor: 1 + 4 x (RMS, capped at 1), a numpy scalar, plus rate / 1e6."""
    return 1 + 4 * np.minimum(1.0, np.sqrt(np.mean(wave**2))) + rate / 1e6


def one_arg(wave):
    return 3.0


def with_options(wave, rate, *, strong=True):
    return 4.0 if strong else 2.0


def nan_mos(wave, rate):
    return float("nan")


def text_mos(wave, rate):
    return "good"


NOT_A_FUNCTION = 5


def test_mos_plugin():
    pred = load_mos("test_mos:loudness_mos")
    waves = [np.full(100, 0.5, np.float32), np.zeros(0, np.float32), np.full(50, 0.1, np.float32)]
    got = predict_mos(pred, waves, 22050)
    assert got["scores"] == pytest.approx([3.022050, None, 1.422050])
    assert got["mean"] == pytest.approx((3.022050 + 1.422050) / 2)
    assert got["predictor"] == "test_mos:loudness_mos"
    assert predict_mos(load_mos("test_mos:with_options"), waves[:1], 16000)["scores"] == [4.0]


def test_mos_bad_specs_and_values():
    with pytest.raises(EvaluationError, match="--mos 'utmos22': expected module:callable"):
        load_mos("utmos22")
    with pytest.raises(EvaluationError, match="cannot import module 'no_such_mos_module'"):
        load_mos("no_such_mos_module:utmos22")
    with pytest.raises(EvaluationError, match="has no attribute 'utmos'"):
        load_mos("test_mos:utmos")
    with pytest.raises(EvaluationError, match="'NOT_A_FUNCTION' is a int, not a callable"):
        load_mos("test_mos:NOT_A_FUNCTION")
    with pytest.raises(EvaluationError, match=r"must take \(wave, rate\).*\(wave\)"):
        load_mos("test_mos:one_arg")
    wave = [np.ones(10, np.float32)]
    with pytest.raises(EvaluationError, match="returned nan for wave 0; expected a finite"):
        predict_mos(load_mos("test_mos:nan_mos"), wave, 16000)
    with pytest.raises(EvaluationError, match="returned 'good' for wave 0"):
        predict_mos(load_mos("test_mos:text_mos"), wave, 16000)
