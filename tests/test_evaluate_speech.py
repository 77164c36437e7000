"""`cslm-jax evaluate` on audio (issue 26): a tiny CSLM model whose answers are known (a bigram
chain, as in test_evaluate_cli), a random token2wav, the tiny random Whisper, a MOS predictor
defined here and a judge on loopback: TTS and spoken-QA tasks end to end, every audio measure
present and computed from the wavs written; bad flag combinations exit 2 before any model
loads."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import yaml

from cslm_jax.cli.main import main as cli
from cslm_jax.convert.hf import import_hf
from cslm_jax.eval.asr import WhisperAsr, save_random_whisper, transcript_error_rates
from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer
from cslm_jax.speech.token2wav import save_random_token2wav
from test_decode_cli import write_bigram_cslm
from test_evaluate_cli import LANGS, s2s, write_jsonl
from test_judge import ChatServer

UNITS = 16
SPEECH = [3, 12, 5, 7, 1, 9, 2, 4, 6, 8, 10, 11]
ANSWER = (
    "[question]Please answer[answer]The quick<sosp>"
    + "".join(f"<{u}>" for u in SPEECH)
    + "<eosp>brown fox<eoa>"
)


def loudness(wave, rate):
    """A stand-in MOS predictor: 1 + 4 x RMS (capped at 1)."""
    return 1.0 + 4.0 * min(1.0, float(np.sqrt(np.mean(wave**2))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    root = tmp_path_factory.mktemp("evaluate_speech")
    tok = load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, UNITS, len(tok))
    header = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    first = tok.encode(header, add_special_tokens=False)[-1]
    write_bigram_cslm(root / "hf", tok, tok.encode(ANSWER, add_special_tokens=False), first)
    ckpt = import_hf(root / "hf", root / "ck", log=lambda *_: None)
    data = root / "data"
    data.mkdir()
    files = {
        "s2s": write_jsonl(
            data / "s2s_en.jsonl",
            [
                s2s("Please answer", "en", "The quick brown fox", "en", 4),
                s2s("please answer me", "en", "the quick red fox", "en", 4),
            ],
        ),
        "tts": write_jsonl(
            data / "tts_en.jsonl",
            [
                {"lang": "en", "text": "the quick fox", "units": [3, 3, 12, 9]},
                {"lang": "en", "text": "a brown dog", "units": [4, 5]},
            ],
        ),
        "asr": write_jsonl(
            data / "asr_en.jsonl", [{"lang": "en", "text": "The quick fox.", "units": [1, 2]}]
        ),
    }
    config = {
        "data_dir": ".",
        "format": {"unit_count": UNITS},
        "languages": LANGS,
        "stages": {
            "sft": [
                {"kind": "s2s", "lang": "en", "validation": [files["s2s"]]},
                {"kind": "tts", "lang": "en", "validation": [files["tts"]]},
                {"kind": "asr", "lang": "en", "validation": [files["asr"]]},
            ]
        },
    }
    (data / "data.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    t2w = save_random_token2wav(root / "t2w", "v1", seed=0)
    whisper = save_random_whisper(root / "whisper", seed=0)
    return SimpleNamespace(
        root=root, config=data / "data.yaml", ckpt=ckpt, t2w=t2w, whisper=whisper
    )


def evaluate(setup, capsys, task, out, *args):
    code = cli(
        [
            "evaluate",
            "--config",
            str(setup.config),
            "--task",
            task,
            "--ckpt",
            str(setup.ckpt),
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


def audio_args(setup):
    return [
        "--token2wav",
        str(setup.t2w),
        "--voice",
        "random",
        "--speech-rate",
        "4",
        "--asr",
        f"whisper:{setup.whisper}",
        "--mos",
        "test_evaluate_speech:loudness",
    ]


def read_wavs(out, rows):
    waves = []
    for r in rows:
        wave, rate = sf.read(str(out.parent / r["wav"]), dtype="float32")
        assert rate == 22050 and len(wave) > 0 and r["audio_s"] == pytest.approx(len(wave) / rate)
        waves.append(wave)
    return waves


def check_latency(m, rows):
    for r in rows:
        assert 0 < r["time_to_first_audio_s"]
        assert 0 < r["chain_time_to_first_audio_s"]
    for way in ("interleaved", "chain"):
        t = m["time_to_first_audio_s"][way]
        key = "time_to_first_audio_s" if way == "interleaved" else "chain_time_to_first_audio_s"
        vals = [r[key] for r in rows]
        assert t["answers"] == len(rows)
        assert t["mean"] == pytest.approx(np.mean(vals))
        assert t["median"] == pytest.approx(np.median(vals))
    t = m["time_to_first_audio_s"]
    assert t["chain_over_interleaved"] == pytest.approx(
        t["chain"]["median"] / t["interleaved"]["median"]
    )


def test_tts_audio_is_transcribed_and_scored(setup, capsys, tmp_path):
    out = tmp_path / "tts.json"
    code, stdout, err, r = evaluate(setup, capsys, "cslm_sft_tts_en", out, *audio_args(setup))
    assert code == 0, err
    m, rows = r["metrics"], r["examples"]
    assert sorted(p.name for p in (tmp_path / "tts_wavs").iterdir()) == [
        ".cslm_jax_output.json",
        "0000.wav",
        "0001.wav",
    ]
    assert [row["wav"] for row in rows] == ["tts_wavs/0000.wav", "tts_wavs/0001.wav"]
    waves = read_wavs(out, rows)
    assert m["audio"]["answers_with_audio"] == 2 and m["audio"]["speech_rate"] == 4.0
    # the transcripts are the ASR's of the wavs written, scored against the input text
    asr = WhisperAsr(setup.whisper)
    hyps = asr.transcribe(waves, 22050, "en")
    assert [row["audio_transcript"] for row in rows] == hyps
    want = transcript_error_rates(
        ["the quick fox", "a brown dog"], hyps, ["word"] * 2, ["en"] * 2, asr
    )
    assert m["asr_error_rate"] == pytest.approx(want["error_rate"]) and m["asr_error_rate"] > 0
    assert m["asr_error_rate_metric"] == "wer"
    assert [row["asr_error_rate"] for row in rows] == pytest.approx(want["per_example"])
    assert "without a spelling map" in m["asr_normalizers"]["en"]  # the folder has none
    assert m["mos"]["mean"] == pytest.approx(np.mean([loudness(w, 22050) for w in waves]))
    check_latency(m, rows)
    for line in ("ASR of the speech vs input text, WER", "time to first audio, chain", "MOS"):
        assert line in stdout


def test_spoken_qa_audio_consistency_and_judge(setup, capsys, tmp_path):
    server = ChatServer()
    try:
        out = tmp_path / "s2s.json"
        args = [
            *audio_args(setup),
            "--judge-url",
            server.url,
            "--judge-model",
            "judge",
            "--judge-scale",
            "0-100",
        ]
        code, stdout, err, r = evaluate(setup, capsys, "cslm_sft_s2s_en", out, *args)
        assert code == 0, err
        m, rows = r["metrics"], r["examples"]
        waves = read_wavs(out, rows)
        assert [row["answer"] for row in rows] == ["The quick brown fox"] * 2
        asr = WhisperAsr(setup.whisper)
        hyps = asr.transcribe(waves, 22050, "en")
        assert [row["audio_transcript"] for row in rows] == hyps
        # consistency: the audio's transcript against the model's own text answer (the unit
        # lexicon replaced), and against the reference answers
        own = transcript_error_rates([x["answer"] for x in rows], hyps, ["word"] * 2, ["en"] * 2)
        ref = transcript_error_rates(
            ["The quick brown fox", "the quick red fox"], hyps, ["word"] * 2, ["en"] * 2
        )
        assert m["consistency_error_rate"] == pytest.approx(own["error_rate"])
        assert m["speech_answer_error_rate"] == pytest.approx(ref["error_rate"])
        assert m["consistency_source"] == f"ASR whisper:{setup.whisper}"
        assert r["unit_lexicon"] is None and "--asr" in r["unit_lexicon_note"]
        assert [x["mos"] for x in rows] == pytest.approx([loudness(w, 22050) for w in waves])
        assert m["mos"]["mean"] == pytest.approx(np.mean([x["mos"] for x in rows]))
        check_latency(m, rows)
        # the judge rated the transcripts of the answer audio (its score: their word counts)
        assert m["judge"]["judged"] == "answer audio transcripts"
        assert [row["judge_score"] for row in rows] == [float(len(h.split())) for h in hyps]
        assert m["judge"]["requests"] == server.total() == 2  # the questions differ
        assert (m["judge"]["scored"], m["judge"]["failed"]) == (2, 0)
        assert (tmp_path / "s2s_judge_cache.jsonl").is_file()
        assert "judge score (judge, 0-100)" in stdout
        assert "text/speech consistency error (ASR of the audio)" in stdout
    finally:
        server.close()


def test_judge_without_audio_rates_text_answers_and_a_rerun_is_cached(setup, capsys, tmp_path):
    server = ChatServer()
    try:
        out = tmp_path / "judged.json"
        args = ["--judge-url", server.url + "/v1", "--judge-model", "judge"]
        code, _, err, r = evaluate(setup, capsys, "cslm_sft_s2s_en", out, *args)
        assert code == 0, err
        j = r["metrics"]["judge"]
        assert j["judged"] == "text answers" and j["scale"] == [1, 10]
        # the answer "The quick brown fox": Score 4 from the server (its word count)
        assert [x["judge_score"] for x in r["examples"]] == [4.0, 4.0]
        assert (j["mean"], j["requests"], j["cached"]) == (4.0, 2, 0) and server.total() == 2
        assert "audio" not in r["metrics"] and not (tmp_path / "judged_wavs").exists()
        code, _, err, r = evaluate(setup, capsys, "cslm_sft_s2s_en", out, *args, "--force")
        assert code == 0, err
        assert (r["metrics"]["judge"]["requests"], r["metrics"]["judge"]["cached"]) == (0, 2)
        assert server.total() == 2 and r["metrics"]["judge"]["mean"] == 4.0
    finally:
        server.close()


@pytest.mark.parametrize(
    "task, args, message",
    [
        ("cslm_sft_s2s_en", ["--asr", "whisper:x"], "--asr is for the answers' audio"),
        ("cslm_sft_s2s_en", ["--token2wav", "t2w"], "--token2wav and --voice go together"),
        ("cslm_sft_asr_en", ["--token2wav", "T2W", "--voice", "random"], "asr answers have no"),
        ("cslm_sft_s2s_en", ["--judge-url", "http://127.0.0.1:1"], "go together"),
        ("cslm_sft_tts_en", ["--judge-url", "u", "--judge-model", "m"], "not tts"),
        (
            "cslm_sft_tts_en",
            ["--token2wav", "T2W", "--voice", "random", "--asr", "nope"],
            "expected whisper:DIR",
        ),
        (
            "cslm_sft_tts_en",
            ["--token2wav", "T2W", "--voice", "nobody"],
            "voice 'nobody': not a voice",
        ),
        (
            "cslm_sft_tts_en",
            ["--token2wav", "T2W", "--voice", "random", "--mos", "test_evaluate_speech:nope"],
            "has no attribute 'nope'",
        ),
    ],
)
def test_bad_audio_flags_exit_2(setup, capsys, tmp_path, task, args, message):
    args = [str(setup.t2w) if a == "T2W" else a for a in args]
    code, _, err, _ = evaluate(setup, capsys, task, tmp_path / "o.json", *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o.json").exists()


def test_the_wav_folder_never_replaces_other_files(setup, capsys, tmp_path):
    (tmp_path / "o_wavs").mkdir()
    (tmp_path / "o_wavs" / "mine.wav").write_bytes(b"RIFF")
    args = ["--token2wav", str(setup.t2w), "--voice", "random"]
    code, _, err, _ = evaluate(setup, capsys, "cslm_sft_tts_en", tmp_path / "o.json", *args)
    assert code == 2 and "its wav folder" in err and "holds mine.wav, which evaluate did not" in err
    assert (tmp_path / "o_wavs" / "mine.wav").read_bytes() == b"RIFF"
