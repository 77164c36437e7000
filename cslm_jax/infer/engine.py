"""Continuous batching: a fixed number of KV-cache slots that requests enter and leave between
decoding steps (JetStream's prefill / insert / generate split), for `cslm-jax serve`.

`generate` (cslm_jax.infer.decode) decodes a fixed batch from start to end: a new question
waits for the whole batch, and a short answer's row idles until the longest one ends. The
engine instead keeps `slots` rows of cache `[slots, K, T, Dh]` per layer (T = `max_length`):

* **prefill**: the waiting prompts (as many as there are free slots) are left-padded to a
  multiple of `prompt_bucket` and run through `decode.prefill` together, a cache of their own
  of P slots each;
* **insert**: each prompt's cache rows go into a free slot's first P positions, with its
  logits, its padding and its next position P (`_insert`, jitted per P);
* **generate**: one step for every slot at once (`_step`): each busy row samples its next token
  from its logits (greedy or temperature/top-p, its own settings and seed) and writes it at
  its own position (`Llama.decode_step` with a per-row index); free rows compute on padding
  and their results are ignored.

A row's arithmetic is the left-padded batch's of `generate`: RoPE position = slot - pad, slots
before the padding and after the row's position masked out of attention. So a greedy answer
is `generate`'s for the same prompt whatever the other slots hold (the same tokens; the float
sums over the cache differ only in the masked slots they skip). A sampled answer draws with
`fold_in(fold_in(PRNGKey(seed), t), 0)` at its t-th token: `generate` of that prompt alone
with the same seed.

A finished answer (a stop id, its token budget, the cache's end) or a cancelled one frees its
slot at once; the next step may fill it. Requests wait in a FIFO queue of at most `max_queue`.
The engine runs in one thread (`start`); its callbacks are called from it: keep them short
(the server hands the tokens to its event loop).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import json
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cslm_jax.config import ModelConfig
from cslm_jax.infer.decode import (
    DecodeError,
    KVCache,
    Sampling,
    decoding_params,
    left_pad,
    prefill,
    sample_logits,
    speech_mask,
    start_state,
)
from cslm_jax.model.llama import bind, config_key, kv_cache_sharding, on_mesh, params_mesh
from cslm_jax.model.vocab import VocabInfo


class QueueFull(DecodeError):
    """More waiting requests than the engine's queue holds (the server answers 503)."""


class SlotState(NamedTuple):
    """The device state of all slots (S slots, T cache positions per slot): cache per layer
    [S, K, T, Dh]; logits [S, V] f32 for each row's next token; pos [S] int32, the position its
    next token is written at; pad [S] int32, its left padding; in_speech [S] bool."""

    cache: KVCache
    logits: jax.Array
    pos: jax.Array
    pad: jax.Array
    in_speech: jax.Array


class RowSettings(NamedTuple):
    """Per-slot sampling settings and bookkeeping, host arrays passed to each step: active [S]
    bool, greedy [S] bool, temperature, top_p [S] f32, seed [S] uint32, t [S] int32 (the row's
    tokens so far: its random draw's step)."""

    active: np.ndarray
    greedy: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    t: np.ndarray


def _step(cfg: ModelConfig, constraint, params, st: SlotState, rows: RowSettings, consts):
    """One token for every slot: sample from each row's logits, write it at the row's position,
    the next logits. consts: (sosp, eosp, pad_id) int32. -> (tokens [S] int32, new state)."""
    sosp, eosp, pad_id = consts[0], consts[1], consts[2]
    logits = st.logits if constraint is None else speech_mask(st.logits, st.in_speech, constraint)
    greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def key(seed, t):  # generate's draw for row 0 of a batch seeded `seed`, step t
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), t), 0)

    keys = jax.vmap(key)(rows.seed, rows.t)
    temperature = jnp.where(rows.greedy, 1.0, rows.temperature)[:, None]
    sampled = sample_logits(logits, keys, temperature, rows.top_p[:, None])
    tok = jnp.where(rows.greedy, greedy_tok, sampled)
    tok = jnp.where(rows.active, tok, pad_id)
    in_speech = jnp.where(tok == sosp, True, jnp.where(tok == eosp, False, st.in_speech))
    slots = st.cache.k[0].shape[2]
    at = jnp.minimum(st.pos, slots - 1)  # free rows: anywhere (their results are unused)
    logits, cache = bind(cfg, params).decode_step(st.cache, tok, at, st.pad)
    pos = st.pos + rows.active.astype(jnp.int32)
    return tok, SlotState(cache, logits, pos, st.pad, in_speech)


def _insert(st: SlotState, slot, cache: KVCache, row, logits, pad, in_speech) -> SlotState:
    """Row `row` of a prefill's cache (P slots) into slot `slot`'s first P positions."""
    p_len = cache.k[0].shape[2]

    def put(full, new):
        new = jax.lax.dynamic_slice_in_dim(new, row, 1, axis=0).astype(full.dtype)
        return jax.lax.dynamic_update_slice(full, new, (slot, 0, 0, 0))

    return SlotState(
        KVCache(
            tuple(put(f, n) for f, n in zip(st.cache.k, cache.k)),
            tuple(put(f, n) for f, n in zip(st.cache.v, cache.v)),
        ),
        st.logits.at[slot].set(logits[row]),
        st.pos.at[slot].set(p_len),
        st.pad.at[slot].set(pad),
        st.in_speech.at[slot].set(in_speech),
    )


@functools.lru_cache(maxsize=8)
def _programs(cfg_key: str, constraint):
    cfg = ModelConfig.from_dict(json.loads(cfg_key))
    step = jax.jit(functools.partial(_step, cfg, constraint), donate_argnums=(1,))
    insert = jax.jit(_insert, donate_argnums=(0,))
    return step, insert


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt to answer. `on_token(tok)` gets each generated id (the stop id included);
    `on_done(reason)` once at the end: "stop" (a stop id), "length" (max_new_tokens or the
    cache's end), "cancelled", or "error: ..." (the engine failed; the message says why).
    `on_start(slot)` when it enters a slot. Times (time.perf_counter) are filled in."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    on_token: Callable[[int], None] = lambda tok: None
    on_done: Callable[[str], None] = lambda reason: None
    on_start: Callable[[int], None] = lambda slot: None
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    slot: int | None = None
    generated: int = 0
    budget: int = 0
    submitted_at: float = 0.0
    started_at: float | None = None
    done: bool = False


class Engine:
    """`slots` concurrent answers of at most `max_length` cache positions (prompt, rounded up to
    `prompt_bucket`, plus answer). `stop_ids` end an answer (its last token); `vocab` gives
    `<sosp>`/`<eosp>` (the in-speech flag for `constrain_speech` requests: the constraint is
    the engine's, `constrain_speech`, since it is part of the compiled step)."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: dict,
        *,
        slots: int = 8,
        max_length: int = 2048,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
        vocab: VocabInfo | None = None,
        prompt_bucket: int = 64,
        max_queue: int = 64,
        constrain_speech: bool = False,
        log: Callable[[str], None] = lambda _: None,
    ):
        if slots < 1:
            raise DecodeError(f"slots must be >= 1, got {slots}")
        if max_length <= prompt_bucket:
            raise DecodeError(
                f"max_length {max_length} leaves no room for an answer after a prompt of "
                f"{prompt_bucket} positions; give a larger max_length"
            )
        for t in list(stop_ids) + [pad_id]:
            if not 0 <= int(t) < cfg.real_vocab_size:
                raise DecodeError(f"token id {t} (stop or pad id) is outside the vocabulary")
        self.cfg, self.vocab, self.log = cfg, vocab, log
        self.params = decoding_params(cfg, params)
        self.slots, self.max_length = slots, max_length
        self.prompt_bucket, self.max_queue = prompt_bucket, max_queue
        self.stop_ids = {int(s) for s in stop_ids}
        self.pad_id = int(pad_id)

        def control(name):
            return vocab.token_id(name) if vocab and name in vocab.control_tokens else -1

        sosp, eosp = control("<sosp>"), control("<eosp>")
        constraint = None
        if constrain_speech:
            if vocab is None or not vocab.unit_count or eosp < 0:
                raise DecodeError("constrain_speech needs a vocabulary with units and <eosp>")
            constraint = (vocab.unit_offset, vocab.unit_offset + vocab.unit_count, eosp)
        self._consts = jnp.asarray([sosp, eosp, self.pad_id], jnp.int32)
        self._step, self._insert = _programs(config_key(cfg), constraint)
        dtype = jnp.dtype(cfg.compute_dtype)
        shape = (slots, cfg.num_kv_heads, max_length, cfg.head_dim)
        # On a mesh (params placed by `decoding_params(..., mesh)`, e.g. `load_for_decoding(
        # tensor=N)`): the cache split as decoding splits it (kv heads over `tensor`), and every
        # program traced and run under the mesh (`on_mesh`).
        mesh = params_mesh(self.params)
        where = None if mesh is None else kv_cache_sharding(cfg, mesh, slots=slots)

        def zeros():
            return tuple(jnp.zeros(shape, dtype, device=where) for _ in range(cfg.num_layers))

        self._state = SlotState(
            KVCache(zeros(), zeros()),
            jnp.zeros((slots, cfg.vocab_size), jnp.float32),
            jnp.zeros((slots,), jnp.int32),
            jnp.zeros((slots,), jnp.int32),
            jnp.zeros((slots,), bool),
        )
        self._rows = RowSettings(
            np.zeros(slots, bool),
            np.ones(slots, bool),
            np.ones(slots, np.float32),
            np.ones(slots, np.float32),
            np.zeros(slots, np.uint32),
            np.zeros(slots, np.int32),
        )
        self._owner: list[Request | None] = [None] * slots
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._admitting = 0
        self.failure: str | None = None
        self.steps = self.tokens = self.finished = 0  # counters (metrics)

    # -- the client side (any thread) --

    def submit(self, req: Request) -> int:
        """Queue a request; returns how many requests wait for a slot before it (0: a slot is
        free for it at the next step). Raises QueueFull when `max_queue` requests wait for a
        slot already, DecodeError for a prompt that cannot fit or bad settings."""
        if not req.prompt:
            raise DecodeError("empty prompt")
        if req.max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
        req.sampling.check()
        padded = -(-len(req.prompt) // self.prompt_bucket) * self.prompt_bucket
        if padded >= self.max_length:
            raise DecodeError(
                f"prompt of {len(req.prompt)} tokens (padded to {padded}) leaves no room in a "
                f"slot of {self.max_length} positions (serve --max-length)"
            )
        req.budget = min(req.max_new_tokens, self.max_length - padded)
        with self._cv:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            waiting = len(self._queue) - self._free()  # beyond the free slots
            if waiting >= self.max_queue:
                raise QueueFull(
                    f"{waiting} requests waiting for a slot (max_queue {self.max_queue})"
                )
            req.submitted_at = time.perf_counter()
            self._queue.append(req)
            self._cv.notify()
            return max(0, waiting + 1)

    def cancel(self, req: Request) -> None:
        """Drop a request: out of the queue now, out of its slot before the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def queue_position(self, req: Request) -> int | None:
        """0-based place in the queue; None once it has a slot (or is done)."""
        with self._cv:
            for i, r in enumerate(self._queue):
                if r is req:
                    return i
        return None

    @property
    def busy(self) -> int:
        return sum(o is not None for o in self._owner)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def warm_up(self, max_prompt: int = 512) -> int:
        """Compile prefill and insert for every prompt bucket up to `max_prompt` tokens (and
        the step) before serving, so a first question of any such length does not wait for a
        compile. Call before `start`. Returns the number of buckets."""
        top = min(max_prompt, self.max_length - self.prompt_bucket)
        buckets = range(self.prompt_bucket, top + 1, self.prompt_bucket)
        zero = jnp.int32(0)
        for p_len in buckets:
            tokens = np.full((1, p_len), self.pad_id, np.int32)
            pad = np.zeros(1, np.int32)
            logits, cache = prefill(self.cfg, self.params, tokens, pad, cache_len=p_len)
            with on_mesh(self.params):
                self._state = self._insert(
                    self._state, zero, cache, zero, logits, zero, jnp.bool_(False)
                )
        with on_mesh(self.params):
            rows = RowSettings(*(jnp.asarray(a) for a in self._rows))  # every row free
            _, self._state = self._step(self.params, self._state, rows, self._consts)
        return len(buckets)

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="cslm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting; with `drain` the answers in slots and queue finish first (else they
        end "cancelled"). Returns True when the engine thread ended within `timeout`."""
        with self._cv:
            self._stopping = True
            if not drain:
                for r in list(self._queue) + [o for o in self._owner if o is not None]:
                    r.cancelled = True
            self._cv.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the engine thread --

    def _run(self) -> None:
        with on_mesh(self.params):
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._work() and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._work():
                        return
                    admit = self._take()
                if admit:
                    try:
                        self._admit(admit)
                    finally:
                        with self._cv:
                            self._admitting = 0
                if self.busy:
                    self._generate()
        except Exception as e:  # a failed step ends every answer with the reason, not silently
            self.failure = f"{type(e).__name__}: {e}"
            self.log(f"engine: failed: {self.failure}")
            with self._cv:
                pending = list(self._queue) + [o for o in self._owner if o is not None]
                self._queue.clear()
                self._owner = [None] * self.slots
                self._stopping = True
            for r in pending:
                self._finish(r, f"error: {self.failure}")

    def _free(self) -> int:
        """Slots neither busy nor being filled (under the lock)."""
        return self.slots - self.busy - self._admitting

    def _work(self) -> bool:
        return bool(self._queue) or self.busy > 0

    def _take(self) -> list[Request]:
        """(Under the lock.) Cancelled requests out of the queue; as many as there are free
        slots taken from its front."""
        for r in [r for r in self._queue if r.cancelled]:
            self._queue.remove(r)
            self._finish(r, "cancelled")
        take = [self._queue.popleft() for _ in range(min(self._free(), len(self._queue)))]
        self._admitting = len(take)  # their slots count as taken until they are in them
        return take

    def _finish(self, req: Request, reason: str) -> None:
        if req.done:
            return
        req.done = True
        if req.slot is not None:
            self._rows.active[req.slot] = False
            self._owner[req.slot] = None
        self.finished += 1
        req.on_done(reason)

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill the new prompts one by one (a prompt's padding, and so its room for an
        answer, never depends on the company it came with, and prefill compiles once per
        prompt bucket, not per bucket and count: `warm_up` can compile them all), each into a
        free slot."""
        for r in reqs:
            self._prefill_insert(r)

    def _prefill_insert(self, req: Request) -> None:
        tokens, pad = left_pad([list(req.prompt)], self.pad_id, self.prompt_bucket)
        logits, cache = prefill(self.cfg, self.params, tokens, pad, cache_len=tokens.shape[1])
        slot = next(s for s in range(self.slots) if self._owner[s] is None)
        in_speech = self.vocab is not None and start_state(req.prompt, self.vocab) == "speech"
        zero = jnp.int32(0)
        self._state = self._insert(
            self._state, jnp.int32(slot), cache, zero, logits, jnp.int32(pad[0]),
            jnp.bool_(in_speech),
        )  # fmt: skip
        s, rows = req.sampling, self._rows
        rows.active[slot] = True
        rows.greedy[slot] = bool(s.greedy)
        rows.temperature[slot] = s.temperature
        rows.top_p[slot] = s.top_p
        rows.seed[slot] = np.uint32(s.seed % 2**32)
        rows.t[slot] = 0
        req.slot, req.started_at = slot, time.perf_counter()
        self._owner[slot] = req
        req.on_start(slot)

    def _generate(self) -> None:
        for req in list(self._owner):  # cancelled since the last step: free now
            if req is not None and req.cancelled:
                self._finish(req, "cancelled")
        if not self.busy:
            return
        rows = RowSettings(*(jnp.asarray(a) for a in self._rows))
        tokens, self._state = self._step(self.params, self._state, rows, self._consts)
        tokens = np.asarray(tokens)
        self.steps += 1
        for slot, req in enumerate(self._owner):
            if req is None:
                continue
            tok = int(tokens[slot])
            self._rows.t[slot] += 1
            req.generated += 1
            self.tokens += 1
            req.on_token(tok)
            if tok in self.stop_ids:
                self._finish(req, "stop")
            elif req.generated >= req.budget:
                self._finish(req, "length")
