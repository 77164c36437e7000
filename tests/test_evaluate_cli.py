"""`cslm-jax evaluate` end to end on tiny models whose answers are known in advance (the bigram
models of test_decode_cli), so every score is computed by hand; bad input exits 2."""

import json
from types import SimpleNamespace

import pytest
import sacrebleu
import yaml

from cslm_jax.cli.main import main as cli
from cslm_jax.convert.hf import import_hf
from cslm_jax.demo.random_hf import write_random_hf_llama
from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer
from test_decode_cli import write_bigram_cslm

UNITS = 16
S2S_ANSWER = "[question]Please answer[answer]The quick<sosp><3><12><5><eosp>brown fox<eoa>"
TEXT_ANSWER = "The quick brown fox"  # then <|eot_id|>

LANGS = {
    "en": {
        "name": "English",
        "chunk_unit": "word",
        "chunk_size": 7,
        "asr_prompt": "Transcribe: {speech}",
        "tts_prompt": "Say: {text}",
        "mt_prompt": "Translate {src_name} into English: {text}",
        "s2s_prompt": "Answer: {speech}.",
        "s2s_cross_prompt": "Answer in English: {speech}.",
    },
    "zh": {
        "name": "Chinese",
        "chunk_unit": "char",
        "chunk_size": 10,
        "asr_prompt": "转写: {speech}",
        "tts_prompt": "读: {text}",
        "mt_prompt": "翻译: {text}",
        "s2s_prompt": "回答: {speech}。",
        "s2s_cross_prompt": "用中文回答: {speech}。",
    },
}


def s2s(q_text, q_lang, a_text, a_lang, n_timed):
    return {
        "question_units": [0, 1, 2, 0],
        "question_text": q_text,
        "question_lang": q_lang,
        "answer_text": a_text,
        "answer_units": [0, 3, 12, 5, 9, 0],
        "answer_word_times": [[0.02 * (i + 1), 0.02 * (i + 2)] for i in range(n_timed)],
        "answer_lang": a_lang,
    }


def write_jsonl(path, rows):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path.name


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("evaluate_cli")
    tok = load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, UNITS, len(tok))
    header = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    first = tok.encode(header, add_special_tokens=False)[-1]
    write_bigram_cslm(root / "s2s_hf", tok, tok.encode(S2S_ANSWER, add_special_tokens=False), first)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    write_bigram_cslm(
        root / "text_hf", tok, tok.encode(TEXT_ANSWER, add_special_tokens=False) + [eot], first
    )
    quiet = lambda *_: None  # noqa: E731
    s2s_ckpt = import_hf(root / "s2s_hf", root / "s2s_ck", log=quiet)
    text_ckpt = import_hf(root / "text_hf", root / "text_ck", log=quiet)
    write_random_hf_llama(root / "plain_hf", load_tokenizer(tiny_tokenizer_dir))
    plain_ckpt = import_hf(root / "plain_hf", root / "plain_ck", speech_units=0, log=quiet)

    data = root / "data"
    data.mkdir()
    files = {
        "s2s_en": write_jsonl(
            data / "s2s_en.jsonl",
            [
                s2s("Please answer", "en", "The quick brown fox", "en", 4),
                s2s("please answer me", "en", "the quick red fox", "en", 4),
            ],
        ),
        "s2s_en2zh": write_jsonl(
            data / "s2s_en2zh.jsonl", [s2s("Please answer", "en", "狐狸很快", "zh", 4)]
        ),
        "asr_en": write_jsonl(
            data / "asr_en.jsonl",
            [
                {"lang": "en", "text": "The quick brown fox.", "units": [1, 2, 3]},
                {"lang": "en", "text": "the slow brown fox", "units": [4, 4, 5]},
            ],
        ),
        "mt": write_jsonl(
            data / "mt.jsonl",
            [
                {
                    "src_lang": "zh",
                    "tgt_lang": "en",
                    "src": "快速的棕色狐狸",
                    "tgt": "The quick brown fox",
                },
                {"src_lang": "en", "tgt_lang": "zh", "src": "a quick fox", "tgt": "一只快狐狸"},
            ],
        ),
        "tts_en": write_jsonl(
            data / "tts_en.jsonl", [{"lang": "en", "text": "the quick fox", "units": [3, 3, 12, 9]}]
        ),
        "instruct": write_jsonl(data / "instruct.jsonl", [{"prompt": "hi", "response": "hello"}]),
    }
    config = {
        "data_dir": ".",
        "format": {"unit_count": UNITS},
        "languages": LANGS,
        "stages": {
            "sft": [
                {"kind": "s2s", "lang": "en", "validation": [files["s2s_en"]]},
                {"kind": "s2s", "lang": "en2zh", "validation": [files["s2s_en2zh"]]},
                {"kind": "asr", "lang": "en", "validation": [files["asr_en"]]},
                {"kind": "asr", "lang": "zh", "train": [files["asr_en"]]},  # no validation split
                {"kind": "mt", "validation": [files["mt"]]},
                {"kind": "tts", "lang": "en", "validation": [files["tts_en"]]},
                {"kind": "instruct", "validation": [files["instruct"]]},
            ]
        },
    }
    (data / "data.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    lexicon = root / "lexicon.json"
    lexicon.write_text(
        json.dumps({"silence": [0], "table": {"the": [3], "quick": [12], "brown": [5], "fox": [9]}})
    )
    return SimpleNamespace(
        root=root,
        config=data / "data.yaml",
        s2s=s2s_ckpt,
        text=text_ckpt,
        plain=plain_ckpt,
        lexicon=lexicon,
    )


def evaluate(setup, capsys, task, ckpt, *args):
    out = setup.root / f"{task}_{ckpt.name}_{len(args)}.json"  # apart: no --force needed
    code = cli(
        [
            "evaluate",
            "--config",
            str(setup.config),
            "--task",
            task,
            "--ckpt",
            str(ckpt),
            "--output",
            str(out),
            "--batch-size",
            "2",
            *args,
        ]
    )
    captured = capsys.readouterr()
    result = json.loads(out.read_text(encoding="utf-8")) if code == 0 else None
    return code, captured.out, captured.err, result


def test_spoken_qa_scores_transcript_answer_off_target_and_consistency(setup, capsys):
    code, out, err, r = evaluate(
        setup, capsys, "cslm_sft_s2s_en", setup.s2s, "--unit-lexicon", str(setup.lexicon)
    )
    assert code == 0, err
    m = r["metrics"]
    assert [e["transcript"] for e in r["examples"]] == ["Please answer"] * 2
    assert [e["answer"] for e in r["examples"]] == ["The quick brown fox"] * 2
    # transcripts: 0 + 1 deletion ("me") over 2 + 3 words; answers: 0 + 1 substitution over 8
    assert m["transcript_error_rate"] == pytest.approx(1 / 5)
    assert m["answer_error_rate"] == pytest.approx(1 / 8)
    assert m["off_target_ratio"] == 0.0 and m["off_target"]["scored"] == 2
    # speech <3><12><5> reads "the quick brown": 1 deletion ("fox") per 4-word answer
    assert [e["speech_as_text"] for e in r["examples"]] == ["the quick brown"] * 2
    assert m["consistency_error_rate"] == pytest.approx(1 / 4)
    assert m["well_formed"] == 1.0 and m["speech_chunks_per_answer"] == 1.0
    for row in (
        "transcript WER",
        "20.0%",
        "answer text WER",
        "12.5%",
        "off-target ratio",
        "text/speech consistency error  25.0%",
    ):
        assert row in out


def test_cross_lingual_answers_in_the_wrong_language_are_off_target(setup, capsys):
    code, out, err, r = evaluate(setup, capsys, "cslm_sft_s2s_en2zh", setup.s2s)
    assert code == 0, err
    m = r["metrics"]
    assert m["off_target_ratio"] == 1.0 and r["examples"][0]["detected_lang"] == "en"
    assert m["answer_error_rate_name"] == "CER"
    # the demo table does not read this corpus' units back: auto leaves consistency off
    assert m["consistency_error_rate"] is None and r["unit_lexicon"] is None
    assert "auto: off" in r["unit_lexicon_note"] and "no unit lexicon" in out


def test_asr_word_error_rate(setup, capsys):
    code, out, err, r = evaluate(setup, capsys, "cslm_sft_asr_en", setup.text)
    assert code == 0, err
    assert [e["hypothesis"] for e in r["examples"]] == [TEXT_ANSWER] * 2
    assert r["metrics"]["error_rate"] == pytest.approx(1 / 8)  # "slow" -> "quick"
    assert r["metrics"]["error_rate_name"] == "WER" and r["metrics"]["exact"] == 0.5
    assert "WER" in out and "12.5%" in out


def test_evaluate_sharded_over_tensor(setup, capsys):
    """--tensor 2: the weights and cache split over 2 of the 8 fake CPU devices, the same
    answers and scores."""
    code, _, err, r = evaluate(setup, capsys, "cslm_sft_asr_en", setup.text, "--tensor", "2")
    assert code == 0, err
    assert [e["hypothesis"] for e in r["examples"]] == [TEXT_ANSWER] * 2
    assert r["metrics"]["error_rate"] == pytest.approx(1 / 8)
    code, _, err, _ = evaluate(  # (one more argument: another output file)
        setup, capsys, "cslm_sft_asr_en", setup.text, "--tensor", "3", "--force"
    )
    assert code == 2 and "--tensor 3" in err


def test_mt_bleu_and_chrf_per_direction(setup, capsys):
    code, out, err, r = evaluate(setup, capsys, "cslm_sft_mt", setup.text, "--max-examples", "3")
    assert code == 0, err
    m = r["metrics"]
    refs = ["The quick brown fox", "快速的棕色狐狸", "一只快狐狸"]
    hyps = [TEXT_ANSWER] * 3
    assert [e["reference"] for e in r["examples"]] == refs and m["examples"] == 3
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert m["directions"]["zh->en"]["bleu"] == pytest.approx(100.0)
    assert m["directions"]["en->zh"]["bleu"] == pytest.approx(0.0)
    assert m["directions"]["en->zh"]["bleu_tokenize"] == "zh"
    assert "BLEU (zh)" in out and "zh->en" in out


def test_tts_unit_error_rate_and_speech_read_back(setup, capsys):
    code, out, err, r = evaluate(
        setup, capsys, "cslm_sft_tts_en", setup.s2s, "--unit-lexicon", str(setup.lexicon)
    )
    assert code == 0, err
    m = r["metrics"]
    # generated <3><12><5> vs reference 3 3 12 9 (merged: 3 12 9): one substitution in 3
    assert r["examples"][0]["units"] == [3, 12, 5] and m["unit_error_rate"] == pytest.approx(1 / 3)
    # read back "the quick brown" vs "the quick fox"
    assert m["readback_error_rate"] == pytest.approx(1 / 3) and m["with_speech"] == 1.0
    assert "unit error rate" in out and "33.3%" in out


@pytest.mark.parametrize(
    "task, ckpt, message",
    [
        ("cslm_sft_nope", "s2s", "no such task"),
        ("cslm_sft_asr_zh", "s2s", "has no validation split"),
        ("cslm_sft_instruct", "s2s", "evaluate supports asr, mt, s2s, tts"),
        ("cslm_sft_asr_en", "plain", "no speech units"),
        ("cslm_sft_asr_en", "missing", "neither a model checkpoint"),
    ],
)
def test_bad_input_exits_2(setup, capsys, task, ckpt, message):
    path = setup.root / "missing" if ckpt == "missing" else getattr(setup, ckpt)
    code, _, err, _ = evaluate(setup, capsys, task, path)
    assert code == 2 and message in err and "cslm-jax evaluate: error:" in err


def test_ckpt_is_required_outside_a_run_folder(setup, capsys):
    code = cli(["evaluate", "--config", str(setup.config), "--task", "cslm_sft_asr_en"])
    assert code == 2 and "--ckpt is required" in capsys.readouterr().err


def test_an_existing_output_needs_force(setup, capsys):
    """As every other command's outputs: an existing --output is refused (exit 2) before
    anything is decoded, and replaced with --force."""
    out = setup.root / "force.json"
    args = [
        "evaluate",
        "--config",
        str(setup.config),
        "--task",
        "cslm_sft_asr_en",
        "--ckpt",
        str(setup.text),
        "--output",
        str(out),
        "--batch-size",
        "2",
    ]
    out.write_text("earlier results\n")
    assert cli(args) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"cslm-jax evaluate: error: --output {out}: exists; pass --force to replace it\n"
    )
    assert captured.out == "" and out.read_text() == "earlier results\n"  # nothing decoded
    assert cli(args + ["--force"]) == 0
    assert json.loads(out.read_text())["metrics"]["error_rate"] == pytest.approx(1 / 8)


def test_output_paths_are_checked_before_anything_is_decoded(setup, capsys, tmp_path):
    """Issue 29 item 5: --output a folder (it decoded every example, then died with
    IsADirectoryError), under a file, or where nothing can be written: exit 2 at once."""
    (tmp_path / "file.jsonl").write_text("x")
    base = [
        "evaluate",
        "--config",
        str(setup.config),
        "--task",
        "cslm_sft_asr_en",
        "--ckpt",
        str(setup.text),
        "--batch-size",
        "2",
    ]
    for out, message in (
        (tmp_path, "is a folder; --output names a file"),
        (
            tmp_path / "file.jsonl" / "out.json",
            "file.jsonl is a file, so the file cannot be created under it",
        ),
        ("/sys/x.json", "cannot write in /sys"),
    ):
        assert cli(base + ["--output", str(out), "--force"]) == 2
        captured = capsys.readouterr()
        assert f"--output {out}:" in captured.err and message in captured.err, captured.err
        assert captured.out == ""  # nothing decoded
