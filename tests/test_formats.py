"""CSLM formats: the loss mask against the reference semantics, the interleaved chain of
modality, and bad records named by file, line and field."""

import json

import pytest

from conftest import REPO
from cslm_jax.cli.main import main as cli
from cslm_jax.config import ConfigError
from cslm_jax.data.formats import (
    ChatRenderer,
    RecordError,
    chunk_answer,
    examples,
    load_data_config,
    merge_repeats,
    read_jsonl,
    speech,
    timed_tokens,
    validate_record,
)
from cslm_jax.demo.corpus import build_corpus
from cslm_jax.model.vocab import extend_tokenizer, llama3_tokenizer, load_tokenizer

SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
)
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [
        {
            "role": "user",
            "content": "Please directly answer the questions in the user's speech. "
            "This is input: <sosp><12><7><3><eosp>.",
        },
        {
            "role": "assistant",
            "content": "[question] hi there [answer] hello <sosp><1><2><eosp> "
            "friend <sosp><3><eosp> <eoa>",
        },
    ],
    [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second <sosp><5><eosp>"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "third answer"},
    ],
]


@pytest.fixture(scope="module")
def fmt():
    return load_data_config(REPO / "configs" / "data" / "demo.yaml", check_files=False).format


@pytest.fixture(scope="module")
def real_tokenizer():
    tok = llama3_tokenizer()
    extend_tokenizer(tok, 64, len(tok))
    return tok


def piecewise_mask(tok, messages, system_trained: bool):
    """The expected mask built piece by piece from the rendered turns: the system block (BOS
    excepted) trained or not, every user turn ignored, each assistant turn (header, response,
    <|eot_id|>) trained."""
    ids = tok.encode(SYSTEM, add_special_tokens=False)
    mask = [0] + [int(system_trained)] * (len(ids) - 1)
    for m in messages:
        piece = (
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        )
        p = tok.encode(piece, add_special_tokens=False)
        ids += p
        mask += [int(m["role"] == "assistant")] * len(p)
    return ids, mask


def reference_loop(tok, ids):
    """The authors' loop (cslm/train/pretrain.py and sft.py), step by step: labels = ids;
    begin = 0; at each assistant header: stop if nothing follows it, else labels[begin:i] =
    ignore; at each user header begin = i; finally labels[0] = ignore if ids[0] is BOS."""
    user = tok.encode("<|start_header_id|>user<|end_header_id|>", add_special_tokens=False)
    assistant = tok.encode(
        "<|start_header_id|>assistant<|end_header_id|>", add_special_tokens=False
    )
    labels = list(ids)
    begin = 0
    for i in range(len(ids)):
        if ids[i : i + len(assistant)] == assistant:
            if i + len(assistant) >= len(ids):
                break
            for j in range(begin, i):
                labels[j] = -100
        if ids[i : i + len(user)] == user:
            begin = i
    if ids[0] == tok.bos_token_id:
        labels[0] = -100
    return [int(x != -100) for x in labels]


@pytest.mark.parametrize("which", ["llama3", "demo"])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_loss_mask_matches_reference(which, chat, real_tokenizer, demo):
    """Default (`reference`): the authors' tokenization and loop: `tokenizer(text)` adds its own
    <|begin_of_text|> in front of the template's, and the loop trains the system block (the
    template's BOS included); `assistant_only` tokenizes the text as it is and masks the system
    block. Both train every assistant turn and no user turn."""
    tok = real_tokenizer if which == "llama3" else load_tokenizer(demo[1])
    bos = tok.bos_token_id
    rendered = ChatRenderer(tok)(CHATS[chat])
    ids, mask = piecewise_mask(tok, CHATS[chat], system_trained=True)
    assert rendered.input_ids == [bos] + ids  # two BOS, as the reference's
    assert rendered.loss_mask == [0, 1] + mask[1:] == reference_loop(tok, rendered.input_ids)
    only = ChatRenderer(tok, mask="assistant_only")(CHATS[chat])
    assert (only.input_ids, only.loss_mask) == piecewise_mask(
        tok, CHATS[chat], system_trained=False
    )
    system_len = len(tok.encode(SYSTEM, add_special_tokens=False))
    differ = [i for i, (a, b) in enumerate(zip(rendered.loss_mask[1:], only.loss_mask)) if a != b]
    assert differ == list(range(system_len))  # exactly the system block, its BOS included
    if which == "llama3":
        assert system_len == 26  # CSLM.md: 25 system tokens after the BOS
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for r, offset in ((rendered, 1), (only, 0)):
        assert r.input_ids[0] == bos and r.loss_mask[0] == 0
        # each assistant turn's <|eot_id|> is trained, the user turns' are not
        body = list(zip(r.input_ids[offset + system_len :], r.loss_mask[offset + system_len :]))
        assert sum(1 for i, m in body if i == eot and m) == sum(
            m["role"] == "assistant" for m in CHATS[chat]
        )
    if which == "llama3":
        assert 78191 in [i for i, m in zip(ids, mask) if m]  # "assistant" header token
        assert 882 not in [i for i, m in zip(ids, mask) if m]  # "user" never trained


def test_reference_truncates_before_the_eos_and_masks_what_is_left(real_tokenizer):
    """The reference's `tokenize` truncates to max_length first (no EOS then), and its loop only
    sees the kept ids: a user turn whose assistant header was cut off stays trained (what the
    authors' code does), unlike assistant_only, which masks the full sequence first."""
    full = ChatRenderer(real_tokenizer)(CHATS[2])
    header = real_tokenizer.encode(
        "<|start_header_id|>user<|end_header_id|>", add_special_tokens=False
    )
    last_user = max(i for i in range(len(full.input_ids)) if full.input_ids[i : i + 3] == header)
    user3 = last_user + 5  # the third user turn, "\n\nthird" included
    cut = ChatRenderer(real_tokenizer, max_length=user3)(CHATS[2])
    assert cut.truncated and cut.input_ids == full.input_ids[:user3]
    assert cut.loss_mask == reference_loop(real_tokenizer, cut.input_ids)
    assert cut.input_ids[-1] != real_tokenizer.eos_token_id
    only = ChatRenderer(real_tokenizer, max_length=user3 - 1, mask="assistant_only")(CHATS[2])
    assert only.truncated and only.loss_mask[-3:] == [0, 0, 0]
    assert cut.loss_mask[-3:] == [1, 1, 1]


def test_truncation_is_flagged(demo):
    tok = load_tokenizer(demo[1])
    r = ChatRenderer(tok, max_length=20)(CHATS[2])
    assert r.truncated and len(r.input_ids) == 20 == len(r.loss_mask)


def test_merge_repeats_and_speech_spans():
    assert merge_repeats([5, 5, 7, 7, 7, 5, 1, 1]) == [5, 7, 5, 1]
    assert speech([12, 907, 33]) == "<sosp><12><907><33><eosp>"


def test_interleaving_on_demo_answers(fmt):
    corpus = build_corpus(0)
    n = 0
    for stem in ("s2s_en2en.train", "s2s_zh2zh.train", "s2s_en2zh.train", "s2s_zh2en.train"):
        for r in corpus[stem]:
            lang = fmt.languages[r["answer_lang"]]
            chunks = chunk_answer(
                r["answer_text"], r["answer_word_times"], r["answer_units"], lang, fmt
            )
            # speech chunks concatenate to the full merged unit sequence
            assert [u for _, us in chunks for u in us] == merge_repeats(r["answer_units"])
            texts = [t for t, _ in chunks]
            if lang.chunk_unit == "word":
                assert " ".join(texts) == " ".join(r["answer_text"].split())
            else:
                assert "".join(texts) == r["answer_text"]
            for t in texts[:-1]:  # every cut is at punctuation or at the chunk size
                timed = len(timed_tokens(t, lang.chunk_unit, fmt.punctuation))
                assert t.rstrip()[-1] in fmt.punctuation or timed == lang.chunk_size
            for t in texts:
                pieces = [
                    p
                    for p in timed_tokens(t, lang.chunk_unit, fmt.punctuation)
                    if any(c not in fmt.punctuation and not c.isspace() for c in p)
                ]
                assert len(pieces) <= lang.chunk_size
            n += 1
    assert n > 300


def test_chunk_boundaries_follow_timings(fmt):
    """Units at 50/s; word starts at 0.0, 0.1, 0.2, 0.3 s = unit indices 0, 5, 10, 15 (before
    merging). Chunk size 2 and no punctuation: cuts at raw indices 10."""
    import dataclasses

    lang = dataclasses.replace(fmt.languages["en"], chunk_size=2)
    units = [1] * 5 + [2] * 5 + [2] * 3 + [3] * 2 + [4] * 5  # a run crosses the cut at 10
    times = [[0.0, 0.1], [0.1, 0.2], [0.2, 0.3], [0.3, 0.4]]
    chunks = chunk_answer("one two three four", times, units, lang, fmt)
    assert chunks == [("one two", [1, 2]), ("three four", [3, 4])]
    raw = chunk_answer(
        "one two three four", times, units, lang, dataclasses.replace(fmt, merge_repeats=False)
    )
    assert raw == [("one two", units[:10]), ("three four", units[10:])]
    # chunk size 4 (the ablation) gives one chunk; punctuation cuts earlier
    assert (
        len(
            chunk_answer(
                "one two three four", times, units, dataclasses.replace(lang, chunk_size=4), fmt
            )
        )
        == 1
    )
    cut = chunk_answer(
        "one, two three four", times, units, dataclasses.replace(lang, chunk_size=7), fmt
    )
    assert [t for t, _ in cut] == ["one,", "two three four"]
    assert [u for _, us in cut for u in us] == merge_repeats(units)


def test_response_templates(fmt):
    r = build_corpus(0)["s2s_en2en.train"][0]
    msgs = examples("s2s", r, fmt, "x")[0]
    assert msgs[0]["content"].startswith(
        "Please directly answer the questions in the user's speech. This is input: <sosp><"
    )
    resp = msgs[1]["content"]
    assert resp.startswith(f"[question] {r['question_text']} [answer] ") and resp.endswith(
        "<eosp> <eoa>"
    )
    import dataclasses

    seq = examples("s2s", r, dataclasses.replace(fmt, chain="sequential"), "x")[0][1]["content"]
    assert seq == (
        f"[question] {r['question_text']} [answer] {r['answer_text']} "
        f"{speech(merge_repeats(r['answer_units']))} <eoa>"
    )
    cross = build_corpus(0)["s2s_zh2en.train"][0]
    assert examples("s2s", cross, fmt, "x")[0][0]["content"].startswith(
        "Please answer the questions in the user's speech in English."
    )


GOOD = {
    "lang": "en",
    "text": "hello world",
    "units": [1, 1, 2, 3, 3, 0],
    "word_times": [[0.0, 0.04], [0.04, 0.1]],
}
BAD = [
    ("{not json", "<json>"),
    (json.dumps({"lang": "en", "units": [1]}), "text"),
    (json.dumps(dict(GOOD, units=[1, 300])), "units[1]"),
    (json.dumps(dict(GOOD, text="   ")), "text"),
    (json.dumps(dict(GOOD, lang="fr")), "lang"),
    (json.dumps(dict(GOOD, word_times=[[0.05, 0.1], [0.0, 0.04]])), "word_times[1]"),
    (json.dumps(dict(GOOD, word_times=[[0.0, 0.04], [0.04, 9.0]])), "word_times[1]"),
    (json.dumps(dict(GOOD, word_times=[[0.0, 0.04]])), "word_times"),
    (json.dumps({"prompt": "x <sosp><1><2> y", "response": "z"}), "prompt"),
    (json.dumps({"prompt": ["a", "b"], "response": ["c"]}), "response"),
    (json.dumps({"prompt": "say <sosp><1><999><eosp>", "response": "ok"}), "prompt"),
    ("", "<json>"),
]


@pytest.mark.parametrize("line,field", BAD)
def test_bad_records_name_file_line_and_field(tmp_path, fmt, line, field):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(RecordError) as err:
        list(read_jsonl(path, None, fmt))
    assert str(err.value).startswith(f"{path}:2: field '{field}'")


def test_validate_data_cli_strict_and_skip_bad(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD)] + [line for line, _ in BAD] + [json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    assert cli(["validate-data", str(path)]) == 2
    assert f"{path}:2: field '<json>'" in capsys.readouterr().err
    assert cli(["validate-data", str(path), "--skip-bad", "--show", "0"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 2 valid (2 paired), {len(BAD)} skipped" in out


def test_demo_corpus_is_valid(fmt):
    corpus = build_corpus(0)
    for stem, rows in corpus.items():
        for i, r in enumerate(rows):
            from cslm_jax.data.formats import detect_kind

            validate_record(detect_kind(r), r, fmt, f"{stem}:{i + 1}")


def test_inspect_data_shows_the_reference_mask_and_the_option_switches_it(
    real_tokenizer, tmp_path, capsys
):
    """inspect-data with the true Llama-3.1 tokenizer (single and multi-turn instructions): with
    the default data config the mask is the reference loop's, re-derived step by step, and the
    rule is named; `format.loss_mask: assistant_only` masks exactly the system block too."""
    import yaml

    tok_dir = tmp_path / "tok"
    real_tokenizer.save_pretrained(str(tok_dir))
    records = tmp_path / "instruct.jsonl"
    records.write_text(
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"prompt": "What is 2+2?", "response": "4."},
                {"prompt": ["first", "second <sosp><5><eosp>"], "response": ["one", "two"]},
            ]
        )
        + "\n"
    )

    def inspect(config):
        assert (
            cli(
                [
                    "inspect-data",
                    "--tokenizer",
                    str(tok_dir),
                    "--jsonl",
                    str(records),
                    "--kind",
                    "instruct",
                    "--data-config",
                    str(config),
                    "-n",
                    "5",
                ]
            )
            == 0
        )
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    default = inspect(REPO / "configs" / "data" / "demo.yaml")
    assert len(default) == 2
    for ex in default:
        assert ex["loss_mask_rule"] == "reference"
        assert ex["loss_mask"] == reference_loop(real_tokenizer, ex["input_ids"])
    data = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    data["format"]["loss_mask"] = "assistant_only"
    other = tmp_path / "assistant_only.yaml"
    other.write_text(yaml.safe_dump(data, allow_unicode=True))
    switched = inspect(other)
    system_len = len(real_tokenizer.encode(SYSTEM, add_special_tokens=False))
    for a, b in zip(default, switched):
        bos = real_tokenizer.bos_token_id
        assert b["loss_mask_rule"] == "assistant_only" and a["input_ids"] == [bos] + b["input_ids"]
        assert [
            i for i, (x, y) in enumerate(zip(a["loss_mask"][1:], b["loss_mask"])) if x != y
        ] == list(range(system_len))


def test_speech_rate_is_for_synthesis_only():
    """format.speech_rate (the mean run length extract-units prints) sets the synthesis rate of
    merged units, is checked, and leaves the prepared examples' key alone (a cache stays valid)."""
    from cslm_jax.data.prepare import format_key

    path = REPO / "configs" / "data" / "demo.yaml"
    plain = load_data_config(path, check_files=False).format
    rated = load_data_config(path, ["format.speech_rate=1.37"], check_files=False).format
    assert rated.speech_rate == 1.37 and format_key(rated) == format_key(plain)
    assert "speech_rate" not in format_key(rated)
    assert rated.synthesis_rate() == (1.37, "format.speech_rate")
    rate, why = plain.synthesis_rate()
    assert rate == 1.0 and "format.speech_rate is not set" in why
    unmerged = load_data_config(path, ["format.merge_repeats=false"], check_files=False).format
    assert unmerged.synthesis_rate()[0] == 1.0
    with pytest.raises(ConfigError, match=r"format.speech_rate 0.5: the mean run length"):
        load_data_config(path, ["format.speech_rate=0.5"], check_files=False)
    with pytest.raises(ConfigError, match=r"format.speech_rate True: the mean run length"):
        load_data_config(path, ["format.speech_rate=true"], check_files=False)
