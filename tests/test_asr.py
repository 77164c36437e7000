"""cslm_jax.eval.asr (issue 26): the Whisper scorer against transformers' own greedy `generate`
on a tiny random Whisper, the spec strings and plug-ins, and the error rates against jiwer."""

import jiwer
import numpy as np
import pytest

from cslm_jax.eval.asr import (
    WhisperAsr,
    load_asr,
    register_asr,
    save_random_whisper,
    transcribe,
    transcript_error_rates,
)
from cslm_jax.eval.metrics import EvaluationError, normalize_tokens


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return save_random_whisper(
        tmp_path_factory.mktemp("whisper"), seed=0, spelling={"colour": "color"}
    )


@pytest.fixture(scope="module")
def reference(whisper_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(str(whisper_dir))
    model = WhisperForConditionalGeneration.from_pretrained(str(whisper_dir)).eval()
    return proc, model


def waves(rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 12000, 4000, 15000)]
    t = np.arange(rate) / rate
    out.append((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    return [w[: int(len(w) * rate / 16000)] for w in out]


def generate_one(reference, wave, language, long_form=False):
    """transformers' greedy transcript of one 16 kHz wave, batch 1."""
    import torch

    proc, model = reference
    if long_form:
        f = proc.feature_extractor(
            wave,
            sampling_rate=16000,
            truncation=False,
            padding="longest",
            return_attention_mask=True,
            return_tensors="pt",
        )
        extra = {"attention_mask": f.attention_mask, "return_timestamps": True}
    else:
        f = proc.feature_extractor(wave, sampling_rate=16000, return_tensors="pt")
        extra = {}
    with torch.no_grad():
        ids = model.generate(f.input_features, language=language, task="transcribe", **extra)
    return proc.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("language", ["en", "zh"])
def test_whisper_equals_greedy_generate(whisper_dir, reference, language):
    asr = WhisperAsr(whisper_dir, batch_size=3)  # batches of 3 and 2
    ws = waves()
    got = transcribe(asr, ws, 16000, language)
    want = [generate_one(reference, w, language) for w in ws]
    assert got == want
    assert all(got) and len(set(got)) == len(got)  # the audio decides the transcript


def test_whisper_language_is_forced(whisper_dir):
    asr = load_asr(f"whisper:{whisper_dir}")
    ws = waves()
    assert transcribe(asr, ws, 16000, "en") != transcribe(asr, ws, 16000, "zh")
    with pytest.raises(EvaluationError, match="no language token for 'fr'.*en, zh"):
        asr.transcribe(ws, 16000, "fr")


def test_whisper_resamples_to_16k(whisper_dir, reference):
    import soxr

    asr = load_asr(f"whisper:{whisper_dir}")
    ws = waves(rate=22050, seed=1)
    got = transcribe(asr, ws, 22050, "en")
    want = [generate_one(reference, soxr.resample(w, 22050, 16000), "en") for w in ws]
    assert got == want


def test_whisper_long_form(whisper_dir, reference):
    """Waves over the model's window (1 s here) are decoded long-form, each the same whether
    batched with short ones or alone."""
    asr = WhisperAsr(whisper_dir, batch_size=4)
    rng = np.random.default_rng(3)
    long_waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (26000, 40000)]
    mixed = [long_waves[0], *waves()[:2], long_waves[1]]
    got = transcribe(asr, mixed, 16000, "en")
    assert got[0] == generate_one(reference, long_waves[0], "en", long_form=True)
    assert got[3] == generate_one(reference, long_waves[1], "en", long_form=True)
    assert got[1:3] == [generate_one(reference, w, "en") for w in waves()[:2]]
    assert transcribe(asr, [np.zeros(0, np.float32)], 16000, "en") == [""]


def test_bad_specs(tmp_path):
    with pytest.raises(EvaluationError, match="not a Hugging Face Whisper folder"):
        load_asr(f"whisper:{tmp_path}")
    with pytest.raises(EvaluationError, match="whisper needs its argument"):
        load_asr("whisper:")
    with pytest.raises(EvaluationError, match="expected whisper:DIR"):
        load_asr("paraformer")
    with pytest.raises(EvaluationError, match="cannot import module 'no_such_asr_module'"):
        load_asr("no_such_asr_module:make")
    with pytest.raises(EvaluationError, match="has no attribute 'missing'"):
        load_asr("test_asr:missing")
    with pytest.raises(EvaluationError, match="not a callable"):
        load_asr("test_asr:NOT_CALLABLE")
    with pytest.raises(EvaluationError, match="returned a int, which has no transcribe"):
        load_asr("test_asr:not_an_asr")
    with pytest.raises(EvaluationError, match="returned 1 transcripts for 2 waves"):
        transcribe(load_asr("test_asr:short_asr"), waves()[:2], 16000, "en")
    with pytest.raises(EvaluationError, match="wave 1: expected a 1-D float array"):
        transcribe(load_asr("test_asr:EchoAsr"), [np.zeros(3), np.zeros((2, 3))], 16000, "en")


# Plug-ins named by the spec tests ("test_asr:..."): tests/ is on sys.path.
NOT_CALLABLE = 3


class EchoAsr:
    """A plug-in recogniser: the wave's length and the arguments it was built with."""

    def __init__(self, arg="none"):
        self.arg = arg

    def transcribe(self, waves, rate, language):
        return [f"{self.arg} {language} {rate} {len(w)}" for w in waves]


def not_an_asr():
    return 1


def short_asr():
    class Short:
        def transcribe(self, waves, rate, language):
            return ["one"]

    return Short()


def test_plugins():
    ws = [np.zeros(5, np.float32), np.zeros(7, np.float32)]
    asr = load_asr("test_asr:EchoAsr")
    assert asr.name == "test_asr:EchoAsr"
    assert transcribe(asr, ws, 8000, "zh") == ["none zh 8000 5", "none zh 8000 7"]
    assert transcribe(load_asr("test_asr:EchoAsr=/m/p"), ws, 8000, "en")[0] == "/m/p en 8000 5"
    register_asr("echo", EchoAsr)
    assert transcribe(load_asr("echo:x"), ws[:1], 16000, "en") == ["x en 16000 5"]


EN_CASES = [
    ("Hello, world!", "hello world"),
    ("The colour is red.", "the color is red"),
    ("I won't go there.", "I will not go their"),
    ("Mr. Smith has twenty five cats", "mister smith has 25 cats"),
    ("um so it is good", "so it's good"),
    ("the cat sat on the mat", "a cat sat on mat mat too"),
]
ZH_CASES = [
    ("你好，世界。", "你好世界"),
    ("今天天气很好", "今天天很好啊"),
    ("我 喜欢 猫！", "我喜欢狗"),
]


def test_error_rates_equal_jiwer(whisper_dir):
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    asr = WhisperAsr(whisper_dir)
    refs, hyps = zip(*EN_CASES)
    got = transcript_error_rates(refs, hyps, ["word"] * 6, ["en"] * 6, asr)
    norm = EnglishTextNormalizer({"colour": "color"})
    want = jiwer.wer([norm(r) for r in refs], [norm(h) for h in hyps])
    assert got["error_rate"] == pytest.approx(want)
    assert got["metric"] == "wer"
    assert "normalizer.json" in got["normalizers"]["en"]
    assert got["per_example"][:2] == [0.0, 0.0]  # punctuation, case; British spelling
    assert got["per_example"][2] == pytest.approx(1 / 5)  # won't = will not; their
    assert got["per_example"][3] == 0.0  # mr, numbers
    # without the spelling map (a plug-in recogniser): colour != color, and the result says so
    plain = transcript_error_rates(refs[1:2], hyps[1:2], ["word"], ["en"], None)
    assert plain["error_rate"] == pytest.approx(0.25)
    assert "without a spelling map" in plain["normalizers"]["en"]

    zrefs, zhyps = zip(*ZH_CASES)
    got = transcript_error_rates(zrefs, zhyps, ["char"] * 3, ["zh"] * 3)

    def chars(s):
        return "".join(normalize_tokens(s, "char"))

    want = jiwer.cer([chars(r) for r in zrefs], [chars(h) for h in zhyps])
    assert got["error_rate"] == pytest.approx(want)
    assert got["metric"] == "cer"
    assert got["per_example"] == pytest.approx([0.0, 2 / 6, 1 / 4])

    mixed = transcript_error_rates(
        refs + zrefs, hyps + zhyps, ["word"] * 6 + ["char"] * 3, ["en"] * 6 + ["zh"] * 3, asr
    )
    assert mixed["metric"] == "mixed" and set(mixed["normalizers"]) == {"en", "zh"}
