"""An LLM judge for spoken-QA answers (issue 26): any OpenAI-compatible chat endpoint (a vLLM or
SGLang server, a hosted API) rates each answer on a score scale, as the paper's LLM judge does.

The paper does not publish its judge prompt, so the prompt and its scale are configuration:
`DEFAULT_PROMPT` (below, 1-10) unless a template file is given. A template is plain text with
the placeholders `{question}`, `{answer}`, `{reference}`, `{lo}` and `{hi}` (literal braces
doubled: `{{`, `}}`); when audio is scored, `{question}` and `{answer}` are the transcripts of
the spoken question and of the answer's audio. The reply must carry the score as `Score: N`
(or be just the number), N within [lo, hi]; anything else is a malformed reply.

Each prompt is one request: `POST <url>/chat/completions` with `{"model", "messages": [one user
message], "temperature": 0}`, the key (if the environment variable `CSLM_JUDGE_API_KEY`, or the
one named, is set) as a bearer token. `--judge-url` may be the server's root
(`http://host:8000`), its `/v1`, or the full `/v1/chat/completions`.

- Retries: a malformed reply, a 5xx or 429 status, a timeout or a dropped connection is retried
  up to `retries` times with exponential backoff (`backoff_s`, doubled each time). A reply still
  malformed after that counts as failed (score None, the reply kept); still 5xx / 429 raises.
- A refused connection (the endpoint down) or any other 4xx (a wrong key, model or path) is an
  `EvaluationError` naming the URL at once: nothing would be scored.
- `concurrency` requests in flight at most (threads sharing one HTTP client).
- Cache: a JSON-lines file, one line per scored prompt `{"model", "prompt", "reply", "score"}`,
  keyed by (model, prompt); a rerun with the same prompts sends no request. Failed prompts are
  not cached (a rerun asks again).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from cslm_jax.eval.metrics import EvaluationError

API_KEY_ENV = "CSLM_JUDGE_API_KEY"

# The documented default (the paper's own prompt is not published).
DEFAULT_PROMPT = """\
You are grading an answer to a spoken question. The question and the answer were spoken; you \
see their transcripts, which may contain recognition errors.

Question: {question}
Reference answer: {reference}
Answer to grade: {answer}

Rate the answer from {lo} to {hi}: {hi} means correct, complete, relevant and fluent (at least \
as good as the reference answer); {lo} means wrong, irrelevant or unintelligible. Judge the \
content, not the wording. Reply with one line: Score: <an integer from {lo} to {hi}>"""

PLACEHOLDERS = ("question", "answer", "reference", "lo", "hi")
_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE = re.compile(r"^\s*\**\s*(-?\d+(?:\.\d+)?)\s*\**\s*(?:/\s*\d+)?\s*\.?\s*$")


def chat_url(url: str) -> str:
    """The chat completions URL of `--judge-url` (root, /v1 or the full path)."""
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


def parse_score(reply: str, lo: float, hi: float) -> float | None:
    """The score in a judge's reply: the last `Score: N`, else a reply that is only a number
    (`7`, `7/10`); None when there is none or it lies outside [lo, hi]."""
    found = _SCORE.findall(reply)
    if found:
        value = float(found[-1])
    else:
        m = _BARE.match(reply)
        if not m:
            return None
        value = float(m.group(1))
    return value if lo <= value <= hi else None


def load_prompt(path=None) -> tuple[str, str]:
    """(template, where it came from): `DEFAULT_PROMPT`, or a template file checked for unknown
    placeholders."""
    if path is None:
        return DEFAULT_PROMPT, "default"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise EvaluationError(
            f"--judge-prompt {path}: cannot read it ({e.strerror or e})"
        ) from None
    check_template(text, f"--judge-prompt {path}")
    return text, str(path)


def check_template(text: str, where: str) -> None:
    try:
        text.format(**{k: "" for k in PLACEHOLDERS})
    except KeyError as e:
        raise EvaluationError(
            f"{where}: unknown placeholder {{{e.args[0]}}}; the placeholders are "
            f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (double literal braces)"
        ) from None
    except (ValueError, IndexError) as e:
        raise EvaluationError(
            f"{where}: not a valid template ({e}; double literal braces)"
        ) from None


def parse_scale(text: str) -> tuple[int, int]:
    """`--judge-scale LO-HI` (e.g. 1-10)."""
    m = re.fullmatch(r"\s*(-?\d+)\s*[-:]\s*(-?\d+)\s*", text)
    if not m or int(m.group(1)) >= int(m.group(2)):
        raise EvaluationError(f"--judge-scale {text!r}: expected LO-HI with LO < HI, e.g. 1-10")
    return int(m.group(1)), int(m.group(2))


class _Retry(Exception):
    """A transient failure (5xx, 429, timeout, dropped connection) worth another try."""


class Judge:
    """Scores answers through an OpenAI-compatible chat endpoint (see the module doc)."""

    def __init__(
        self,
        url: str,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        scale: tuple[float, float] = (1, 10),
        cache=None,
        concurrency: int = 4,
        retries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 120.0,
        api_key_env: str = API_KEY_ENV,
        prompt_source: str = "default",
    ):
        if not url or not model:
            raise EvaluationError("the judge needs both --judge-url and --judge-model")
        if concurrency < 1 or retries < 0:
            raise EvaluationError(
                f"judge concurrency {concurrency} / retries {retries}: need >= 1 / >= 0"
            )
        check_template(prompt, f"judge prompt ({prompt_source})")
        self.url = chat_url(url)
        self.model = model
        self.prompt = prompt
        self.prompt_source = prompt_source
        self.lo, self.hi = scale
        self.concurrency = int(concurrency)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.timeout_s = float(timeout_s)
        self.api_key_env = api_key_env
        self.cache_path = Path(cache) if cache is not None else None
        self.cache: dict[tuple[str, str], dict] = {}
        self.lock = threading.Lock()
        self.requests = 0
        if self.cache_path is not None and self.cache_path.is_file():
            self.read_cache()

    def read_cache(self) -> None:
        lines = self.cache_path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if line.startswith("{") and (
                    e.pos >= len(line.rstrip()) or e.msg.startswith("Unterminated string")
                ):
                    continue  # a line cut short by an interrupted run: asked again
                rec = None
            try:
                key = (rec["model"], rec["prompt"])
                float(rec["score"])
            except (KeyError, TypeError, ValueError):
                raise EvaluationError(
                    f"judge cache {self.cache_path} line {n}: not a cache record "
                    f'{{"model", "prompt", "reply", "score"}}; delete the file to start over'
                ) from None
            self.cache[key] = rec

    def render(self, question: str, answer: str, reference: str = "") -> str:
        return self.prompt.format(
            question=question, answer=answer, reference=reference, lo=self.lo, hi=self.hi
        )

    def score(self, items) -> dict:
        """Scores of `items` (dicts with question, answer and optional reference), in order.

        Returns {"scores": [float or None], "replies": [str or None], "mean" (over scored
        answers), "scored", "failed", "requests" (sent), "cached" (answered from the cache),
        "model", "url", "prompt", "scale"}."""
        prompts = [
            self.render(it["question"], it["answer"], it.get("reference", "")) for it in items
        ]
        headers = {}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        results: list[dict | None] = [None] * len(prompts)
        todo = []
        cached = 0
        for i, p in enumerate(prompts):
            hit = self.cache.get((self.model, p))
            if hit is not None:
                results[i] = hit
                cached += 1
            else:
                todo.append(i)
        self.requests = 0
        if todo:
            limits = httpx.Limits(max_connections=self.concurrency)
            with httpx.Client(headers=headers, timeout=self.timeout_s, limits=limits) as client:
                pool = ThreadPoolExecutor(self.concurrency)
                try:
                    futures = {i: pool.submit(self.ask, client, prompts[i]) for i in todo}
                    for i, fut in futures.items():
                        results[i] = fut.result()
                finally:  # on an error, the prompts not yet sent are not sent
                    pool.shutdown(cancel_futures=True)
        scores = [r["score"] if r else None for r in results]
        ok = [s for s in scores if s is not None]
        return {
            "scores": scores,
            "replies": [r["reply"] if r else None for r in results],
            "mean": sum(ok) / len(ok) if ok else None,
            "scored": len(ok),
            "failed": len(scores) - len(ok),
            "requests": self.requests,
            "cached": cached,
            "model": self.model,
            "url": self.url,
            "prompt": self.prompt_source,
            "scale": [self.lo, self.hi],
        }

    def ask(self, client, prompt: str) -> dict:
        """One prompt's record {"model", "prompt", "reply", "score"} (score None when every try
        was malformed), cached when scored."""
        reply = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self.post(client, prompt)
            except _Retry as e:
                if attempt == self.retries:
                    raise EvaluationError(
                        f"--judge-url {self.url}: {e} after {self.retries + 1} tries"
                    ) from None
                continue
            score = parse_score(reply, self.lo, self.hi)
            if score is not None:
                rec = {"model": self.model, "prompt": prompt, "reply": reply, "score": score}
                self.remember(rec)
                return rec
        return {"model": self.model, "prompt": prompt, "reply": reply, "score": None}

    def post(self, client, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
        }
        with self.lock:
            self.requests += 1
        try:
            r = client.post(self.url, json=body)
        except httpx.ConnectError as e:
            raise EvaluationError(
                f"--judge-url {self.url}: cannot connect ({e}); is the judge's server running "
                f"and the URL right?"
            ) from None
        except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError) as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        if r.status_code >= 500 or r.status_code == 429:
            raise _Retry(f"HTTP {r.status_code}")
        if r.status_code != 200:
            raise EvaluationError(
                f"--judge-url {self.url}: HTTP {r.status_code} for model {self.model!r}: "
                f"{r.text[:300]!r} (check the URL, --judge-model and ${self.api_key_env})"
            )
        try:
            content = r.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return ""  # not a chat completion: malformed, retried
        return content if isinstance(content, str) else ""

    def remember(self, rec: dict) -> None:
        with self.lock:
            self.cache[(rec["model"], rec["prompt"])] = rec
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
                with open(self.cache_path, "a+b") as f:
                    if f.seek(0, os.SEEK_END):
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            line = b"\n" + line  # after a line cut short, start a new one
                    f.write(line)
