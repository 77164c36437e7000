"""S3 speech tokenizers (CosyVoice `speech_tokenizer_v1`, `_v1_25hz`, `_v2_25hz`) in JAX:
16 kHz audio -> discrete speech units, as the `s3tokenizer` package (0.3.0) computes them.

Public API (stable; `cslm-jax extract-units` is built on it):

    from cslm_jax.speech import load_speech_tokenizer
    tok = load_speech_tokenizer("tokenizers/s3_v1")            # a folder, see below
    tok.version, tok.codebook_size, tok.units_per_second, tok.sample_rate   # "v1", 4096, 50, 16000
    codes = tok.encode([wave0, wave1])                # list of 1-D float32 arrays (16 kHz mono)
    codes = tok.encode(padded, lengths)               # or a padded [B, N] array + lengths [B]
    # -> list of B np.int32 arrays of raw codes (units_per_second per second, no repeat merging)

- `load_speech_tokenizer(dir, *, precision="highest", mesh=None, batch_axis=None)
  -> SpeechTokenizer`. With a `jax.sharding.Mesh` (devices of this process), the batch axis of
  every step is sharded over `batch_axis` (default: all mesh axes) and the weights replicated;
  batches are padded with dummy rows to a multiple of that size.
- `SpeechTokenizer.encode(waves, lengths=None, *, long_audio="window", pad_multiple=16000,
  pack=None)`:
  compiled once per padded `[B, N]` shape (list inputs are padded to a multiple of
  `pad_multiple` samples, so bucket by length for few shapes). Utterances over 30 s are encoded
  in the package's 30 s windows (26 s stride) and stitched (`long_audio="window"`, which keeps
  the tail the package can drop; `"window_package"`: bit-for-bit the package; `"refuse"`: raise).
  `pack` (default: on for a list of mixed lengths on one CPU device): the encoder's dense layers and
  the quantizer run on the valid frames only, packed into rows (same codes, less padded work).
  Raises `SpeechTokenizerError` (a `CslmError`) naming the utterance index for fewer than
  `tok.min_samples` (201) samples or non-finite samples.
- `tok.code_lengths(n_samples)`: codes an utterance of that many samples gets (<= 30 s).
- `tok.log_mel(...)`, `tok.hidden(mel, mel_len)`: the front end and the encoder alone (tests).
- `save_random_tokenizer(dir, version="v1", seed=0, force=False, **sizes)`: a random-weight
  folder (random codebook), `sizes` e.g. `n_state=128, n_head=2, n_layer=2` for tests;
  `random_speech_tokenizer(version, seed, **sizes)` the same in memory.
- `import_speech_tokenizer(src, version, out, force=False)`: official ONNX file or s3tokenizer
  state dict (.pt/.pth/.safetensors) -> folder (`cslm-jax import-speech-tokenizer`).
- `VERSIONS`: version name -> (official name, arch, stride, codebook size, units/s).

Folder: `model.safetensors` (s3tokenizer state-dict names) + `speech_tokenizer.json`; see
`cslm_jax.speech.weights`. The model: `cslm_jax.speech.s3`; the front end: `cslm_jax.speech.mel`.
"""

from cslm_jax.speech.s3 import VERSIONS, S3Config, SpeechTokenizerError, init_random
from cslm_jax.speech.tokenizer import (
    LONG_AUDIO_MODES,
    SpeechTokenizer,
    load_speech_tokenizer,
    random_speech_tokenizer,
)
from cslm_jax.speech.weights import import_speech_tokenizer, save_random_tokenizer

__all__ = [
    "VERSIONS",
    "S3Config",
    "SpeechTokenizerError",
    "init_random",
    "LONG_AUDIO_MODES",
    "SpeechTokenizer",
    "load_speech_tokenizer",
    "random_speech_tokenizer",
    "import_speech_tokenizer",
    "save_random_tokenizer",
]
