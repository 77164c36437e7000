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
from cslm_jax.data.fast_chat import FastChat, SpeechText, fast_chat_for, fast_examples, plain
from cslm_jax.data.formats import (
    ChatRenderer,
    RecordError,
    examples,
    load_data_config,
    read_jsonl,
    template_around,
)
from cslm_jax.data.prepare import prepare_task_local, tokenizer_digest
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
        fmt = _variant(cfg.format, variant)
        want = examples(spec.kind, record, fmt, where)
        got = fast_examples(spec.kind, record, fmt, where)
        assert got == want, where
        for messages in got:
            for m in messages:
                if isinstance(m["content"], SpeechText):
                    parts = m["content"].parts
                    assert (
                        "".join(p if k % 2 == 0 else formats.speech(p) for k, p in enumerate(parts))
                        == m["content"]
                    )
                    n += 1
    assert n > 1000


def test_template_around_splits_only_what_it_can_prove():
    assert template_around("a {speech} b", "speech") == ("a ", " b")
    assert template_around("{{x}} {speech}.", "speech") == ("{x} ", ".")
    for bad in ("{speech} {speech}", "{speech!r}", "{speech:>9}", "{text} {speech}", "{", "none"):
        assert template_around(bad, "speech") is None, bad


def _documented_examples(kind, record, fmt, where):
    """The asr, tts and s2s examples as the format documents them, written out with str.format
    and str.join (what formats.examples computed before its contents were defined as parts)."""

    def units_of(field):
        return formats.merge_repeats(record[field]) if fmt.merge_repeats else list(record[field])

    if kind in ("asr", "tts"):
        lang = fmt.languages[record["lang"]]
        sp, text = formats.speech(units_of("units")), record["text"].strip()
        turns = (
            [lang.asr_prompt.format(speech=sp), text]
            if kind == "asr"
            else [lang.tts_prompt.format(text=text), sp]
        )
    else:
        lang = fmt.languages[record["answer_lang"]]
        same = record["question_lang"] == record["answer_lang"]
        prompt = (lang.s2s_prompt if same else lang.s2s_cross_prompt).format(
            speech=formats.speech(units_of("question_units"))
        )
        if fmt.chain == "sequential":
            response = " ".join(
                [
                    "[question]",
                    record["question_text"].strip(),
                    "[answer]",
                    record["answer_text"].strip(),
                    formats.speech(units_of("answer_units")),
                    "<eoa>",
                ]
            )
        else:
            items = ["[question]", record["question_text"].strip(), "[answer]"]
            for text, units in formats.chunk_answer(
                record["answer_text"],
                record["answer_word_times"],
                record["answer_units"],
                lang,
                fmt,
            ):
                items += [text.strip(), formats.speech(units)]
            response = " ".join(x for x in items + ["<eoa>"] if x)
        turns = [prompt, response]
    return [[{"role": r, "content": c} for r, c in zip(("user", "assistant"), turns)]]


@pytest.mark.parametrize("variant", ["as_is", "sequential", "no_merge", "odd_templates"])
def test_examples_are_the_documented_strings(demo, variant):
    """formats.examples joins the parts it defines: the strings the format documents (a guard
    of that definition, which both paths now share)."""
    n = 0
    for cfg, spec, where, record in _demo_records(demo):
        if spec.kind not in ("asr", "tts", "s2s"):
            continue
        fmt = _variant(cfg.format, variant)
        assert examples(spec.kind, record, fmt, where) == _documented_examples(
            spec.kind, record, fmt, where
        ), where
        n += 1
    assert n > 500


def _variant(fmt, variant):
    if variant == "sequential":
        return dataclasses.replace(fmt, chain="sequential")
    if variant == "no_merge":
        return dataclasses.replace(fmt, merge_repeats=False)
    if variant == "odd_templates":  # escapes, a format spec: split or left whole
        return dataclasses.replace(
            fmt,
            languages={
                k: dataclasses.replace(
                    v,
                    asr_prompt="{{x}} " + v.asr_prompt,
                    s2s_prompt=v.s2s_prompt.replace("{speech}", "{speech!s}"),
                )
                for k, v in fmt.languages.items()
            },
        )
    return fmt


def _prepared_bytes(cfg, specs, tok_dir, root, fast):
    """{task/file: bytes} of every prepared shard file of the tasks `specs`."""
    out = {}
    for spec in specs:
        task_dir = root / f"{spec.name}-{fast}"
        prepare_task_local(spec, cfg, tok_dir, task_dir, num_shards=2, fast=fast)
        for f in sorted(task_dir.glob("*.tfrecord-*")):
            out[f"{spec.name}/{f.name}"] = f.read_bytes()
    return out


def _config_with(demo, tmp_path, languages=None, **fmt):
    import yaml

    data = yaml.safe_load((demo[0] / "data.yaml").read_text())
    data["data_dir"] = str(demo[0])
    data["format"].update(fmt)
    for code, prompts in (languages or {}).items():
        data["languages"][code].update(prompts)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_data_config(tmp_path / "data.yaml")


@pytest.mark.parametrize("variant", ["prompts", "prompts_sequential_assistant_only"])
def test_templates_changed_in_the_config_are_followed_by_the_fast_path(demo, tmp_path, variant):
    """Prompts changed in a data config (the speech first, last, alone, beside added tokens),
    the chain and the loss mask: the fast path prepares the exact path's bytes with no code
    changed, and still computes the speech spans (its contents keep the new prompts' pieces)."""
    languages = {
        "en": {
            "asr_prompt": "{speech}<|eot_id|> -> English text:",
            "s2s_prompt": "{speech}",
            "s2s_cross_prompt": "Answer in English.\n\n{speech}\n",
        },
        "zh": {"asr_prompt": "转写: {speech}", "s2s_prompt": "问: {speech}"},
    }
    fmt = {"chain": "sequential", "loss_mask": "assistant_only"} if variant != "prompts" else {}
    cfg = _config_with(demo, tmp_path, languages, **fmt)
    for spec in cfg.tasks("pretrain")[:1] + cfg.tasks("sft")[:1]:
        where, _, record = next(read_jsonl(spec.train[0], None, cfg.format))
        prompt = fast_examples(spec.kind, record, cfg.format, where)[0][0]["content"]
        assert isinstance(prompt, SpeechText) and isinstance(prompt.parts[1], list)
        template = languages["en"]["asr_prompt" if spec.kind == "asr" else "s2s_prompt"]
        assert prompt.parts[0] + "{speech}" + prompt.parts[2] == template
    specs = [t for t in cfg.tasks() if t.kind in ("asr", "s2s")]  # the prompts changed
    fast = _prepared_bytes(cfg, specs, demo[1], tmp_path / "fast", True)
    exact = _prepared_bytes(cfg, specs, demo[1], tmp_path / "exact", False)
    assert fast.keys() == exact.keys() and len(fast) == 2 * 2 * 6
    assert [k for k in fast if fast[k] != exact[k]] == []


def test_a_joining_rule_changed_in_formats_is_followed_by_the_fast_path(
    demo, tmp_path, monkeypatch
):
    """The joining rules live in formats alone: another chain (each chunk's speech before its
    text) and another way of filling a prompt, put in formats' place, change the exact path's
    bytes, and the fast path follows them without a change of its own."""
    cfg = load_data_config(demo[0] / "data.yaml")
    specs = [t for t in cfg.tasks("sft") if t.kind == "s2s"]
    before = _prepared_bytes(cfg, specs, demo[1], tmp_path / "before", True)

    def speech_first(transcript, chunks):
        items = ["<q>", transcript.strip(), "<a>"]
        for text, units in chunks:
            items += [units, "= " + text.strip()]
        return formats.spaced_parts(items + ["<eoa>"], keep_empty=False)

    def around_brackets(template, field, units):
        return ["[", units, "] " + template.replace("{" + field + "}", "...")]

    monkeypatch.setattr(formats, "interleaved_parts", speech_first)
    monkeypatch.setattr(formats, "filled_parts", around_brackets)
    where, _, record = next(read_jsonl(cfg.tasks("sft")[0].train[0], None, cfg.format))
    got = fast_examples("s2s", record, cfg.format, where)[0]
    assert got[0]["content"].parts[0] == "[" and got[1]["content"].parts[0].startswith("<q> ")
    assert got[1]["content"].parts[-1].startswith(" = ")
    assert got == examples("s2s", record, cfg.format, where)[0]
    fast = _prepared_bytes(cfg, specs, demo[1], tmp_path / "fast", True)
    exact = _prepared_bytes(cfg, specs, demo[1], tmp_path / "exact", False)
    assert fast.keys() == exact.keys() == before.keys() and len(fast) == 4 * 2 * 2
    assert [k for k in fast if fast[k] != exact[k]] == []
    assert all(fast[k] != before[k] for k in fast)


def test_fast_chat_for_keeps_one_per_tokenizer_mask_and_template(demo):
    """`fast_chat_for`: the plans of a tokenizer object are kept per loss-mask rule, made again
    when its chat template changes (they were kept, and the sample check then failed), and
    not shared with another tokenizer object (keyed by the object, not by id())."""
    tok = load_tokenizer(demo[1])
    first = fast_chat_for(ChatRenderer(tok, 256))
    assert fast_chat_for(ChatRenderer(tok, 4096)) is first  # not the maximum length
    assert fast_chat_for(ChatRenderer(tok, 256, mask="assistant_only")) is not first
    assert fast_chat_for(ChatRenderer(load_tokenizer(demo[1]), 256)) is not first
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    renderer = ChatRenderer(tok, 256)
    again = fast_chat_for(renderer)
    assert again is not first and again.r.tok.chat_template == tok.chat_template
    batch = _speech_conversations(random.Random(6), 20, 256)
    assert again.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]


def test_messages_a_plan_cannot_take_go_to_jinja(demo):
    """A message with a field besides role and content, or a content that is not text: that
    example is rendered by Jinja (and its headers searched), the others built from plans."""
    tok = load_tokenizer(demo[1])
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10**9)
    batch = [
        [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": 12}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "c"}],
    ]
    found: list = []
    assert fast.ids(batch, found) == [renderer.encode(renderer.render_text(m)) for m in batch]
    assert found[0] is None and found[1] is None and found[2] is not None


# -- speech spans as ids ----------------------------------------------------------------------------


def _speech_conversations(rng, n, unit_count):
    texts = [
        "Hello world!",
        "  padded  ",
        "直接回答用户语音中的问题。",
        "",
        " ",
        "x<",
        "<|eot_id|>",
        "[question] q [answer]",
        "'s 12345",
        "tail <",
    ]
    out = []
    for _ in range(n):
        msgs = []
        for i in range(rng.choice([2, 4])):
            parts = [rng.choice(texts)]
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                parts += [
                    [rng.randrange(unit_count) for _ in range(rng.randrange(0, 30))],
                    rng.choice(texts),
                ]
            msgs.append({"role": ("user", "assistant")[i % 2], "content": SpeechText(parts)})
        out.append(msgs)
    return out


def test_speech_spans_as_ids_equal_jinja_on_the_demo_tokenizer(demo):
    tok = load_tokenizer(demo[1])
    for mask in ("reference", "assistant_only"):
        renderer = ChatRenderer(tok, 4096, mask=mask)
        fast = FastChat(renderer, verify_every=10**9)
        assert fast.span_ids is not None
        batch = _speech_conversations(random.Random(0), 300, 256)
        got = fast.ids(batch)
        assert got == [renderer.encode(renderer.render_text(plain(m))) for m in batch]
        again = fast.ids(batch)  # template constants now come from the cache
        assert again == got and fast.cache


@pytest.mark.parametrize("mask", ["reference", "assistant_only"])
def test_speech_spans_as_ids_equal_jinja_on_the_true_llama31_tokenizer(mask):
    from cslm_jax.model.vocab import extend_tokenizer, llama3_tokenizer

    tok = llama3_tokenizer()
    extend_tokenizer(tok, 64, base_size=128256)
    renderer = ChatRenderer(tok, 8192, mask=mask)
    fast = FastChat(renderer, verify_every=10**9)
    assert fast.span_ids is not None
    batch = _speech_conversations(random.Random(1), 200, 64)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]


def test_speech_spans_as_ids_equal_jinja_on_a_template_that_keeps_contents_as_they_are(demo):
    tok = load_tokenizer(demo[1])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    )
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10**9)
    batch = _speech_conversations(random.Random(4), 200, 256)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]
    plans = [p for p in fast.plans.values() if p is not None]
    assert plans and not any(p.strip for p in plans)  # contents enter verbatim, not trimmed


@pytest.mark.parametrize("variant", ["word_cache", "batch_api", "tiny_cache"])
def test_texts_the_word_cache_refuses_go_through_the_batch_api(demo, variant):
    """Texts with characters that fail WordTokens' probes (and every text, for a tokenizer
    without WordTokens) are collected, encoded in one batch call and assembled; a text cache
    cleared while that happens sends the example to the exact path, never to wrong ids."""
    tok = load_tokenizer(demo[1])
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10**9)
    if variant == "batch_api":
        fast.words = None
    if variant == "tiny_cache":
        fast.CACHE_SIZE = 3
    rng = random.Random(5)
    batch = _speech_conversations(rng, 150, 256)
    batch += [
        [{"role": "user", "content": f"x² {i} \x1c y"}, {"role": "assistant", "content": "½"}]
        for i in range(30)
    ]
    rng.shuffle(batch)
    found: list = []
    assert fast.ids(batch, found) == [
        renderer.encode(renderer.render_text(plain(m))) for m in batch
    ]
    assert sum(f is not None for f in found) > len(batch) // 2


def test_units_the_tokenizer_lacks_are_tokenized_as_text(demo):
    tok = load_tokenizer(demo[1])
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10**9)
    batch = [
        [
            {"role": "user", "content": SpeechText(["a ", [1, 255, 256, 9999], " b"])},
            {"role": "assistant", "content": SpeechText(["", [3, -1], ""])},
        ],
        [
            {"role": "user", "content": SpeechText(["ok ", [1, 2], ""])},
            {"role": "assistant", "content": "fine"},
        ],
    ]
    want = [renderer.encode(renderer.render_text(plain(m))) for m in batch]
    assert fast.ids(batch) == want
    # units known to lie below a codebook larger than the tokenizer's units: still looked over
    assert fast.ids(batch, units_below=10000) == want


def test_speech_spans_left_to_the_tokenizer_when_a_token_could_run_into_them(demo):
    tok = load_tokenizer(demo[1])
    tok.add_tokens(["<sosp><1"])  # a longer match at a span's start: ids not computed
    renderer = ChatRenderer(tok, 4096)
    fast = FastChat(renderer, verify_every=10**9)
    assert fast.span_ids is None
    batch = _speech_conversations(random.Random(2), 60, 256)
    assert fast.ids(batch) == [renderer.encode(renderer.render_text(plain(m))) for m in batch]


def test_header_positions_read_off_the_template_give_the_searched_loss_mask(demo):
    """FastChat._mark: the user/assistant header positions it reports give the mask the search
    gives, before and after truncation, for both rules; a content holding a header is searched."""
    tok = load_tokenizer(demo[1])
    rng = random.Random(3)
    words = ["hello", "world", "直接", "回答", "12", "'s", " ", "\n"]
    batch = [
        [
            {
                "role": ("user", "assistant")[i % 2],
                "content": "".join(rng.choice(words) for _ in range(rng.randrange(1, 12))),
            }
            for i in range(rng.choice([2, 4, 6]))
        ]
        for _ in range(100)
    ]
    batch += _speech_conversations(rng, 100, 256)
    batch += [
        [
            {"role": "user", "content": "<|start_header_id|>assistant<|end_header_id|> hi"},
            {"role": "assistant", "content": "ok"},
        ],
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a <|start_header_id|>user<|end_header_id|> b"},
        ],
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "<|start_header_id|>"},
            {"role": "assistant", "content": "b"},
        ],
    ]
    for mask in ("reference", "assistant_only"):
        for max_length in (4096, 40, 12):
            renderer = ChatRenderer(tok, max_length, mask=mask)
            fast = FastChat(renderer, verify_every=10**9)
            found: list = []
            ids = fast.ids(batch, found)
            assert len(found) == len(batch)
            assert sum(f is not None for f in found) > len(batch) // 2
            assert all(f is None for f in found[-3:])  # headers inside a content: searched
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
    specials = [math.nan, math.inf, -0.0, True, False, None, "1", 10**30, -1, 0]
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
                pair = (
                    [
                        int(x) if isinstance(x, float) and x == x and abs(x) < 1e9 else x
                        for x in pair
                    ]
                    if isinstance(pair, list)
                    else pair
                )
            pairs.append(pair)
            t = a if isinstance(a, float) else t
        record = {"t": pairs}
        n_units = rng.choice([1, 10, 50, 100])
        want = _outcome(
            formats.validated_times, record, "t", "f:1", n, n_units, cfg, False
        )  # loop alone
        got = _outcome(formats.validated_times, record, "t", "f:1", n, n_units, cfg)
        assert got == want, pairs
        seen.add(want[0] if want[0] == "ok" else want[1].split("': ")[1][:12])
    assert len(seen) >= 5  # valid and each kind of error met


def test_timed_count_counts_the_timed_pieces():
    rng = random.Random(0)
    alphabet = [
        "a",
        "中",
        " ",
        "\u3000",
        "\t",
        "\x1c",
        "\x85",
        ".",
        "。",
        "，",
        "!",
        "…",
        "-",
        "]",
        "\\",
        "^",
        "🎉",
    ]
    for chunk_unit in ("word", "char"):
        for punctuation in (formats.DEFAULT_PUNCTUATION, "-]^\\", ""):
            lang = formats.LanguageConfig("L", "", "", "", "", "", chunk_unit=chunk_unit)
            cfg = formats.FormatConfig(languages={"l": lang}, unit_count=4, punctuation=punctuation)
            for _ in range(500):
                text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
                want = sum(
                    formats.piece_is_timed(p, chunk_unit, punctuation)
                    for p in formats.timed_tokens(text, chunk_unit, punctuation)
                )
                assert formats.timed_count(text, lang, cfg) == want, (text, chunk_unit)


def test_units_errors_unchanged():
    for value, field in [
        ([1, True], "u[1]"),
        ([1, 2.0], "u[1]"),
        ([5, 300], "u[1]"),
        ([-1], "u[0]"),
        ("1", "u"),
        ([], "u"),
    ]:
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
        for _ in range(rng.randrange(0, 4)):
            at = rng.randrange(len(ids) + 1)
            ids[at:at] = rng.choice([user, assistant])
        for mode in ("reference", "assistant_only"):
            for pattern_user, pattern_assistant in ((user, assistant), ([7], [7, 7])):
                assert formats.loss_mask(
                    ids, pattern_user, pattern_assistant, 0, mode
                ) == _loss_mask_reference(ids, pattern_user, pattern_assistant, 0, mode)


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
    (tok / ".hidden").write_text("x")  # tf.io.gfile.glob("*") lists dot files too
    (tok / "sub").mkdir()
    assert tokenizer_digest(tok) == tokenizer_digest(f"file://{tok}")
    before = tokenizer_digest(tok)  # kept per folder while its files stand
    (tok / ".hidden").write_text("y")  # same size, new content and time
    assert tokenizer_digest(tok) != before
    assert tokenizer_digest(tok) == tokenizer_digest(f"file://{tok}")


def test_seqio_version_without_importing_seqio():
    import seqio

    from cslm_jax.data.prepare import seqio_version

    assert seqio_version() == seqio.__version__
    code = (
        "import sys; from cslm_jax.data.prepare import info_json; info_json(1, {}); "
        "from cslm_jax.data import beam_prepare; "
        "print(json.dumps(sorted(m for m in ('seqio', 'tensorflow', 'torch') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
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
            pieces = sorted(
                (s, e, line) for unit in plan for (_, _, fi, _, s, e, line) in unit if fi == i
            )
            size = len(open(f, "rb").read())
            assert pieces[0][0] == 0 and pieces[-1][1] == size
            data = open(f, "rb").read()
            for (s, e, line), nxt in zip(pieces, pieces[1:] + [(size, None, None)]):
                assert e == nxt[0]  # contiguous, covering
                assert s == 0 or data[s - 1 : s] == b"\n"  # at a line start
                assert line == data[:s].count(b"\n") + 1  # with its line number
        if units == 2:  # equal shares of the big file
            big = [e - s for unit in plan for (_, _, fi, _, s, e, _) in unit if fi == 3]
            assert len(big) == 2 and abs(big[0] - big[1]) < 0.05 * sum(big)
