"""KV-cache decoding against transformers and full recomputation; sampling; constrained decoding;
streaming events that reassemble into the generated ids."""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cslm_jax.convert.hf import export_hf, import_hf
from cslm_jax.demo.random_hf import llama3_rope_scaling, write_random_hf_llama
from cslm_jax.infer.decode import (
    GREEDY,
    End,
    EventParser,
    Sampling,
    SpeechChunk,
    TextChunk,
    Transcript,
    decode_step,
    decoding_params,
    default_stop_ids,
    generate,
    generate_stream,
    left_pad,
    load_for_decoding,
    parse_events,
    prefill,
    start_state,
    stream_events,
)
from cslm_jax.kernels import cpu_matmul as cpu_kernels
from cslm_jax.model.llama import forward, fused_groups, split_fused
from cslm_jax.model.vocab import load_tokenizer

N = 20  # new tokens in the comparisons (one compiled loop shape per batch size)
PROMPTS = [[5, 17, 99], [400, 3, 8, 9, 200, 101, 55, 7, 12], list(range(30, 47))]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tiny_tokenizer_dir):
    """A random HF Llama (GQA, untied, llama3 rope scaling), imported without speech units."""
    root = tmp_path_factory.mktemp("decode_text")
    torch_model = write_random_hf_llama(
        root / "hf", load_tokenizer(tiny_tokenizer_dir), rope_scaling=llama3_rope_scaling(32)
    )
    cfg, params, tok, vocab = load_for_decoding(
        import_hf(root / "hf", root / "ck", speech_units=0, log=quiet)
    )
    return SimpleNamespace(
        torch=torch_model, cfg=cfg, params=params, tok=tok, vocab=vocab, hf_dir=root / "hf"
    )


@pytest.fixture(scope="module")
def cslm_model(tmp_path_factory, tiny_tokenizer_dir):
    """A CSLM model: tied embeddings, one kv head, 16 speech units (random new rows)."""
    root = tmp_path_factory.mktemp("decode_cslm")
    write_random_hf_llama(
        root / "hf",
        load_tokenizer(tiny_tokenizer_dir),
        num_layers=3,
        num_kv_heads=1,
        tie_word_embeddings=True,
        seed=1,
    )
    ckpt = import_hf(root / "hf", root / "ck", speech_units=16, new_rows="normal", log=quiet)
    cfg, params, tok, vocab = load_for_decoding(ckpt)
    return SimpleNamespace(cfg=cfg, params=params, tok=tok, vocab=vocab, ckpt=ckpt, root=root)


def hf_greedy(model, prompts, n=N):
    """transformers' greedy decoding of n tokens (no EOS), left padding + attention mask."""
    p = max(map(len, prompts))
    ids = torch.tensor([[0] * (p - len(x)) + list(x) for x in prompts])
    mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return out[:, p:].tolist()


# -- greedy against transformers -------------------------------------------------------------------


def test_greedy_matches_transformers_one_by_one(text_model):
    m = text_model
    for prompt in PROMPTS:
        ours = generate(m.cfg, m.params, [prompt], max_new_tokens=N, sampling=GREEDY)
        assert ours == hf_greedy(m.torch, [prompt])
        assert len(ours[0]) == N


def test_greedy_padded_batch_matches_transformers_and_single_rows(text_model):
    m = text_model
    ours = generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY)
    assert ours == hf_greedy(m.torch, PROMPTS)
    assert ours == [
        generate(m.cfg, m.params, [p], max_new_tokens=N, sampling=GREEDY)[0] for p in PROMPTS
    ]
    # the rows really differ (a broken mask that leaked one row into another would show)
    assert len({tuple(r) for r in ours}) == len(PROMPTS)


def test_stop_ids_end_rows_and_finished_rows_keep_padding(text_model):
    m = text_model
    full = generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY)
    stop = full[0][5]
    first = full[0].index(stop)
    pad_id = 3
    ours = generate(
        m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY, stop_ids=[stop], pad_id=pad_id
    )
    for row, ref in zip(ours, full):
        want = ref[: ref.index(stop) + 1] if stop in ref else ref
        assert row == want
    assert ours[0] == full[0][: first + 1]
    steps = np.stack(
        list(
            generate_stream(
                m.cfg,
                m.params,
                PROMPTS,
                max_new_tokens=N,
                sampling=GREEDY,
                stop_ids=[stop],
                pad_id=pad_id,
            )
        ),
        axis=1,
    )
    assert (steps[0, first + 1 :] == pad_id).all() and steps[0, first] == stop
    # other rows kept going after row 0 stopped (unless they stopped too)
    assert steps.shape[1] > first + 1 or all(stop in r for r in full)


def test_greedy_stream_equals_generate(text_model):
    m = text_model
    ref = generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY)
    for chunk in (1, 7):
        steps = list(
            generate_stream(
                m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY, chunk_size=chunk
            )
        )
        assert len(steps) == N and steps[0].shape == (len(PROMPTS),)
        assert np.stack(steps, axis=1).tolist() == ref


def test_decoding_layout_gives_the_same_tokens(text_model):
    """Params split per layer once (decoding_params) decode exactly as the stacked tree, and a
    split tree passes through without another copy."""
    m = text_model
    split = decoding_params(m.cfg, m.params)
    assert isinstance(split["layers"], tuple) and len(split["layers"]) == m.cfg.num_layers
    cfg = m.cfg
    d, hd, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size
    # on CPU in float32 the matrices are in the native kernel's panel layout
    assert (split["lm_head"].ndim == 3) == cpu_kernels.available()
    qkv, gate_up = split["layers"][1]["qkv"], split["layers"][1]["gate_up"]
    if qkv.ndim == 3:
        qkv = cpu_kernels.from_panels(qkv, hd + 2 * cfg.num_kv_heads * cfg.head_dim)
        gate_up = cpu_kernels.from_panels(gate_up, 2 * f)
    layer = m.params["layers"]
    # fused columns come interleaved per kv head / MLP block (llama.fused_groups)
    kd = cfg.num_kv_heads * cfg.head_dim
    q = split_fused(qkv, [hd, kd, kd], fused_groups(cfg, "qkv"))[0]
    up = split_fused(gate_up, [f, f], fused_groups(cfg, "gate_up"))[1]
    np.testing.assert_array_equal(np.asarray(q), np.asarray(layer["q_proj"][1]).reshape(d, -1))
    np.testing.assert_array_equal(np.asarray(up), np.asarray(layer["up_proj"][1]))
    assert decoding_params(m.cfg, split) is split
    assert generate(m.cfg, split, PROMPTS, max_new_tokens=N, sampling=GREEDY) == generate(
        m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY
    )


# -- the cache against full recomputation ---------------------------------------------------------


def full_logits(cfg, params, seqs):
    """`forward` on each sequence as if alone, in one call: right padding in segment 0 (causal
    attention never looks right, and the segment mask keeps padding out)."""
    width = max(map(len, seqs))
    tokens, segments = (
        np.zeros((len(seqs), width), np.int32),
        np.zeros((len(seqs), width), np.int32),
    )
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], segments[i, : len(s)] = s, 1
    run = jax.jit(lambda p, t, seg: forward(cfg, p, t, None, seg))
    return np.asarray(run(params, jnp.asarray(tokens), jnp.asarray(segments)))


def test_cached_step_logits_equal_full_forward(cslm_model):
    """Teacher forcing through prefill + decode_step on a left-padded batch of two rows with
    different prompt lengths: every step's logits equal `forward` on that row alone."""
    m = cslm_model
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, m.vocab.size, size=n).tolist() for n in (5 + 10, 12 + 10)]
    prompts = [seqs[0][:5], seqs[1][:12]]
    tokens, pad = left_pad(prompts, pad_id=0, bucket=16)
    assert tokens.shape == (2, 16) and pad.tolist() == [11, 4]
    logits, cache = prefill(m.cfg, m.params, tokens, pad, cache_len=16 + 10)
    assert len(cache.k) == len(cache.v) == m.cfg.num_layers
    assert cache.k[0].shape == (2, m.cfg.num_kv_heads, 26, m.cfg.head_dim)
    full = full_logits(m.cfg, m.params, seqs)
    first = np.asarray(logits)
    worst = 0.0
    for j in range(10):
        for b, p in enumerate(prompts):
            diff = np.abs(np.asarray(logits[b]) - full[b, len(p) - 1 + j])
            worst = max(worst, float(diff[: m.vocab.size].max()))
        assert (np.asarray(logits)[:, m.vocab.size :] < -1e30).all()  # padding rows masked
        nxt = [s[len(p) + j] for s, p in zip(seqs, prompts)]
        logits, cache = decode_step(m.cfg, m.params, cache, nxt, 16 + j, pad)
    assert worst < 1e-4, worst

    # bf16 compute: the cache is kept in bf16 and the logits stay close to fp32
    cfg16 = m.cfg.replace(compute_dtype="bfloat16")
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), m.params)
    logits16, cache16 = prefill(cfg16, params16, tokens, pad, cache_len=16 + 10)
    assert cache16.k[0].dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    real = slice(0, m.vocab.size)
    err = np.abs(np.asarray(logits16)[:, real] - first[:, real]).max()
    assert err < 0.05 * np.abs(first[:, real]).max()


# -- sampling ---------------------------------------------------------------------------------------


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(text_model):
    m = text_model
    nucleus = Sampling(temperature=1.0, top_p=0.95)
    a = generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=nucleus.seeded(1))
    assert a == generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=nucleus.seeded(1))
    b = generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=nucleus.seeded(2))
    assert sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) > N  # most tokens differ
    greedy = generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=GREEDY)
    assert a != greedy
    assert (
        generate(m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=Sampling(top_p=1e-6, seed=3))
        == greedy
    )
    # the sampled stream is the same computation as the sampled loop
    steps = generate_stream(
        m.cfg, m.params, PROMPTS, max_new_tokens=N, chunk_size=3, sampling=nucleus.seeded(1)
    )
    assert np.stack(list(steps), axis=1).tolist() == a


def test_top_p_limits_the_candidates(text_model):
    """With top_p 0.7 every sampled token lies in the nucleus of the model's distribution."""
    m = text_model
    outs = generate(
        m.cfg, m.params, PROMPTS, max_new_tokens=N, sampling=Sampling(seed=5, top_p=0.7)
    )
    full = full_logits(m.cfg, m.params, [p + o for p, o in zip(PROMPTS, outs)])
    for b, (prompt, out) in enumerate(zip(PROMPTS, outs)):
        for j, tok in enumerate(out):
            logits = full[b, len(prompt) - 1 + j]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            assert probs[probs > probs[tok]].sum() < 0.7 + 1e-5


# -- constrained decoding ------------------------------------------------------------------------


def speech_states(prompt, out, vocab):
    """Per generated token: was the decoder inside a speech span when it drew it?"""
    sosp, eosp = vocab.token_id("<sosp>"), vocab.token_id("<eosp>")
    inside = max((i for i, t in enumerate(prompt) if t == sosp), default=-1) > max(
        (i for i, t in enumerate(prompt) if t == eosp), default=-1
    )
    states = []
    for t in out:
        states.append(inside)
        inside = True if t == sosp else False if t == eosp else inside
    return states


def test_constrained_decoding_keeps_units_inside_speech(cslm_model):
    m = cslm_model
    v = m.vocab
    lo, hi, eosp = v.unit_offset, v.unit_offset + v.unit_count, v.token_id("<eosp>")
    # Make units and <eosp> likely everywhere, so that the unconstrained model breaks both rules.
    params = dict(m.params)
    params["embed"] = m.params["embed"].at[lo : hi + 1].multiply(6.0)
    text = m.tok("[question] hi [answer] The fox", add_special_tokens=False).input_ids
    prompts = [text + [v.token_id("<sosp>")], text + [v.token_id("<sosp>"), lo + 3], text]
    hot = Sampling(temperature=1.5, top_p=1.0, seed=0)
    kw = dict(max_new_tokens=N, vocab=v)

    def violations(outs):
        bad = 0
        for prompt, out in zip(prompts, outs):
            for inside, t in zip(speech_states(prompt, out, v), out):
                speechy = lo <= t < hi or t == eosp
                bad += speechy != inside
        return bad

    free = generate(m.cfg, params, prompts, sampling=hot, **kw)
    assert violations(free) > 3
    ours = generate(
        m.cfg, params, prompts, sampling=dataclasses.replace(hot, constrain_speech=True), **kw
    )
    assert violations(ours) == 0
    flat = [t for row in ours for t in row]
    assert any(lo <= t < hi for t in flat) and eosp in flat  # both sides were exercised
    assert any(s is False for p, o in zip(prompts, ours) for s in speech_states(p, o, v))


# -- streaming events -----------------------------------------------------------------------------


def feed_all(parser, ids):
    """[(position of the id that completed it, event)], then close()."""
    out = []
    for i, t in enumerate(ids):
        out += [(i, e) for e in parser.feed(t)]
        if parser.state == "ended":
            break
    return out + [(len(ids), e) for e in parser.close()]


def joined(events):
    return [t for e in events for t in e.ids]


def test_events_of_a_well_formed_answer(cslm_model):
    m = cslm_model
    text = (
        "[question] What is 直接? [answer] The fox jumps <sosp><3><12><12><eosp> 直接回答 "
        "<sosp><1><eosp> over it. <sosp><15><0><eosp> <eoa>"
    )
    ids = m.tok(text, add_special_tokens=False).input_ids
    timed = feed_all(EventParser(m.tok, m.vocab), ids)
    events = [e for _, e in timed]
    assert joined(events) == ids
    assert events == [
        Transcript("What is 直接?", events[0].ids),
        TextChunk(0, "The fox jumps", events[1].ids),
        SpeechChunk(0, (3, 12, 12), events[2].ids),
        TextChunk(1, "直接回答", events[3].ids),
        SpeechChunk(1, (1,), events[4].ids),
        TextChunk(2, "over it.", events[5].ids),
        SpeechChunk(2, (15, 0), events[6].ids),
        End("eoa", (), events[7].ids),
    ]
    # each event comes out on the very token that completes it
    closers = {Transcript: "[answer]", TextChunk: "<sosp>", SpeechChunk: "<eosp>", End: "<eoa>"}
    for pos, e in timed:
        assert m.tok.convert_ids_to_tokens(ids[pos]) == closers[type(e)]
    # whole-span decoding matters: the Chinese text spans several byte-level tokens
    chinese = [t for t in events[3].ids]
    assert "".join(m.tok.decode([t]) for t in chinese).strip() != "直接回答"
    assert parse_events(ids, m.tok, m.vocab) == events
    # generation that continues a prompt ending inside a speech span starts in that span
    prompt = m.tok("[question] hi [answer] Hello <sosp>", add_special_tokens=False).input_ids
    assert start_state(prompt, m.vocab) == "speech"
    assert (
        start_state(prompt[:-1], m.vocab) == "text"
        and start_state(prompt[:2], m.vocab) == "question"
    )
    rest = m.tok("<3><4><eosp> more<eoa>", add_special_tokens=False).input_ids
    events = parse_events(rest, m.tok, m.vocab, start="speech")
    assert [type(e) for e in events] == [SpeechChunk, TextChunk, End] and joined(events) == rest
    assert events[0].units == (3, 4) and events[1].text == "more" and events[2].problems == ()


@pytest.mark.parametrize(
    "text,reason,problems,last",
    [
        (
            "[question] hi [answer] Hello <sosp><3><4>",
            "length",
            ["speech span not closed"],
            SpeechChunk,
        ),
        (
            "[question] hi [answer] Hello <sosp><3> x<|eot_id|>",
            "stop",
            ["inside a speech span", "speech span not closed"],
            SpeechChunk,
        ),
        (
            "[question] hi <5> there",
            "length",
            ["inside the question transcript", "question transcript not closed"],
            Transcript,
        ),
        (
            "[answer] one <7><eosp> two <sosp><2><eosp><eoa>",
            "eoa",
            ["outside a speech span", "outside a speech span"],
            SpeechChunk,
        ),
        ("plain text only", "length", [], TextChunk),
    ],
)
def test_events_of_malformed_answers_still_reassemble(cslm_model, text, reason, problems, last):
    m = cslm_model
    ids = m.tok(text, add_special_tokens=False).input_ids
    stops = default_stop_ids(m.tok, m.vocab)
    events = parse_events(ids, m.tok, m.vocab, stops)
    assert joined(events) == ids
    end = events[-1]
    assert isinstance(end, End) and end.reason == reason
    assert len(end.problems) == len(problems)
    for got, want in zip(end.problems, problems):
        assert want in got
    assert isinstance(events[-2], last)
    if last is SpeechChunk and "not closed" in " ".join(problems):
        assert events[-2].closed is False and events[-2].units[0] == 3


def test_events_of_generated_output(cslm_model):
    m = cslm_model
    v = m.vocab
    prompt = m.tok("[question] hi [answer] The fox <sosp>", add_special_tokens=False).input_ids
    kw = dict(
        max_new_tokens=N,
        sampling=Sampling(temperature=1.5, top_p=1.0, seed=4, constrain_speech=True),
    )
    stops = default_stop_ids(m.tok, v)
    assert v.token_id("<eoa>") in stops and m.tok.eos_token_id in stops
    generated = generate(m.cfg, m.params, [prompt], stop_ids=stops, vocab=v, **kw)[0]
    events = list(stream_events(m.cfg, m.params, m.tok, v, prompt, stop_ids=stops, **kw))
    assert joined(events) == generated
    # the prompt opened a speech span: the first event is its units, closed by a generated <eosp>
    assert isinstance(events[0], SpeechChunk) and events[0].units and events[0].closed
    assert isinstance(events[-1], End)
    assert all(0 <= u < v.unit_count for e in events if isinstance(e, SpeechChunk) for u in e.units)


# -- loading -------------------------------------------------------------------------------------


def test_load_for_decoding_from_hf_folders(cslm_model, text_model, tmp_path):
    m = cslm_model
    exported = export_hf(m.ckpt, tmp_path / "hf", dtype="float32", log=quiet)
    cfg, params, tok, vocab = load_for_decoding(exported, tmp_dir=tmp_path)
    assert vocab == m.vocab and cfg == m.cfg and len(tok) == len(m.tok)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(m.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompt = m.tok("[question] hi [answer]", add_special_tokens=False).input_ids
    ours = generate(cfg, params, [prompt], max_new_tokens=N, sampling=GREEDY)
    # transformers decodes the exported folder (speech units included) to the same tokens
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(
        str(exported), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert ours == hf_greedy(hf, [prompt])
    # a plain text Llama folder decodes as it is: no units added
    cfg2, _, tok2, vocab2 = load_for_decoding(text_model.hf_dir, tmp_dir=tmp_path)
    assert vocab2.unit_count == 0 and cfg2.real_vocab_size == text_model.torch.config.vocab_size
