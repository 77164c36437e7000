"""cslm_jax.speech.stream (issue 25 item 4): a CSLM answer's speech chunks synthesised as they
close, with CosyVoice v1's streaming scheme, against upstream's own streaming path
(`CosyVoiceModel.token2wav(..., finalize=False/True)` driven with the same unit windows and the
same noise draws), and `cslm-jax decode --speech-out` end to end on a tiny CSLM model.

Reduced sizes, random weights (`save_random_token2wav`). Few shapes compile: every window
synthesised before the end has 60 units (the chunks below are chosen so), the final one 20, in
the parity test and in the decode test alike (one process: the compiled programs are shared).

Measured (float32, CPU): the streamed waveform within ~1.5e-4 of upstream's (bound 1e-3, the whole
synthesis bound of issue 25)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import cosyvoice_reference as ref
from cslm_jax.cli.main import main as cli
from cslm_jax.speech import token2wav as t2w
from cslm_jax.speech.hift import Token2WavError
from cslm_jax.speech.stream import SpeechStream, speak
from cslm_jax.speech.token2wav_weights import flow_to_state_dict, hift_to_state_dict

TOL = 1e-3
# Chunk sizes: the first (30 units) is too short to synthesise alone (40 units or fewer) and
# waits; the second makes a window of 60; the third one of 20 carried + 40 = 60; the answer's end
# the final window of the 20 carried units.
CHUNKS = (30, 30, 40)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return t2w.load_token2wav(
        t2w.save_random_token2wav(tmp_path_factory.mktemp("t2w") / "t2w", seed=0)
    )


def _chunks(seed=0):
    rng = np.random.default_rng(seed)
    units = rng.integers(0, 4096, sum(CHUNKS)).tolist()
    cuts = np.cumsum((0,) + CHUNKS)
    return units, [units[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def _expected_windows(units):
    return [(units[0:60], False), (units[40:100], False), (units[80:100], True)]


@pytest.fixture(scope="module")
def upstream(model):
    """Upstream's streaming path on the expected windows, torch seeded: (audio per call, the
    draws of each call)."""
    fcfg, hcfg = model.flow_cfg, model.hift_cfg
    flow_m = ref.flow_reference(fcfg, flow_to_state_dict(fcfg, model.flow_params))
    hift_m = ref.hift_reference(hcfg, hift_to_state_dict(hcfg, model.hift_params))
    units, _ = _chunks()
    return ref.run_token2wav_stream(
        flow_m, hift_m, _expected_windows(units), model.voices["random"], seed=0
    )


def _their_noise(model, draws):
    """Our stream's noise callable giving upstream's draws of each call."""

    def noise(k, flow_frames, hift_frames):
        d = draws[k]
        assert d[0][0] == "randn_like" and d[0][1].shape == (1, 80, flow_frames)
        return {"flow": d[0][1].transpose(0, 2, 1), "hift": ref.hift_noise(model.hift_cfg, d[1:])}

    return noise


def _stream(model, chunks, noise="zero"):
    s = SpeechStream(model, "random", noise=noise)
    outs = [s.push(c) for c in chunks]
    return s, outs + [s.finish()]


def test_streamed_audio_equals_upstreams_streaming_path(model, upstream):
    audio_ref, draws = upstream
    units, chunks = _chunks()
    s, outs = _stream(model, chunks, _their_noise(model, draws))
    assert s.windows == _expected_windows(units)
    assert len(outs[0]) == 0  # the short first chunk waits
    ours = [o for o in outs if len(o)]
    assert [len(o) for o in ours] == [len(a) for a in audio_ref]
    for i, (a, b) in enumerate(zip(ours, audio_ref)):
        err = np.abs(a - b).max()
        print(
            f"call {i}: {len(a)} samples, max |ours - upstream| {err:.2e} "
            f"(peak {np.abs(b).max():.2f})"
        )
        assert 0.01 < np.abs(b).max() and err <= TOL


def test_length_is_the_windows_frames_and_seams_do_not_click(model):
    _, chunks = _chunks()
    s, outs = _stream(model, chunks)
    wave = np.concatenate(outs)
    # windows of 60, 60 and 20 units: 103 + 103 + 34 mel frames, each later window's first 34
    # frames taking the place of the previous one's last 34
    frames = [t2w.mel_frames(n) for n in (60, 60, 20)]
    assert frames == [103, 103, 34]
    assert len(wave) == s.expected_samples() == (sum(frames) - 2 * 34) * 256 == s.samples
    # at a seam (where one returned chunk ends and the next begins), the step between two samples
    # is no larger than the signal's typical step (its 99th percentile), as a click would be. A
    # bound only: random weights give noise-like audio (median step ~0.19, 99th percentile ~0.33),
    # where even a hard cut between calls stays under it (measured 0.17 / 0.20 at these seams,
    # against 0.11 / 0.15 here); the cross-fades themselves are checked by the parity test above
    diff = np.abs(np.diff(wave))
    typical = np.percentile(diff, 99)
    seams = np.cumsum([len(o) for o in outs if len(o)])[:-1]
    assert len(seams) == 2
    for b in seams:
        assert diff[b - 1] <= typical, (b, diff[b - 1], typical)
    # zero noise is deterministic; a key gives other audio of the same length, reproducibly
    np.testing.assert_array_equal(np.concatenate(_stream(model, chunks)[1]), wave)
    import jax

    keyed = np.concatenate(_stream(model, chunks, jax.random.PRNGKey(1))[1])
    assert keyed.shape == wave.shape and not np.array_equal(keyed, wave)
    np.testing.assert_array_equal(
        np.concatenate(_stream(model, chunks, jax.random.PRNGKey(1))[1]), keyed
    )


def test_windows_of_one_bucket_share_one_compiled_flow(model):
    """Windows of 60 and 63 units (103 and 108 mel frames) are both padded to 64 units and 128
    frames (`window_buckets`): the second reuses the first's compiled flow (no new program, no
    compile seconds; HiFT's 69 and 74 frames share its 96-frame bucket too), and the audio is
    what the window gives alone (the 63-unit window's samples, `expected_samples`)."""
    from cslm_jax.speech.stream import compiled_window_programs, window_buckets

    assert (
        window_buckets(60, t2w.mel_frames(60))
        == window_buckets(63, t2w.mel_frames(63))
        == (64, 128)
    )
    rng = np.random.default_rng(5)
    a = SpeechStream(model, "random")
    assert len(a.push(rng.integers(0, 4096, 60).tolist())) > 0
    programs = compiled_window_programs()
    b = SpeechStream(model, "random")
    out = b.push(rng.integers(0, 4096, 63).tolist())
    assert compiled_window_programs() == programs and b.compile_s == 0.0
    assert len(out) == (t2w.mel_frames(63) - 34 - 20) * 256 and np.abs(out).max() > 0.01
    assert len(out) + len(b.finish()) == b.expected_samples()


def test_windows_of_several_answers_run_as_rows_of_one_flow(model):
    """Three answers' streams advanced together (a server's sessions): their windows of one
    bucket run as rows of one flow call (`run_flows`; two windows in different buckets too),
    and each answer's audio is what its stream gives alone."""
    from cslm_jax.speech.stream import compiled_window_programs, run_flows

    answers = [_chunks(seed)[1] for seed in (0, 1)]
    rng = np.random.default_rng(9)
    answers.append([rng.integers(0, 4096, n).tolist() for n in (45, 90, 10)])  # other buckets
    alone = [np.concatenate(_stream(model, chunks)[1]) for chunks in answers]
    streams = [SpeechStream(model, "random") for _ in answers]
    outs: list = [[] for _ in answers]
    before = compiled_window_programs()

    def run(jobs):
        live = [(i, j) for i, j in enumerate(jobs) if j is not None]
        for (i, j), (mel, mu) in zip(live, run_flows([j for _, j in live])):
            outs[i].append(j.stream.complete(j, mel, mu))

    for k in range(3):
        run([s.push_job(chunks[k]) for s, chunks in zip(streams, answers)])
    run([s.finish_job() for s in streams])
    assert compiled_window_programs() > before  # the two-row programs are new
    for got, want in zip(outs, alone):
        np.testing.assert_allclose(np.concatenate(got), want, atol=2e-4)


def test_events_in_audio_out(model):
    from cslm_jax.infer.decode import End, SpeechChunk, TextChunk

    _, chunks = _chunks()
    events = [TextChunk(0, "hi", ())]
    events += [SpeechChunk(i, tuple(c), ()) for i, c in enumerate(chunks)]
    events += [TextChunk(1, "bye", ()), End("eoa", (), ())]
    pairs = list(speak(events, SpeechStream(model, "random")))
    assert [p[0] for p in pairs] == events
    assert [len(a) for _, a in pairs] == [0, 0] + [
        len(o) for o in _stream(model, chunks)[1][1:3]
    ] + [0, len(_stream(model, chunks)[1][3])]
    np.testing.assert_array_equal(
        np.concatenate([a for _, a in pairs]), np.concatenate(_stream(model, chunks)[1])
    )


def test_short_answers_and_bad_input(model):
    # an answer shorter than a window: one final window, a plain synthesis. The stream's flow
    # runs padded to its buckets (masked GroupNorms): the mel within ~1e-5 of the unpadded
    # `synthesize`'s, which HiFT turns into up to ~1e-4 (measured 9.9e-5; the bound of
    # test_token2wav.py's batched = one by one, 2e-4)
    s = SpeechStream(model, "random")
    assert len(s.push(list(range(12)))) == 0 and len(s.push(list(range(8)))) == 0
    wave = s.finish()
    want = t2w.synthesize(model, list(range(12)) + list(range(8)), "random")
    assert wave.shape == want.shape and np.abs(want).max() > 0.01
    np.testing.assert_allclose(wave, want, atol=2e-4, rtol=0)
    assert s.windows == [(list(range(12)) + list(range(8)), True)]
    assert len(s.finish()) == 0 and len(SpeechStream(model, "random").finish()) == 0
    with pytest.raises(Token2WavError, match="push after finish"):
        s.push([1])
    with pytest.raises(Token2WavError, match="speech chunk: unit 4096 at position 1"):
        SpeechStream(model, "random").push([3, 4096])
    with pytest.raises(Token2WavError, match="speech rate 0.5: streaming needs a rate >= 1"):
        SpeechStream(model, "random", speech_rate=0.5)
    with pytest.raises(Token2WavError, match="voice 'nobody': not a voice of"):
        SpeechStream(model, "nobody")


# -- cslm-jax decode --speech-out ----------------------------------------------------------------

# The tiny model answers with a bigram chain (no token twice), so one speech chunk per answer:
# 60 units, a window synthesised when its <eosp> closes, then the final window of the 20 carried
# units at <eoa> (the shapes compiled above; several chunks per answer are tested above).
UNITS = 64
SPEECH = [list(range(60))]
ANSWER = "[question]What[answer]The<sosp>" + "".join(f"<{u}>" for u in SPEECH[0]) + "<eosp>fox<eoa>"


def _bigram_cslm(out, tok, answer_ids, first, hidden=128):
    """A transformers Llama that continues `first` with `answer_ids` whatever came before
    (attention and MLP outputs zeroed; embedding row of the i-th chain token = unit vector i, LM
    head maps it to the (i+1)-th), as tests/test_decode_cli.py's, wide enough for 60 units."""
    from cslm_jax.demo.random_hf import write_random_hf_llama

    chain = [first] + list(answer_ids)
    assert len(set(chain)) == len(chain) <= hidden
    model = write_random_hf_llama(
        out,
        tok,
        hidden_size=hidden,
        intermediate_size=64,
        num_layers=1,
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
                torch.tensor(i), hidden
            ).float()
            if i + 1 < len(chain):
                model.lm_head.weight[chain[i + 1], i] = 10.0
    model.save_pretrained(str(out))


@pytest.fixture(scope="module")
def cslm(tmp_path_factory, tiny_tokenizer_dir):
    from cslm_jax.convert.hf import import_hf
    from cslm_jax.infer.responses import write_unit_file
    from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("speech_out")
    tok = load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, UNITS, len(tok))
    answer_ids = tok.encode(ANSWER, add_special_tokens=False)
    header = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    _bigram_cslm(root / "hf", tok, answer_ids, tok.encode(header, add_special_tokens=False)[-1])
    ckpt = import_hf(root / "hf", root / "ck", log=lambda *_: None)
    units = root / "questions.txt"
    write_unit_file(units, [[1, 1, 2, 7], [15, 3]])
    return ckpt, units, len(answer_ids)


def test_decode_speech_out_writes_a_wav_per_answer_with_timings(cslm, model, tmp_path, capsys):
    ckpt, units, n_ids = cslm
    code = cli(
        [
            "decode",
            "--lang",
            "en",
            "--unit",
            str(units),
            "--ckpt",
            str(ckpt),
            "--greedy",
            "--max-new-tokens",
            str(n_ids + 4),
            "--output-dir",
            str(tmp_path / "out"),
            "--batch-size",
            "2",  # both answers streamed side by side
            "--speech-out",
            str(tmp_path / "wavs"),
            "--token2wav",
            str(model.path),
            "--voice",
            "random",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "time to first audio (--speech-out)" in captured.out
    records = [
        json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()
    ]
    assert len(records) == 2
    # windows of 60 and 20 units
    frames = t2w.mel_frames(60) + t2w.mel_frames(20) - 34
    for r in records:
        assert r["speech_chunks"] == SPEECH and r["finish"] == "eoa"
        assert r["wav"] == f"{r['index']:04d}.wav"  # a fresh run: lines 0, 1
        wave, rate = sf.read(str(tmp_path / "wavs" / r["wav"]), dtype="float32")
        assert rate == 22050 and wave.shape == (frames * 256,)
        assert np.abs(wave).max() > 0.01
        # the wav is the streamed synthesis of the decoded chunks (PCM 16-bit)
        _, outs = _stream(model, r["speech_chunks"])
        np.testing.assert_allclose(wave, np.concatenate(outs), atol=1 / 32768 + 1e-6)
        t = r["timing"]
        assert t["audio_s"] == pytest.approx(frames * 256 / 22050)
        assert 0 < t["time_to_first_speech_chunk_s"] <= t["time_to_first_audio_s"] <= t["total_s"]
        assert t["speech_rtf"] > 0 and t["speech_compile_s"] >= 0
    assert sorted(p.name for p in (tmp_path / "wavs").iterdir()) == [
        ".cslm_jax_output.json",  # the folder is decode --speech-out's (never another's wavs)
        "0000.wav",
        "0001.wav",
    ]
    summary = json.loads((tmp_path / "out" / "latency_summary.json").read_text())
    assert summary["time_to_first_audio_s"]["missing"] == 0
    assert summary["time_to_first_audio_s"]["mean"] == pytest.approx(
        np.mean([r["timing"]["time_to_first_audio_s"] for r in records])
    )


def test_decode_speech_out_names_wavs_by_their_line_when_appending_and_resuming(
    cslm, model, tmp_path, capsys
):
    """Each wav is named by its answer's line in responses.jsonl: an --append run's answers to
    questions 0 and 1 (lines 2 and 3) get 0002.wav and 0003.wav beside the first run's, which
    stay byte for byte; that run cut off after its first answer and started again resumes with
    its answer to question 1 as 0003.wav again."""
    ckpt, units, n_ids = cslm
    out, wavs = tmp_path / "out", tmp_path / "wavs"
    args = [
        "decode",
        "--lang",
        "en",
        "--unit",
        str(units),
        "--ckpt",
        str(ckpt),
        "--greedy",
        "--max-new-tokens",
        str(n_ids + 4),
        "--output-dir",
        str(out),
        "--batch-size",
        "1",
        "--speech-out",
        str(wavs),
        "--token2wav",
        str(model.path),
        "--voice",
        "random",
    ]

    def run(*extra):
        code = cli(args + list(extra))
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
        return [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]

    def wav_bytes():
        return {p.name: p.read_bytes() for p in sorted(wavs.glob("*.wav"))}

    first = run()
    assert [r["wav"] for r in first] == ["0000.wav", "0001.wav"]
    before = wav_bytes()
    assert sorted(before) == ["0000.wav", "0001.wav"]
    records = run("--append")
    assert [(r["index"], r["wav"]) for r in records] == [
        (0, "0000.wav"),
        (1, "0001.wav"),
        (0, "0002.wav"),
        (1, "0003.wav"),
    ]
    after = wav_bytes()
    assert sorted(after) == ["0000.wav", "0001.wav", "0002.wav", "0003.wav"]
    assert {k: after[k] for k in before} == before  # the old wavs untouched
    # the new ones are the answers' audio (the same answers: the same bytes, other files)
    assert after["0002.wav"] == before["0000.wav"] and after["0003.wav"] == before["0001.wav"]
    # cut off after the append run's first answer: a rerun resumes it at question 1, line 3
    lines = (out / "responses.jsonl").read_text().splitlines(keepends=True)
    (out / "responses.jsonl").write_text("".join(lines[:3]))
    results = (out / "responses.json").read_text().splitlines(keepends=True)
    (out / "responses.json").write_text("".join(results[:3]))
    (wavs / "0003.wav").unlink()
    resumed = run()
    assert [(r["index"], r["wav"]) for r in resumed[2:]] == [(0, "0002.wav"), (1, "0003.wav")]
    assert wav_bytes() == after


def test_decode_speech_out_refuses_bad_arguments_before_loading(cslm, model, tmp_path, capsys):
    ckpt, units, _ = cslm
    base = [
        "decode",
        "--lang",
        "en",
        "--unit",
        str(units),
        "--ckpt",
        str(ckpt),
        "--output-dir",
        str(tmp_path / "out"),
    ]
    for extra, message in [
        (
            [
                "--speech-out",
                str(tmp_path / "w"),
                "--token2wav",
                str(model.path),
                "--voice",
                "nobody",
            ],
            "voice 'nobody': not a voice of",
        ),
        (
            ["--speech-out", str(tmp_path / "w"), "--token2wav", str(model.path)],
            "--speech-out needs --voice",
        ),
        (["--voice", "random"], "--voice goes only with --speech-out"),
        (
            [
                "--speech-out",
                str(tmp_path / "w"),
                "--token2wav",
                str(tmp_path / "none"),
                "--voice",
                "random",
            ],
            "--token2wav",
        ),
        (
            ["--speech-out", str(units), "--token2wav", str(model.path), "--voice", "random"],
            "--speech-out",
        ),
        (
            [
                "--speech-out",
                str(tmp_path / "w"),
                "--token2wav",
                str(model.path),
                "--voice",
                "random",
                "--speech-rate",
                "0.5",
            ],
            "--speech-rate 0.5",
        ),
        (["--speech-rate", "1.2"], "--speech-rate goes only with --speech-out"),
        (
            [
                "--speech-out",
                str(tmp_path / "mine"),
                "--token2wav",
                str(model.path),
                "--voice",
                "random",
            ],
            "0000.wav, which decode --speech-out did not write",
        ),
    ]:
        (tmp_path / "mine").mkdir(exist_ok=True)
        (tmp_path / "mine" / "0000.wav").write_bytes(b"the user's own recording")
        code = cli(base + extra)
        captured = capsys.readouterr()
        assert code == 2 and message in captured.err, (extra, captured.err)
        assert captured.out == ""  # nothing loaded, nothing decoded
        assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()
        assert (tmp_path / "mine" / "0000.wav").read_bytes() == b"the user's own recording"


def test_decode_speech_out_refuses_a_token2wav_with_fewer_units_than_the_model(
    cslm, tmp_path, capsys
):
    """A model answering with 64 units and a flow that knows 32: refused once the model is
    loaded, naming --token2wav, before any answer is decoded or written."""
    ckpt, units, _ = cslm
    small = t2w.save_random_token2wav(tmp_path / "t2w32", "v1", seed=0, vocab_size=32)
    code = cli(
        [
            "decode",
            "--lang",
            "en",
            "--unit",
            str(units),
            "--ckpt",
            str(ckpt),
            "--output-dir",
            str(tmp_path / "out"),
            "--speech-out",
            str(tmp_path / "w"),
            "--token2wav",
            str(small),
            "--voice",
            "random",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "its flow knows 32 units" in err and "answers with 64" in err, err
    assert not (tmp_path / "w").exists()
    assert not (tmp_path / "out" / "responses.jsonl").exists()
