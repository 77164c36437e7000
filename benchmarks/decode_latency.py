"""Latency to the first speech: the interleaved chain of modality vs the sequential one
(CSLM.md section 3; the paper reports the interleaved chain 2.93x faster on average).

Two measurements on the same spoken questions (the S2S validation files of a corpus; default: the
demo corpus, written to a temporary folder):

1. **From the formatted references, no model** (always). Each reference answer is formatted
   under both chains exactly as training formats it (`cslm_jax.data.formats.examples`, chunking by the
   answer's word timings) and tokenized with the CSLM tokenizer. Counted per answer: the tokens a
   decoder must generate before the first speech token (before the first `<sosp>`: TQ + TA1
   interleaved, TQ + the whole TA sequential) and up to the end of the first speech chunk
   (through its `<eosp>`: what a chunk-level unit-to-speech decoder needs). Reported: the ratio
   sequential / interleaved of the mean counts, and the mean of the per-answer ratios. Decoding
   time per token is nearly constant, so these are the latency ratios up to the prefill.
   The ratio grows with the answer's length over the chunk size (the paper's answers are long,
   the demo's are one or two chunks): `--join 1,4,8` also joins K answers of the same direction
   into one longer answer (texts, units and shifted word timings concatenated) and reports each.

2. **With trained models, measured** (`--models INTERLEAVED SEQUENTIAL`, two checkpoints or HF
   folders trained on each chain; `--train-demo DIR` trains both on the demo corpus first: stage 1
   once, then stage 2 twice from it, ~15 minutes on 2 cores). Each model answers every question
   greedily at batch 1 with `cslm-jax decode`'s timed decoder (token by token to the host); the
   wall-clock time to the first `<sosp>` and to the first complete speech chunk, prefill included
   and compilation excluded, are compared.

    python benchmarks/decode_latency.py                                  # references only
    python benchmarks/decode_latency.py --train-demo runs/latency        # + trained demo models
    python benchmarks/decode_latency.py --data-dir DIR --tokenizer TOK   # another corpus
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIRECTIONS = ("en2en", "zh2zh", "en2zh", "zh2en")


def s2s_records(data_dir: Path, split: str) -> list[tuple[str, str, dict]]:
    """(direction, where, record) of every spoken instruction in s2s_*.{split}.jsonl."""
    out = []
    for d in DIRECTIONS:
        path = data_dir / f"s2s_{d}.{split}.jsonl"
        if path.is_file():
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    out.append((d, f"{path}:{i + 1}", json.loads(line)))
    if not out:
        raise SystemExit(f"{data_dir}: no s2s_<direction>.{split}.jsonl files")
    return out


def first_speech_counts(ids: list[int], sosp: int, eosp: int) -> tuple[int, int]:
    """(tokens before the first <sosp>, tokens through the first <eosp>) of a response."""
    return ids.index(sosp), ids.index(eosp) + 1


def ratios(seq: list[float], inter: list[float]) -> tuple[float, float]:
    """(ratio of the means, mean of the per-answer ratios), sequential / interleaved."""
    return (
        statistics.fmean(seq) / statistics.fmean(inter),
        statistics.fmean(s / i for s, i in zip(seq, inter)),
    )


def join_records(records, k: int, unit_rate: float) -> list[tuple[str, str, dict]]:
    """Longer answers: k consecutive records of one direction become one (the first question,
    the k answers' texts, units and word timings, each shifted by the units before it)."""
    out = []
    for d in DIRECTIONS:
        group = [(w, r) for dd, w, r in records if dd == d]
        for start in range(0, len(group) - k + 1, k):
            parts = [r for _, r in group[start : start + k]]
            joined = dict(parts[0])
            sep = "" if parts[0]["answer_lang"] == "zh" else " "
            joined["answer_text"] = sep.join(p["answer_text"] for p in parts)
            units, times = [], []
            for p in parts:
                shift = len(units) / unit_rate
                times += [[a + shift, b + shift] for a, b in p["answer_word_times"]]
                units += p["answer_units"]
            joined["answer_units"], joined["answer_word_times"] = units, times
            out.append((d, f"{group[start][0]} (+{k - 1} joined)", joined))
    return out


def reference_counts(records, fmt, tok, vocab) -> dict:
    from cslm_jax.data.formats import examples, validate_record

    sosp, eosp = vocab.token_id("<sosp>"), vocab.token_id("<eosp>")
    rows = []
    for direction, where, r in records:
        validate_record("spoken_instruction", r, fmt, where)
        row = {"direction": direction}
        for chain in ("interleaved", "sequential"):
            messages = examples("s2s", r, dataclasses.replace(fmt, chain=chain), where)[0]
            ids = tok.encode(messages[-1]["content"], add_special_tokens=False)
            before, through = first_speech_counts(ids, sosp, eosp)
            row[chain] = {
                "before_speech": before,
                "first_chunk": through,
                "total": len(ids),
                "speech_chunks": ids.count(sosp),
            }
        rows.append(row)
    return {"rows": rows}


def print_reference(counts: dict, k: int) -> None:
    rows = counts["rows"]
    joined = f", each {k} validation answers joined" if k > 1 else ""
    print(f"\n1. From the formatted references (no model): {len(rows)} answers{joined}")
    print(
        f"   {'':<34}{'interleaved':>12}{'sequential':>12}{'ratio of means':>16}{'mean ratio':>12}"
    )
    for key, name in (
        ("before_speech", "tokens before the first <sosp>"),
        ("first_chunk", "tokens through the first <eosp>"),
        ("total", "tokens in the whole answer"),
        ("speech_chunks", "speech chunks per answer"),
    ):
        inter = [r["interleaved"][key] for r in rows]
        seq = [r["sequential"][key] for r in rows]
        rom, mor = ratios(seq, inter)
        print(
            f"   {name:<34}{statistics.fmean(inter):12.1f}{statistics.fmean(seq):12.1f}"
            f"{rom:15.2f}x{mor:11.2f}x"
        )
    for d in DIRECTIONS:
        sub = [r for r in rows if r["direction"] == d]
        if sub:
            rom, _ = ratios(
                [r["sequential"]["before_speech"] for r in sub],
                [r["interleaved"]["before_speech"] for r in sub],
            )
            print(f"   {d}: {len(sub)} answers, tokens before the first <sosp>: {rom:.2f}x")


def train_demo_models(out: Path) -> tuple[Path, Path, Path]:
    """Demo corpus -> random tiny Llama -> stage 1 -> stage 2 on each chain. Returns
    (data dir, interleaved model, sequential model); reuses finished runs in `out`."""
    import yaml

    from cslm_jax.config import load_model_config, load_run_config
    from cslm_jax.convert.hf import import_hf
    from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
    from cslm_jax.demo.random_hf import write_random_hf_llama
    from cslm_jax.model.vocab import load_tokenizer
    from cslm_jax.train.loop import EXIT_OK, train

    data = out / "data"
    if not (data / "data.yaml").is_file():
        make_demo_data(data, REPO / "configs" / "data" / "demo.yaml", force=True)
    seq_cfg = data / "data_sequential.yaml"
    if not seq_cfg.is_file():
        spec = yaml.safe_load((data / "data.yaml").read_text())
        spec["format"]["chain"] = "sequential"
        seq_cfg.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    if not (out / "ckpt").is_dir():
        shape = load_model_config(REPO / "configs" / "model" / "demo.yaml")
        write_random_hf_llama(
            out / "hf_base",
            load_tokenizer(data / "tokenizer"),
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            rope_scaling=shape.rope_scaling,
            rope_theta=shape.rope_theta,
            max_position_embeddings=shape.max_position_embeddings,
            weight_std=0.02,
        )
        import_hf(out / "hf_base", out / "ckpt", speech_units=UNIT_COUNT)

    def stage(config: str, run: Path, data_cfg: Path, init_from: Path | None, overrides=()):
        if (run / "model").is_dir():
            return
        cfg = load_run_config(
            REPO / "configs" / config,
            [f"data.config={data_cfg}", "train.progress_bar=false", *overrides],
        )
        if train(cfg, run, init_from=init_from, log=print) != EXIT_OK:
            raise SystemExit(f"training {run} failed")

    print(f"training the demo models under {out} (stage 1, then stage 2 per chain)", flush=True)
    stage("demo.yaml", out / "stage1", data / "data.yaml", None, [f"init_from={out / 'ckpt'}"])
    stage("demo_sft.yaml", out / "stage2_interleaved", data / "data.yaml", out / "stage1")
    stage("demo_sft.yaml", out / "stage2_sequential", seq_cfg, out / "stage1")
    return data, out / "stage2_interleaved" / "model", out / "stage2_sequential" / "model"


def measured(
    records, data_cfg_path: Path, models: list[Path], max_new_tokens: int, repeats: int = 3
) -> dict:
    """Greedy batch-1 answers of each model to the same questions, with the decoder's timings
    (each question decoded `repeats` times: the median of each time is kept)."""
    from cslm_jax.data.formats import load_data_config, merge_repeats, speech
    from cslm_jax.infer.decode import GREEDY, decoding_params, load_for_decoding
    from cslm_jax.infer.responses import chat_prompt_ids, decode_questions

    fmt = load_data_config(data_cfg_path, check_files=False).format
    out = {}
    for chain, path in zip(("interleaved", "sequential"), models):
        cfg, params, tok, vocab = load_for_decoding(path)
        params = decoding_params(cfg, params)
        prompts = []
        for direction, where, r in records:
            q, a = direction.split("2")
            spec = fmt.languages[a]
            template = spec.s2s_prompt if q == a else spec.s2s_cross_prompt
            prompts.append(
                chat_prompt_ids(
                    tok, template.format(speech=speech(merge_repeats(r["question_units"]))), where
                )
            )
        runs = [
            [
                a
                for batch in decode_questions(
                    cfg, params, tok, vocab, prompts, max_new_tokens=max_new_tokens, sampling=GREEDY
                )
                for a in batch.answers
            ]
            for _ in range(repeats)
        ]
        answers = runs[0]
        for i, a in enumerate(answers):  # greedy: the same tokens every run
            for field in (
                "time_to_first_token_s",
                "time_to_speech_start_s",
                "time_to_first_speech_chunk_s",
                "total_s",
            ):
                vals = [getattr(run[i], field) for run in runs]
                setattr(a, field, None if None in vals else statistics.median(vals))
        out[chain] = answers
        print(
            f"   {chain} model {path}: {len(answers)} answers, "
            f"{sum(a.tokens_before_first_speech is not None for a in answers)} with speech",
            flush=True,
        )
    return out


def print_measured(out: dict) -> None:
    inter, seq = out["interleaved"], out["sequential"]
    pairs = [
        (i, s)
        for i, s in zip(inter, seq)
        if i.tokens_before_first_speech is not None and s.tokens_before_first_speech is not None
    ]
    print(
        f"\n2. Measured with the trained models: {len(pairs)} of {len(inter)} questions answered "
        f"with speech by both (greedy, batch 1, token by token to the host, prefill included, "
        f"compilation excluded, median of the repeats)"
    )
    if not pairs:
        return

    rows = [
        (
            "time to the first <sosp>",
            [i.time_to_speech_start_s for i, _ in pairs],
            [s.time_to_speech_start_s for _, s in pairs],
            "s",
        ),
        (
            "time to the first complete chunk",
            [i.time_to_first_speech_chunk_s for i, _ in pairs],
            [s.time_to_first_speech_chunk_s for _, s in pairs],
            "s",
        ),
        (
            "tokens before the first <sosp>",
            [i.tokens_before_first_speech for i, _ in pairs],
            [s.tokens_before_first_speech for _, s in pairs],
            "",
        ),
        (
            "tokens through the first <eosp>",
            [i.tokens_to_first_speech_chunk for i, _ in pairs],
            [s.tokens_to_first_speech_chunk for _, s in pairs],
            "",
        ),
    ]
    print(
        f"   {'':<34}{'interleaved':>12}{'sequential':>12}{'ratio of means':>16}{'mean ratio':>12}"
    )
    for name, a, b, unit in rows:
        both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        if not both:
            print(f"   {name:<34}  (no answer has it under both chains)")
            continue
        a, b = [x for x, _ in both], [y for _, y in both]
        rom, mor = ratios(b, a)
        note = f"  ({len(both)} answers)" if len(both) < len(pairs) else ""
        print(
            f"   {name:<34}{statistics.fmean(a):11.3f}{unit or ' '}{statistics.fmean(b):11.3f}"
            f"{unit or ' '}{rom:15.2f}x{mor:11.2f}x{note}"
        )


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--data-dir",
        help="a corpus folder with data.yaml and s2s_*.jsonl (default: the demo corpus, generated)",
    )
    ap.add_argument(
        "--tokenizer",
        help="the CSLM tokenizer (default: the demo tokenizer extended with the demo's units)",
    )
    ap.add_argument("--split", default="validation")
    ap.add_argument(
        "--models",
        nargs=2,
        metavar=("INTERLEAVED", "SEQUENTIAL"),
        help="trained models (checkpoints or HF folders), one per chain",
    )
    ap.add_argument("--train-demo", metavar="DIR", help="train both demo models here first")
    ap.add_argument(
        "--join",
        default="1",
        help="comma-separated K: also count answers made of "
        "K joined validation answers (longer answers, like the paper's)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="decode each question this many times with each model; the median time counts",
    )
    args = ap.parse_args()

    from cslm_jax.data.formats import load_data_config
    from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
    from cslm_jax.model.vocab import existing_layout, extend_tokenizer, load_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="cslm_latency_")
    models = [Path(m) for m in args.models] if args.models else None
    if args.train_demo:
        data_dir, *models = train_demo_models(Path(args.train_demo))
    elif args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        data_dir = make_demo_data(
            Path(tmp.name) / "data", REPO / "configs" / "data" / "demo.yaml", log=lambda *_: None
        )
    fmt = load_data_config(data_dir / "data.yaml", check_files=False).format
    tok = load_tokenizer(args.tokenizer or data_dir / "tokenizer")
    vocab = existing_layout(tok, str(args.tokenizer or data_dir / "tokenizer"))
    if vocab is None:
        vocab = extend_tokenizer(tok, UNIT_COUNT if not args.data_dir else fmt.unit_count, len(tok))
    records = s2s_records(data_dir, args.split)
    print(
        f"corpus {data_dir} ({args.split}), chunks of "
        f"{', '.join(f'{c}: {s.chunk_size} {s.chunk_unit}s' for c, s in fmt.languages.items())}"
    )
    for k in [int(x) for x in args.join.split(",")]:
        group = records if k == 1 else join_records(records, k, fmt.unit_rate)
        print_reference(reference_counts(group, fmt, tok, vocab), k)
    if models:
        print_measured(
            measured(records, data_dir / "data.yaml", models, args.max_new_tokens, args.repeats)
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()
