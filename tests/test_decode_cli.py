"""`cslm-jax decode` end to end on a tiny CSLM model whose answer is known in advance, the
reference's files (unit file, responses.json) round-tripping, and bad input refused with exit
code 2 and a message naming the file and line."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO
from cslm_jax.cli.main import main as cli
from cslm_jax.config import ConfigError
from cslm_jax.convert.hf import import_hf
from cslm_jax.demo.random_hf import write_random_hf_llama
from cslm_jax.infer.responses import (
    UnitFileError,
    append_results,
    format_unit_line,
    parse_unit_line,
    prompt_template,
    read_results,
    read_unit_file,
    write_unit_file,
)
from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer

UNITS = 16
REFERENCE_DATA = REPO / "configs" / "data" / "cslm_en_zh.yaml"  # decode's default data config
# The answer the model is built to give: no token twice, so a bigram model can say it.
ANSWER = "[question]What[answer]The<sosp><3><12><5><eosp>fox<eoa>"
QUESTIONS = [[1, 1, 2, 7, 7, 7, 0], [15, 3], [4, 4, 4, 4]]


def quiet(*_):
    pass


def write_bigram_cslm(out, tok, answer_ids, first):
    """A transformers Llama whose next token depends on the current token only (attention and MLP
    outputs zeroed) and that continues `first` (the prompt's last token) with `answer_ids`:
    embedding row of the i-th chain token = unit vector i, LM head maps it to the (i+1)-th."""
    chain = [first] + list(answer_ids)
    assert len(set(chain)) == len(chain)
    model = write_random_hf_llama(
        out,
        tok,
        hidden_size=64,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        seed=3,
    )
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for i, tok_id in enumerate(chain):
            model.model.embed_tokens.weight[tok_id] = torch.nn.functional.one_hot(
                torch.tensor(i), 64
            ).float()
            if i + 1 < len(chain):
                model.lm_head.weight[chain[i + 1], i] = 10.0
    model.save_pretrained(str(out))
    return model


@pytest.fixture(scope="module")
def cslm(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("decode_cli")
    tok = load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, UNITS, len(tok))
    answer_ids = tok.encode(ANSWER, add_special_tokens=False)
    header = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    first = tok.encode(header, add_special_tokens=False)[-1]
    write_bigram_cslm(root / "hf", tok, answer_ids, first)
    ckpt = import_hf(root / "hf", root / "ck", log=quiet)  # keeps the tokenizer's layout
    text_only = root / "text_hf"
    write_random_hf_llama(text_only, load_tokenizer(tiny_tokenizer_dir))
    units = root / "questions.txt"
    write_unit_file(units, QUESTIONS)
    return SimpleNamespace(
        root=root,
        tok=tok,
        answer_ids=answer_ids,
        hf=root / "hf",
        ckpt=ckpt,
        units=units,
        text_ckpt=import_hf(text_only, root / "text_ck", speech_units=0, log=quiet),
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decode(tmp_path, capsys, *args, out="out"):
    code = cli(["decode", "--output-dir", str(tmp_path / out), "--max-new-tokens", "24", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- end to end ---------------------------------------------------------------------------------


def test_decode_writes_the_reference_files_and_the_answer(cslm, tmp_path, capsys):
    code, out, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "en",
        "--unit",
        str(cslm.units),
        "--ckpt",
        str(cslm.ckpt),
        "--greedy",
        "--batch-size",
        "2",
    )
    assert code == 0, err
    records = read_jsonl(tmp_path / "out" / "responses.jsonl")
    results = read_results(tmp_path / "out" / "responses.json")
    assert [r["line"] for r in records] == [1, 2, 3]
    tok = cslm.tok
    for r, units, result in zip(records, QUESTIONS, results):
        assert r["output_ids"] == cslm.answer_ids
        assert r["transcript"] == "What" and r["text_chunks"] == ["The", "fox"]
        assert r["answer"] == "The fox" and r["speech_chunks"] == [[3, 12, 5]]
        assert r["finish"] == "eoa" and r["problems"] == []
        assert result == r["result"] == ANSWER
        # the prompt is the reference's English template around the merged units, chat-rendered
        # and tokenized as training tokenizes under the data config's (reference) rule:
        # the tokenizer's BOS in front of the template's
        merged = [u for i, u in enumerate(units) if i == 0 or units[i - 1] != u]
        text = prompt_template("en", False, REFERENCE_DATA)[0].format(
            speech="<sosp>" + format_unit_line(merged) + "<eosp>"
        )
        want = tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        )
        assert want[:2] == [tok.bos_token_id] * 2
        assert r["input_ids"] == want
        t = r["timing"]
        sosp = cslm.answer_ids.index(tok.convert_tokens_to_ids("<sosp>"))
        eosp = cslm.answer_ids.index(tok.convert_tokens_to_ids("<eosp>"))
        assert (
            t["tokens_before_first_speech"] == sosp
            and t["tokens_to_first_speech_chunk"] == eosp + 1
        )
        assert (
            0
            < t["time_to_first_token_s"]
            <= t["time_to_speech_start_s"]
            <= t["time_to_first_speech_chunk_s"]
            <= t["total_s"]
        )
        assert t["generated_tokens"] == len(cslm.answer_ids)
    assert [r["timing"]["batch_size"] for r in records] == [2, 2, 1]
    summary = json.loads((tmp_path / "out" / "latency_summary.json").read_text())
    assert summary["answers"] == 3
    assert summary["tokens_before_first_speech"]["mean"] == sosp
    assert "time to first speech chunk" in out

    # A second run appends with --append (as the reference does); the cross-lingual prompt is
    # the other one.
    code, _, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "zh",
        "--cross-lingual",
        "--unit",
        str(cslm.units),
        "--hf-dir",
        str(cslm.hf),
        "--seed",
        "1",
        "--append",
    )
    assert code == 0, err
    records = read_jsonl(tmp_path / "out" / "responses.jsonl")
    assert len(records) == len(read_results(tmp_path / "out" / "responses.json")) == 6
    zh = records[3:]
    assert all(r["lang"] == "zh" and r["cross_lingual"] for r in zh)
    # sampled (top-p 0.7) from an HF folder: this model's answer is certain, so it is the same
    assert all(r["output_ids"] == cslm.answer_ids for r in zh)
    assert all(r["answer"] == "Thefox" for r in zh)  # zh chunks join without spaces
    prompt = tok.decode(zh[0]["input_ids"])
    assert "用中文回答用户语音中的问题。 这是输入: <sosp><1><2><7><0><eosp>。" in prompt


def test_any_language_of_the_data_config_can_answer(cslm, tmp_path, capsys):
    """--lang is a language of --data-config (default: en and zh), not a fixed list; an unknown
    one exits 2 naming the config's languages."""
    code, _, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "fr",
        "--unit",
        str(cslm.units),
        "--ckpt",
        str(cslm.ckpt),
        "--greedy",
    )
    assert code == 2 and "--lang 'fr'" in err and "its languages: en, zh" in err, err
    assert not (tmp_path / "out").exists()
    cfg = yaml.safe_load(REFERENCE_DATA.read_text())
    cfg["languages"]["fr"] = dict(
        cfg["languages"]["en"],
        name="French",
        s2s_prompt="Réponds à la question orale. Entrée : {speech}.",
    )
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    code, _, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "fr",
        "--unit",
        str(cslm.units),
        "--ckpt",
        str(cslm.ckpt),
        "--greedy",
        "--data-config",
        str(data),
    )
    assert code == 0, err
    records = read_jsonl(tmp_path / "out" / "responses.jsonl")
    assert [r["lang"] for r in records] == ["fr"] * 3
    assert all(r["output_ids"] == cslm.answer_ids and r["answer"] == "The fox" for r in records)
    assert "Réponds à la question orale. Entrée : <sosp><1><2><7><0><eosp>." in cslm.tok.decode(
        records[0]["input_ids"]
    )


def test_stream_prints_events_in_order(cslm, tmp_path, capsys):
    code, out, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "en",
        "--unit",
        str(cslm.units),
        "--ckpt",
        str(cslm.ckpt),
        "--greedy",
        "--stream",
    )
    assert code == 0, err
    for q in (1, 2, 3):
        lines = [line for line in out.splitlines() if line.startswith(f"[{q}] ")]
        kinds = [line.split()[2] for line in lines]
        assert kinds == ["transcript", "text", "speech", "text", "end"], lines
        assert "'What'" in lines[0] and "<3><12><5>" in lines[2] and "(eoa)" in lines[4]
        stamps = [float(line.split()[1].rstrip("s")) for line in lines]
        assert stamps == sorted(stamps)


def test_a_run_folder_is_accepted_as_ckpt_in_either_compute_dtype(cslm, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(cslm.ckpt)
    single = tmp_path / "one.txt"
    single.write_text("<sosp> <1> <2> <eosp>\n")  # spaces are removed
    # float32 on CPU multiplies with the native kernel; bfloat16 with XLA's dot (and says so)
    for i, (dtype, says) in enumerate(
        [("float32", "CPU decoding kernel: on"), ("bfloat16", "not used for bfloat16")]
    ):
        code, out, err = decode(
            tmp_path,
            capsys,
            "--lang",
            "en",
            "--unit",
            str(single),
            "--ckpt",
            str(run),
            "--greedy",
            "--compute-dtype",
            dtype,
            *(["--append"] if i else []),
        )
        assert code == 0, err
        assert says in out
        assert read_jsonl(tmp_path / "out" / "responses.jsonl")[i]["output_ids"] == cslm.answer_ids


# -- interrupted runs resume (issue 29, item 8) ------------------------------------------------------

CLI = [
    sys.executable,
    "-c",
    "import sys; from cslm_jax.cli.main import main; sys.exit(main(sys.argv[1:]))",
]


def test_a_run_interrupted_by_ctrl_c_resumes_where_it_stopped(cslm, tmp_path, capsys):
    """SIGINT to a running `cslm-jax decode` once it has written answers; the same command run
    again answers only the other questions: one line per question in both files, in question
    order, the interrupted run's lines kept as they were."""
    n = 60  # one prompt length: one compilation; about 30 ms per answer
    questions = [[(i * 7 + j) % UNITS for j in range(4)] for i in range(n)]
    units = tmp_path / "many.txt"
    write_unit_file(units, questions)
    out = tmp_path / "out"
    args = [
        "decode",
        "--lang",
        "en",
        "--unit",
        str(units),
        "--ckpt",
        str(cslm.ckpt),
        "--output-dir",
        str(out),
        "--max-new-tokens",
        "24",
        "--batch-size",
        "2",
        "--seed",
        "5",
    ]
    proc = subprocess.Popen(
        CLI + args,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    jsonl = out / "responses.jsonl"
    deadline = time.monotonic() + 300
    while not (jsonl.is_file() and jsonl.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, f"decode ended before answering: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no answer within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "cslm-jax decode: interrupted (Ctrl-C)"
    before = jsonl.read_text(encoding="utf-8")
    answered = read_jsonl(jsonl)
    assert 1 <= len(answered) < n, "interrupted while questions were left"
    assert [r["index"] for r in answered] == list(range(len(answered)))

    code, printed, err = cli(args), *capsys.readouterr()
    assert code == 0, err
    assert f"resuming: {len(answered)} of {n} question(s) answered already" in printed
    records = read_jsonl(jsonl)
    assert [r["index"] for r in records] == list(range(n))
    assert [r["line"] for r in records] == list(range(1, n + 1))
    assert jsonl.read_text(encoding="utf-8").startswith(before)
    assert all(r["output_ids"] == cslm.answer_ids for r in records)
    assert read_results(out / "responses.json") == [r["result"] for r in records]
    summary = json.loads((out / "latency_summary.json").read_text())
    assert summary["answers"] == n and summary["answered_before"] == len(answered)
    # complete now: a third run has nothing to resume and is refused; --append answers again
    code, _, err = cli(args), *capsys.readouterr()
    assert code == 2 and f"already holds answers to all {n} question(s)" in err, err
    assert len(read_jsonl(jsonl)) == n


def test_resume_lines_up_responses_json_and_drops_a_cut_line(cslm, tmp_path, capsys):
    """What an interruption can leave: responses.jsonl ahead of responses.json by a batch and a
    record cut off mid-write; a folder the reference's scripts began (lines before ours) keeps
    those lines. Another run's answers are no run to resume: refused without --append."""
    n = len(QUESTIONS)
    args = ["--lang", "en", "--unit", str(cslm.units), "--ckpt", str(cslm.ckpt), "--greedy"]
    assert decode(tmp_path, capsys, *args, out="full")[0] == 0
    full = (tmp_path / "full" / "responses.jsonl").read_text(encoding="utf-8").splitlines(True)
    out = tmp_path / "out"
    out.mkdir()
    reference = [json.dumps({"result": "an answer the reference's script wrote"}) + "\n"]
    (out / "responses.jsonl").write_text(full[0] + full[1][:40], encoding="utf-8")
    (out / "responses.json").write_text(reference[0] + '{"resu', encoding="utf-8")
    code, printed, err = decode(tmp_path, capsys, *args)
    assert code == 0, err
    assert "dropped the last line" in printed and "resuming: 1 of 3" in printed
    records = read_jsonl(out / "responses.jsonl")
    assert [r["index"] for r in records] == list(range(n))
    assert (out / "responses.jsonl").read_text(encoding="utf-8").startswith(full[0])
    assert (out / "responses.json").read_text(encoding="utf-8").splitlines(True)[:1] == reference
    assert read_results(out / "responses.json")[1:] == [r["result"] for r in records]
    # interrupted after its last answer, before responses.json had it: the files are completed
    # (nothing decoded); complete, the run is refused
    answers = (out / "responses.jsonl").read_text(encoding="utf-8")
    lines = (out / "responses.json").read_text(encoding="utf-8").splitlines(True)
    (out / "responses.json").write_text("".join(lines[:-1]), encoding="utf-8")
    (out / "latency_summary.json").unlink()
    code, printed, err = decode(tmp_path, capsys, *args)
    assert code == 0, err
    assert "are answered already" in printed and "compiled" not in printed
    assert (out / "responses.json").read_text(encoding="utf-8").splitlines(True) == lines
    assert (out / "responses.jsonl").read_text(encoding="utf-8") == answers
    assert json.loads((out / "latency_summary.json").read_text())["answers"] == n
    code, _, err = decode(tmp_path, capsys, *args)
    assert code == 2 and "nothing to resume" in err and "--append" in err

    # the same questions with another seed, or another model, are another run
    other = tmp_path / "other"
    other.mkdir()
    (other / "responses.jsonl").write_text(full[0], encoding="utf-8")
    code, _, err = decode(tmp_path, capsys, *args[:-1], "--seed", "1", out="other")
    assert code == 2 and "not an interrupted run of these questions with these settings" in err
    assert "--append" in err and (other / "responses.jsonl").read_text() == full[0]


# -- the reference's file formats ------------------------------------------------------------------


def test_unit_file_round_trip(tmp_path):
    questions = [[0, 5, 5, 4095], [12], list(range(300))]
    path = tmp_path / "units.txt"
    write_unit_file(path, questions)
    lines = path.read_text().splitlines()
    assert lines[0] == "<0><5><5><4095>" and " " not in path.read_text()
    assert read_unit_file(path) == questions
    # the forms a reference file may take parse to the same units
    for line in (
        "<0><5><5><4095>",
        "<0> <5> <5> <4095>",
        "<sosp><0><5><5><4095><eosp>",
        " <sosp> <0><5> <5><4095> <eosp>\t",
    ):
        assert parse_unit_line(line, "f:1") == questions[0]


def test_responses_json_round_trip(tmp_path):
    results = [
        "[question] hi [answer] Hello <sosp><1><2><eosp> <eoa>",
        '直接回答 "quoted"\nnewline',
        "",
    ]
    path = tmp_path / "responses.json"
    append_results(path, results[:2])
    append_results(path, results[2:])
    assert read_results(path) == results
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(set(json.loads(x)) == {"result"} for x in lines)
    assert "直接回答" in lines[1]  # UTF-8, not \\u escapes


def test_default_prompts_are_the_reference_recipes():
    """The default data config (configs/data/cslm_en_zh.yaml) holds the reference recipe's
    prompts (CSLM.md section 5) and chunk units."""
    assert prompt_template("en", False, REFERENCE_DATA)[0].format(speech="<sosp><1><eosp>") == (
        "Please directly answer the questions in the user's speech. This is input: <sosp><1><eosp>."
    )
    assert prompt_template("en", True, REFERENCE_DATA) == (
        "Please answer the questions in the user's speech in English. This is input: {speech}.",
        "word",
    )
    assert prompt_template("zh", False, REFERENCE_DATA) == (
        "直接回答用户语音中的问题。 这是输入: {speech}。",
        "char",
    )
    assert (
        prompt_template("zh", True, REFERENCE_DATA)[0]
        == "用中文回答用户语音中的问题。 这是输入: {speech}。"
    )
    with pytest.raises(ConfigError, match="--lang 'fr'.*its languages: en, zh"):
        prompt_template("fr", False, REFERENCE_DATA)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content,line,words",
    [
        ("<1><2>\n\n<3>\n", 2, ["empty line"]),
        ("<1><2>\n   \n", 2, ["empty line"]),
        ("<1><2>\n12 907 33\n", 2, ["column 1", "bare numbers"]),
        ("<1><x2>\n", 1, ["column 4", "<x2>"]),
        ("<1><eosp>\n", 1, ["<eosp> without <sosp>"]),
        ("<sosp><1><2>\n", 1, ["not closed"]),
    ],
)
def test_malformed_unit_file_names_the_line(cslm, tmp_path, capsys, content, line, words):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    code, _, err = decode(
        tmp_path, capsys, "--lang", "en", "--unit", str(bad), "--ckpt", str(cslm.ckpt)
    )
    assert code == 2
    assert f"{bad}:{line}:" in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "out" / "responses.json").exists()


def test_units_outside_the_codebook_name_the_line(cslm, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text(f"<1><2>\n<3><{UNITS}><4>\n")
    code, _, err = decode(
        tmp_path, capsys, "--lang", "en", "--unit", str(bad), "--ckpt", str(cslm.ckpt)
    )
    assert code == 2
    assert f"{bad}:2:" in err and f"<{UNITS}>" in err and f"<0>..<{UNITS - 1}>" in err, err
    assert not (tmp_path / "out" / "responses.json").exists()


def test_a_model_without_speech_units_is_refused(cslm, tmp_path, capsys):
    code, _, err = decode(
        tmp_path, capsys, "--lang", "en", "--unit", str(cslm.units), "--ckpt", str(cslm.text_ckpt)
    )
    assert code == 2
    assert str(cslm.text_ckpt) in err and "no speech units" in err, err


def test_missing_inputs_are_named(cslm, tmp_path, capsys):
    code, _, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "en",
        "--unit",
        str(tmp_path / "nope.txt"),
        "--ckpt",
        str(cslm.ckpt),
    )
    assert code == 2 and "nope.txt" in err and "not found" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = decode(
        tmp_path, capsys, "--lang", "en", "--unit", str(empty), "--ckpt", str(cslm.ckpt)
    )
    assert code == 2 and "empty.txt" in err and "empty" in err
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = decode(
        tmp_path, capsys, "--lang", "en", "--unit", str(cslm.units), "--ckpt", str(plain)
    )
    assert code == 2 and str(plain) in err and "cslm_checkpoint.json" in err
    with pytest.raises(UnitFileError, match="f.txt:3: no unit tokens"):
        parse_unit_line("<sosp><eosp>", "f.txt:3")


# -- the reference's prompt and result (--prompt-style reference) ---------------------------------


@pytest.mark.parametrize("which", ["llama3", "demo"])
def test_reference_prompt_is_decode_generals(which, tiny_tokenizer_dir):
    """[user, assistant ""] through the tokenizer's own template: the Llama-3.1 template closes
    the empty assistant turn (so nothing is stripped), and tokenizer(text) adds a second BOS."""
    from cslm_jax.infer.responses import REFERENCE_STRIP, reference_prompt
    from cslm_jax.model.vocab import llama3_tokenizer

    tok = llama3_tokenizer() if which == "llama3" else load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, UNITS, len(tok))
    text = "Please directly answer the questions in the user's speech. This is input: <sosp><1><2><eosp>."
    rendered, ids = reference_prompt(tok, text, "test")
    full = tok.apply_chat_template(
        [{"role": "user", "content": text}, {"role": "assistant", "content": ""}], tokenize=False
    )
    assert not full.endswith(REFERENCE_STRIP) and rendered == full
    assert rendered.endswith(
        f"{text}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>"
    )
    bos = tok.bos_token_id
    assert ids[:2] == [bos, bos] and ids[2] != bos and ids == tok(rendered).input_ids
    assert ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_reference_tags_are_the_scripts():
    from cslm_jax.infer.responses import reference_tag

    assert reference_tag(prompt_template("en", False, REFERENCE_DATA)[0]) == "This is input: <sosp>"
    assert reference_tag(prompt_template("en", True, REFERENCE_DATA)[0]) == "This is input: <sosp>"
    assert reference_tag(prompt_template("zh", False, REFERENCE_DATA)[0]) == "这是输入: <sosp>"
    assert reference_tag(prompt_template("zh", True, REFERENCE_DATA)[0]) == "这是输入: <sosp>"


def test_prompt_style_reference_writes_what_the_reference_writes(cslm, tmp_path, capsys):
    """A model that answers the reference prompt (after its closed empty assistant turn it goes
    on with the answer): greedy `decode --prompt-style reference` writes the responses.json that
    the reference's extraction rule builds from transformers' `generate` on the same prompt, and
    responses.jsonl still parses the answer."""
    from transformers import LlamaForCausalLM

    from cslm_jax.infer.decode import default_stop_ids
    from cslm_jax.infer.responses import reference_prompt
    from cslm_jax.storage.checkpoint import read_metadata

    tok = cslm.tok
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    write_bigram_cslm(tmp_path / "ref_hf", tok, cslm.answer_ids, eot)
    code, _, err = decode(
        tmp_path,
        capsys,
        "--lang",
        "en",
        "--unit",
        str(cslm.units),
        "--hf-dir",
        str(tmp_path / "ref_hf"),
        "--greedy",
        "--prompt-style",
        "reference",
    )
    assert code == 0, err
    results = read_results(tmp_path / "out" / "responses.json")
    records = read_jsonl(tmp_path / "out" / "responses.jsonl")

    hf = LlamaForCausalLM.from_pretrained(
        str(tmp_path / "ref_hf"), attn_implementation="eager", dtype=torch.float32
    ).eval()
    stops = default_stop_ids(tok, read_metadata(cslm.ckpt)[2])
    template = prompt_template("en", False, REFERENCE_DATA)[0]
    for units, result, r in zip(QUESTIONS, results, records):
        text = template.format(speech="<sosp>" + format_unit_line(units) + "<eosp>")  # not merged
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}, {"role": "assistant", "content": ""}],
            tokenize=False,
        )
        ids = tok(rendered, return_tensors="pt").input_ids
        assert r["input_ids"] == ids[0].tolist() == reference_prompt(tok, text, "t")[1]
        with torch.no_grad():
            seq = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=24,
                eos_token_id=stops,
                pad_token_id=0,
            )
        decoded = tok.batch_decode(seq, skip_special_tokens=True)[0] + "<eoa>"
        start = decoded.index("This is input: <sosp>") + len("This is input: <sosp>")
        want = decoded[start : decoded.index("<eoa>", start)]
        assert result == r["result"] == want
        # the question's units, the empty assistant turn's header text, then the answer
        assert want == format_unit_line(units) + "<eosp>.assistant\n\n" + ANSWER[: -len("<eoa>")]
        assert r["output_ids"] == cslm.answer_ids and r["prompt_style"] == "reference"
        assert r["transcript"] == "What" and r["text_chunks"] == ["The", "fox"]
        assert r["speech_chunks"] == [[3, 12, 5]] and r["finish"] == "eoa" and r["problems"] == []


def test_the_assistant_header_opened_after_a_reference_prompt_is_no_event(cslm):
    """With --prompt-style reference the model first opens an assistant header: those ids are
    held back and dropped; a generation that does not start with it is parsed whole."""
    from cslm_jax.infer.decode import EventParser, parse_events
    from cslm_jax.infer.responses import ASSISTANT_HEADER, SkipPrefix
    from cslm_jax.storage.checkpoint import read_metadata

    tok, vocab = cslm.tok, read_metadata(cslm.ckpt)[2]
    header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False)
    assert len(header) > 2

    def events(ids):
        p = SkipPrefix(EventParser(tok, vocab), header)
        return [e for t in ids for e in p.feed(t)] + p.close()

    answer = cslm.answer_ids
    assert events(header + answer) == parse_events(answer, tok, vocab)
    assert events(answer) == parse_events(answer, tok, vocab)
    assert events(header[:2] + answer) == parse_events(header[:2] + answer, tok, vocab)
    assert events(header[:2]) == parse_events(header[:2], tok, vocab)  # cut off inside it


def test_output_dir_is_checked_before_the_model_loads(cslm, tmp_path, capsys):
    """Issue 29 item 5: a folder that cannot be made (a file on its way), one that holds the
    checkpoint, or a file: exit 2 before the model loads (nothing logged, nothing written)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    before = sorted(p.name for p in cslm.ckpt.iterdir())
    for out, message in (
        (
            a_file / "out",
            f"--output-dir {a_file / 'out'}: {a_file} is a file, "
            f"so the folder cannot be created under it",
        ),
        (cslm.ckpt.parent, "contains the input"),
        (cslm.units, "is a file, not a folder"),
    ):
        code = cli(
            [
                "decode",
                "--lang",
                "en",
                "--unit",
                str(cslm.units),
                "--ckpt",
                str(cslm.ckpt),
                "--output-dir",
                str(out),
            ]
        )
        captured = capsys.readouterr()
        assert code == 2 and message in captured.err, captured.err
        assert captured.out == ""  # nothing loaded, nothing decoded
    assert sorted(p.name for p in cslm.ckpt.iterdir()) == before
