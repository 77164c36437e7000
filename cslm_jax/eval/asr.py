"""Speech recognisers that score generated speech (issue 26): the paper's TTS and spoken-answer
numbers are the error rate of an ASR's transcript of the *audio* against a text.

A recogniser is anything with `transcribe(waves, rate, language) -> list[str]` (one transcript
per mono float wave, all at sample rate `rate`, `language` a data config code such as "en" or
"zh"), chosen by a spec string (`--asr`):
* `whisper:DIR`: a Hugging Face Whisper folder (`WhisperForConditionalGeneration` +
  `WhisperProcessor`, e.g. openai/whisper-large-v3, the paper's English scorer) run through
  `transformers` on PyTorch (CUDA when torch sees a GPU, else CPU). Imported when used, never
  needed for training.
* `NAME:ARG` for a backend added with `register_asr(NAME, factory)`: `factory(ARG)`.
* `module:callable` or `module:callable=ARG`: any importable factory (e.g. one wrapping
  FunASR's Paraformer for Chinese) called with no argument or with ARG; it returns the
  recogniser.

Scoring (`transcript_error_rates`): WER for `chunk_unit: word` languages, CER for `chunk_unit:
char` ones (`cslm_jax.eval.metrics.error_rate`). English text (reference and transcript) first
goes through Whisper's English normaliser (transformers' `EnglishTextNormalizer`: contractions,
numbers, British spellings from the folder's `normalizer.json`, fillers dropped), as Whisper's
own WER is computed; without a spelling map (a folder without normalizer.json, a plug-in
without `english_spelling`) the normaliser runs with an empty map and the result says so. Other
word languages are lower-cased and stripped of punctuation, char languages scored on their
characters without spaces or punctuation (`metrics.normalize_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from cslm_jax.eval.metrics import EvaluationError, mixed_error_rate
from cslm_jax.eval.plugins import import_callable

# Whisper's feature extractor works at 16 kHz (WhisperFeatureExtractor.sampling_rate).
WHISPER_RATE = 16000


@runtime_checkable
class Transcriber(Protocol):
    """A speech recogniser. `name` is reported with the scores; `english_spelling` (optional
    attribute) is the British -> American spelling map for Whisper's English normaliser."""

    name: str

    def transcribe(self, waves: list[np.ndarray], rate: int, language: str) -> list[str]: ...


ASR_BACKENDS: dict[str, Callable[[str], Transcriber]] = {}


def register_asr(name: str, factory: Callable[[str], Transcriber]) -> None:
    """Make `--asr NAME:ARG` build its recogniser as `factory(ARG)`."""
    ASR_BACKENDS[name] = factory


def load_asr(spec: str, flag: str = "--asr") -> Transcriber:
    """The recogniser a spec names (see the module doc); errors name the flag and the spec."""
    name, sep, arg = spec.partition(":")
    if name in ASR_BACKENDS:
        if not arg:
            raise EvaluationError(f"{flag} {spec!r}: {name} needs its argument ({name}:DIR)")
        asr = ASR_BACKENDS[name](arg)
    elif sep:
        target, eq, arg = spec.partition("=")
        factory = import_callable(target, flag)
        asr = factory(arg) if eq else factory()
    else:
        raise EvaluationError(
            f"{flag} {spec!r}: expected whisper:DIR, one of "
            f"{', '.join(f'{n}:ARG' for n in sorted(ASR_BACKENDS))}, or module:callable[=ARG]"
        )
    if not callable(getattr(asr, "transcribe", None)):
        raise EvaluationError(
            f"{flag} {spec!r}: the factory returned a {type(asr).__name__}, which has no "
            f"transcribe(waves, rate, language) method"
        )
    if not isinstance(getattr(asr, "name", None), str):
        try:
            asr.name = spec
        except AttributeError:
            pass
    return asr


def transcribe(asr: Transcriber, waves: Sequence[np.ndarray], rate: int, language: str) -> list:
    """`asr.transcribe` with its answer checked: one string per wave (a plug-in that returns
    anything else is named in the error)."""
    waves = [check_wave(w, i) for i, w in enumerate(waves)]
    if not waves:
        return []
    texts = asr.transcribe(waves, int(rate), language)
    if not isinstance(texts, (list, tuple)) or len(texts) != len(waves):
        got = len(texts) if isinstance(texts, (list, tuple)) else type(texts).__name__
        raise EvaluationError(
            f"ASR {getattr(asr, 'name', asr)!r} returned {got} transcripts for {len(waves)} waves"
        )
    if not all(isinstance(t, str) for t in texts):
        raise EvaluationError(f"ASR {getattr(asr, 'name', asr)!r} returned a non-string transcript")
    return [t.strip() for t in texts]


def check_wave(wave, index: int = 0) -> np.ndarray:
    """A wave as 1-D float32; anything else is an `EvaluationError` naming its index."""
    w = np.asarray(wave)
    if w.ndim != 1 or not (np.issubdtype(w.dtype, np.floating) or w.size == 0):
        raise EvaluationError(
            f"wave {index}: expected a 1-D float array (mono samples), got shape {w.shape} "
            f"dtype {w.dtype}"
        )
    return w.astype(np.float32, copy=False)


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`wave` from `rate` to `target` Hz (soxr, its default high quality), float32."""
    if rate == target or wave.size == 0:
        return wave.astype(np.float32, copy=False)
    import soxr  # heavy: soxr, only to resample

    return soxr.resample(wave, rate, target).astype(np.float32, copy=False)


# -- Whisper through transformers -----------------------------------------------------------------


class WhisperAsr:
    """A Hugging Face Whisper folder: greedy decoding (`generate` with one beam, no sampling),
    the language forced (`language=`, `task="transcribe"`), `batch_size` waves per call.

    Waves are resampled to 16 kHz. Those up to the model's window (30 s for real Whisper) are
    padded to it and decoded in one call per batch; longer ones go through transformers'
    sequential long-form decoding (timestamps predicted, segments stitched) one at a time:
    batched, transformers' long-form gives a wave another transcript than alone, and a wave's
    transcript must not depend on which others share its batch."""

    def __init__(self, path, batch_size: int = 16, device: str | None = None):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise EvaluationError(
                f"--asr whisper:{path}: not a Hugging Face Whisper folder (no config.json)"
            )
        import torch  # heavy: torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor  # heavy

        try:
            self.processor = WhisperProcessor.from_pretrained(str(path))
            self.model = WhisperForConditionalGeneration.from_pretrained(str(path)).eval()
        except (OSError, ValueError, KeyError) as e:
            raise EvaluationError(f"--asr whisper:{path}: cannot load it ({e})") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.path = path
        self.name = f"whisper:{path}"
        self.batch_size = int(batch_size)
        self.rate = int(self.processor.feature_extractor.sampling_rate)
        self.window = int(self.processor.feature_extractor.n_samples)
        spelling = getattr(self.processor.tokenizer, "english_spelling_normalizer", None)
        self.english_spelling = spelling
        self.english_spelling_source = (
            f"{path}/normalizer.json" if spelling else f"none ({path} has no normalizer.json)"
        )

    def languages(self) -> list[str] | None:
        """Codes `generate(language=...)` accepts, or None for an English-only model."""
        gc = self.model.generation_config
        if not getattr(gc, "is_multilingual", True) or not hasattr(gc, "lang_to_id"):
            return None
        return sorted(t.strip("<|>") for t in gc.lang_to_id)

    def language_args(self, language: str) -> dict:
        langs = self.languages()
        if langs is None:
            if language != "en":
                raise EvaluationError(
                    f"--asr {self.name}: an English-only Whisper cannot transcribe {language!r}"
                )
            return {}
        if language not in langs:
            raise EvaluationError(
                f"--asr {self.name}: Whisper has no language token for {language!r} "
                f"(its languages: {', '.join(langs)})"
            )
        return {"language": language, "task": "transcribe"}

    def transcribe(self, waves, rate: int, language: str) -> list[str]:
        import torch  # heavy: torch

        lang = self.language_args(language)
        waves = [resample(check_wave(w, i), rate, self.rate) for i, w in enumerate(waves)]
        out = [""] * len(waves)
        short = [i for i, w in enumerate(waves) if 0 < w.size <= self.window]
        long = [i for i, w in enumerate(waves) if w.size > self.window]
        fe = self.processor.feature_extractor
        for group, long_form in ((short, False), (long, True)):
            step = 1 if long_form else self.batch_size
            for s in range(0, len(group), step):
                idx = group[s : s + step]
                batch = [waves[i] for i in idx]
                if long_form:
                    feats = fe(
                        batch,
                        sampling_rate=self.rate,
                        truncation=False,
                        padding="longest",
                        return_attention_mask=True,
                        return_tensors="pt",
                    )
                    extra = {
                        "attention_mask": feats.attention_mask.to(self.device),
                        "return_timestamps": True,
                    }
                else:
                    feats = fe(batch, sampling_rate=self.rate, return_tensors="pt")
                    extra = {}
                with torch.no_grad():
                    ids = self.model.generate(
                        feats.input_features.to(self.device),
                        do_sample=False,
                        num_beams=1,
                        **lang,
                        **extra,
                    )
                texts = self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)
                for i, t in zip(idx, texts):
                    out[i] = t.strip()
        return out


register_asr("whisper", WhisperAsr)


# -- scoring ---------------------------------------------------------------------------------------


def english_normalizer(asr=None) -> tuple[Callable[[str], str], str]:
    """Whisper's English normaliser with the recogniser's spelling map (if it has one), and a
    description of it for the results."""
    # heavy: transformers
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    spelling = getattr(asr, "english_spelling", None)
    source = getattr(asr, "english_spelling_source", None)
    if spelling:
        return EnglishTextNormalizer(
            spelling
        ), f"whisper English normaliser, spellings from {source}"
    why = source or "the recogniser has none"
    return EnglishTextNormalizer({}), f"whisper English normaliser without a spelling map ({why})"


NORMALIZER_NAMES = {
    "word": "lower-cased, punctuation removed (metrics.normalize_tokens)",
    "char": "characters without spaces or punctuation (metrics.normalize_tokens)",
}


def transcript_error_rates(
    refs: Sequence[str],
    hyps: Sequence[str],
    units: Sequence[str],
    languages: Sequence[str],
    asr=None,
) -> dict:
    """Corpus error rate of transcripts `hyps` against `refs` (per example: its `unit`, "word"
    or "char", and its language), English through Whisper's normaliser (see the module doc).

    Returns {"error_rate", "metric" ("wer", "cer" or "mixed"), "normalizers": {language:
    description}, "per_example": [error rate of each example, None for an empty reference]}."""
    if not len(refs) == len(hyps) == len(units) == len(languages):
        raise ValueError(
            f"{len(refs)} references, {len(hyps)} transcripts, {len(units)} units, "
            f"{len(languages)} languages"
        )
    norm_en = None
    names: dict[str, str] = {}
    nrefs, nhyps = [], []
    for r, h, u, lang in zip(refs, hyps, units, languages):
        if u == "word" and lang == "en":
            if norm_en is None:
                norm_en, names["en"] = english_normalizer(asr)
            r, h = norm_en(r), norm_en(h)
        else:
            names.setdefault(lang, NORMALIZER_NAMES[u])
        nrefs.append(r)
        nhyps.append(h)
    kinds = set(units)
    metric = "mixed" if len(kinds) > 1 else {"word": "wer", "char": "cer"}.get(kinds.pop(), "?")
    per = []
    for r, h, u in zip(nrefs, nhyps, units):
        per.append(mixed_error_rate([r], [h], [u]) if r.strip() else None)
    return {
        "error_rate": mixed_error_rate(nrefs, nhyps, list(units)) if refs else None,
        "metric": metric if refs else None,
        "normalizers": names,
        "per_example": per,
    }


# -- a tiny random Whisper for tests and the demo ---------------------------------------------------

# What the random Whisper may emit: a few whole words (space-prefixed, byte-level spelling),
# single letters and a few Chinese characters; every other token is suppressed, so its
# transcripts are readable (random) text.
RANDOM_WORDS = ("the", "cat", "sat", "on", "mat", "dog", "a", "is", "good", "day")
RANDOM_HAN = "你好猫狗天"


def save_random_whisper(
    path,
    seed: int = 0,
    languages: Sequence[str] = ("en", "zh"),
    window_s: int = 1,
    init_std: float = 0.5,
    spelling: dict | None = None,
) -> Path:
    """A random-weight Whisper folder (model, tokenizer, feature extractor, generation config
    with language and task tokens, timestamps for long-form) at tiny sizes: d_model 32, one
    encoder and one decoder layer, 16 mel bins, a `window_s`-second window. `spelling` is written
    as normalizer.json (Whisper's English spelling map). Its weights are drawn with a large
    `init_std` so the transcript depends on the audio. For tests and the demo; nothing is
    fetched."""
    import torch  # heavy: torch
    from tokenizers import pre_tokenizers  # heavy: tokenizers
    from transformers import (  # heavy: transformers
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    allowed = {byte_char[ord(c)] for c in "abcdefghijklmnopqrstuvwxyz"} | {byte_char[ord(" ")]}

    def spell(word: str) -> str:
        pieces = [byte_char[b] for b in word.encode("utf-8")]
        cur = pieces[0]
        for p in pieces[1:]:
            if cur + p not in vocab:
                vocab[cur + p] = len(vocab)
                merges.append((cur, p))
            cur += p
        return cur

    for w in RANDOM_WORDS:
        allowed.add(spell(" " + w))
    for ch in RANDOM_HAN:
        allowed.add(spell(ch))
    n_ts = 50 * window_s + 1  # 0.00 .. window_s in 0.02 s steps
    specials = (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{lang}|>" for lang in languages]
        + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>"]
        + ["<|nospeech|>", "<|notimestamps|>"]
    )
    tok = WhisperTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(n_ts)])
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    fe = WhisperFeatureExtractor(feature_size=16, chunk_length=window_s)
    frames = fe.nb_max_frames
    cfg = WhisperConfig(
        vocab_size=len(tok),
        num_mel_bins=16,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=frames // 2,
        max_target_positions=64,
        init_std=init_std,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc._from_model_config = False
    gc.is_multilingual = True
    gc.lang_to_id = {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in languages}
    gc.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    gc.no_timestamps_token_id = ids["<|notimestamps|>"]
    gc.max_length = 24
    timestamps = set(range(ids["<|notimestamps|>"] + 1, len(tok)))
    keep = {vocab[t] for t in allowed} | {ids["<|endoftext|>"]} | timestamps
    gc.suppress_tokens = [i for i in range(len(tok)) if i not in keep]
    model.save_pretrained(str(path))
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(str(path))
    if spelling:
        (path / "normalizer.json").write_text(json.dumps(spelling), encoding="utf-8")
    return path


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE spells bytes with), in
    byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
