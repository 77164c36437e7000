"""`cslm-jax decode`: spoken questions (unit files) -> streamed CSLM answers with latency per answer.

The command replaces the reference's `decode_general.py` (answer in the question's language) and
`decode_general_cross.py` (answer in the other language) and keeps their files:

* input (`--unit FILE`): one spoken question per line, its speech units written as unit tokens
  with no spaces, `<12><907><33>` (spaces between tokens are removed; a line may also carry the
  `<sosp>` ... `<eosp>` delimiters, which the prompt adds anyway). Empty lines, anything that is
  not a unit token and unit ids outside the model's codebook are errors naming the line.
* `OUT/responses.json`: one `{"result": "<the generated text>"}` line appended per question,
  in input order, as the reference does.
* `OUT/responses.jsonl` (ours): one record per question, appended beside it: the transcript, the
  text answer and its chunks, the speech chunks (unit numbers), the prompt's token ids
  (`input_ids`), the generated ids (`output_ids`), the timings below, and what identifies the
  run (`source`, `index`, `lang`, `cross_lingual`, `prompt_style`, `settings`).

A run that was interrupted (Ctrl-C) resumes when it is started again with the same arguments:
the questions responses.jsonl answers already (this run's records, questions 0..k-1, at its
end) are skipped, the others answered and appended in order, and responses.json is first
rewritten to line up with responses.jsonl (`prior_answers`).

Latency per answer, measured from the moment its batch starts decoding (prefill included,
compilation excluded: every new batch shape is compiled by a warm-up call first):
`time_to_first_token_s`, `time_to_speech_start_s` (the first `<sosp>` is out: a unit-level
streaming speech decoder can start), `time_to_first_speech_chunk_s` (its `<eosp>` is out: a
chunk-level speech decoder can start), `total_s` (the answer's stop token), `tokens_before_first_speech`
(generated tokens before the first `<sosp>`: TQ + TA1 in the interleaved chain, TQ + the whole
TA in the sequential one) and `tokens_to_first_speech_chunk` (through its `<eosp>`). A token is
timed when the host receives it, i.e. at the end of its group of `--chunk-size` steps. With
`--speech-out` (`cslm_jax.speech.stream.SpeechOut`): `time_to_first_audio_s` (the first samples
ready), `speech_rtf` (synthesis seconds / audio seconds), `audio_s` and `speech_compile_s`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from cslm_jax.config import ConfigError
from cslm_jax.data.formats import ChatRenderer, load_data_config, merge_repeats, speech
from cslm_jax.errors import CslmError
from cslm_jax.model.vocab import require_model_cslm_tokens
from cslm_jax.storage import fs
from cslm_jax.storage.outputs import check_output_place

# JAX-backed modules (infer.decode, storage.checkpoint, kernels) are imported where they are used:
# importing this module (unit-file parsing, prompts, answer records) does not load JAX.


class UnitFileError(CslmError):
    """A unit file (or its model) cannot be decoded; the message names the file and line."""


# -- the reference's files ----------------------------------------------------------------------

_TOKEN = re.compile(r"<sosp>|<eosp>|<(\d+)>")


def parse_unit_line(line: str, where: str) -> list[int]:
    """One line of a unit file -> its unit numbers. `where` ("FILE:LINE") prefixes errors."""
    text = "".join(line.split())  # the reference removes spaces
    if not text:
        raise UnitFileError(
            f"{where}: empty line; every line must hold one spoken question as "
            f"unit tokens like <12><907><33>"
        )
    units: list[int] = []
    pos, opened, closed = 0, False, False
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or closed:
            bad = text[pos : pos + 20]
            hint = (
                " (bare numbers: write each unit as <N>, no spaces needed)"
                if bad[:1].isdigit()
                else ""
            )
            raise UnitFileError(
                f"{where}: column {pos + 1}: expected a unit token like <12>, found {bad!r}{hint}"
            )
        if m.group(0) == "<sosp>":
            if opened or units:
                raise UnitFileError(f"{where}: column {pos + 1}: <sosp> may only open the line")
            opened = True
        elif m.group(0) == "<eosp>":
            if not opened:
                raise UnitFileError(f"{where}: column {pos + 1}: <eosp> without <sosp>")
            closed = True
        else:
            units.append(int(m.group(1)))
        pos = m.end()
    if not units:
        raise UnitFileError(f"{where}: no unit tokens in the line")
    if opened and not closed:
        raise UnitFileError(f"{where}: <sosp> is not closed by <eosp>")
    return units


def read_unit_file(path: str | Path) -> list[list[int]]:
    """All questions of a unit file, one list of unit numbers per line (codebook not checked:
    see `check_codebook`)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnitFileError(f"{path}: unit file not found") from None
    except OSError as e:
        raise UnitFileError(f"{path}: cannot read the unit file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UnitFileError(f"{path}: not UTF-8 text ({e})") from None
    lines = raw.splitlines()
    if not lines:
        raise UnitFileError(f"{path}: the unit file is empty; write one question per line")
    return [parse_unit_line(line, f"{path}:{i + 1}") for i, line in enumerate(lines)]


def check_codebook(questions: Sequence[Sequence[int]], unit_count: int, path, model) -> None:
    """Every unit lies in the model's codebook 0..unit_count-1 (the error names file and line)."""
    for i, units in enumerate(questions):
        for u in units:
            if not 0 <= u < unit_count:
                raise UnitFileError(
                    f"{path}:{i + 1}: unit <{u}> is outside the codebook of {model} "
                    f"(units <0>..<{unit_count - 1}>)"
                )


def format_unit_line(units: Sequence[int]) -> str:
    """A unit-file line as the reference writes it: `<12><907><33>`."""
    return "".join(f"<{int(u)}>" for u in units)


def write_unit_file(path: str | Path, questions: Sequence[Sequence[int]]) -> None:
    Path(path).write_text("".join(format_unit_line(u) + "\n" for u in questions), encoding="utf-8")


def append_results(path: str | Path, results: Sequence[str]) -> None:
    """Append `{"result": ...}` lines (the reference's responses.json: JSON lines, UTF-8)."""
    with open(path, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({"result": r}, ensure_ascii=False) + "\n")


def read_results(path: str | Path) -> list[str]:
    """The `result` of every line of a responses.json."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        try:
            out.append(json.loads(line)["result"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UnitFileError(f'{path}:{i + 1}: not a {{"result": ...}} line') from None
    return out


# -- prompts ----------------------------------------------------------------------------------------


def prompt_template(lang: str, cross_lingual: bool, data_config: str | Path) -> tuple[str, str]:
    """(prompt template with {speech}, chunk unit "word"|"char") for an answer language: the
    language's `s2s_prompt` / `s2s_cross_prompt` in the data config (configs/data/cslm_en_zh.yaml
    holds the reference recipe's, CSLM.md section 5). An unknown language is a ConfigError naming
    the config's languages."""
    fmt = load_data_config(data_config, check_files=False).format
    return _prompt(fmt, lang, cross_lingual, data_config)


def _prompt(fmt, lang: str, cross_lingual: bool, data_config) -> tuple[str, str]:
    if lang not in fmt.languages:
        raise ConfigError(
            f"--lang {lang!r}: {data_config} has no language {lang!r}; its "
            f"languages: {', '.join(sorted(fmt.languages))}"
        )
    spec = fmt.languages[lang]
    return (spec.s2s_cross_prompt if cross_lingual else spec.s2s_prompt), spec.chunk_unit


def chat_prompt_ids(tokenizer, text: str, where: str, loss_mask: str = "reference") -> list[int]:
    """The user turn rendered with the tokenizer's chat template plus the assistant header,
    tokenized as training tokenizes its examples under the data config's `format.loss_mask`
    (`ChatRenderer.prompt_ids`: "reference" adds the tokenizer's special tokens, as the
    authors' training does) (CSLM.md section 2)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UnitFileError(
            f"{where}: the tokenizer has no chat template; CSLM prompts are rendered with it"
        )
    return ChatRenderer(tokenizer, mask=loss_mask).prompt_ids(text)


PROMPT_STYLES = ("training", "reference")
# decode_general.py's `preprocess` strips this suffix when the rendered prompt ends with it (the
# Llama-3.1 template never renders it for an empty assistant message: nothing is stripped).
REFERENCE_STRIP = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
# What the model opens after the reference prompt's closed, empty assistant turn: a new assistant
# header. Its tokens are generated but belong to no streamed event (see `decode_questions`).
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def reference_prompt(tokenizer, text: str, where: str) -> tuple[str, list[int]]:
    """The prompt exactly as the reference's decode_general.py / decode_general_cross.py build
    it: [user `text`, assistant ""] rendered with the tokenizer's own chat template (no generation
    prompt), `REFERENCE_STRIP` removed if the text ends with it, then `tokenizer(text)` with its
    special tokens added. With a Llama-3.1 tokenizer the prompt therefore ends with a closed,
    empty assistant turn (`...assistant<|end_header_id|>\n\n<|eot_id|>`) and starts with two
    `<|begin_of_text|>` (the template's and the tokenizer's). Returns (text, ids)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UnitFileError(
            f"{where}: the tokenizer has no chat template; CSLM prompts are rendered with it"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}, {"role": "assistant", "content": ""}], tokenize=False
    )
    if rendered.endswith(REFERENCE_STRIP):
        rendered = rendered[: -len(REFERENCE_STRIP)]
    return rendered, list(tokenizer(rendered).input_ids)


def reference_tag(template: str) -> str:
    """The text the reference's `postprocess` cuts its result from: the prompt template's last
    sentence up to the speech span, plus `<sosp>` ("This is input: <sosp>", "这是输入: <sosp>" for
    the recipe's prompts)."""
    before = template.split("{speech}")[0]
    last = max(before.rfind(". "), before.rfind("。"), before.rfind("! "), before.rfind("? "))
    return (before[last + 1 :] if last >= 0 else before).lstrip() + "<sosp>"


def reference_result(
    prompt_ids: Sequence[int], output_ids: Sequence[int], tokenizer, tag: str
) -> str:
    """The reference's `result`: prompt and generation decoded together (special tokens
    skipped), then the text between the first `tag` and the first `<eoa>` after it (to the end
    when no `<eoa>` follows; "" when the tag is missing). It therefore starts with the question's
    units and holds the text of the assistant header the model opened."""
    text = tokenizer.decode(list(prompt_ids) + list(output_ids), skip_special_tokens=True)
    match = re.search(f"{re.escape(tag)}(.*?){re.escape('<eoa>')}", text + "<eoa>", re.DOTALL)
    return match.group(1) if match else ""


# -- decoding with timings ------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    """One decoded question. Times in seconds from the start of its batch (None: never happened)."""

    index: int  # 0-based line of the unit file
    input_ids: list[int]
    output_ids: list[int] = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)
    time_to_first_token_s: float | None = None
    time_to_speech_start_s: float | None = None
    time_to_first_speech_chunk_s: float | None = None
    total_s: float | None = None
    tokens_before_first_speech: int | None = None
    tokens_to_first_speech_chunk: int | None = None
    batch_size: int = 1


@dataclasses.dataclass
class DecodedBatch:
    """A batch's answers, its decoding time (prefill + loop) and the compilation it needed first."""

    answers: list[Answer]
    decode_s: float
    compile_s: float


def decode_questions(
    cfg,
    params,
    tokenizer,
    vocab,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 1,
    max_new_tokens: int = 2048,
    sampling=None,
    chunk_size: int = 1,
    stop_ids: Sequence[int] | None = None,
    answer_prefix: Sequence[int] = (),
    first: int = 0,
    on_event: Callable[[int, object, float], None] | None = None,
    speech_out=None,
    log: Callable[[str], None] = lambda _: None,
) -> Iterator[DecodedBatch]:
    """Decode prompts in batches of `batch_size`, yielding each batch when it is done.
    `first`: start at that prompt (a resumed run: the prompts before it are answered already).

    on_event(index, event, seconds) is called as soon as each event completes (streaming).
    speech_out: a `cslm_jax.speech.stream.SpeechOut` (or any object with its `begin(index, t0)`
    and `event(index, event)`): told when each answer's batch starts and of every event, it
    synthesises the speech chunks as they close (inside the decoding loop, so later timings
    include that synthesis).
    answer_prefix: ids the model is expected to generate first (the assistant header it opens
    after the reference prompt); when an answer starts with them they are kept in its output ids
    but not parsed into events (else they are parsed like any text).
    sampling: a `cslm_jax.infer.decode.Sampling` (default: its defaults, the reference's top-p);
    reproducible for a seed and batch size (the batch starting at prompt k uses seed + k).
    """
    from cslm_jax.infer.decode import (  # heavy: jax
        EventParser,
        Sampling,
        SpeechChunk,
        default_stop_ids,
        generate_stream,
        start_state,
    )

    if batch_size < 1:
        raise UnitFileError(f"--batch-size must be >= 1, got {batch_size}")
    stops = default_stop_ids(tokenizer, vocab) if stop_ids is None else list(stop_ids)
    sosp = vocab.token_id("<sosp>")
    bucket = 64
    compiled: set = set()
    sampling = Sampling() if sampling is None else sampling
    kw = dict(
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
        vocab=vocab,
        pad_id=pad_token_id(tokenizer, cfg),
        prompt_bucket=bucket,
        chunk_size=chunk_size,
    )
    for start in range(first, len(prompts), batch_size):
        batch = [list(p) for p in prompts[start : start + batch_size]]
        shape = (len(batch), -(-max(map(len, batch)) // bucket))
        compile_s = 0.0
        if shape not in compiled:  # compile outside the timed region
            t0 = time.perf_counter()
            next(
                iter(
                    generate_stream(
                        cfg, params, batch, sampling=sampling.seeded(sampling.seed + start), **kw
                    )
                )
            )
            compiled.add(shape)
            compile_s = time.perf_counter() - t0
            log(
                f"compiled for batch {shape[0]} x prompt <= {shape[1] * bucket} tokens in "
                f"{compile_s:.1f}s"
            )
        answers = [Answer(start + b, p, batch_size=len(batch)) for b, p in enumerate(batch)]
        parsers = [EventParser(tokenizer, vocab, stops, start_state(p, vocab)) for p in batch]
        parsers = [SkipPrefix(p, answer_prefix) for p in parsers]
        t0 = time.perf_counter()
        if speech_out is not None:
            for a in answers:
                speech_out.begin(a.index, t0)
        compiled_before = 0.0 if speech_out is None else speech_out.compile_total

        def clock(t0=t0, compiled_before=compiled_before) -> float:
            """Seconds since t0 without the speech windows compiled meanwhile (as the decoder's
            own compiles, they are not the answer's latency)."""
            spent = 0.0 if speech_out is None else speech_out.compile_total - compiled_before
            return time.perf_counter() - t0 - spent

        def emit(b: int, events, now: float, answers=answers):
            a = answers[b]
            for ev in events:
                a.events.append(ev)
                if isinstance(ev, SpeechChunk) and a.time_to_first_speech_chunk_s is None:
                    a.time_to_first_speech_chunk_s = now
                    a.tokens_to_first_speech_chunk = len(a.output_ids)
                if on_event is not None:
                    on_event(a.index, ev, now)
                if speech_out is not None:
                    speech_out.event(a.index, ev)

        for step in generate_stream(
            cfg, params, batch, sampling=sampling.seeded(sampling.seed + start), **kw
        ):
            now = clock()
            for b, tok in enumerate(step.tolist()):
                a, parser = answers[b], parsers[b]
                if parser.state == "ended":
                    continue
                if not a.output_ids:
                    a.time_to_first_token_s = now
                if tok == sosp and a.tokens_before_first_speech is None:
                    a.tokens_before_first_speech = len(a.output_ids)
                    a.time_to_speech_start_s = now
                a.output_ids.append(tok)
                emit(b, parser.feed(tok), now)
                if parser.state == "ended":
                    a.total_s = now
        now = clock()
        for b, parser in enumerate(parsers):
            if parser.state != "ended":
                emit(b, parser.close(), now)
                answers[b].total_s = now
        yield DecodedBatch(answers, now, compile_s)


class SkipPrefix:
    """An `EventParser` that first holds back generated ids while they spell a prefix of
    `prefix`: the whole prefix is dropped (it belongs to no event), anything else is parsed
    from its first id after all (also when the stream ends inside the prefix)."""

    def __init__(self, parser, prefix: Sequence[int] = ()):
        self.parser, self.prefix = parser, [int(t) for t in prefix]
        self.held: list[int] | None = [] if self.prefix else None

    @property
    def state(self) -> str:
        return self.parser.state

    def _release(self) -> list:
        pending, self.held = self.held or [], None
        events: list = []
        for t in pending:
            if self.parser.state != "ended":
                events += self.parser.feed(t)
        return events

    def feed(self, tok: int) -> list:
        if self.held is None:
            return self.parser.feed(tok)
        self.held.append(int(tok))
        if self.held == self.prefix[: len(self.held)]:
            if len(self.held) == len(self.prefix):
                self.held = None
            return []
        return self._release()

    def close(self) -> list:
        events = self._release()
        return events + (self.parser.close() if self.parser.state != "ended" else [])


def pad_token_id(tokenizer, cfg) -> int:
    """The tokenizer's pad id (the reference pads with 128002), else 0: finished rows emit it,
    and it never reaches an answer."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None and 0 <= pad < cfg.real_vocab_size else 0


def answer_record(a: Answer, tokenizer, vocab, chunk_unit: str, result: str | None = None) -> dict:
    """The responses.jsonl record of an answer (events split by kind, text chunks joined).
    `result`: responses.json's text for it (default: `result_text` of the generated ids)."""
    from cslm_jax.infer.decode import End, SpeechChunk, TextChunk, Transcript  # heavy: jax

    texts = [e.text for e in a.events if isinstance(e, TextChunk)]
    end = next((e for e in a.events if isinstance(e, End)), None)
    return {
        "index": a.index,
        "result": result_text(a.output_ids, tokenizer) if result is None else result,
        "transcript": next((e.text for e in a.events if isinstance(e, Transcript)), None),
        "answer": (" " if chunk_unit == "word" else "").join(texts),
        "text_chunks": texts,
        "speech_chunks": [list(e.units) for e in a.events if isinstance(e, SpeechChunk)],
        "finish": end.reason if end else None,
        "problems": list(end.problems) if end else [],
        "input_ids": a.input_ids,
        "output_ids": a.output_ids,
        "timing": {
            "time_to_first_token_s": a.time_to_first_token_s,
            "time_to_speech_start_s": a.time_to_speech_start_s,
            "time_to_first_speech_chunk_s": a.time_to_first_speech_chunk_s,
            "total_s": a.total_s,
            "tokens_before_first_speech": a.tokens_before_first_speech,
            "tokens_to_first_speech_chunk": a.tokens_to_first_speech_chunk,
            "generated_tokens": len(a.output_ids),
            "batch_size": a.batch_size,
        },
    }


def result_text(output_ids: Sequence[int], tokenizer) -> str:
    """The generated text as the reference stores it: special tokens (end of turn, EOS) dropped,
    the CSLM tokens (`[question]`, `<sosp>`, units, `<eoa>`, ...) kept."""
    return tokenizer.decode(
        list(output_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
    ).strip()


def latency_summary(records: Sequence[dict]) -> dict:
    """Mean and median of each timing over the answers that have it, and how many lack it."""
    out: dict = {"answers": len(records)}
    for key in (
        "time_to_first_token_s",
        "time_to_speech_start_s",
        "time_to_first_speech_chunk_s",
        "total_s",
        "tokens_before_first_speech",
        "tokens_to_first_speech_chunk",
        "generated_tokens",
    ):
        vals = [r["timing"][key] for r in records if r["timing"][key] is not None]
        out[key] = {
            "mean": statistics.fmean(vals) if vals else None,
            "median": statistics.median(vals) if vals else None,
            "missing": len(records) - len(vals),
        }
    for key in SPEECH_OUT_TIMINGS:  # --speech-out's, where some answer has them
        vals = [r["timing"].get(key) for r in records]
        if any(key in r["timing"] for r in records):
            vals = [v for v in vals if v is not None]
            out[key] = {
                "mean": statistics.fmean(vals) if vals else None,
                "median": statistics.median(vals) if vals else None,
                "missing": len(records) - len(vals),
            }
    return out


SPEECH_OUT_TIMINGS = ("time_to_first_audio_s", "speech_rtf")


def describe_event(index: int, ev, seconds: float) -> str:
    """One line per streamed event (for --stream)."""
    from cslm_jax.infer.decode import End, SpeechChunk, TextChunk, Transcript  # heavy: jax

    head = f"[{index + 1}] {seconds:7.3f}s"
    if isinstance(ev, Transcript):
        return f"{head} transcript {ev.text!r}"
    if isinstance(ev, TextChunk):
        return f"{head} text {ev.index} {ev.text!r}"
    if isinstance(ev, SpeechChunk):
        shown = format_unit_line(ev.units[:12]) + ("..." if len(ev.units) > 12 else "")
        return f"{head} speech {ev.index} ({len(ev.units)} units{'' if ev.closed else ', unclosed'}) {shown}"
    if isinstance(ev, End):
        return f"{head} end ({ev.reason})" + (
            f" problems: {'; '.join(ev.problems)}" if ev.problems else ""
        )
    return f"{head} {ev!r}"


# -- the command ----------------------------------------------------------------------------------


def model_folder(ckpt: str | None, hf_dir: str | None) -> Path:
    """The folder to load: `ckpt` (a model checkpoint or a finished run folder: its model/) or
    `hf_dir` (a Hugging Face folder, export-hf output)."""
    from cslm_jax.storage.checkpoint import resolve_model_dir  # heavy: jax

    if ckpt is not None:
        return resolve_model_dir(ckpt, flag="--ckpt")

    path = fs.path(hf_dir, "--hf-dir")
    if not (path / "config.json").is_file():
        raise UnitFileError(f"--hf-dir {path}: no config.json (not a Hugging Face model folder)")
    return path


def check_decode_arguments(
    sampling, *, batch_size: int, max_new_tokens: int, chunk_size: int
) -> None:
    """The decode command's numbers, named by their flags (before any model loads)."""
    for flag, value in (
        ("--batch-size", batch_size),
        ("--max-new-tokens", max_new_tokens),
        ("--chunk-size", chunk_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    if not sampling.greedy:
        if not sampling.temperature > 0:
            raise ConfigError(
                f"--temperature must be > 0 when sampling (or pass --greedy), got "
                f"{sampling.temperature}"
            )
        if not 0 < sampling.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {sampling.top_p}")


ANSWER_FILES = ("responses.json", "responses.jsonl")


def check_decode_output(out_dir: Path, inputs=()) -> None:
    """--output-dir must be a folder (or creatable), apart from every input (`inputs`: (flag,
    path) pairs; `storage.outputs.check_output_place`). What it holds is judged by
    `prior_answers`, once the questions and the model are known."""
    check_output_place(out_dir, inputs=inputs, flag="--output-dir", inside_ok=True)


def run_identity(
    *,
    unit_file,
    lang: str,
    cross_lingual: bool,
    prompt_style: str,
    model,
    sampling,
    max_new_tokens: int,
    compute_dtype,
    data_config,
) -> dict:
    """The responses.jsonl fields that tell a run's answers from another's: a rerun with the same
    arguments has the same (batch and chunk size aside, which change no answer's question)."""
    return {
        "source": str(unit_file),
        "lang": lang,
        "cross_lingual": bool(cross_lingual),
        "prompt_style": prompt_style,
        "settings": {
            "model": str(model),
            **dataclasses.asdict(sampling),
            "max_new_tokens": max_new_tokens,
            "compute_dtype": compute_dtype,
            "data_config": str(data_config),
        },
    }


def _same_run(record: dict, run: dict) -> bool:
    """`record` was written by `run` (`run_identity`); its paths compared as absolute paths, so
    `q.txt` and `./q.txt` name the same file (the prompts' ids are compared after loading)."""

    def norm(r):
        settings = dict(r.get("settings") or {})
        for key in ("model", "data_config"):
            if isinstance(settings.get(key), str) and "://" not in settings[key]:
                settings[key] = os.path.abspath(settings[key])
        source = r.get("source")
        return {
            **{k: r.get(k) for k in run},
            "settings": settings,
            "source": os.path.abspath(source) if isinstance(source, str) else source,
        }

    return norm(record) == norm(run)


@dataclasses.dataclass
class PriorAnswers:
    """What --output-dir holds for a decode run (`prior_answers`)."""

    done: list[dict]  # this run's records already written: questions 0..len-1
    jsonl_keep: int | None = None  # cut responses.jsonl to this many bytes (a cut-off last line)
    json_lines: list[str] | None = None  # rewrite responses.json with these (to line up)
    finish: bool = False  # every question is answered: only the files to complete
    position: int = 0  # responses.jsonl's line (0-based) of this run's answer to
    # question 0 (--speech-out names each wav by its answer's)


def _json_lines(path: Path) -> tuple[list[bytes], int | None]:
    """The lines of a JSON-lines file (none if it is missing), and where its last line was cut
    off mid-write (no newline and not JSON: the length of the complete lines before it) or None."""
    data = path.read_bytes() if path.is_file() else b""
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    if not last or _parse(last) is not None:
        return lines + ([last] if last else []), None
    return lines, len(data) - len(last)


def _parse(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def prior_answers(out_dir: Path, run: dict, questions: int, append: bool) -> PriorAnswers:
    """Decide what a decode run does with what `out_dir` holds (before any model loads).

    * nothing: a fresh run.
    * responses.jsonl ends with this run's answers to questions 0..k-1 (`run_identity` equal),
      k < `questions`: an interrupted run, resumed at question k (with or without `append`).
      A last line cut off mid-write is dropped (its question is answered again), and
      responses.json is rewritten to line up with responses.jsonl: any lines before ours (a
      folder the reference's scripts began) kept as they are, then one per record.
    * all `questions` answered by this run: refused (nothing to resume) unless `append`, which
      answers them all again after them; where the interruption came after the last answer
      (responses.json behind, no latency_summary.json) the files are only completed.
    * anything else (another run's answers, or a folder the reference's scripts wrote): refused
      unless `append`, which adds this run's answers after them (a cut-off last line of
      responses.jsonl dropped first)."""
    jsonl, json_file = out_dir / "responses.jsonl", out_dir / "responses.json"
    held = [n for n in ANSWER_FILES if (out_dir / n).is_file() and (out_dir / n).stat().st_size]
    if not held:
        return PriorAnswers([])
    lines, cut = _json_lines(jsonl)
    records = [_parse(line) for line in lines]
    done: list[dict] = []
    last = records[-1] if records else None
    if (
        isinstance(last, dict)
        and isinstance(last.get("index"), int)
        and 0 <= last["index"] < min(questions, len(records))
    ):
        tail = records[len(records) - last["index"] - 1 :]
        if all(
            isinstance(r, dict) and r.get("index") == i and _same_run(r, run)
            for i, r in enumerate(tail)
        ):
            done = tail
    if not done:
        if not append:
            raise ConfigError(
                f"--output-dir {out_dir}: already holds answers ({', '.join(held)}) "
                f"that are not an interrupted run of these questions with these "
                f"settings; pass --append to add these after them, or give another "
                f"folder"
            )
        return PriorAnswers([], jsonl_keep=cut, position=len(records))
    json_lines = _lined_up(
        json_file,
        [r.get("result") if isinstance(r, dict) else None for r in records],
        len(done),
        done[-1].get("timing", {}).get("batch_size", 1),
    )
    prior = PriorAnswers(
        done, jsonl_keep=cut, json_lines=json_lines, position=len(records) - len(done)
    )
    if len(done) < questions:
        return prior
    if append:
        return dataclasses.replace(prior, done=[], position=len(records))
    if (
        cut is not None
        or json_lines is not None
        or not (out_dir / "latency_summary.json").is_file()
    ):
        return dataclasses.replace(prior, finish=True)
    raise ConfigError(
        f"--output-dir {out_dir}: already holds answers to all {questions} "
        f"question(s) of {run['source']} with these settings (nothing to resume); "
        f"pass --append to answer them again after them, or give another folder"
    )


def _lined_up(json_file: Path, results: list, ours: int, last_batch: int) -> list[str] | None:
    """The lines responses.json must have to line up with responses.jsonl (`results`: its
    records' results, the last `ours` of them an interrupted run's), or None when it has them.
    Its lines before ours are kept as they are (another run's, or the reference's); of ours it may
    lack up to the last batch (responses.jsonl is written first) and end with a line cut off
    mid-write. Missing or empty, it is rebuilt from all of responses.jsonl."""
    want = [json.dumps({"result": r}, ensure_ascii=False) for r in results]
    raw, cut = _json_lines(json_file)
    if not raw:
        return want
    have_results = [p.get("result") if isinstance(p, dict) else None for p in map(_parse, raw)]
    earlier = len(results) - ours
    for missing in range(min(last_batch, ours) + 1):
        have = ours - missing
        before = len(have_results) - have
        if before >= earlier and have_results[before:] == results[earlier : earlier + have]:
            if not missing and cut is None:
                return None
            return [line.decode("utf-8", "replace") for line in raw[:before]] + want[earlier:]
    raise UnitFileError(
        f"{json_file}: does not line up with {json_file.with_suffix('.jsonl')} "
        f"(its last lines are not the results of the interrupted run's {ours} "
        f"answers); move it away to have it rebuilt from responses.jsonl, or give "
        f"another --output-dir"
    )


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    """Replace `path` with `lines` (atomically: a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def repair_answer_files(out_dir: Path, prior: PriorAnswers, log) -> None:
    """Apply what `prior_answers` found: drop responses.jsonl's cut-off last line, give a
    complete last line its newline, rewrite responses.json to line up."""
    jsonl = out_dir / "responses.jsonl"
    if prior.jsonl_keep is not None:
        with open(jsonl, "r+b") as f:
            f.truncate(prior.jsonl_keep)
        log(f"decode: dropped the last line of {jsonl}, cut off by the interruption")
    for path in (jsonl, out_dir / "responses.json"):
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                f.seek(-1, 2)
                ends = f.read(1) == b"\n"
            if not ends:
                with open(path, "ab") as f:
                    f.write(b"\n")
    if prior.json_lines is not None:
        _write_lines(out_dir / "responses.json", prior.json_lines)
        log(
            f"decode: rewrote {out_dir / 'responses.json'} to line up with {jsonl.name} "
            f"({len(prior.json_lines)} line(s))"
        )


@dataclasses.dataclass
class DecodePlan:
    """What `decode` will do, from its arguments alone (`plan_decode`): nothing loaded yet."""

    out_dir: Path
    unit_file: str
    fmt: object  # the data config's FormatConfig
    template: str
    chunk_unit: str
    questions: list[list[int]]
    model_path: Path
    run: dict  # the run's identity (`run_identity`), stored in each answer record
    prior: "PriorAnswers"
    reference: bool


def plan_decode(
    *,
    unit_file,
    output_dir,
    lang: str,
    data_config,
    cross_lingual: bool,
    ckpt,
    hf_dir,
    sampling,
    max_new_tokens: int,
    batch_size: int,
    chunk_size: int,
    compute_dtype,
    prompt_style: str,
    append: bool,
) -> DecodePlan:
    """decode's checks, before any model loads: the arguments, the output folder, the data
    config's language, the unit file's syntax, the model folder's CSLM tokens, and the answers
    an interrupted run left (`prior_answers`)."""
    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(
            f"--prompt-style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}"
        )
    check_decode_arguments(
        sampling, batch_size=batch_size, max_new_tokens=max_new_tokens, chunk_size=chunk_size
    )
    out_dir = Path(output_dir)
    check_decode_output(
        out_dir,
        [
            ("--unit", unit_file),
            ("--ckpt", ckpt),
            ("--hf-dir", hf_dir),
            ("--data-config", data_config),
        ],
    )
    fmt = load_data_config(data_config, check_files=False).format
    template, chunk_unit = _prompt(fmt, lang, cross_lingual, data_config)
    questions = read_unit_file(unit_file)  # syntax first: fail before loading a model
    model_path = model_folder(ckpt, hf_dir)
    require_model_cslm_tokens(model_path)  # before the weights load
    run = run_identity(
        unit_file=unit_file,
        lang=lang,
        cross_lingual=cross_lingual,
        prompt_style=prompt_style,
        model=model_path,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        compute_dtype=compute_dtype,
        data_config=data_config,
    )
    prior = prior_answers(out_dir, run, len(questions), append)
    return DecodePlan(
        out_dir,
        str(unit_file),
        fmt,
        template,
        chunk_unit,
        questions,
        model_path,
        run,
        prior,
        prompt_style == "reference",
    )


def load_decode_model(plan: DecodePlan, compute_dtype, tensor, speech_out, say):
    """The model for `plan` (cfg, decoding params, tokenizer, vocab), checked against the
    questions' codebook and the token2wav's; an HF folder's temporary checkpoint goes near the
    output."""
    from cslm_jax.infer.decode import decoding_params, load_for_decoding  # heavy: jax

    tmp_root = plan.out_dir.absolute()
    while not tmp_root.exists():
        tmp_root = tmp_root.parent
    t_load = time.perf_counter()
    model_path = plan.model_path
    cfg, params, tok, vocab = load_for_decoding(
        model_path, tmp_dir=tmp_root, compute_dtype=compute_dtype, tensor=tensor
    )
    if not vocab.unit_count or "<sosp>" not in vocab.control_tokens:
        raise UnitFileError(
            f"{model_path}: the model's vocabulary has no speech units "
            f"(a text-only model); decode a CSLM checkpoint (import-hf with "
            f"speech units, then train)"
        )
    check_codebook(plan.questions, vocab.unit_count, plan.unit_file, model_path)
    if speech_out is not None and vocab.unit_count > speech_out.t2w.flow_cfg.vocab_size:
        raise UnitFileError(
            f"--token2wav {speech_out.t2w.path}: its flow knows {speech_out.t2w.flow_cfg.vocab_size}"
            f" units, the model {model_path} answers with {vocab.unit_count}: give the token2wav "
            f"of the speech tokenizer the model was trained on (v1: 4096 units, v2: 6561)"
        )
    params = decoding_params(cfg, params)  # once, not per batch (a copy per call)
    say(
        f"decode: {len(plan.questions)} question(s) from {plan.unit_file}; model {model_path} "
        f"({cfg.num_layers} layers x {cfg.hidden_size}, {vocab.unit_count} units) loaded in "
        f"{time.perf_counter() - t_load:.1f}s; answers in {plan.run['lang']}"
        f"{' (cross-lingual prompt)' if plan.run['cross_lingual'] else ''}"
    )
    import jax  # heavy: jax

    if jax.default_backend() == "cpu":
        from cslm_jax.kernels import cpu_matmul as cpu_kernels  # heavy: jax

        if params["lm_head"].ndim == 3 or not cpu_kernels.available():
            say(f"decode: {cpu_kernels.status()}")
        else:
            say(
                f"decode: CPU decoding kernel: not used for {cfg.compute_dtype} (float32 only: "
                f"--compute-dtype float32 uses it)"
            )
    return cfg, params, tok, vocab


def question_prompt(tok, fmt, template: str, units, where: str, reference: bool = False):
    """One spoken question's prompt ids, as decode builds it: "training" style, the data
    config's template with the units merged as it says, rendered as training renders the user
    turn (`chat_prompt_ids`); `reference`: the reference scripts' prompt with the units as given
    (`reference_prompt`). `cslm-jax serve` builds its prompts here too."""
    if reference:
        return reference_prompt(tok, template.format(speech=speech(units)), where)[1]
    units = merge_repeats(units) if fmt.merge_repeats else list(units)
    return chat_prompt_ids(tok, template.format(speech=speech(units)), where, fmt.loss_mask)


def write_answers(out_dir: Path, batch: list[dict]) -> None:
    """A batch's records appended, responses.jsonl first (a rerun resumes from it and lines
    responses.json up with it): an interrupted run keeps what it finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "responses.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch))
    append_results(out_dir / "responses.json", [r["result"] for r in batch])


def decode_unit_file(
    *,
    unit_file: str | Path,
    output_dir: str | Path,
    lang: str,
    data_config: str | Path,
    cross_lingual: bool = False,
    ckpt: str | None = None,
    hf_dir: str | None = None,
    sampling=None,
    max_new_tokens: int = 2048,
    batch_size: int = 1,
    chunk_size: int = 1,
    stream: bool = False,
    compute_dtype: str | None = None,
    prompt_style: str = "training",
    append: bool = False,
    speech_out=None,
    tensor: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The `decode` command: answer every question of `unit_file` in `lang` (a language of
    `data_config`, which gives the prompt, chunk unit and merge_repeats), appending
    OUTPUT_DIR/responses.json and responses.jsonl batch by batch and writing
    latency_summary.json. The model is `ckpt` or `hf_dir`; `sampling` a `decode.Sampling`
    (default: the reference's, temperature 1.0 and top-p 0.7). Progress goes to `log`; returns
    the latency summary. `tensor`: the model split over that many devices (`load_for_decoding`).

    prompt_style "training" (default): the user turn plus the assistant header, as training
    renders it, with units merged as the data config says; responses.json holds the generated
    text. "reference": the prompt and `result` exactly as the reference's decode scripts make
    them (`reference_prompt`, `reference_result`; the line's units as given), for numbers
    comparable with the paper's; responses.jsonl keeps the parsed fields either way.

    Every argument and path is checked before the model loads; the folder is created with the
    first answers (a failed start leaves none behind). A folder that holds an interrupted run's
    answers (the same arguments) resumes it: only the questions not answered yet are decoded,
    and responses.json is made to line up with responses.jsonl first; a folder with other
    answers, or this run's complete ones, is refused unless `append`, which adds a full set of
    answers after them (`prior_answers`).

    speech_out: a `cslm_jax.speech.stream.SpeechOut` (`--speech-out`): each answer synthesised
    chunk by chunk while it is decoded, its wav written when it ends, and its record's timing
    given `time_to_first_audio_s`, `speech_rtf` and `audio_s`. Its `position` is set to the
    line of responses.jsonl that question 0's answer has in this run (`prior_answers`: after the
    lines already there, or, resuming, where the interrupted run put it), so each wav is named
    by its answer's line (`SpeechOut.wav_name`) and an --append run's wavs do not replace
    earlier ones; the record's `wav` names it."""
    from cslm_jax.infer.decode import Sampling  # heavy: jax

    sampling = Sampling() if sampling is None else sampling
    say = log
    plan = plan_decode(
        unit_file=unit_file,
        output_dir=output_dir,
        lang=lang,
        data_config=data_config,
        cross_lingual=cross_lingual,
        ckpt=ckpt,
        hf_dir=hf_dir,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chunk_size=chunk_size,
        compute_dtype=compute_dtype,
        prompt_style=prompt_style,
        append=append,
    )
    out_dir, prior, questions = plan.out_dir, plan.prior, plan.questions
    summary_fields = dict(
        unit_file=str(unit_file),
        model=str(plan.model_path),
        batch_size=batch_size,
        chunk_size=chunk_size,
        greedy=bool(sampling.greedy),
    )
    if prior.finish:  # interrupted after its last answer: complete the files
        say(
            f"decode: all {len(questions)} question(s) of {unit_file} are answered already in "
            f"{out_dir / 'responses.jsonl'}; completing the other files"
        )
        repair_answer_files(out_dir, prior, say)
        return _write_summary(
            out_dir,
            prior.done,
            say,
            **summary_fields,
            decode_s=0.0,
            compile_s=0.0,
            answered_before=len(prior.done),
        )
    cfg, params, tok, vocab = load_decode_model(plan, compute_dtype, tensor, speech_out, say)
    prompts = [
        question_prompt(
            tok, plan.fmt, plan.template, units, f"{plan.model_path} (line {i + 1})", plan.reference
        )
        for i, units in enumerate(questions)
    ]
    first = len(prior.done)
    for i, r in enumerate(prior.done):
        if r.get("input_ids") != prompts[i]:
            raise UnitFileError(
                f"{out_dir / 'responses.jsonl'}: the interrupted run's answer to "
                f"{unit_file} line {i + 1} was to another question (its prompt "
                f"differs: the unit file, data config or tokenizer changed since); "
                f"give another --output-dir"
            )
    if out_dir.is_dir():
        repair_answer_files(out_dir, prior, say)
    if speech_out is not None:
        speech_out.position = prior.position
    if first:
        say(
            f"decode: resuming: {first} of {len(questions)} question(s) answered already in "
            f"{out_dir / 'responses.jsonl'}; answering the other {len(questions) - first}"
        )
    tag = reference_tag(plan.template)
    header = tok.encode(ASSISTANT_HEADER, add_special_tokens=False) if plan.reference else ()
    on_event = (lambda i, ev, s: say(describe_event(i, ev, s))) if stream else None
    records: list[dict] = []
    decode_s = compile_s = 0.0
    for done in decode_questions(
        cfg,
        params,
        tok,
        vocab,
        prompts,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        chunk_size=chunk_size,
        sampling=sampling,
        answer_prefix=header,
        first=first,
        on_event=on_event,
        speech_out=speech_out,
        log=say,
    ):
        decode_s += done.decode_s
        compile_s += done.compile_s
        batch = [
            answer_record(
                a,
                tok,
                vocab,
                plan.chunk_unit,
                reference_result(a.input_ids, a.output_ids, tok, tag) if plan.reference else None,
            )
            for a in done.answers
        ]
        for r in batch:
            r.update(plan.run, line=r["index"] + 1)
            if speech_out is not None:
                r["timing"].update(speech_out.timing(r["index"]))
                r["wav"] = speech_out.wav_name(r["index"])
        write_answers(out_dir, batch)
        records += batch
        if not stream:
            for r in batch:
                t = r["timing"]
                say(
                    f"[{r['line']}] {t['generated_tokens']} tokens, {len(r['speech_chunks'])} speech "
                    f"chunk(s), first speech chunk after {_secs(t['time_to_first_speech_chunk_s'])}, "
                    f"total {_secs(t['total_s'])} ({r['finish']})"
                )
    summary = _write_summary(
        out_dir,
        prior.done + records,
        say,
        **summary_fields,
        decode_s=decode_s,
        compile_s=compile_s,
        answered_before=first,
        tokens_per_s=sum(len(r["output_ids"]) for r in records) / max(decode_s, 1e-9),
    )
    say(
        f"decode: appended {len(records)} line(s) to {out_dir / 'responses.json'} and "
        f"{out_dir / 'responses.jsonl'}"
        + (f" after the {first} of the interrupted run" if first else "")
    )
    return summary


def _write_summary(out_dir: Path, records: list[dict], say, **fields) -> dict:
    """latency_summary.json over a run's answers (those of an interrupted run it resumed
    included; the decoding times and tokens/s are this process's)."""
    summary = latency_summary(records)
    summary.update(fields)
    summary.setdefault("tokens_per_s", 0.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(format_summary(summary))
    return summary


def _secs(v) -> str:
    return "-" if v is None else f"{v:.3f}s"


def format_summary(s: dict) -> str:
    def row(name, key, fmt):
        v = s[key]
        if v["mean"] is None:
            return f"  {name:<34} -   (none of {s['answers']})"
        miss = f"  ({v['missing']} without)" if v["missing"] else ""
        return f"  {name:<34} mean {fmt(v['mean'])}  median {fmt(v['median'])}{miss}"

    sec = lambda v: f"{v:8.3f}s"  # noqa: E731
    num = lambda v: f"{v:8.1f} "  # noqa: E731
    return "\n".join(
        [
            f"latency over {s['answers']} answer(s) (from each batch's start; compile excluded):",
            row("time to first token", "time_to_first_token_s", sec),
            row("time to speech start (<sosp>)", "time_to_speech_start_s", sec),
            row("time to first speech chunk", "time_to_first_speech_chunk_s", sec),
            row("total time", "total_s", sec),
            row("tokens before first speech", "tokens_before_first_speech", num),
            row("tokens to first speech chunk", "tokens_to_first_speech_chunk", num),
            row("generated tokens", "generated_tokens", num),
            *[
                row(name, key, fmt)
                for name, key, fmt in (
                    ("time to first audio (--speech-out)", "time_to_first_audio_s", sec),
                    ("speech real-time factor", "speech_rtf", lambda v: f"{v:8.3f} "),
                )
                if key in s
            ],
            f"  {s['tokens_per_s']:.1f} generated tokens/s over {s['decode_s']:.2f}s of decoding "
            f"(batch {s['batch_size']}, chunk {s['chunk_size']}; {s['compile_s']:.1f}s compiling)",
        ]
    )
