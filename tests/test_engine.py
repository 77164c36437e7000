"""The continuous-batching engine (cslm_jax.infer.engine): answers equal `generate`'s for the same
prompt whatever else is in the slots, requests arriving mid-answer, slots freed at once."""

import threading
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from cslm_jax.convert.hf import import_hf
from cslm_jax.demo.random_hf import write_random_hf_llama
from cslm_jax.infer.decode import (
    GREEDY,
    DecodeError,
    Sampling,
    decode_step,
    decoding_params,
    generate,
    left_pad,
    load_for_decoding,
    prefill,
)
from cslm_jax.infer.engine import Engine, QueueFull, Request
from cslm_jax.model.vocab import load_tokenizer

PROMPTS = [
    [5, 17, 99],
    [400, 3, 8, 9, 200, 101, 55, 7, 12],
    list(range(30, 47)),
    list(range(100, 170)),  # longer than one prompt bucket of 64
    [7, 7, 7, 7, 1],
]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("engine")
    write_random_hf_llama(
        root / "hf", load_tokenizer(tiny_tokenizer_dir), num_layers=2, num_kv_heads=2, seed=3
    )
    ckpt = import_hf(root / "hf", root / "ck", speech_units=16, new_rows="normal", log=quiet)
    cfg, params, tok, vocab = load_for_decoding(ckpt)
    return SimpleNamespace(
        cfg=cfg, params=decoding_params(cfg, params), tok=tok, vocab=vocab, ckpt=ckpt
    )


class Collect:
    """A request's tokens and end, and an event set when it ends."""

    def __init__(self):
        self.tokens, self.reason, self.ended = [], None, threading.Event()

    def request(self, prompt, n, sampling=GREEDY, **kw):
        def done(reason):
            self.reason = reason
            self.ended.set()

        return Request(prompt, n, sampling, on_token=self.tokens.append, on_done=done, **kw)

    def wait(self):
        assert self.ended.wait(120), "the request never ended"
        return self.tokens


def test_vector_index_step_equals_scalar(model):
    """A decoding step with each row's own slot index equals the shared-index step."""
    tokens, pad = left_pad(PROMPTS[:3], 0, 8)
    logits, cache = prefill(model.cfg, model.params, tokens, pad, cache_len=tokens.shape[1] + 4)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    p = tokens.shape[1]
    a, _ = decode_step(model.cfg, model.params, cache, tok, p, pad)
    b, _ = decode_step(model.cfg, model.params, cache, tok, jnp.full((3,), p, jnp.int32), pad)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_answers_equal_generate_with_arrivals_mid_answer(model):
    """Two slots, five prompts: later ones wait in the queue and enter as slots free; one is
    submitted from inside another's answer. Each greedy answer equals `generate` of its prompt;
    a stop id ends an answer with it."""
    n = 12

    def gen(p, **kw):
        return generate(model.cfg, model.params, [p], max_new_tokens=n, sampling=GREEDY, **kw)[0]

    want = [gen(p) for p in PROMPTS]
    stop = want[1][5]  # an id answer 1 produces: it must end there
    want_stopped = [gen(p, stop_ids=[stop]) for p in PROMPTS]
    engine = Engine(model.cfg, model.params, slots=2, max_length=192, stop_ids=[stop]).start()
    try:
        got = [Collect() for _ in PROMPTS]
        late = got[4].request(PROMPTS[4], n)

        first = got[0].request(PROMPTS[0], n)
        base = first.on_token

        def submit_late(tok):  # the fifth prompt arrives while the first answer is under way
            base(tok)
            if len(got[0].tokens) == 3:
                engine.submit(late)

        first.on_token = submit_late
        assert engine.submit(first) == 0
        for i in (1, 2, 3):
            engine.submit(got[i].request(PROMPTS[i], n))
        for i, c in enumerate(got):
            assert c.wait() == want_stopped[i], i
            assert c.reason == ("stop" if want_stopped[i][-1] == stop else "length")
        assert want_stopped[1] == want[1][:6]  # the stop id really cut answer 1
        assert engine.busy == 0 and engine.waiting == 0
    finally:
        assert engine.stop(timeout=60)


def test_warm_up_compiles_every_prompt_bucket(model):
    """warm_up compiles prefill + insert per prompt bucket and the step: answers afterwards
    are as without it (the warm-up leaves no trace in the slots)."""
    engine = Engine(model.cfg, model.params, slots=2, max_length=192)
    assert engine.warm_up(512) == 2  # buckets of 64 and 128 positions (192 - 64 = 128 at most)
    engine.start()
    try:
        got = [Collect() for _ in PROMPTS[:4]]
        for c, p in zip(got, PROMPTS):
            engine.submit(c.request(p, 6))
        for c, p in zip(got, PROMPTS):
            want = generate(model.cfg, model.params, [p], max_new_tokens=6, sampling=GREEDY)[0]
            assert c.wait() == want
    finally:
        assert engine.stop(timeout=60)


def test_sampled_answers_equal_generate_alone(model):
    """Sampling per request (own temperature, top-p and seed) draws what `generate` of that
    prompt alone draws with the same settings, beside a greedy answer."""
    settings = [Sampling(temperature=1.3, top_p=0.9, seed=7), GREEDY, Sampling(seed=11)]
    engine = Engine(model.cfg, model.params, slots=4, max_length=128).start()
    try:
        got = [Collect() for _ in settings]
        for c, p, s in zip(got, PROMPTS, settings):
            engine.submit(c.request(p, 10, s))
        for c, p, s in zip(got, PROMPTS, settings):
            assert (
                c.wait() == generate(model.cfg, model.params, [p], max_new_tokens=10, sampling=s)[0]
            )
    finally:
        engine.stop(timeout=60)


def test_cancel_frees_slot_and_queue_limit(model):
    """A cancelled answer leaves its slot at once for the next request; a full queue refuses;
    the cache's end caps an answer ("length"); stop() drains."""
    engine = Engine(model.cfg, model.params, slots=1, max_length=80, max_queue=1).start()
    try:
        long, nxt, extra = Collect(), Collect(), Collect()
        req = long.request(PROMPTS[0], 10_000)
        started = threading.Event()
        base = req.on_token

        def on_token(tok):
            base(tok)
            if len(long.tokens) == 2:
                started.set()

        req.on_token = on_token
        engine.submit(req)
        assert started.wait(120)
        engine.submit(nxt.request(PROMPTS[1], 4))  # waits: the only slot is busy
        with pytest.raises(QueueFull):
            engine.submit(extra.request(PROMPTS[2], 4))
        engine.cancel(req)
        assert (
            nxt.wait()
            == generate(model.cfg, model.params, [PROMPTS[1]], max_new_tokens=4, sampling=GREEDY)[0]
        )
        assert long.reason == "cancelled" and len(long.tokens) < 80
        capped = Collect()
        engine.submit(capped.request(PROMPTS[2], 10_000))  # 64 prompt positions + 16
        assert len(capped.wait()) == 16 and capped.reason == "length"
        with pytest.raises(DecodeError, match="leaves no room"):
            engine.submit(Collect().request(PROMPTS[3], 4))  # 70 tokens: 128 positions > 80
    finally:
        assert engine.stop(timeout=60)
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit(Collect().request(PROMPTS[0], 4))


def test_sharded_engine_answers_as_one_device(model):
    """Weights and the slots' cache split over tensor=2 of the 8 fake CPU devices: the same
    greedy answers as on one device, and the cache really is split over the kv heads."""
    cfg, params, _, _ = load_for_decoding(model.ckpt, tensor=2)
    engine = Engine(cfg, params, slots=2, max_length=192).start()
    try:
        k = engine._state.cache.k[0]
        assert len(k.sharding.device_set) == 2
        assert k.addressable_shards[0].data.shape == (2, cfg.num_kv_heads // 2, 192, cfg.head_dim)
        got = [Collect() for _ in PROMPTS[:3]]
        for c, p in zip(got, PROMPTS):
            engine.submit(c.request(p, 8))
        for c, p in zip(got, PROMPTS):
            want = generate(model.cfg, model.params, [p], max_new_tokens=8, sampling=GREEDY)[0]
            assert c.wait() == want
    finally:
        assert engine.stop(timeout=60)
