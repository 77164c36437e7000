"""The fast paths of data preparation equal the exact ones: speech spans turned into ids without
the tokenizer (`SpeechText`, `fast_examples`, `FastChat._span_ids`), on the demo tokenizer and the
true Llama-3.1 tokenizer; validation shortcuts (`validated_times`, `timed_count`, `_units`), the
loss mask, `merge_repeats`, `speech`; the Beam work units; what a worker no longer imports."""
import dataclasses
import json
import math
import random
import re
import subprocess
import sys

import pytest

from conftest import REPO

from cslm_jax.data import formats
from cslm_jax.data.fast_chat import FastChat, SpeechText, fast_examples, plain
from cslm_jax.data.formats import (ChatRenderer, RecordError, examples, load_data_config,
                                   read_jsonl, template_around)
from cslm_jax.data.prepare import tokenizer_digest
from cslm_jax.model.vocab import load_tokenizer


# -- fast_examples == examples ------------------------------------------------------------------------

def _demo_records(demo, stages=("pretrain", "sft")):
    cfg = load_data_config(demo[0] / "data.yaml")
    for stage in stages:
        for spec in cfg.tasks(stage):
            for where, _, record in read_jsonl(spec.train[0], None, cfg.format):
                yield cfg, spec, where, record


@pytest.mark.parametrize("variant", ["as_is", "sequential", "no_merge", "odd_templates"])
def test_fast_examples_equal_examples_on_every_demo_task(demo, variant):
    n = 0
    for cfg, spec, where, record in _demo_records(demo):
        fmt = cfg.format
        if variant == "sequential":
            fmt = dataclasses.replace(fmt, chain="sequential")
        elif variant == "no_merge":
            fmt = dataclasses.replace(fmt, merge_repeats=False)
        elif variant == "odd_templates":       # escapes, a format spec: split or left to examples()
            fmt = dataclasses.replace(fmt, languages={
                k: dataclasses.replace(v, asr_prompt="{{x}} " + v.asr_prompt,
                                       s2s_prompt=v.s2s_prompt.replace("{speech}", "{speech!s}"))
                for k, v in fmt.languages.items()})
        want = examples(spec.kind, record, fmt, where)
        got = fast_examples(spec.kind, record, fmt, where)
        assert got == want, where
        for messages in got:
            for m in messages:
                if isinstance(m["content"], SpeechText):
                    parts = m["content"].parts
                    assert "".join(p if k % 2 == 0 else formats.speech(p)
                                   for k, p in enumerate(parts)) == m["content"]
                    n += 1
    assert n > 1000


def test_template_around_splits_only_what_it_can_prove():
    assert template_around("a {speech} b", "speech") == ("a ", " b")
    assert template_around("{{x}} {speech}.", "speech") == ("{x} ", ".")
    for bad in ("{speech} {speech}", "{speech!r}", "{speech:>9}", "{text} {speech}", "{", "none"):
        assert template_around(bad, "speech") is None, bad


# -- speech spans as ids ----------------------------------------------------------------------------

def _speech_conversations(rng, n, unit_count):
    texts = ["Hello world!", "  padded  ", "直接回答用户语音中的问题。", "", " ", "x<", "<|eot_id|>",
             "[question] q [answer]", "'s 12345", "tail <"]
    out = []
    for _ in range(n):
        msgs = []
        for i in range(rng.choice([2, 4])):
            parts = [rng.choice(texts)]
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                parts += [[rng.randrange(unit_count) for _ in range(rng.randrange(0, 30))],
                          rng.choice(texts)]
            msgs.append({"role": ("user", "assistant")[i % 2], "content": SpeechText(parts)})
        out.append(msgs)
    return out


def test_speech_spans_as_ids_equal_jinja_on_the_demo_tokenizer(demo):
    tok = load_tokenizer(demo[1])
    for mask in ("reference", "assistant_only"):
        renderer = ChatRenderer(tok, 4096, mask=mask)
        fast = FastChat(renderer, verify_every=10 ** 9)
        assert fast.span_ids is not None
        batch = _speech_conversations(random.Random(0), 300, 256)
        got = fast.ids(batch)
        assert got == [renderer.encode(renderer.render_text(plain(m))) for m in batch]
        again = fast.ids(batch)           # template constants now come from the cache
        assert again == got and fast.cache


@pytest.mark.parametrize("mask", ["reference", "assistant_only"])
def test_speech_spans_as_ids_equal_jinja_on_the_true_llama31_tokenizer(mask):
    from cslm_jax.model.vocab import extend_tokenizer, llama3_tokenizer

    tok = llama3_tokenizer()
    extend_tokenizer(tok, 64, base_size=128256)
    renderer = ChatRenderer(tok, 8192, mask=mask)
    fast = FastChat(renderer, verify_every=10 ** 9)
    assert fast.span_ids is not None
    batch = _speech_conversations(random.Random(1), 200, 64)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]


def test_speech_spans_as_ids_equal_jinja_on_a_template_that_keeps_contents_as_they_are(demo):
    tok = load_tokenizer(demo[1])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                         "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10 ** 9)
    batch = _speech_conversations(random.Random(4), 200, 256)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]
    plans = [p for p in fast.plans.values() if p is not None]
    assert plans and not any(p.strip for p in plans)    # contents enter verbatim, not trimmed


@pytest.mark.parametrize("variant", ["word_cache", "batch_api", "tiny_cache"])
def test_texts_the_word_cache_refuses_go_through_the_batch_api(demo, variant):
    """Texts with characters that fail WordTokens' probes (and every text, for a tokenizer
    without WordTokens) are collected, encoded in one batch call and assembled; a text cache
    cleared while that happens sends the example to the exact path, never to wrong ids."""
    tok = load_tokenizer(demo[1])
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10 ** 9)
    if variant == "batch_api":
        fast.words = None
    if variant == "tiny_cache":
        fast.CACHE_SIZE = 3
    rng = random.Random(5)
    batch = _speech_conversations(rng, 150, 256)
    batch += [[{"role": "user", "content": f"x² {i} \x1c y"}, {"role": "assistant", "content": "½"}]
              for i in range(30)]
    rng.shuffle(batch)
    found: list = []
    assert fast.ids(batch, found) == [renderer.encode(renderer.render_text(plain(m)))
                                      for m in batch]
    assert sum(f is not None for f in found) > len(batch) // 2


def test_units_the_tokenizer_lacks_are_tokenized_as_text(demo):
    tok = load_tokenizer(demo[1])
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10 ** 9)
    batch = [[{"role": "user", "content": SpeechText(["a ", [1, 255, 256, 9999], " b"])},
              {"role": "assistant", "content": SpeechText(["", [3, -1], ""])}],
             [{"role": "user", "content": SpeechText(["ok ", [1, 2], ""])},
              {"role": "assistant", "content": "fine"}]]
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]


def test_speech_spans_left_to_the_tokenizer_when_a_token_could_run_into_them(demo):
    tok = load_tokenizer(demo[1])
    tok.add_tokens(["<sosp><1"])         # a longer match at a span's start: ids not computed
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10 ** 9)
    assert fast.span_ids is None
    batch = _speech_conversations(random.Random(2), 60, 256)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]


def test_header_positions_read_off_the_template_give_the_searched_loss_mask(demo):
    """FastChat._mark: the user/assistant header positions it reports give the mask the search
    gives, before and after truncation, for both rules; a content holding a header is searched."""
    tok = load_tokenizer(demo[1])
    rng = random.Random(3)
    words = ["hello", "world", "直接", "回答", "12", "'s", " ", "\n"]
    batch = [[{"role": ("user", "assistant")[i % 2],
               "content": "".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))}
              for i in range(rng.choice([2, 4, 6]))] for _ in range(100)]
    batch += _speech_conversations(rng, 100, 256)
    batch += [[{"role": "user", "content": "<|start_header_id|>assistant<|end_header_id|> hi"},
               {"role": "assistant", "content": "ok"}],
              [{"role": "user", "content": "q"},
               {"role": "assistant", "content": "a <|start_header_id|>user<|end_header_id|> b"}],
              [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
               {"role": "user", "content": "<|start_header_id|>"}, {"role": "assistant", "content": "b"}]]
    for mask in ("reference", "assistant_only"):
        for max_length in (4096, 40, 12):
            renderer = ChatRenderer(tok, max_length, mask=mask)
            fast = FastChat(renderer, verify_every=10 ** 9)
            found: list = []
            ids = fast.ids(batch, found)
            assert len(found) == len(batch)
            assert sum(f is not None for f in found) > len(batch) // 2
            assert all(f is None for f in found[-3:])       # headers inside a content: searched
            for i, f in zip(ids, found):
                assert renderer.finish_ids(list(i), f) == renderer.finish_ids(list(i))


# -- validation shortcuts ---------------------------------------------------------------------------

def _outcome(f, *args):
    try:
        return ("ok", f(*args))
    except RecordError as e:
        return ("error", str(e))


def test_times_shortcut_gives_the_loops_result_and_errors(demo):
    cfg = load_data_config(demo[0] / "data.yaml").format
    rng = random.Random(0)
    specials = [math.nan, math.inf, -0.0, True, False, None, "1", 10 ** 30, -1, 0]
    seen = set()
    for _ in range(4000):
        n = rng.randrange(0, 6)
        t, pairs = 0.0, []
        for _ in range(n):
            a = t + rng.choice([0, 0.1, 0.25, -0.1])
            b = a + rng.choice([0, 0.2, -0.05])
            pair = [a, b]
            if rng.random() < 0.15:
                pair[rng.randrange(2)] = rng.choice(specials)
            if rng.random() < 0.05:
                pair = rng.choice([tuple(pair), pair[:1], pair + [1.0], "ab", {"a": 1}])
            if rng.random() < 0.1:
                pair = [int(x) if isinstance(x, float) and x == x and abs(x) < 1e9 else x
                        for x in pair] if isinstance(pair, list) else pair
            pairs.append(pair)
            t = a if isinstance(a, float) else t
        record = {"t": pairs}
        n_units = rng.choice([1, 10, 50, 100])
        want = _outcome(formats.validated_times, record, "t", "f:1", n, n_units, cfg,
                        False)                                                  # loop alone
        got = _outcome(formats.validated_times, record, "t", "f:1", n, n_units, cfg)
        assert got == want, pairs
        seen.add(want[0] if want[0] == "ok" else want[1].split("': ")[1][:12])
    assert len(seen) >= 5                              # valid and each kind of error met


def test_timed_count_counts_the_timed_pieces():
    rng = random.Random(0)
    alphabet = ["a", "中", " ", "\u3000", "\t", "\x1c", "\x85", ".", "。", "，", "!", "…", "-", "]",
                "\\", "^", "🎉"]
    for chunk_unit in ("word", "char"):
        for punctuation in (formats.DEFAULT_PUNCTUATION, "-]^\\", ""):
            lang = formats.LanguageConfig("L", "", "", "", "", "", chunk_unit=chunk_unit)
            cfg = formats.FormatConfig(languages={"l": lang}, unit_count=4, punctuation=punctuation)
            for _ in range(500):
                text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
                want = sum(formats.piece_is_timed(p, chunk_unit, punctuation)
                           for p in formats.timed_tokens(text, chunk_unit, punctuation))
                assert formats.timed_count(text, lang, cfg) == want, (text, chunk_unit)


def test_units_errors_unchanged():
    for value, field in [([1, True], "u[1]"), ([1, 2.0], "u[1]"), ([5, 300], "u[1]"),
                         ([-1], "u[0]"), ("1", "u"), ([], "u")]:
        with pytest.raises(RecordError, match=re.escape(f"f:3: field '{field}'")):
            formats._units({"u": value}, "u", "f:3", 256)
    assert formats._units({"u": [0, 255]}, "u", "f:3", 256) == [0, 255]


# -- the loss mask, merge_repeats, speech ------------------------------------------------------------

def _loss_mask_reference(ids, user, assistant, bos_id, mode="reference"):
    """formats.loss_mask before `_find_all`: repeated `_find` calls."""
    find = formats._find
    mask = [1] * len(ids)
    users, pos = [], 0
    while (pos := find(ids, user, pos)) >= 0:
        users.append(pos)
        pos += len(user)
    if mode == "reference":
        u, begin, pos = 0, 0, 0
        while (pos := find(ids, assistant, pos)) >= 0 and pos + len(assistant) < len(ids):
            while u < len(users) and users[u] < pos:
                begin = users[u]
                u += 1
            mask[begin:pos] = [0] * (pos - begin)
            pos += len(assistant)
        if bos_id is not None and ids and ids[0] == bos_id:
            mask[0] = 0
        return mask
    for s in [0] + users:
        a = find(ids, assistant, s)
        end = len(ids) if a < 0 else a
        mask[s:end] = [0] * (end - s)
    if bos_id is not None and bos_id in ids:
        mask[list(ids).index(bos_id)] = 0
    return mask


def test_loss_mask_equals_repeated_searches():
    rng = random.Random(0)
    user, assistant = [7, 1, 8], [7, 2, 8]
    for _ in range(3000):
        ids = [rng.choice([0, 1, 2, 7, 7, 8, 9]) for _ in range(rng.randrange(0, 40))]
        for k in range(rng.randrange(0, 4)):
            at = rng.randrange(len(ids) + 1)
            ids[at:at] = rng.choice([user, assistant])
        for mode in ("reference", "assistant_only"):
            for pattern_user, pattern_assistant in ((user, assistant), ([7], [7, 7])):
                assert formats.loss_mask(ids, pattern_user, pattern_assistant, 0, mode) == \
                    _loss_mask_reference(ids, pattern_user, pattern_assistant, 0, mode)


def test_merge_repeats_and_speech():
    rng = random.Random(0)
    for _ in range(500):
        units = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        want = []
        for u in units:
            if not want or want[-1] != u:
                want.append(u)
        assert formats.merge_repeats(units) == want
        assert formats.speech(units) == "<sosp>" + "".join(f"<{u}>" for u in units) + "<eosp>"
        assert formats.speech(iter(units)) == formats.speech(units)


# -- start-up and layout -------------------------------------------------------------------------------

def test_local_tokenizer_digest_equals_the_gfile_one(demo, tmp_path):
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(demo[1], tok)
    (tok / ".hidden").write_text("x")            # tf.io.gfile.glob("*") lists dot files too
    (tok / "sub").mkdir()
    assert tokenizer_digest(tok) == tokenizer_digest(f"file://{tok}")
    before = tokenizer_digest(tok)                     # kept per folder while its files stand
    (tok / ".hidden").write_text("y")                  # same size, new content and time
    assert tokenizer_digest(tok) != before
    assert tokenizer_digest(tok) == tokenizer_digest(f"file://{tok}")


def test_seqio_version_without_importing_seqio():
    import seqio

    from cslm_jax.data.prepare import seqio_version

    assert seqio_version() == seqio.__version__
    code = ("import sys; from cslm_jax.data.prepare import info_json; info_json(1, {}); "
            "from cslm_jax.data import beam_prepare; "
            "print(json.dumps(sorted(m for m in ('seqio', 'tensorflow', 'torch') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_work_units_are_equal_contiguous_shares_of_every_file(tmp_path):
    from cslm_jax.data.beam_prepare import plan_units

    files = []
    for i, lines in enumerate((1, 7, 500, 2000)):
        f = tmp_path / f"f{i}.jsonl"
        f.write_text("".join(f'{{"x": "{"y" * (k % 13)}"}}\n' for k in range(lines)))
        files.append(str(f))
    jobs = [("t", "train", i, f) for i, f in enumerate(files)]
    for units, range_bytes in ((2, 64 << 20), (3, 1000), (None, 4096)):
        plan = plan_units(jobs, range_bytes, units)
        if units:
            assert len(plan) <= units
        for i, f in enumerate(files):
            pieces = sorted((s, e, line) for unit in plan for (_, _, fi, _, s, e, line) in unit
                            if fi == i)
            size = len(open(f, "rb").read())
            assert pieces[0][0] == 0 and pieces[-1][1] == size
            data = open(f, "rb").read()
            for (s, e, line), nxt in zip(pieces, pieces[1:] + [(size, None, None)]):
                assert e == nxt[0]                              # contiguous, covering
                assert s == 0 or data[s - 1:s] == b"\n"         # at a line start
                assert line == data[:s].count(b"\n") + 1        # with its line number
        if units == 2:                                          # equal shares of the big file
            big = [e - s for unit in plan for (_, _, fi, _, s, e, _) in unit if fi == 3]
            assert len(big) == 2 and abs(big[0] - big[1]) < 0.05 * sum(big)
