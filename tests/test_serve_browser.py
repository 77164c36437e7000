"""The web page of `cslm-jax serve` (GET /) in a real browser: Debian's chromium driven by
Playwright (through `executable_path`, so Playwright downloads no browser), its microphone a
fake device that plays a wav (`--use-file-for-fake-audio-capture`). The page records, stops,
and must show the server's transcript and answer text and play the answer's audio; the units
the server answered are the speech tokenizer's for exactly the PCM16 the page sent. A
screenshot of each run is kept in $CSLM_TEST_ARTIFACTS (default test-artifacts/).

Without chromium the tests are skipped, except in CI (the `CI` variable set), where a missing
browser fails them: .ci/run installs it (`apt-get install chromium`)."""

import base64
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import uvicorn

from cslm_jax.cli.main import main as cli
from cslm_jax.infer.engine import Request
from cslm_jax.serve.app import create_app
from cslm_jax.serve.service import load_service
from test_serve import DATA_CONFIG, REPO, Running, bigram, quiet, unit_text  # noqa: F401

TONE_HZ = 440.0
RECORD_S = 1.5  # seconds the page records before Stop (the server takes up to 5)
TIMEOUT_MS = 120_000  # the server's first answer compiles (~25 s on 2 busy cores)


def missing(what: str):
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run the browser tests: .ci/run installs chromium)")
    pytest.skip(what)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def artifacts() -> Path:
    out = Path(os.environ.get("CSLM_TEST_ARTIFACTS") or REPO / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def page_server(bigram, tokdir):  # noqa: F811
    """test_serve's speech server with room for a question of a few seconds of audio."""
    ckpt, t2w, _, _ = bigram
    service = load_service(
        model=ckpt, data_config=DATA_CONFIG, speech_tokenizer=tokdir, token2wav=t2w,
        voice="random", log=quiet, slots=2, max_length=512, max_queue=2, max_seconds=5.0,
    )  # fmt: skip
    running = Running(service)
    yield running
    running.close()


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory):
    """3 s of a 440 Hz tone with a slow swell, 44.1 kHz PCM16 mono (Chromium loops it)."""
    rate = 44100
    t = np.arange(3 * rate) / rate
    wave = 0.4 * np.sin(2 * np.pi * TONE_HZ * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.5 * t))
    path = tmp_path_factory.mktemp("browser") / "question.wav"
    sf.write(str(path), (wave * 32767).astype(np.int16), rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(question_wav):
    exe = chromium_path()
    if exe is None:
        missing("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (requirements-dev.txt)")
    args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={question_wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=args, headless=True)
        yield b
        b.close()


def open_page(browser, server):
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    logs = []
    page.on("console", lambda m: logs.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
    page.goto(server.http + "/")
    page.wait_for_function("document.body.dataset.phase === 'ready'", timeout=TIMEOUT_MS)
    return page, logs


def wait_answered(page, logs):
    """Until the answer has ended and every audio chunk received has been played."""
    try:
        page.wait_for_function(
            """() => { const s = window.cslmState;
                 return s.phase === 'error' || (s.phase === 'done' && s.audio.chunks > 0
                   && s.audio.playedChunks === s.audio.chunks); }""",
            timeout=TIMEOUT_MS,
        )
    except Exception:
        print("\n".join(logs))
        raise
    state = page.evaluate("() => window.cslmState")
    assert state["phase"] == "done" and not state["errors"], (state["errors"], logs)
    return state


def sent_units(page, state, tokdir, tmp_path) -> tuple[np.ndarray, list[int]]:
    """The PCM16 the page sent and extract-units' units for it (a wav at the rate it was sent)."""
    pcm = np.frombuffer(base64.b64decode(page.evaluate("() => cslmState.sentPcmBase64()")), "<i2")
    rate = state["sent"]["sampleRate"]
    assert len(pcm) == state["sent"]["samples"] > 0
    sf.write(str(tmp_path / "sent.wav"), pcm, rate, subtype="PCM_16")
    (tmp_path / "manifest.tsv").write_text(f"{tmp_path / 'sent.wav'}\n")
    code = cli(
        ["extract-units", "--manifest", str(tmp_path / "manifest.tsv"), "--tokenizer",
         str(tokdir), "--out", str(tmp_path / "units"), "--lang", "en"]
    )  # fmt: skip
    assert code == 0
    [record] = [json.loads(x) for x in open(next((tmp_path / "units").glob("units-*.jsonl")))]
    return pcm, record["units"]


def dominant_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


def check_schedule(schedule):
    """Each chunk starts at max(its arrival, the end of the one before): no gap while audio is
    waiting, no overlap."""
    end = 0.0
    for c in schedule:
        assert c["at"] == pytest.approx(max(c["arrived"], end), abs=1e-9), schedule
        assert c["end"] > c["at"]
        end = c["end"]


def check_answer(page, state, tokdir, tmp_path, name):
    """Transcript, answer, audio played, question units from the audio sent; a screenshot."""
    # the page shows what the server sent (the bigram model's one answer)
    assert page.inner_text("#transcript") == state["transcript"] == "What"
    assert page.inner_text("#answer") == state["answer"] == "The fox"
    assert state["chunks"] == ["The", "fox"]
    assert state["finish"] == "eoa"
    audio = page.eval_on_selector("#audio", "e => ({...e.dataset})")
    assert int(audio["audioPlayedSamples"]) == state["audio"]["receivedSamples"] > 0
    assert int(audio["audioPlayedChunks"]) == int(audio["audioChunks"]) >= 1
    check_schedule(state["audio"]["schedule"])
    timing = state["timing"]
    assert 0 < timing["first_token_s"] <= timing["first_audio_s"] <= timing["total_s"]
    shown = page.inner_text("#timings")
    assert "first audio" in shown and "real-time factor" in shown
    # the question: the units of exactly the audio the page sent, which carries the wav's tone
    pcm, units = sent_units(page, state, tokdir, tmp_path)
    rate = state["sent"]["sampleRate"]
    assert state["question"]["units"] == unit_text(units)
    assert page.eval_on_selector("#question", "e => e.dataset.units") == unit_text(units)
    assert state["question"]["seconds"] == pytest.approx(len(pcm) / rate, abs=1e-3)
    assert abs(dominant_hz(pcm, rate) - TONE_HZ) < 3, dominant_hz(pcm, rate)
    shot = artifacts() / f"serve_browser_{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    return pcm, rate


def test_page_records_the_microphone_and_plays_the_answer(
    browser,
    page_server,
    tokdir,
    tmp_path,
):
    """Record from the (fake) microphone, Stop: the transcript and answer text are shown, every
    audio chunk is played, the server answered the units of the audio recorded."""
    page, logs = open_page(browser, page_server)
    assert page.eval_on_selector_all("#lang option", "os => os.map(o => o.value)") == ["en", "zh"]
    page.click("#record")
    page.wait_for_function(
        f"cslmState.sent.sampleRate > 0 && cslmState.sent.samples >= {RECORD_S} * "
        "cslmState.sent.sampleRate",
        timeout=TIMEOUT_MS,
    )
    page.click("#stop")
    state = wait_answered(page, logs)
    pcm, rate = check_answer(page, state, tokdir, tmp_path, "microphone")
    assert RECORD_S <= len(pcm) / rate < RECORD_S + 2
    assert state["capture"] == "audioworklet"
    # a second question on the same page, read by the ScriptProcessor older browsers use
    page.evaluate("cslmPage.forceScriptProcessor = true")
    page.click("#record")
    page.wait_for_function(
        "cslmState.phase === 'recording' && cslmState.sent.samples >= 0.5 * cslmState.sent.sampleRate",
        timeout=TIMEOUT_MS,
    )
    page.click("#stop")
    again = wait_answered(page, logs)
    assert again["capture"] == "scriptprocessor"
    assert again["answer"] == "The fox" and again["audio"]["playedSamples"] > 0
    assert again["question"]["seconds"] == pytest.approx(again["sent"]["samples"] / rate)
    assert again["question"]["seconds"] < state["question"]["seconds"]
    assert page.inner_text("#answer") == "The fox"


def test_page_sends_a_picked_file(
    browser,
    page_server,
    question_wav,
    tokdir,
    tmp_path,
):
    """A file picked instead of the microphone (decoded by the browser at its own rate),
    answered in the other language's cross-lingual prompt: the same checks; before it, one
    longer than the server takes gets the server's error on the page."""
    page, logs = open_page(browser, page_server)
    # longer than the server takes (max_seconds 5): its error is shown, the page stays usable
    sf.write(str(tmp_path / "long.wav"), np.zeros(6 * 16000, np.int16), 16000, subtype="PCM_16")
    page.set_input_files("#file", str(tmp_path / "long.wav"))
    page.wait_for_function("cslmState.phase === 'error'", timeout=TIMEOUT_MS)
    assert "longer than --max-seconds 5" in page.inner_text("#errors")
    assert page.is_enabled("#file") and page.is_enabled("#record")
    page.select_option("#answer-lang", "zh")
    page.set_input_files("#file", str(question_wav))
    state = wait_answered(page, logs)
    pcm, rate = check_answer(page, state, tokdir, tmp_path, "file")
    assert len(pcm) / rate == pytest.approx(3.0, abs=2 / rate)


PLAYER = """async () => {
  await cslmPage.audioContext();
  const rate = 22050, n = 2205;  // chunks of 0.1 s
  const chunk = (f) => Int16Array.from({length: n}, (_, i) => 8000 * Math.sin(2 * Math.PI * f * i / rate));
  const t0 = performance.now();
  cslmPage.play(chunk(300), rate);  // two arrive at once,
  cslmPage.play(chunk(400), rate);
  await new Promise((r) => setTimeout(r, 350));  // the next ones late (network jitter),
  cslmPage.play(chunk(500), rate);
  cslmPage.play(chunk(600), rate);
  cslmPage.play(chunk(700), rate);
  while (cslmState.audio.playedChunks < 5) await new Promise((r) => setTimeout(r, 10));
  return {wall_s: (performance.now() - t0) / 1000, audio: cslmState.audio};
}"""


def test_page_plays_chunks_back_to_back(browser, page_server):
    """The page's player (Web Audio): chunks that arrive together play one after the other
    with neither gap nor overlap; one arriving after the audio ran out starts when it comes."""
    page, _ = open_page(browser, page_server)
    out = page.evaluate(PLAYER)
    audio = out["audio"]
    assert audio["playedSamples"] == audio["receivedSamples"] == 5 * 2205
    assert audio["gaps"] == 1
    sched = audio["schedule"]
    check_schedule(sched)
    for c in sched:
        assert c["end"] - c["at"] == pytest.approx(0.1, abs=1e-6)
    assert sched[1]["at"] == sched[0]["end"] and sched[3]["at"] == sched[2]["end"]
    assert sched[2]["at"] == sched[2]["arrived"] > sched[1]["end"] + 0.1
    # played in real time: the first 0.2 s within the wait of 0.35 s, then 0.3 s (at once,
    # they would all have ended 0.1 s after the wait)
    assert 0.6 <= out["wall_s"] < 3, out
    assert page.eval_on_selector("#audio", "e => e.dataset.audioPlayedChunks") == "5"


@pytest.fixture
def keyed_server(page_server):
    """A second app on page_server's service that needs the API key "sesame"."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(page_server.service, "sesame"),
            host="127.0.0.1",
            port=0,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(30)


def test_page_with_an_api_key(browser, keyed_server, question_wav):
    """A server with --api-key: the page opened at /?key=KEY uses it (/healthz as a Bearer
    token, the WebSocket as ?key=); a wrong key typed in is reported and disables asking. The
    question asked with sampling (its fields sent as the server wants them)."""
    page = browser.new_page()
    page.goto(keyed_server + "/?key=sesame")
    page.wait_for_function("document.body.dataset.phase === 'ready'", timeout=TIMEOUT_MS)
    page.fill("#key", "wrong")
    page.press("#key", "Tab")  # change
    page.wait_for_function("document.body.dataset.phase === 'needs-key'", timeout=TIMEOUT_MS)
    assert page.inner_text("#status") == "wrong API key"
    assert page.is_disabled("#file") and page.is_disabled("#record")
    page.fill("#key", "sesame")
    page.press("#key", "Tab")
    page.wait_for_function("document.body.dataset.phase === 'ready'", timeout=TIMEOUT_MS)
    # sampling (the bigram model's answer is the same: its one next token holds p > top_p)
    page.select_option("#decoding", "sample")
    page.fill("#temperature", "0.8")
    page.fill("#top-p", "0.9")
    page.fill("#seed", "7")
    page.set_input_files("#file", str(question_wav))
    state = wait_answered(page, [])
    assert state["answer"] == "The fox" and state["audio"]["playedSamples"] > 0


def test_page_shows_its_place_in_the_queue(browser, page_server, question_wav):
    """Every slot busy: the page says where its question waits, then answers when a slot frees."""
    page, logs = open_page(browser, page_server)
    engine = page_server.service.engine
    hold = threading.Event()
    blockers = [
        Request([5] * 10, 10_000, on_token=lambda t: hold.wait(60)) for _ in range(engine.slots)
    ]
    try:
        for r in blockers:
            engine.submit(r)
        page.set_input_files("#file", str(question_wav))
        page.wait_for_function("cslmState.queued !== null", timeout=TIMEOUT_MS)
        assert page.evaluate("cslmState.queued") == 1
        assert "position 1 in the queue" in page.inner_text("#status")
    finally:
        for r in blockers:
            engine.cancel(r)
        hold.set()
    state = wait_answered(page, logs)
    assert state["answer"] == "The fox" and state["queued"] == 1


def test_page_asks_with_units(browser, page_server):
    """Speech units typed in (what a server without a speech tokenizer takes): answered."""
    page, logs = open_page(browser, page_server)
    page.click("#units-box summary")
    page.fill("#units", "<1><2><3>")
    page.press("#units", "Enter")
    state = wait_answered(page, logs)
    assert state["question"]["units"] == "<1><2><3>" and state["sent"]["samples"] == 0
    assert state["transcript"] == "What" and state["answer"] == "The fox"
    assert state["audio"]["playedSamples"] > 0
