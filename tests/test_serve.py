"""`cslm-jax serve` on loopback: the WebSocket protocol against `decode --greedy`, `decode
--speech-out` and `extract-units`; concurrent sessions and continuous batching; bad input;
POST /v1/s2s, /healthz, /metrics, the API key; SIGTERM with an answer in flight."""

import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from cslm_jax.cli.main import main as cli
from cslm_jax.infer.engine import Request
from cslm_jax.infer.responses import write_unit_file
from cslm_jax.serve.app import create_app
from cslm_jax.serve.service import load_service
from cslm_jax.speech import token2wav as t2w_mod

REPO = Path(__file__).resolve().parents[1]
DATA_CONFIG = str(REPO / "configs" / "data" / "demo.yaml")
UNITS = 4096  # the speech tokenizer's and token2wav's codebook
SPEECH = list(range(60))
ANSWER = "[question]What[answer]The<sosp>" + "".join(f"<{u}>" for u in SPEECH) + "<eosp>fox<eoa>"
QUESTIONS = [[1, 1, 2, 7], [15, 3], [100, 200, 300]]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def bigram(tmp_path_factory, tiny_tokenizer_dir):
    """A CSLM model of 4096 units that answers ANSWER (one speech chunk of 60 units) to any
    question, a random v1 token2wav, and the questions as a unit file."""
    from cslm_jax.convert.hf import import_hf
    from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer
    from test_speech_stream import _bigram_cslm

    root = tmp_path_factory.mktemp("serve")
    tok = load_tokenizer(tiny_tokenizer_dir)
    extend_tokenizer(tok, UNITS, len(tok))
    answer_ids = tok.encode(ANSWER, add_special_tokens=False)
    header = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    _bigram_cslm(root / "hf", tok, answer_ids, tok.encode(header, add_special_tokens=False)[-1])
    ckpt = import_hf(root / "hf", root / "ck", log=quiet)
    t2w = t2w_mod.save_random_token2wav(root / "t2w", "v1", seed=0)
    units = root / "questions.txt"
    write_unit_file(units, QUESTIONS)
    return ckpt, t2w, units, len(answer_ids)


class Running:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, service, api_key=None):
        self.service = service.start()
        config = uvicorn.Config(
            create_app(service, api_key), host="127.0.0.1", port=0, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.http, self.ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/s2s"

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.service.close(timeout=10)


@pytest.fixture(scope="module")
def speech_server(bigram, tokdir):
    ckpt, t2w, _, _ = bigram
    service = load_service(
        model=ckpt,
        data_config=DATA_CONFIG,
        speech_tokenizer=tokdir,
        token2wav=t2w,
        voice="random",
        log=quiet,
        slots=2,
        max_length=256,
        max_queue=2,
        max_seconds=5.0,
    )
    running = Running(service)
    yield running
    running.close()


def ask(ws, start, question=None, audio=None, rate=None):
    """One turn: start, the question (units text or PCM16 audio), every message to `end`.
    Returns (messages, {index: concatenated int16 audio})."""
    ws.send(json.dumps({"type": "start", **start}))
    if audio is not None:
        for i in range(0, len(audio), rate // 10):  # 100 ms frames
            ws.send(audio[i : i + rate // 10].astype("<i2").tobytes())
        ws.send(json.dumps({"type": "end_of_audio"}))
    else:
        ws.send(json.dumps({"type": "units", "units": question}))
    msgs, audio_out = [], {}
    while True:
        m = json.loads(ws.recv(timeout=120))
        msgs.append(m)
        if m["type"] == "audio":
            data = ws.recv(timeout=120)
            assert isinstance(data, bytes) and len(data) == 2 * m["samples"]
            audio_out.setdefault(m["index"], []).append(np.frombuffer(data, "<i2"))
        if m["type"] in ("end", "error"):
            return msgs, {i: np.concatenate(a) for i, a in audio_out.items()}


def unit_text(units):
    return "".join(f"<{u}>" for u in units)


def test_units_in_text_and_audio_out_equal_decode(speech_server, bigram, tmp_path):
    """Each question as units: transcript and answer text are decode --greedy's, the audio is
    decode --speech-out's wav (noise zero, PCM16), in protocol order, with timings."""
    ckpt, t2w, units, n_ids = bigram
    code = cli(
        ["decode", "--lang", "en", "--unit", str(units), "--ckpt", str(ckpt), "--greedy",
         "--data-config", DATA_CONFIG, "--max-new-tokens", "2048",
         "--output-dir", str(tmp_path / "out"), "--speech-out", str(tmp_path / "wavs"),
         "--token2wav", str(t2w), "--voice", "random"]
    )  # fmt: skip
    assert code == 0
    records = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").open()]
    with connect(speech_server.ws) as ws:
        for q, r in zip(QUESTIONS, records):
            msgs, audio = ask(ws, {"lang": "en", "greedy": True}, unit_text(q))
            kinds = [m["type"] for m in msgs]
            # the audio comes when synthesised: after its chunk's text, maybe after later text
            assert kinds[:3] == ["question", "transcript", "text"] and kinds[-1] == "end", msgs
            assert sorted(kinds[3:-1]) == ["audio", "audio", "text"]
            assert msgs[0]["units"] == unit_text(q)
            assert msgs[1]["text"] == r["transcript"] == "What"
            assert [m["text"] for m in msgs if m["type"] == "text"] == r["text_chunks"]
            assert [m["index"] for m in msgs if m["type"] == "text"] == [0, 1]
            assert all(
                m["index"] == 0 and m["sample_rate"] == 22050 for m in msgs if m["type"] == "audio"
            )
            wav, rate = sf.read(str(tmp_path / "wavs" / r["wav"]), dtype="int16")
            np.testing.assert_allclose(audio[0], wav, atol=1)  # 1 LSB: float -> PCM16 rounding
            end = msgs[-1]
            assert end["finish"] == r["finish"] == "eoa"
            t = end["timing"]
            assert 0 < t["first_token_s"] <= t["first_text_s"] <= t["first_audio_s"] <= t["total_s"]
            assert t["rtf"] == pytest.approx(t["total_s"] / (len(wav) / 22050))


def test_concurrent_answers_are_synthesised_as_rows_of_one_flow(speech_server, bigram, tmp_path):
    """Two sessions at once: their speech windows run as rows of one flow call (the metrics
    count fewer synthesis rounds than windows), and each answer's audio is still the streamed
    synthesis of its chunk (decode --speech-out's wav, within the flow's batched-row
    difference: 2e-4, a few PCM16 steps)."""
    ckpt, t2w, units, _ = bigram
    code = cli(
        ["decode", "--lang", "en", "--unit", str(units), "--ckpt", str(ckpt), "--greedy",
         "--data-config", DATA_CONFIG, "--output-dir", str(tmp_path / "out"),
         "--speech-out", str(tmp_path / "wavs"), "--token2wav", str(t2w), "--voice", "random"]
    )  # fmt: skip
    assert code == 0
    wav, _ = sf.read(str(tmp_path / "wavs" / "0000.wav"), dtype="int16")

    def metric(name):
        text = httpx.get(speech_server.http + "/metrics").text
        return int(next(x.split()[1] for x in text.splitlines() if x.startswith(name + " ")))

    rounds, windows = metric("cslm_synthesis_rounds_total"), metric("cslm_synthesis_windows_total")
    audio = [None, None]
    barrier = threading.Barrier(2)

    def client(i):
        with connect(speech_server.ws) as ws:
            barrier.wait()
            audio[i] = ask(ws, {"lang": "en", "greedy": True}, unit_text(QUESTIONS[0]))[1][0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for a in audio:
        np.testing.assert_allclose(a, wav, atol=8)
    new_rounds = metric("cslm_synthesis_rounds_total") - rounds
    new_windows = metric("cslm_synthesis_windows_total") - windows
    assert new_windows == 4 and new_rounds < new_windows  # 2 answers x 2 windows


def test_audio_in_units_equal_extract_units(speech_server, tokdir, tmp_path):
    """PCM16 at 44.1 kHz in: the units the answer is to are extract-units' for the same
    samples (a wav of them), resampled the same way."""
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(int(44100 * 1.3)) * 3000).astype(np.int16)
    sf.write(str(tmp_path / "q.wav"), pcm, 44100, subtype="PCM_16")
    (tmp_path / "manifest.tsv").write_text(f"{tmp_path / 'q.wav'}\n")
    code = cli(
        ["extract-units", "--manifest", str(tmp_path / "manifest.tsv"), "--tokenizer",
         str(tokdir), "--out", str(tmp_path / "units"), "--lang", "en"]
    )  # fmt: skip
    assert code == 0
    [record] = [json.loads(x) for x in open(next((tmp_path / "units").glob("units-*.jsonl")))]
    with connect(speech_server.ws) as ws:
        msgs, _ = ask(ws, {"lang": "en", "greedy": True, "sample_rate": 44100}, audio=pcm,
                      rate=44100)  # fmt: skip
    assert msgs[0]["type"] == "question"
    assert msgs[0]["units"] == unit_text(record["units"])
    assert msgs[0]["seconds"] == pytest.approx(1.3, abs=1e-3)
    assert msgs[-1]["type"] == "end"
    # POST /v1/s2s with the wav file: the same units
    with open(tmp_path / "q.wav", "rb") as f:
        r = httpx.post(
            speech_server.http + "/v1/s2s",
            data={"lang": "en", "greedy": "true"},
            files={"audio": ("q.wav", f, "audio/wav")},
            timeout=120,
        )
    assert r.status_code == 200, r.text
    assert r.json()["question"]["units"] == unit_text(record["units"])
    bad = httpx.post(
        speech_server.http + "/v1/s2s",
        data={"lang": "en"},
        files={"audio": ("q.wav", b"not a sound file", "audio/wav")},
        timeout=30,
    )
    assert bad.status_code == 400 and "undecodable audio" in bad.json()["error"]


BAD = [
    # (messages before the question is complete, what the error names)
    ([b"\x00\x01"], "expected a JSON start message"),
    (["not json"], "not JSON"),
    ([{"type": "units", "units": "<1>"}], "expected a start message, got 'units'"),
    ([{"type": "start", "lang": "fr"}], "field 'lang': 'fr' is not a language"),
    ([{"type": "start", "lang": "en", "sample_rate": 12345}], "12345 Hz is not supported"),
    ([{"type": "start", "lang": "en", "top_p": 0}], "0 < top_p <= 1"),
    ([{"type": "start", "lang": "en", "colour": 1}], "unknown field(s) 'colour'"),
    ([{"type": "start", "lang": "en"}, {"type": "end_of_audio"}], "audio: empty"),
    ([{"type": "start", "lang": "en"}, b"\x01\x02\x03", {"type": "end_of_audio"}], "2 bytes"),
    ([{"type": "start", "lang": "en", "sample_rate": 8000}, b"\x00" * 2 * 8000 * 6],
     "longer than --max-seconds 5"),
    ([{"type": "start", "lang": "en"}, {"type": "units", "units": "<4096>"}],
     "unit 4096 is outside the model's codebook"),
    ([{"type": "start", "lang": "en"}, {"type": "units", "units": "12 13"}],
     "expected a unit token like <12>"),
    ([{"type": "start", "lang": "en"}, {"type": "start", "lang": "en"}],
     "expected audio frames, end_of_audio or units after start, got 'start'"),
]  # fmt: skip


def test_bad_input_gets_errors_while_another_answer_completes(speech_server):
    """Every bad input of one client gets an error naming the problem (the connection stays
    usable), while another client's answer completes; then the first client is answered."""
    result = {}

    def other():
        with connect(speech_server.ws) as ws:
            result["msgs"], _ = ask(ws, {"lang": "en", "greedy": True}, "<5><6>")

    t = threading.Thread(target=other)
    t.start()
    with connect(speech_server.ws) as ws:
        for messages, expected in BAD:
            for m in messages:
                ws.send(m if isinstance(m, (bytes, str)) else json.dumps(m))
            reply = json.loads(ws.recv(timeout=60))
            assert reply["type"] == "error" and expected in reply["message"], (expected, reply)
        msgs, _ = ask(ws, {"lang": "en", "greedy": True}, "<5>")
        assert msgs[-1]["type"] == "end"
    t.join(120)
    assert result["msgs"][-1]["type"] == "end" and result["msgs"][-1]["finish"] == "eoa"


def test_disconnect_mid_answer_frees_its_slot(speech_server):
    """A client gone mid-answer: its slot is free at once and the server carries on."""
    engine = speech_server.service.engine
    with connect(speech_server.ws) as ws:
        ws.send(json.dumps({"type": "start", "lang": "en", "greedy": True}))
        ws.send(json.dumps({"type": "units", "units": "<9>"}))
        assert json.loads(ws.recv(timeout=60))["type"] == "question"
        assert json.loads(ws.recv(timeout=60))["type"] == "transcript"
    deadline = time.time() + 30
    while engine.busy or speech_server.service.sessions:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.05)
    with connect(speech_server.ws) as ws:
        assert ask(ws, {"lang": "en", "greedy": True}, "<9>")[0][-1]["finish"] == "eoa"


def test_post_healthz_metrics(speech_server, tmp_path):
    """POST /v1/s2s answers like the WebSocket (events and a wav); /healthz and /metrics."""
    with connect(speech_server.ws) as ws:
        ws_msgs, ws_audio = ask(ws, {"lang": "en", "greedy": True}, "<3><4>")
    r = httpx.post(
        speech_server.http + "/v1/s2s",
        data={"lang": "en", "greedy": "true", "units": "<3><4>"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["type"] for e in body["events"]] == [m["type"] for m in ws_msgs[1:]]
    wav, rate = sf.read(io.BytesIO(base64.b64decode(body["wav"])), dtype="int16")
    assert rate == 22050
    np.testing.assert_array_equal(wav, ws_audio[0])
    bad = httpx.post(speech_server.http + "/v1/s2s", data={"lang": "en"}, timeout=30)
    assert bad.status_code == 400 and "'audio' or a field 'units'" in bad.json()["error"]
    health = httpx.get(speech_server.http + "/healthz").json()
    assert health["status"] == "ok" and health["slots"] == 2 and health["speech_out"]
    metrics = httpx.get(speech_server.http + "/metrics").text
    assert "cslm_busy_slots 0" in metrics and "cslm_queue 0" in metrics
    assert 'cslm_answers_total{finish="eoa"}' in metrics
    assert "cslm_first_audio_seconds_count" in metrics
    page = httpx.get(speech_server.http + "/")
    assert page.status_code == 200 and "/v1/s2s" in page.text


# -- many sessions, continuous batching -----------------------------------------------------------


@pytest.fixture(scope="module")
def random_server(base_ckpt):
    """The demo-sized random CSLM (answers differ per question), text only, 4 slots, its
    weights and cache split over 2 of the 8 fake CPU devices (serve --tensor 2)."""
    service = load_service(
        model=base_ckpt, data_config=DATA_CONFIG, log=quiet, slots=4, max_length=192,
        max_new_tokens=24, max_queue=4, tensor=2,
    )  # fmt: skip
    running = Running(service, api_key="sesame")
    yield running
    running.close()


def test_concurrent_sessions_get_their_own_answers(random_server, base_ckpt, tmp_path):
    """8 clients at once on 4 slots (sharded over tensor 2): each answer equals decode
    --greedy's (one device) for its question; the later ones are told their place in the
    queue; the API key is required."""
    rng = np.random.default_rng(1)
    questions = [rng.integers(0, 256, rng.integers(3, 30)).tolist() for _ in range(8)]
    write_unit_file(tmp_path / "q.txt", questions)
    code = cli(
        ["decode", "--lang", "en", "--unit", str(tmp_path / "q.txt"), "--ckpt", str(base_ckpt),
         "--greedy", "--data-config", DATA_CONFIG, "--max-new-tokens", "24",
         "--output-dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 0
    want = [json.loads(x) for x in (tmp_path / "out" / "responses.jsonl").open()]
    url = random_server.ws + "?key=sesame"
    results = [None] * len(questions)

    def client(i):
        with connect(url) as ws:
            results[i] = ask(ws, {"lang": "en", "greedy": True}, unit_text(questions[i]))[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for msgs, r in zip(results, want):
        texts = [m["text"] for m in msgs if m["type"] == "text"]
        assert texts == r["text_chunks"], json.dumps(msgs)[:500]
        assert msgs[-1]["type"] == "end" and msgs[-1]["finish"] == r["finish"]
    assert any(m["type"] == "queued" for msgs in results for m in msgs)
    with pytest.raises(InvalidStatus, match="403"):
        with connect(random_server.ws) as ws:  # no key
            ws.recv(timeout=10)
    assert httpx.get(random_server.http + "/healthz").status_code == 401
    ok = httpx.get(random_server.http + "/healthz", headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200


def test_full_queue_is_refused_with_retry_after(random_server, base_ckpt):
    """Every slot busy and max_queue requests waiting: a WebSocket question gets a busy error
    with retry_after (close code 1013), a POST 503 with Retry-After."""
    engine = random_server.service.engine
    hold = threading.Event()
    blockers = []
    for _ in range(engine.slots + engine.max_queue):  # fill the slots and the queue
        r = Request([5] * 10, 10_000, on_token=lambda t: hold.wait(60))  # the engine waits
        engine.submit(r)
        blockers.append(r)
    try:
        with connect(random_server.ws + "?key=sesame") as ws:
            msgs, _ = ask(ws, {"lang": "en", "greedy": True}, "<1>")
            assert msgs[-1]["type"] == "error" and "busy" in msgs[-1]["message"]
            assert msgs[-1]["retry_after"] > 0
        r = httpx.post(
            random_server.http + "/v1/s2s",
            data={"lang": "en", "units": "<1>"},
            headers={"Authorization": "Bearer sesame"},
            timeout=30,
        )
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    finally:
        for r in blockers:
            engine.cancel(r)
        hold.set()


# -- the command: SIGTERM -------------------------------------------------------------------------


def test_sigterm_lets_the_answer_in_flight_finish(bigram, tmp_path):
    ckpt, t2w, _, _ = bigram
    proc = subprocess.Popen(
        [sys.executable, "-m", "cslm_jax.cli.main", "serve", "--ckpt", str(ckpt),
         "--data-config", DATA_CONFIG, "--port", "0", "--slots", "1", "--max-length", "256",
         "--token2wav", str(t2w), "--voice", "random", "--no-warmup", "--grace-seconds", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    try:
        url = None
        for line in proc.stdout:
            if "listening on http://" in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url, "no listening line"
        ws = connect(url.replace("http", "ws") + "/v1/s2s")
        ws.send(json.dumps({"type": "start", "lang": "en", "greedy": True}))
        ws.send(json.dumps({"type": "units", "units": "<1><2>"}))
        assert json.loads(ws.recv(timeout=60))["type"] == "question"
        proc.send_signal(signal.SIGTERM)
        msgs = []
        while not msgs or msgs[-1].get("type") != "end":
            m = ws.recv(timeout=120)
            if isinstance(m, str):
                msgs.append(json.loads(m))
        assert msgs[-1]["finish"] == "eoa"
        # the server goes once the answer is out: its close may cross the client's
        with contextlib.suppress(ConnectionClosed, ConnectionResetError):
            ws.close()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "not taking new questions" in out and "serve: stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_resolves_a_run_folder(tmp_path, capsys):
    """--ckpt RUN is the run's model/ as for decode (a run that has not finished says so)."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert cli(["serve", "--ckpt", str(tmp_path / "run"), "--data-config", DATA_CONFIG]) == 2
    assert "this run has no model/ yet" in capsys.readouterr().err
