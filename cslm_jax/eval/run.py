"""`cslm-jax evaluate`: decode a task's validation records greedily and score them.

The task is named as its SeqIO task (`cslm_<stage>_<kind>[_<lang>]` or the entry's `name`,
see tasks/cslm.py); its files and kind come from the data config the run config points at
(`--config` takes a run config or a data config). The raw records of the split's files are
read directly rather than through SeqIO: scoring needs the references and the records' fields
(languages, units), not the packed token rows SeqIO serves, and skipping TensorFlow keeps the
command fast. Each record is rendered into its chat example exactly as training renders it
(`formats.examples`), the user turn becomes the prompt and the assistant turn the reference.

Scores per task kind (error rates: WER for word languages, CER for `chunk_unit: char` ones):
* asr: error rate of the transcription.
* mt: BLEU and chrF (sacrebleu; BLEU tokenized per target language, `zh` for Chinese), overall
  and per direction; both directions of every pair, as training uses them.
* s2s: transcript (TQ) error rate, answer text (TA) error rate, off-target ratio (answers in
  another language than asked for; `--language-id`, script-based zh/en by default), and
  text/speech consistency: the answer's speech chunks mapped back to text by a unit lexicon and
  scored against its own text answer (plus the share of well-formed answers).
* tts: unit error rate of the generated speech against the reference units (merged repeats),
  and, with a unit lexicon, the error rate of the speech read back as text (the paper's "ASR of
  generated speech", with the lexicon as the recogniser).
* instruct: not supported (free text answers need a judge); a clear error.
* audio (s2s, tts; `cslm_jax.eval.audio`): with `--token2wav DIR --voice V` the answers are
  synthesised as they are decoded, their wavs kept and time to first audio measured
  (interleaved and the non-interleaved chain); `--asr` scores the audio (TTS: against the input
  text; s2s: consistency with the text answer, replacing the unit lexicon, and against the
  reference), `--mos` rates it; `--judge-url` / `--judge-model` rate spoken-QA answers.

Unit lexicon (`--unit-lexicon`): `auto` (default) uses the demo corpus' pronunciation table
when, and only when, it reads the task's own reference units back into their reference text
without a single error - so a real corpus never gets scored through a toy table, and the demo
needs no flag; `demo` forces that table, `none` switches consistency off, a file gives a table
(`{"silence": [0], "table": {"cat": [17], ...}}`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cslm_jax.config import load_run_config, load_yaml
from cslm_jax.data.formats import (
    RECORD_KIND_OF_TASK,
    examples,
    load_data_config,
    merge_repeats,
    read_jsonl,
)
from cslm_jax.eval.audio import (
    audio_table_rows,
    chain_first_audio,
    decode_answers,
    judge_answers,
    open_audio_scoring,
    score_audio,
)
from cslm_jax.eval.metrics import (
    EvaluationError,
    UnitLexicon,
    bleu,
    bleu_tokenize,
    chrf,
    edit_distance,
    language_id,
    mixed_error_rate,
    normalize_tokens,
    off_target,
)
from cslm_jax.infer.responses import chat_prompt_ids, pad_token_id
from cslm_jax.model.vocab import require_model_cslm_tokens
from cslm_jax.storage.outputs import check_output_file

SUPPORTED = ("asr", "mt", "s2s", "tts")
SPEECH_KINDS = ("asr", "s2s", "tts")


# -- the task and its records --------------------------------------------------------------------


def config_file(config: str | Path) -> Path:
    """--config as a file: a run folder of `cslm-jax train` means its config.yaml."""
    path = Path(config)
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    if not path.is_file():
        raise EvaluationError(f"--config {path}: file not found")
    return path


def load_data(config: str | Path, overrides=()):
    """The data config behind `config`: a run config (its data.config; overrides as for train)
    or a data config (overrides of its own fields)."""
    path = config_file(config)
    raw = load_yaml(path)
    if isinstance(raw, dict) and "stages" in raw:
        return load_data_config(path, list(overrides), check_files=False)
    run = load_run_config(path, list(overrides))
    return load_data_config(run.data.config, check_files=False)


def default_checkpoint(config: str | Path) -> Path:
    """The model a run config stands for, when that is known: the config.yaml that `cslm-jax
    train` writes into its run folder sits beside the run's final model/. Any other config
    does not say which run it trained, so --ckpt is needed."""
    from cslm_jax.storage.checkpoint import META_FILE, resolve_model_dir  # heavy: jax

    path = config_file(config)
    if path.name == "config.yaml" and (path.parent / "model" / META_FILE).is_file():
        return resolve_model_dir(path.parent, flag="--config")
    raise EvaluationError(
        f"--ckpt is required: {path} is not the config.yaml of a finished train "
        f"run folder (one with model/), so it does not name a model"
    )


def find_task(data_cfg, name: str, split: str):
    """(TaskSpec, files of the split) for a task name of any stage; errors list what exists."""
    specs = data_cfg.tasks()
    spec = next((s for s in specs if s.name == name), None)
    if spec is None:
        raise EvaluationError(
            f"--task {name!r}: no such task in {data_cfg.path}; tasks: "
            f"{', '.join(s.name for s in specs)}"
        )
    if split not in ("train", "validation"):
        raise EvaluationError(f"--split {split!r}: splits are train and validation")
    files = spec.validation if split == "validation" else spec.train
    if not files:
        with_split = [s.name for s in specs if (s.validation if split == "validation" else s.train)]
        raise EvaluationError(
            f"--task {name!r} has no {split} split in {data_cfg.path} (no "
            f"'{split}' files); tasks with one: {', '.join(with_split)}"
        )
    if spec.kind not in SUPPORTED:
        raise EvaluationError(
            f"--task {name!r} is a {spec.kind} task; evaluate supports "
            f"{', '.join(SUPPORTED)} (instruct answers are free text: they "
            f"need a judge, not a reference metric)"
        )
    for f in files:
        if not Path(f).is_file():
            raise EvaluationError(f"--task {name!r}: {split} file {f} does not exist")
    return spec, list(files)


def build_items(spec, files, fmt, max_examples: int | None, skip_bad: bool = False) -> list[dict]:
    """One item per chat example of the split's records: prompt text, reference text, the
    language(s) and unit of scoring, and the record fields the kind needs."""
    items: list[dict] = []
    for path in files:
        for where, _, record in read_jsonl(path, RECORD_KIND_OF_TASK[spec.kind], fmt, skip_bad):
            chats = examples(spec.kind, record, fmt, where)
            for d, chat in enumerate(chats):
                item = {"where": where, "prompt": chat[0]["content"], "target": chat[1]["content"]}
                if spec.kind in ("asr", "tts"):
                    item.update(lang=record["lang"], reference=record["text"].strip())
                    if spec.kind == "tts":
                        units = record["units"]
                        item["reference_units"] = (
                            merge_repeats(units) if fmt.merge_repeats else list(units)
                        )
                elif spec.kind == "mt":
                    src, tgt = (("src_lang", "tgt_lang"), ("tgt_lang", "src_lang"))[d]
                    item.update(
                        src_lang=record[src],
                        lang=record[tgt],
                        reference=record["tgt" if d == 0 else "src"].strip(),
                    )
                else:
                    item.update(
                        question_lang=record["question_lang"],
                        lang=record["answer_lang"],
                        question=record["question_text"].strip(),
                        reference=record["answer_text"].strip(),
                        reference_units=list(record["answer_units"]),
                    )
                item["unit"] = fmt.languages[item["lang"]].chunk_unit
                items.append(item)
                if max_examples is not None and len(items) >= max_examples:
                    return items
    return items


def choose_lexicon(
    choice: str, items: list[dict], kind: str, fmt
) -> tuple[UnitLexicon | None, str]:
    """The unit -> text mapper for consistency / TTS read-back, and why (see the module doc)."""
    if choice == "none" or kind not in ("s2s", "tts"):
        return None, "off" if choice == "none" else f"not used for {kind}"
    if choice not in ("auto", "demo"):
        return UnitLexicon.from_file(choice), f"from {choice}"
    lex = UnitLexicon.demo()
    refs = [it["reference"] for it in items]
    read = [lex.to_text(it["reference_units"]) for it in items]
    rate = mixed_error_rate(refs, read, [it["unit"] for it in items])
    if choice == "demo":
        return lex, f"demo table (reads the reference units back with error rate {rate:.1%})"
    if rate == 0.0 and items:
        return lex, "auto: the demo table reads every reference's units back exactly"
    return None, (
        f"auto: off (the demo table reads the reference units back with error rate "
        f"{rate:.1%}, so it is not this corpus' pronunciation; pass --unit-lexicon FILE)"
    )


# -- decoding ----------------------------------------------------------------------------------


def default_max_new_tokens(items, tokenizer) -> int:
    """Twice the longest reference answer in tokens plus 16, at most 2048 (the reference cap)."""
    longest = max(len(tokenizer.encode(it["target"], add_special_tokens=False)) for it in items)
    return min(2048, 2 * longest + 16)


def decode_items(
    cfg,
    params,
    tok,
    vocab,
    items,
    *,
    batch_size: int,
    max_new_tokens: int,
    loss_mask: str = "reference",
    log=lambda _: None,
) -> list[list[int]]:
    """Greedy generations (ids, stop id included) for every item's prompt (tokenized as training
    tokenizes under `loss_mask`, the data config's), in batches."""
    from cslm_jax.infer.decode import GREEDY, default_stop_ids, generate  # heavy: jax

    stops = default_stop_ids(tok, vocab)
    prompts = [chat_prompt_ids(tok, it["prompt"], it["where"], loss_mask) for it in items]
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        out += generate(
            cfg,
            params,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            stop_ids=stops,
            sampling=GREEDY,
            vocab=vocab,
            pad_id=pad_token_id(tok, cfg),
        )
        log(f"  decoded {len(out)}/{len(prompts)} ({time.perf_counter() - t0:.1f}s)")
    return out


# -- scoring ---------------------------------------------------------------------------------------


def _rate_name(units) -> str:
    units = set(units)
    return "WER" if units == {"word"} else "CER" if units == {"char"} else "WER/CER"


def score(
    kind: str,
    items: list[dict],
    generations: list[list[int]],
    tok,
    vocab,
    *,
    lexicon: UnitLexicon | None = None,
    lid_name: str = "script",
    lang_units: dict | None = None,
) -> tuple[dict, list[dict]]:
    """(metrics, per-example rows). lang_units: language -> "word"|"char" (the data config's
    chunk_unit), for transcripts of spoken questions (default "word")."""
    from cslm_jax.infer.decode import (  # heavy: jax
        End,
        SpeechChunk,
        TextChunk,
        Transcript,
        default_stop_ids,
        parse_events,
    )

    stops = set(default_stop_ids(tok, vocab))
    units = [it["unit"] for it in items]
    rows = []
    metrics: dict = {"examples": len(items)}
    if kind in ("asr", "mt"):
        hyps = [
            tok.decode([i for i in g if i not in stops], skip_special_tokens=True).strip()
            for g in generations
        ]
        refs = [it["reference"] for it in items]
        for it, h, g in zip(items, hyps, generations):
            rows.append(
                {
                    "where": it["where"],
                    "lang": it["lang"],
                    "reference": it["reference"],
                    "hypothesis": h,
                    "generated_tokens": len(g),
                }
            )
        if kind == "asr":
            metrics["error_rate"] = mixed_error_rate(refs, hyps, units)
            metrics["error_rate_name"] = _rate_name(units)
            metrics["exact"] = sum(
                normalize_tokens(r, u) == normalize_tokens(h, u)
                for r, h, u in zip(refs, hyps, units)
            ) / len(items)
            return metrics, rows
        directions: dict = {}
        for it, r, h in zip(items, refs, hyps):
            directions.setdefault(f"{it['src_lang']}->{it['lang']}", []).append((it["lang"], r, h))
        tok_all = bleu_tokenize([it["lang"] for it in items])
        metrics.update(bleu=bleu(refs, hyps, tok_all), chrf=chrf(refs, hyps), bleu_tokenize=tok_all)
        metrics["directions"] = {}
        for d, triples in sorted(directions.items()):
            langs, r, h = zip(*triples)
            t = bleu_tokenize(langs)
            metrics["directions"][d] = {
                "examples": len(r),
                "bleu": bleu(r, h, t),
                "chrf": chrf(r, h),
                "bleu_tokenize": t,
            }
        return metrics, rows

    parsed = [parse_events(g, tok, vocab, sorted(stops)) for g in generations]
    if kind == "tts":
        spoken = [[u for e in evs if isinstance(e, SpeechChunk) for u in e.units] for evs in parsed]
        ref_units = [it["reference_units"] for it in items]
        edits = sum(edit_distance(r, merge_repeats(h)) for r, h in zip(ref_units, spoken))
        metrics["unit_error_rate"] = edits / max(sum(map(len, ref_units)), 1)
        metrics["with_speech"] = sum(bool(s) for s in spoken) / len(items)
        read = [lexicon.to_text(s) for s in spoken] if lexicon else None
        if read is not None:
            metrics["readback_error_rate"] = mixed_error_rate(
                [it["reference"] for it in items], read, units
            )
            metrics["readback_error_rate_name"] = _rate_name(units)
        for i, it in enumerate(items):
            rows.append(
                {
                    "where": it["where"],
                    "lang": it["lang"],
                    "reference": it["reference"],
                    "units": spoken[i],
                    "readback": read[i] if read else None,
                    "generated_tokens": len(generations[i]),
                }
            )
        return metrics, rows

    # s2s
    lid = language_id(lid_name)
    transcripts, answers, speech_text, well_formed, chunks = [], [], [], 0, 0
    for it, evs in zip(items, parsed):
        transcripts.append(next((e.text for e in evs if isinstance(e, Transcript)), ""))
        texts = [e.text.strip() for e in evs if isinstance(e, TextChunk)]
        answers.append((" " if it["unit"] == "word" else "").join(texts))
        sp = [e.units for e in evs if isinstance(e, SpeechChunk)]
        chunks += len(sp)
        speech_text.append(lexicon.to_text([u for c in sp for u in c]) if lexicon else None)
        end = next((e for e in evs if isinstance(e, End)), None)
        well_formed += bool(end and end.reason in ("eoa", "stop") and not end.problems and sp)
    q_units = [(lang_units or {}).get(it["question_lang"], "word") for it in items]
    metrics["transcript_error_rate"] = mixed_error_rate(
        [it["question"] for it in items], transcripts, q_units
    )
    metrics["transcript_error_rate_name"] = _rate_name(q_units)
    metrics["answer_error_rate"] = mixed_error_rate(
        [it["reference"] for it in items], answers, units
    )
    metrics["answer_error_rate_name"] = _rate_name(units)
    ot = off_target(answers, [it["lang"] for it in items], lid)
    metrics["off_target_ratio"] = ot["ratio"]
    metrics["off_target"] = {k: v for k, v in ot.items() if k != "detected"}
    if lexicon is not None:
        metrics["consistency_error_rate"] = mixed_error_rate(answers, speech_text, units)
        metrics["consistency_exact"] = sum(
            normalize_tokens(a, u) == normalize_tokens(s, u)
            for a, s, u in zip(answers, speech_text, units)
        ) / len(items)
    else:
        metrics["consistency_error_rate"] = None
    metrics["well_formed"] = well_formed / len(items)
    metrics["speech_chunks_per_answer"] = chunks / len(items)
    for i, it in enumerate(items):
        rows.append(
            {
                "where": it["where"],
                "question_lang": it["question_lang"],
                "lang": it["lang"],
                "question": it["question"],
                "transcript": transcripts[i],
                "reference": it["reference"],
                "answer": answers[i],
                "detected_lang": ot["detected"][i],
                "speech_as_text": speech_text[i],
                "generated_tokens": len(generations[i]),
            }
        )
    return metrics, rows


# -- the table -------------------------------------------------------------------------------------


def format_table(result: dict) -> str:
    m, kind = result["metrics"], result["kind"]
    rows: list[tuple[str, str]] = [("examples", str(m["examples"]))]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    if kind == "asr":
        rows += [(m["error_rate_name"], pct(m["error_rate"])), ("exact match", pct(m["exact"]))]
    elif kind == "mt":
        rows += [(f"BLEU ({m['bleu_tokenize']})", f"{m['bleu']:.2f}"), ("chrF", f"{m['chrf']:.2f}")]
        for d, v in m["directions"].items():
            rows += [
                (f"  {d}: BLEU ({v['bleu_tokenize']})", f"{v['bleu']:.2f}"),
                (f"  {d}: chrF", f"{v['chrf']:.2f}"),
                (f"  {d}: examples", str(v["examples"])),
            ]
    elif kind == "tts":
        rows += [
            ("unit error rate", pct(m["unit_error_rate"])),
            ("answers with speech", pct(m["with_speech"])),
        ]
        if "readback_error_rate" in m:
            rows.append(
                (
                    f"speech read back, {m['readback_error_rate_name']}",
                    pct(m["readback_error_rate"]),
                )
            )
    else:
        ot = m["off_target"]
        rows += [
            (f"transcript {m['transcript_error_rate_name']}", pct(m["transcript_error_rate"])),
            (f"answer text {m['answer_error_rate_name']}", pct(m["answer_error_rate"])),
            (
                f"off-target ratio ({ot['identifier']})",
                f"{pct(m['off_target_ratio'])}  ({ot['off_target']}/{ot['scored']}, "
                f"{ot['undetermined']} undetermined)",
            ),
            (
                "text/speech consistency error"
                + (" (ASR of the audio)" if "consistency_source" in m else ""),
                pct(m["consistency_error_rate"])
                if m["consistency_error_rate"] is not None
                else "- (no unit lexicon)",
            ),
            ("well-formed answers", pct(m["well_formed"])),
            ("speech chunks per answer", f"{m['speech_chunks_per_answer']:.2f}"),
        ]
    rows += audio_table_rows(m)
    width = max(len(k) for k, _ in rows)
    head = f"{result['task']} ({kind}, {result['split']}) - {result['ckpt']}"
    line = "-" * max(len(head), width + 20)
    return "\n".join([head, line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


# -- the command -----------------------------------------------------------------------------------


def evaluate_task(
    *,
    config: str | Path,
    task: str,
    ckpt: str | None = None,
    split: str = "validation",
    max_examples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output: str | Path | None = None,
    unit_lexicon: str = "auto",
    language_id_name: str = "script",
    overrides=(),
    force: bool = False,
    token2wav=None,
    voice=None,
    speech_rate: float | None = None,
    asr: str | None = None,
    mos: str | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_prompt=None,
    judge_scale: str = "1-10",
    judge_concurrency: int = 4,
    judge_cache=None,
    tensor: int | None = None,
    log=print,
) -> dict:
    """The `evaluate` command: decode `task`'s `split` records greedily with the model `ckpt`
    (default: the run's model/ when `config` is a run folder), score them, write the result as
    JSON to `output` (default eval_TASK_SPLIT.json; an existing file only with `force`, refused
    before anything is read) and log the table. Returns the result.

    Audio (`cslm_jax.eval.audio`): with `token2wav` and `voice` the answers are synthesised as
    they are decoded, their wavs kept, time to first audio measured (interleaved and chain);
    `asr` (a spec, `cslm_jax.eval.asr.load_asr`) scores the audio, `mos` (`module:function`)
    rates it; `judge_url` / `judge_model` (`cslm_jax.eval.judge`) rate spoken-QA answers.
    `tensor` N: the weights and KV cache split over N devices (`load_for_decoding(tensor=)`)."""
    from cslm_jax.storage.checkpoint import resolve_model_dir  # heavy: jax

    say = log
    if batch_size < 1:
        raise EvaluationError(f"--batch-size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise EvaluationError(f"--max-examples must be >= 1, got {max_examples}")
    out_path = Path(output) if output else Path(f"eval_{task}_{split}.json")
    check_output_file(
        out_path, force, inputs=[("--config", config), ("--ckpt", ckpt)], flag="--output"
    )
    language_id(language_id_name)  # unknown names fail before decoding
    data_cfg = load_data(config, overrides)
    spec, files = find_task(data_cfg, task, split)
    fmt = data_cfg.format
    items = build_items(spec, files, fmt, max_examples, data_cfg.skip_bad)
    if not items:
        raise EvaluationError(f"--task {task!r}: no records in {split} files {files}")
    scoring = open_audio_scoring(
        spec.kind,
        out_path,
        fmt,
        token2wav=token2wav,
        voice=voice,
        speech_rate=speech_rate,
        asr=asr,
        mos=mos,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_prompt=judge_prompt,
        judge_scale=judge_scale,
        judge_concurrency=judge_concurrency,
        judge_cache=judge_cache,
        inputs=[("--config", config), ("--ckpt", ckpt)],
    )
    if scoring.asr is not None and spec.kind == "s2s":
        lexicon, lexicon_note = None, f"not used: consistency is scored by --asr {asr}"
    else:
        lexicon, lexicon_note = choose_lexicon(unit_lexicon, items, spec.kind, fmt)
    if spec.kind == "tts" and lexicon is None and scoring.asr is None:
        say(f"evaluate: no unit lexicon ({lexicon_note}); TTS is scored by unit error rate only")

    model_path = (
        resolve_model_dir(ckpt, flag="--ckpt", hf=True) if ckpt else default_checkpoint(config)
    )
    if spec.kind in SPEECH_KINDS:  # before the weights load
        require_model_cslm_tokens(model_path)
    from cslm_jax.infer.decode import decoding_params, load_for_decoding  # heavy: jax

    t0 = time.perf_counter()
    cfg, params, tok, vocab = load_for_decoding(
        model_path,
        tmp_dir=out_path.parent.resolve() if out_path.parent.exists() else None,
        tensor=tensor,
    )
    if spec.kind in SPEECH_KINDS and (not vocab.unit_count or "<sosp>" not in vocab.control_tokens):
        raise EvaluationError(
            f"--ckpt {model_path}: the model's vocabulary has no speech units "
            f"(a text-only model) but {task} is a {spec.kind} task; "
            f"evaluate a CSLM checkpoint (import-hf with speech units, then train)"
        )
    if spec.kind in SPEECH_KINDS and vocab.unit_count < fmt.unit_count:
        raise EvaluationError(
            f"--ckpt {model_path}: {vocab.unit_count} speech units, but the data "
            f"config's codebook has {fmt.unit_count}"
        )
    params = decoding_params(cfg, params)
    max_new = max_new_tokens or default_max_new_tokens(items, tok)
    say(
        f"evaluate: {task} ({spec.kind}), {len(items)} example(s) from {split} "
        f"{', '.join(files)}; model {model_path} loaded in {time.perf_counter() - t0:.1f}s; "
        f"greedy, batch {batch_size}, up to {max_new} new tokens"
    )
    t1 = time.perf_counter()
    answers = None
    if scoring.speech_out is not None:
        say(
            f"evaluate: synthesising the answers as they are decoded into "
            f"{scoring.wav_dir} (speech rate {scoring.speech_rate:g}: "
            f"{scoring.speech_rate_from})"
        )
        prompts = [chat_prompt_ids(tok, it["prompt"], it["where"], fmt.loss_mask) for it in items]
        answers = decode_answers(
            cfg,
            params,
            tok,
            vocab,
            prompts,
            batch_size=batch_size,
            max_new_tokens=max_new,
            speech_out=scoring.speech_out,
            log=say,
        )
        generations = [a.output_ids for a in answers]
    else:
        generations = decode_items(
            cfg,
            params,
            tok,
            vocab,
            items,
            batch_size=batch_size,
            max_new_tokens=max_new,
            loss_mask=fmt.loss_mask,
            log=say,
        )
    decode_s = time.perf_counter() - t1
    metrics, rows = score(
        spec.kind,
        items,
        generations,
        tok,
        vocab,
        lexicon=lexicon,
        lid_name=language_id_name,
        lang_units={k: v.chunk_unit for k, v in fmt.languages.items()},
    )
    if answers is not None:
        say(
            "evaluate: the non-interleaved chain on the same questions (decoded again, then synthesised)"
        )
        chain = chain_first_audio(
            cfg,
            params,
            tok,
            vocab,
            prompts,
            scoring,
            batch_size=batch_size,
            max_new_tokens=max_new,
            log=say,
        )
        score_audio(spec.kind, items, rows, metrics, answers, scoring, chain, say)
    if scoring.judge is not None:
        judge_answers(items, rows, metrics, scoring.judge, say)
    result = {
        "task": task,
        "kind": spec.kind,
        "split": split,
        "files": files,
        "data_config": data_cfg.path,
        "ckpt": str(model_path),
        "greedy": True,
        "max_new_tokens": max_new,
        "batch_size": batch_size,
        "decode_s": decode_s,
        "unit_lexicon": lexicon.name if lexicon else None,
        "unit_lexicon_note": lexicon_note,
        "metrics": metrics,
        "examples": rows,
    }
    if out_path.parent and not out_path.parent.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    say(format_table(result))
    if spec.kind == "s2s":
        say(f"unit lexicon: {lexicon_note}")
    say(f"evaluate: wrote {out_path}")
    return result
