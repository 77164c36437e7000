"""cslm_jax.eval.judge (issue 26) against a local OpenAI-compatible chat server on loopback that
counts the requests it gets: scores parsed, malformed replies retried then counted as failed,
transient 5xx retried, the cache answering a rerun, the endpoint down or a 4xx a clear error."""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cslm_jax.eval.judge import (
    DEFAULT_PROMPT,
    Judge,
    chat_url,
    load_prompt,
    parse_scale,
    parse_score,
)
from cslm_jax.eval.metrics import EvaluationError


class ChatServer:
    """`POST /v1/chat/completions`: the reply depends on the answer in the prompt: "garbled"
    -> no score, "flaky" -> HTTP 500 on its first request then a score, "teapot" -> HTTP 418,
    otherwise `Score: N` with N the number of words of the answer. Counts requests per answer,
    the most in flight at once, and the bearer tokens seen."""

    def __init__(self, delay=0.0):
        self.requests: dict[str, int] = {}
        self.in_flight = self.max_in_flight = 0
        self.keys = set()
        self.bodies = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                answer = re.search(r"Answer to grade: (.*)", prompt).group(1)
                with server.lock:
                    server.bodies.append(body)
                    server.keys.add(self.headers.get("Authorization"))
                    n = server.requests[answer] = server.requests.get(answer, 0) + 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(delay)
                with server.lock:
                    server.in_flight -= 1
                if self.path != "/v1/chat/completions" or "teapot" in answer:
                    return self.send(418, {"error": "no such model"})
                if "flaky" in answer and n == 1:
                    return self.send(500, {"error": "overloaded"})
                text = (
                    "I would rather not say."
                    if "garbled" in answer
                    else (f"The answer is fine.\nScore: {len(answer.split())}")
                )
                self.send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def total(self):
        return sum(self.requests.values())

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


ITEMS = [
    {"question": "what is a cat", "answer": "a small animal", "reference": "an animal"},
    {"question": "say hi", "answer": "hi there friend how are you", "reference": "hi"},
    {"question": "and this", "answer": "garbled noise", "reference": "x"},
    {"question": "once more", "answer": "flaky but fine", "reference": "y"},
]


def test_scores_retries_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CSLM_JUDGE_API_KEY", "sk-test")
    cache = tmp_path / "judge_cache.jsonl"
    judge = Judge(server.url, "judge-model", cache=cache, retries=2, backoff_s=0, concurrency=2)
    got = judge.score(ITEMS)
    assert got["scores"] == [3.0, 6.0, None, 3.0]
    assert got["mean"] == pytest.approx(4.0)
    assert (got["scored"], got["failed"], got["cached"]) == (3, 1, 0)
    # the malformed reply tried 1 + 2 times, the 500 retried once
    assert server.requests == {
        "a small animal": 1,
        "hi there friend how are you": 1,
        "garbled noise": 3,
        "flaky but fine": 2,
    }
    assert got["requests"] == server.total() == 7
    assert got["replies"][2] == "I would rather not say."
    assert server.keys == {"Bearer sk-test"}
    assert {(b["model"], b["temperature"]) for b in server.bodies} == {("judge-model", 0)}
    assert any("Reference answer: an animal" in b["messages"][0]["content"] for b in server.bodies)
    lines = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(lines) == 3 and {x["model"] for x in lines} == {"judge-model"}

    # a rerun: the scored prompts come from the cache, only the failed one is asked again
    again = Judge(server.url, "judge-model", cache=cache, retries=0, backoff_s=0)
    before = server.total()
    got2 = again.score(ITEMS)
    assert got2["scores"] == got["scores"]
    assert (got2["cached"], got2["requests"]) == (3, 1)
    assert server.total() == before + 1
    before = server.total()
    scored = [it for it in ITEMS if "garbled" not in it["answer"]]
    got3 = Judge(server.url, "judge-model", cache=cache).score(scored)
    assert got3["requests"] == 0 and server.total() == before
    assert got3["scores"] == [3.0, 6.0, 3.0]
    # the key is (model, prompt): another judge model is asked afresh
    got4 = Judge(server.url, "other-model", cache=cache).score(scored[:1])
    assert (got4["requests"], got4["cached"]) == (1, 0)


def test_concurrency_limit(tmp_path):
    server = ChatServer(delay=0.2)
    try:
        items = [{"question": "q", "answer": f"answer number {i}"} for i in range(6)]
        got = Judge(server.url + "/v1", "m", concurrency=2, backoff_s=0).score(items)
        assert got["scores"] == [3.0] * 6
        assert server.max_in_flight == 2
    finally:
        server.close()


def test_endpoint_down_and_client_errors(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(EvaluationError, match=rf"--judge-url {url}/v1/chat/completions: cannot"):
        Judge(url, "m", backoff_s=0).score(ITEMS[:2])
    with pytest.raises(EvaluationError, match=r"HTTP 418 for model 'm'.*CSLM_JUDGE_API_KEY"):
        Judge(server.url, "m", backoff_s=0).score([{"question": "q", "answer": "teapot"}])
    with pytest.raises(EvaluationError, match=r"HTTP 418"):
        Judge(server.url + "/wrong/chat/completions", "m").score(ITEMS[:1])


def test_persistent_5xx_raises(server):
    """ "flaky" fails its first request: with no retry, the error names the status."""
    with pytest.raises(EvaluationError, match="HTTP 500 after 1 tries"):
        Judge(server.url, "m", retries=0).score([{"question": "q", "answer": "flaky"}])


def test_parsing_and_configuration(tmp_path):
    assert parse_score("Score: 7", 1, 10) == 7.0
    assert parse_score("thinking... score 3\nFinal **Score:** 8", 1, 10) == 8.0
    assert parse_score(" 9/10 ", 1, 10) == 9.0
    assert parse_score("7.5", 1, 10) == 7.5
    assert parse_score("Score: 11", 1, 10) is None
    assert parse_score("It is a 7 I guess", 1, 10) is None
    assert parse_score("", 1, 10) is None
    assert chat_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_url("http://h/x/v1/chat/completions") == "http://h/x/v1/chat/completions"
    assert parse_scale("1-10") == (1, 10) and parse_scale("0:5") == (0, 5)
    with pytest.raises(EvaluationError, match="--judge-scale '10-1'"):
        parse_scale("10-1")
    assert load_prompt() == (DEFAULT_PROMPT, "default")
    for ph in ("{question}", "{answer}", "{reference}", "{lo}", "{hi}"):
        assert ph in DEFAULT_PROMPT
    good = tmp_path / "p.txt"
    good.write_text("Q {question} A {answer} JSON {{}} in {lo}..{hi}")
    assert load_prompt(good)[0].startswith("Q {question}")
    bad = tmp_path / "bad.txt"
    bad.write_text("Q {question} A {answr}")
    with pytest.raises(EvaluationError, match=r"bad.txt: unknown placeholder \{answr\}"):
        load_prompt(bad)
    with pytest.raises(EvaluationError, match="cannot read"):
        load_prompt(tmp_path / "missing.txt")
    broken = tmp_path / "cache.jsonl"
    broken.write_text('{"model": "m"}\n{"model": "m", "prompt": "p", "reply": "7", "score": 7}\n')
    with pytest.raises(EvaluationError, match="cache.jsonl line 1: not a cache record"):
        Judge("http://127.0.0.1:1", "m", cache=broken)


def test_cache_line_cut_short(server, tmp_path):
    """An interrupted run's last cache line is skipped, and the next record starts a new line."""
    cache = tmp_path / "c.jsonl"
    Judge(server.url, "m", cache=cache).score(ITEMS[:1])
    cache.write_text(cache.read_text() + '{"model": "m", "prom')
    got = Judge(server.url, "m", cache=cache).score(ITEMS[:2])
    assert (got["cached"], got["requests"]) == (1, 1)
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["score"] == 6.0
    assert Judge(server.url, "m", cache=cache).score(ITEMS[:2])["requests"] == 0
