"""Fast autoregressive decoding with a KV cache, and a streaming parser for CSLM answers.

Decoding (shapes: B rows, P padded prompt length, N = max_new_tokens, S = P + N cache slots,
L layers, K kv heads, Dh head dim, V vocabulary rows):

* Prompts are **left-padded** to a common length P (rounded up to `prompt_bucket` so that calls
  with similar prompt lengths reuse one compiled program). Every row's prompt then ends at slot
  P - 1 and its t-th new token goes to slot P + t in every row, so one scalar index addresses the
  cache for the whole batch. Row b's RoPE position of slot s is s - pad[b] (its first real token
  is at position 0) and slots s < pad[b] are masked out of attention, so a row decodes exactly as
  it would alone (masked scores are exp(min) = 0 in the softmax).
* `prefill` runs the prompts through the model once and fills the cache `KVCache(k, v)`, per
  layer [B, K, S, Dh] in the compute dtype (grouped-query: K kv heads, not H). `decode_step`
  feeds one token per row and appends its keys/values at one slot. Both are the model's own
  `Llama.prefill` / `Llama.decode_step` (`cslm_jax.model.llama`: the decoder layer training runs,
  with a cache), jitted here, on the parameters in the decoding layout (`decoding_params`: weights
  of their own per layer, q/k/v and gate/up fused, on CPU in float32 in the native kernel's
  panel layout).
* `generate` runs the whole sampling loop as one `jax.lax.while_loop` inside one jit (no Python
  per token) and leaves it as soon as every row has produced a stop id or N tokens exist.
  `generate_stream` runs the *same* compiled loop in chunks of `chunk_size` steps and yields
  each step's tokens, so it produces the same tokens as `generate`, greedy or sampled.
* Sampling: greedy, or temperature then top-p (the reference's defaults: 1.0, 0.7). Row b's
  random draw at step t uses `fold_in(fold_in(PRNGKey(seed), t), b)`: reproducible for a seed
  and independent of how the loop is chunked. Finished rows emit `pad_id`.
* Optional constrained decoding (`Sampling(constrain_speech=True)`): inside a speech span only
  unit tokens and `<eosp>` may be drawn, outside it neither units nor `<eosp>`. The per-row `in_speech` flag
  travels in the loop state, so the mask is computed inside the jit.

Streaming events: `EventParser` consumes generated ids one at a time and returns typed events
as soon as each completes (`Transcript`, `TextChunk`, `SpeechChunk`, `End`) for the answer
format `[question] TQ [answer] TA1 <sosp>SA1<eosp> TA2 <sosp>SA2<eosp> ... <eoa>`. Every id
belongs to exactly one event, so concatenating the events' `ids` gives back the input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cslm_jax.config import ModelConfig
from cslm_jax.convert.hf import import_hf
from cslm_jax.errors import CslmError
from cslm_jax.model.llama import (  # noqa: F401
    NEG,
    KVCache,
    bind,
    config_key,
    decoding_params,
    on_mesh,
    tensor_mesh,
)
from cslm_jax.model.vocab import VocabInfo, check_layout, existing_layout, load_tokenizer
from cslm_jax.storage import fs
from cslm_jax.storage.checkpoint import META_FILE, load_params, read_metadata


class DecodeError(CslmError):
    """Bad decoding input (empty prompt, unknown folder, ...); the message says what."""


# -- the cached model ------------------------------------------------------------------------------
# The model computation itself is `cslm_jax.model.llama.Llama.prefill` / `decode_step`: the same
# decoder layer as training, with a cache. Here: the jitted programs around them.


def _prefill(cfg: ModelConfig, params, tokens, pad, cache_len: int):
    return bind(cfg, params).prefill(tokens, pad, cache_len)


def _decode_step(cfg: ModelConfig, params, cache: KVCache, token, index, pad):
    return bind(cfg, params).decode_step(cache, token, index, pad)


# -- sampling and the generation loop ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each next token is chosen.

    greedy: argmax; else temperature, then top-p (nucleus) over the tempered distribution (the
    reference's defaults: 1.0 and 0.7), reproducible for `seed`. constrain_speech: inside a
    speech span only units and `<eosp>` may be drawn, outside it neither (needs a vocabulary)."""

    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.7
    seed: int = 0
    constrain_speech: bool = False

    def check(self) -> None:
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise DecodeError(
                f"sampling needs temperature > 0 and 0 < top_p <= 1, got "
                f"{self.temperature}, {self.top_p}"
            )

    def seeded(self, seed: int) -> "Sampling":
        return dataclasses.replace(self, seed=seed)


GREEDY = Sampling(greedy=True)


class LoopConstants(NamedTuple):
    """The loop's arguments that stay fixed during a generation (arrays, so that other values
    reuse the compiled loop): stop_ids [W] int32 (padded with -1), sosp_eosp [2] int32,
    temperature and top_p float32 scalars, pad_id int32 scalar."""

    stop_ids: jax.Array
    sosp_eosp: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    pad_id: jax.Array


class DecodeState(NamedTuple):
    """The generation loop's carry (B rows, N = max_new_tokens).

    logits [B, V] f32 for the next token; t int32 scalar, tokens generated so far (the next token
    is written to out[:, t] and fed to cache slot P + t); pad [B] int32 left padding; finished,
    in_speech [B] bool; out [B, N] int32 (pad_id where nothing was generated); key a PRNG key.
    """

    cache: KVCache
    logits: jax.Array
    t: jax.Array
    pad: jax.Array
    finished: jax.Array
    in_speech: jax.Array
    out: jax.Array
    key: jax.Array


def sample_logits(logits: jax.Array, keys: jax.Array, temperature, top_p) -> jax.Array:
    """Temperature then top-p (nucleus) sampling, as transformers' warpers: keep the smallest set
    of most likely tokens whose probability reaches top_p (the most likely token always).
    logits [B, V] f32, keys [B] PRNG keys -> ids [B] int32."""
    logits = logits / temperature
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = (before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
    kth = jnp.sum(keep, axis=-1) - 1
    threshold = jnp.take_along_axis(sorted_desc, kth[:, None], axis=-1)
    # top_p >= 1 keeps everything (the cumulative sum can round past 1.0 before the tail).
    filtered = jnp.where((logits >= threshold) | (top_p >= 1.0), logits, -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


def speech_mask(logits, in_speech, constraint):
    """Constrained decoding: inside a speech span only units and <eosp>, outside neither."""
    unit_lo, unit_hi, eosp = constraint
    ids = jnp.arange(logits.shape[-1])
    speechy = ((ids >= unit_lo) & (ids < unit_hi)) | (ids == eosp)
    allowed = jnp.where(in_speech[:, None], speechy[None, :], ~speechy[None, :])
    return jnp.where(allowed, logits, NEG)


def _run(
    cfg: ModelConfig, greedy: bool, constraint, params, state: DecodeState, limit, c: LoopConstants
):
    """Advance the loop until t == limit, t == N or every row is finished."""
    b, n = state.out.shape
    p_len = state.cache.k[0].shape[2] - n
    rows = jnp.arange(b, dtype=jnp.int32)
    sosp, eosp = c.sosp_eosp[0], c.sosp_eosp[1]

    def cond(s: DecodeState):
        return (s.t < jnp.minimum(limit, n)) & ~jnp.all(s.finished)

    def body(s: DecodeState):
        logits = s.logits if constraint is None else speech_mask(s.logits, s.in_speech, constraint)
        if greedy:
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            step_key = jax.random.fold_in(s.key, s.t)
            keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(rows)
            tok = sample_logits(logits, keys, c.temperature, c.top_p)
        tok = jnp.where(s.finished, c.pad_id, tok)  # finished rows keep padding
        out = jax.lax.dynamic_update_slice(s.out, tok[:, None], (0, s.t))
        finished = s.finished | jnp.any(tok[:, None] == c.stop_ids[None, :], axis=-1)
        in_speech = jnp.where(tok == sosp, True, jnp.where(tok == eosp, False, s.in_speech))
        next_logits, cache = _decode_step(cfg, params, s.cache, tok, p_len + s.t, s.pad)
        return DecodeState(cache, next_logits, s.t + 1, s.pad, finished, in_speech, out, s.key)

    return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=16)
def _programs(cfg_key: str):
    """Jitted prefill/step for one model config (ModelConfig holds a dict, so it cannot be a jit
    static argument itself; the compiled programs are cached here per config instead)."""
    cfg = ModelConfig.from_dict(json.loads(cfg_key))
    prefill = jax.jit(functools.partial(_prefill, cfg), static_argnames=("cache_len",))
    step = jax.jit(functools.partial(_decode_step, cfg))
    return cfg, prefill, step


@functools.lru_cache(maxsize=32)
def _loop_program(cfg_key: str, greedy: bool, constraint):
    cfg = _programs(cfg_key)[0]
    # The state is donated: the cache is updated in place across chunked calls.
    return jax.jit(functools.partial(_run, cfg, greedy, constraint), donate_argnums=(1,))


def prefill(cfg: ModelConfig, params: dict, tokens, pad, cache_len: int):
    """Jitted prefill. tokens [B, P] int32 left-padded, pad [B] int32 (number of padding slots per
    row), cache_len S >= P -> (logits [B, V] float32 for the token after the prompt, KVCache).
    params in either layout (see `decoding_params`)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if cache_len < tokens.shape[1]:
        raise DecodeError(f"cache_len {cache_len} is shorter than the prompts ({tokens.shape[1]})")
    params = decoding_params(cfg, params)
    with on_mesh(params):
        return _programs(config_key(cfg))[1](
            params, tokens, jnp.asarray(pad, jnp.int32), cache_len=cache_len
        )


def decode_step(cfg: ModelConfig, params: dict, cache: KVCache, token, index: int, pad):
    """Jitted single step: token [B] int32 written at cache slot `index` -> (logits [B, V] float32
    for the next token, new KVCache). The caller keeps index < S."""
    params = decoding_params(cfg, params)
    with on_mesh(params):
        return _programs(config_key(cfg))[2](
            params,
            cache,
            jnp.asarray(token, jnp.int32),
            jnp.asarray(index, jnp.int32),
            jnp.asarray(pad, jnp.int32),
        )


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = 1):
    """prompts -> (tokens [B, P] int32 numpy, pad [B] int32): left padding with pad_id, P the longest
    prompt rounded up to a multiple of `bucket` (fewer distinct shapes, fewer compilations)."""
    if not prompts:
        raise DecodeError("no prompts")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise DecodeError(f"prompt {lengths.index(0)} is empty; every row needs at least one token")
    p_len = -(-max(lengths) // max(bucket, 1)) * max(bucket, 1)
    tokens = np.full((len(prompts), p_len), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, p_len - len(p) :] = np.asarray(p, np.int32)
    return tokens, np.asarray([p_len - n for n in lengths], np.int32)


def _control_id(vocab: VocabInfo | None, name: str) -> int:
    """Id of a CSLM control token, or -1 (matches no token) when the vocabulary has none."""
    if vocab is None or name not in vocab.control_tokens:
        return -1
    return vocab.token_id(name)


def _start(
    cfg,
    params,
    prompts,
    max_new_tokens: int,
    stop_ids,
    sampling: Sampling,
    pad_id: int,
    vocab,
    prompt_bucket: int,
):
    """Prefill and the loop's initial state plus the compiled loop and its constants."""
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling.check()
    for t in list(stop_ids) + [pad_id]:
        if not 0 <= int(t) < cfg.real_vocab_size:
            raise DecodeError(
                f"token id {t} (stop or pad id) is outside the vocabulary "
                f"(0..{cfg.real_vocab_size - 1})"
            )
    constraint = None
    sosp, eosp = _control_id(vocab, "<sosp>"), _control_id(vocab, "<eosp>")
    if sampling.constrain_speech:
        if vocab is None or not vocab.unit_count or eosp < 0:
            raise DecodeError("constrain_speech needs a vocabulary with speech units and <eosp>")
        constraint = (vocab.unit_offset, vocab.unit_offset + vocab.unit_count, eosp)
    tokens, pad = left_pad(prompts, pad_id, prompt_bucket)
    # Rows whose prompt ends inside an open speech span (e.g. with <sosp>) start in it.
    in_speech = [vocab is not None and start_state(p, vocab) == "speech" for p in prompts]
    params = decoding_params(cfg, params)
    b, p_len = tokens.shape
    logits, cache = prefill(cfg, params, tokens, pad, cache_len=p_len + max_new_tokens)
    state = DecodeState(
        cache=cache,
        logits=logits,
        t=jnp.zeros((), jnp.int32),
        pad=jnp.asarray(pad),
        finished=jnp.zeros((b,), bool),
        in_speech=jnp.asarray(in_speech),
        out=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        key=jax.random.PRNGKey(sampling.seed),
    )
    run = _loop_program(config_key(cfg), bool(sampling.greedy), constraint)
    # Stop ids padded with -1 (matches nothing) to a multiple of 8: their count is part of the
    # compiled shape, and one or two more stop ids should not recompile the loop.
    width = max(8, -(-len(stop_ids) // 8) * 8)
    stops = list(stop_ids) + [-1] * (width - len(stop_ids))
    constants = LoopConstants(
        jnp.asarray(stops, jnp.int32),
        jnp.asarray([sosp, eosp], jnp.int32),
        jnp.float32(sampling.temperature),
        jnp.float32(sampling.top_p),
        jnp.int32(pad_id),
    )
    return params, state, run, constants


def _trim(row: np.ndarray, n: int, stops: set[int]) -> list[int]:
    """A row's generated ids: up to and including its first stop id, else its first n tokens."""
    out = []
    for tok in row[:n].tolist():
        out.append(tok)
        if tok in stops:
            break
    return out


def generate(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    vocab: VocabInfo | None = None,
    prompt_bucket: int = 64,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` ids per prompt; the whole loop is one jitted while_loop.

    prompts: token-id lists (B rows, any lengths >= 1; no BOS is added). Returns each row's new ids,
    ending with its stop id when one was produced. `sampling`: greedy (`GREEDY`) or temperature +
    top-p, reproducible for a seed (`Sampling`). `vocab` names the CSLM tokens: needed for
    `sampling.constrain_speech` (units only inside <sosp>...<eosp>, none outside).
    """
    params, state, run, constants = _start(
        cfg, params, prompts, max_new_tokens, stop_ids, sampling, pad_id, vocab, prompt_bucket
    )
    with on_mesh(params):
        state = run(params, state, jnp.int32(max_new_tokens), constants)
    out, n = np.asarray(state.out), int(state.t)
    stops = {int(s) for s in stop_ids}
    return [_trim(row, n, stops) for row in out]


def generate_stream(
    cfg: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    vocab: VocabInfo | None = None,
    prompt_bucket: int = 64,
    chunk_size: int = 1,
) -> Iterator[np.ndarray]:
    """`generate`, yielding each step's tokens as a numpy [B] int32 array (pad_id for rows that
    have finished) until every row has stopped or max_new_tokens steps were made.

    The compiled loop of `generate` runs `chunk_size` steps per call (1: lowest latency; larger:
    less Python overhead), so the tokens are exactly those of `generate` with the same settings.
    """
    if chunk_size < 1:
        raise DecodeError(f"chunk_size must be >= 1, got {chunk_size}")
    params, state, run, constants = _start(
        cfg, params, prompts, max_new_tokens, stop_ids, sampling, pad_id, vocab, prompt_bucket
    )
    done = 0
    while done < max_new_tokens:
        with on_mesh(params):
            state = run(params, state, jnp.int32(min(done + chunk_size, max_new_tokens)), constants)
        t = int(state.t)
        if t == done:
            return  # every row finished
        out = np.asarray(state.out[:, done:t])
        for j in range(t - done):
            yield out[:, j]
        done = t
        if bool(np.all(np.asarray(state.finished))):
            return


# -- loading a model for decoding ----------------------------------------------------------------


def default_stop_ids(tokenizer, vocab: VocabInfo | None) -> list[int]:
    """`<eoa>` (when the vocabulary has it), `<|eot_id|>` and the tokenizer's EOS, as present."""
    ids = {_control_id(vocab, "<eoa>")}
    eot = (
        tokenizer.convert_tokens_to_ids("<|eot_id|>")
        if "<|eot_id|>" in tokenizer.get_vocab()
        else None
    )
    ids.update(i for i in (eot, tokenizer.eos_token_id) if i is not None)
    return sorted(i for i in ids if i >= 0)


def load_for_decoding(
    path: str | Path,
    *,
    compute_dtype: str | None = None,
    tmp_dir: str | Path | None = None,
    log=lambda *_: None,
    tensor: int | None = None,
):
    """(cfg, params, tokenizer, vocab) from a cslm_jax model checkpoint or a Hugging Face Llama folder.

    A checkpoint (holds cslm_checkpoint.json) is read as is. An HF folder is imported into a
    temporary checkpoint with `import_hf` (under `tmp_dir`; it needs the weights' size on disk):
    a tokenizer that already holds the CSLM tokens (e.g. a folder written by `export-hf`) keeps
    its layout; a plain text Llama is imported without speech units (adding 4096 untrained rows
    would only let a sampler draw them). Params come back as device arrays in the compute dtype
    (`compute_dtype` overrides the checkpoint's), in the model's stacked layout (`forward`
    takes them); pass them through `decoding_params` once before decoding many times.
    With `tensor` N: in the decoding layout instead, split over a mesh of N devices
    (`tensor_mesh`, checked against the model before the weights are read), each device given
    only its shards of the weights (`decoding_params(cfg, params, mesh)`).
    """
    path = fs.path(path)

    mesh = None

    def read(ckpt):
        nonlocal mesh
        _, cfg, vocab = read_metadata(ckpt)
        if tensor is not None:
            mesh = tensor_mesh(cfg, tensor)
        tokenizer = load_tokenizer(ckpt / "tokenizer")
        check_layout(tokenizer, vocab, str(ckpt / "tokenizer"))
        return cfg, load_params(ckpt), tokenizer, vocab

    if (path / META_FILE).is_file():
        cfg, params, tokenizer, vocab = read(path)
    elif (path / "config.json").is_file():
        path = fs.local_dir(path, "Hugging Face folder")  # transformers reads local files
        layout = existing_layout(load_tokenizer(path), str(path))
        with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="cslm_decode_") as tmp:
            ckpt = import_hf(path, Path(tmp) / "ckpt", speech_units=None if layout else 0, log=log)
            cfg, params, tokenizer, vocab = read(ckpt)
    else:
        raise DecodeError(
            f"{path}: neither a cslm_jax model checkpoint ({META_FILE}) nor a "
            f"Hugging Face model folder (config.json)"
        )
    if compute_dtype is not None:
        cfg = cfg.replace(compute_dtype=compute_dtype)
    if mesh is not None:
        return cfg, decoding_params(cfg, params, mesh), tokenizer, vocab
    return (
        cfg,
        jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(cfg.compute_dtype)), params),
        tokenizer,
        vocab,
    )


# -- streaming events ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Transcript:
    """TQ: the question's transcript, text between `[question]` and `[answer]` (stripped).
    ids: the tokens from `[question]` through `[answer]` (plus whitespace tokens before them)."""

    text: str
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TextChunk:
    """TA_{index+1}: answer text after `[answer]` or `<eosp>` up to the next `<sosp>` / stop
    (stripped). index counts text chunks from 0. ids: its tokens."""

    index: int
    text: str
    ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SpeechChunk:
    """SA_{index+1}: the unit numbers (0..unit_count-1) between `<sosp>` and `<eosp>`; index counts
    speech chunks from 0. closed is False for a span cut off by a stop token or the end of the
    stream. ids: `<sosp>` .. `<eosp>` (plus whitespace tokens before them)."""

    index: int
    units: tuple[int, ...]
    ids: tuple[int, ...]
    closed: bool = True


@dataclasses.dataclass(frozen=True)
class End:
    """The answer is over. reason: "eoa" (the `<eoa>` token), "stop" (another stop id, e.g.
    `<|eot_id|>`) or "length" (the stream ended without a stop id). problems: what was malformed,
    in order (empty for a well-formed answer). ids: the stop token and whitespace before it."""

    reason: str
    problems: tuple[str, ...]
    ids: tuple[int, ...]


Event = Transcript | TextChunk | SpeechChunk | End


class EventParser:
    """Incremental parser of generated ids into `Transcript`, `TextChunk`, `SpeechChunk`, `End`.

    `feed(id)` returns the events that this id completes (usually none, at most three);
    `close()` ends a stream that stopped without a stop id. Text is decoded span by span with the
    tokenizer (whole spans, so multi-byte characters split across tokens come out right).
    Whitespace-only text between spans produces no event: its ids go to the next event.
    Tolerant: misplaced tokens are kept (ids always reassemble) and reported in `End.problems`.
    `start` is the state the prompt leaves generation in (`start_state(prompt, vocab)`), e.g.
    "speech" for a prompt ending with `<sosp>`; chunk indices count from 0 within the generation.
    """

    def __init__(
        self, tokenizer, vocab: VocabInfo, stop_ids: Sequence[int] = (), start: str = "text"
    ):
        if start not in ("text", "question", "speech"):
            raise DecodeError(f"start state must be text, question or speech, got {start!r}")
        self.tokenizer = tokenizer
        self.unit_lo, self.unit_hi = vocab.unit_offset, vocab.unit_offset + vocab.unit_count
        self.question, self.answer = (
            _control_id(vocab, "[question]"),
            _control_id(vocab, "[answer]"),
        )
        self.sosp, self.eosp = _control_id(vocab, "<sosp>"), _control_id(vocab, "<eosp>")
        self.eoa = _control_id(vocab, "<eoa>")
        self.stops = {int(s) for s in stop_ids} | ({self.eoa} if self.eoa >= 0 else set())
        self.state = start  # text | question | speech | ended
        self.ids: list[int] = []  # ids since the last event (the next event's ids)
        self.content: list[int] = []  # the current span's content, delimiters excluded
        self.problems: list[str] = []
        self.n_text = self.n_speech = self.position = 0

    def _name(self, tok: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(tok)

    def _text(self, ids) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        ).strip()

    def _take_ids(self, upto: int | None = None) -> tuple[int, ...]:
        upto = len(self.ids) if upto is None else upto
        out, self.ids = tuple(self.ids[:upto]), self.ids[upto:]
        return out

    def _flush_text(self, keep_last: bool) -> list[Event]:
        """End the text span; the event holds its ids but not the delimiter just appended."""
        text = self._text(self.content)
        self.content = []
        if not text:
            return []  # whitespace only: ids go to the next event
        ev = TextChunk(self.n_text, text, self._take_ids(len(self.ids) - 1 if keep_last else None))
        self.n_text += 1
        return [ev]

    def _speech_event(self, closed: bool) -> SpeechChunk:
        units = tuple(t - self.unit_lo for t in self.content if self.unit_lo <= t < self.unit_hi)
        ev = SpeechChunk(self.n_speech, units, self._take_ids(), closed)
        self.n_speech += 1
        self.content = []
        return ev

    def _problem(self, tok: int, where: str):
        self.problems.append(f"token {self.position} {self._name(tok)!r} {where}")

    def feed(self, tok: int) -> list[Event]:
        """Consume one generated id; return the events it completes."""
        tok = int(tok)
        if self.state == "ended":
            raise DecodeError(f"token {self.position} ({tok}) fed after the end of the answer")
        self.ids.append(tok)
        events: list[Event] = []
        if tok in self.stops:
            events += self._close_span(stopped=True)
            events.append(
                End("eoa" if tok == self.eoa else "stop", tuple(self.problems), self._take_ids())
            )
            self.state = "ended"
        elif self.state == "speech":
            if tok == self.eosp:
                events.append(self._speech_event(closed=True))
                self.state = "text"
            else:
                if not self.unit_lo <= tok < self.unit_hi:
                    self._problem(tok, "inside a speech span")
                self.content.append(tok)
        elif self.state == "question":
            if tok == self.answer:
                events.append(Transcript(self._text(self.content), self._take_ids()))
                self.content = []
                self.state = "text"
            else:
                if (
                    tok in (self.sosp, self.eosp, self.question)
                    or self.unit_lo <= tok < self.unit_hi
                ):
                    self._problem(tok, "inside the question transcript")
                self.content.append(tok)
        else:  # text
            if tok == self.sosp:
                events += self._flush_text(keep_last=True)
                self.state = "speech"
            elif tok == self.question:
                events += self._flush_text(keep_last=True)
                self.state = "question"
            elif tok == self.answer:
                # [answer] without [question] (no transcript): a delimiter for the next event.
                events += self._flush_text(keep_last=True)
            else:
                if tok == self.eosp or self.unit_lo <= tok < self.unit_hi:
                    self._problem(tok, "outside a speech span")
                self.content.append(tok)
        self.position += 1
        return events

    def _close_span(self, stopped: bool) -> list[Event]:
        """Events for the span open when the stream stops (the stop token, if any, is last in ids)."""
        keep_last = stopped
        if self.state == "speech":
            self.problems.append("speech span not closed by <eosp>")
            stop = self.ids.pop() if stopped else None
            events = [self._speech_event(closed=False)]
            if stop is not None:
                self.ids.append(stop)
            return events
        if self.state == "question":
            self.problems.append("question transcript not closed by [answer]")
            stop = self.ids.pop() if stopped else None
            events = [Transcript(self._text(self.content), self._take_ids())]
            self.content = []
            if stop is not None:
                self.ids.append(stop)
            return events
        return self._flush_text(keep_last=keep_last)

    def close(self) -> list[Event]:
        """End of the stream. Returns [] after a stop id; else the open span's event and End."""
        if self.state == "ended":
            return []
        events = self._close_span(stopped=False)
        events.append(End("length", tuple(self.problems), self._take_ids()))
        self.state = "ended"
        return events


def start_state(prompt: Sequence[int], vocab: VocabInfo) -> str:
    """The parser state a prompt leaves generation in, from its last CSLM delimiter: "speech"
    after an open `<sosp>`, "question" after an open `[question]`, else "text"."""
    marks = {
        _control_id(vocab, "<sosp>"): "speech",
        _control_id(vocab, "[question]"): "question",
        _control_id(vocab, "<eosp>"): "text",
        _control_id(vocab, "[answer]"): "text",
    }
    marks.pop(-1, None)
    for tok in reversed(list(prompt)):
        if int(tok) in marks:
            return marks[int(tok)]
    return "text"


def parse_events(
    ids: Sequence[int],
    tokenizer,
    vocab: VocabInfo,
    stop_ids: Sequence[int] = (),
    start: str = "text",
) -> list[Event]:
    """All events of a finished generation (ids after a stop id are not read). start: the state
    the prompt left (`start_state`)."""
    parser = EventParser(tokenizer, vocab, stop_ids, start)
    events: list[Event] = []
    for tok in ids:
        events += parser.feed(tok)
        if parser.state == "ended":
            break
    return events + parser.close()


def stream_events(
    cfg: ModelConfig,
    params: dict,
    tokenizer,
    vocab: VocabInfo,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int] | None = None,
    **kwargs,
) -> Iterator[Event]:
    """Generate for one prompt and yield its events as soon as each completes (a `SpeechChunk`
    right when its `<eosp>` is generated, ready for the speech decoder). stop_ids default to
    `default_stop_ids`; other keyword arguments go to `generate_stream`."""
    stop_ids = default_stop_ids(tokenizer, vocab) if stop_ids is None else list(stop_ids)
    parser = EventParser(tokenizer, vocab, stop_ids, start_state(prompt, vocab))
    for step in generate_stream(
        cfg,
        params,
        [prompt],
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        vocab=vocab,
        **kwargs,
    ):
        yield from parser.feed(int(step[0]))
        if parser.state == "ended":
            return
    yield from parser.close()
