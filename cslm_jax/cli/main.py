"""`cslm-jax`: one command-line tool with a subcommand per job."""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

# Nothing imported here may import JAX: `main` tunes glibc malloc for training commands first.
from cslm_jax.config import ConfigError
from cslm_jax.resources import config_path

# Commands that run training steps: on XLA:CPU each step allocates its temporaries afresh, which
# glibc serves with mmap/munmap (see cslm_jax.train.cpu_malloc). CSLM_JAX_KEEP_FREED_MEMORY=0 opts out.
TRAINING_COMMANDS = ("train", "demo")


def _cmd_import_hf(args) -> int:
    from cslm_jax.convert.hf import import_hf

    import_hf(args.hf_dir, args.out, speech_units=args.speech_units,
              pad_vocab_multiple=args.pad_vocab_multiple, new_rows=args.new_rows,
              dtype=args.dtype, seed=args.seed, force=args.force)
    return 0


def _cmd_export_hf(args) -> int:
    from cslm_jax.convert.hf import export_hf

    export_hf(args.ckpt, args.out, dtype=args.dtype, force=args.force,
              max_shard_bytes=int(args.max_shard_size_mb * 1024 ** 2))
    return 0


def _cmd_train(args) -> int:
    from cslm_jax.parallel.distributed import initialize
    from cslm_jax.train.loop import run_from_cli

    initialize(args.coordinator, args.num_processes, args.process_id)   # before any device use
    return run_from_cli(args.config, args.run_dir, args.overrides, args.init_from,
                        data_shards=args.data_shards)


TRAIN_EPILOG = """\
overrides (key=value, values parsed as YAML; sections of the run config, see configs/demo.yaml):
  train.steps=N                 optimizer steps (the cosine schedule's length)
  checkpoint.every=N            save a checkpoint every N steps (and at the end and on SIGTERM)
  checkpoint.keep=K             keep the last K checkpoints
  checkpoint.async_save=false   save in the foreground
  train.global_batch_size=288 train.micro_batch_size=32   accumulation = global / micro
  mesh.data=1 mesh.fsdp=-1 mesh.tensor=1                  -1 takes the remaining devices
  optimizer.learning_rate=6e-5 optimizer.warmup_ratio=0.03 optimizer.clip_norm=1.0
  model.remat_policy=dots_no_batch model.compute_dtype=bfloat16
  data.config=FILE data.stage=pretrain data.max_length=1024 train.on_nonfinite=stop|skip

exit codes: 0 done; 75 preempted (SIGTERM: checkpoint written, rerun the same command to
resume); 3 non-finite loss (last checkpoint intact); 2 bad configuration or data.
"""


def _cmd_demo(args) -> int:
    from cslm_jax.demo.run import run_demo

    return run_demo(args.out, force=args.force)


def _format_config(path):
    from cslm_jax.data.formats import load_data_config

    return load_data_config(path, check_files=False).format


def _cmd_validate_data(args) -> int:
    from cslm_jax.data.formats import read_jsonl

    fmt = _format_config(args.data_config)
    total_bad = 0
    for path in args.files:
        skipped: list = []
        kinds = collections.Counter(k for _, k, _ in read_jsonl(path, args.kind, fmt,
                                                                  args.skip_bad, skipped))
        total_bad += len(skipped)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no valid records"
        print(f"{path}: {sum(kinds.values())} valid ({summary}), {len(skipped)} skipped")
        for err in skipped[:args.show]:
            print(f"  skipped {err}")
        if len(skipped) > args.show:
            print(f"  ... and {len(skipped) - args.show} more")
    print(f"validate-data: {len(args.files)} file(s), {total_bad} bad record(s) skipped"
          if args.skip_bad else f"validate-data: {len(args.files)} file(s) valid")
    return 0


def _cmd_inspect_data(args) -> int:
    import json

    from cslm_jax.data.formats import (RECORD_KIND_OF_TASK, TASK_KINDS, ChatRenderer, examples,
                                  load_data_config, read_jsonl)
    from cslm_jax.model.vocab import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    cfg = load_data_config(args.data_config, check_files=bool(args.task))
    renderer = ChatRenderer(tok, max_length=cfg.max_length)
    shown = 0

    def show(rendered, source):
        print(json.dumps({"source": source, "text": rendered.text, "input_ids": rendered.input_ids,
                          "loss_mask": rendered.loss_mask, "truncated": rendered.truncated},
                         ensure_ascii=False))

    if args.jsonl:
        task_kinds = [args.kind] if args.kind in TASK_KINDS else \
            [t for t, r in RECORD_KIND_OF_TASK.items() if r == args.kind]
        if not task_kinds:
            raise ConfigError(f"--kind {args.kind!r}: expected a task kind {TASK_KINDS} or a record "
                              f"kind {sorted(set(RECORD_KIND_OF_TASK.values()))}")
        record_kind = RECORD_KIND_OF_TASK[task_kinds[0]]
        for where, _, record in read_jsonl(args.jsonl, record_kind, cfg.format):
            for kind in task_kinds:
                for messages in examples(kind, record, cfg.format, where):
                    show(renderer(messages), f"{where} {kind}")
                    shown += 1
                    if shown >= args.n:
                        return 0
        return 0
    import seqio

    from cslm_jax.tasks.cslm import register
    register(cfg, args.tokenizer)
    task = seqio.get_mixture_or_task(args.task)
    if not isinstance(task, seqio.Task):
        raise ConfigError(f"--task {args.task!r} is a mixture; name one of its tasks: "
                          f"{[t.name for t in task.tasks]}")
    ds = task.get_dataset(None, split=args.split, shuffle=False, num_epochs=1)
    for ex in ds.take(args.n).as_numpy_iterator():
        ids = ex["targets"].tolist()
        mask = ex["loss_weights"].tolist()
        print(json.dumps({"source": args.task, "text": tok.decode(ids), "input_ids": ids,
                          "loss_mask": mask}, ensure_ascii=False))
    return 0


def _cmd_make_demo_data(args) -> int:
    from cslm_jax.demo.corpus import make_demo_data

    make_demo_data(args.out, config_path("data", "demo.yaml"), seed=args.seed,
                   scale=args.scale, force=args.force)
    return 0


def _cmd_decode(args) -> int:
    from cslm_jax.infer.responses import run_decode

    return run_decode(args)


def _cmd_evaluate(args) -> int:
    from cslm_jax.eval.run import run_evaluate

    return run_evaluate(args)


def _cmd_compile(args) -> int:
    from cslm_jax.tpu.aot import run_compile

    return run_compile(args.config, args.topology, args.overrides, model_path=args.model,
                       speech_units=args.speech_units, pad_vocab_multiple=args.pad_vocab_multiple)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cslm-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("import-hf", help="convert a Hugging Face Llama folder into a cslm_jax "
                       "checkpoint, adding speech units and CSLM tokens to the vocabulary")
    s.add_argument("--hf-dir", required=True, help="folder with config.json, safetensors, tokenizer")
    s.add_argument("--out", required=True, help="checkpoint folder to write")
    s.add_argument("--speech-units", type=int, default=None,
                   help="number of unit tokens <0>..<N-1> (default 4096; 0: import the text model "
                   "unchanged; a tokenizer that already holds CSLM tokens keeps its count)")
    s.add_argument("--pad-vocab-multiple", type=int, default=128,
                   help="pad embedding rows to this multiple (padding logits are masked)")
    s.add_argument("--new-rows", choices=("mean", "normal"), default="mean",
                   help="initialise added rows as the mean of the base rows, or N(0, init range)")
    s.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="stored parameter dtype (default: the source's)")
    s.add_argument("--seed", type=int, default=0, help="seed for --new-rows normal")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=_cmd_import_hf)

    s = sub.add_parser("export-hf", help="write a Hugging Face LlamaForCausalLM folder from a "
                       "cslm_jax checkpoint")
    s.add_argument("--ckpt", required=True, help="cslm_jax model checkpoint folder")
    s.add_argument("--out", required=True, help="folder to write (must be empty unless --force)")
    s.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    s.add_argument("--max-shard-size-mb", type=float, default=5 * 1024,
                   help="split safetensors above this size (with an index)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=_cmd_export_hf)

    s = sub.add_parser("train", help="train one CSLM stage on the device mesh (resumes "
                       "automatically from RUN_DIR's latest checkpoint)", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", required=True, help="run config YAML (configs/cslm_pretrain.yaml, "
                   "configs/cslm_sft.yaml, configs/demo.yaml)")
    s.add_argument("--run-dir", required=True, help="folder for checkpoints, metrics and the "
                   "final model; rerunning with the same folder resumes")
    s.add_argument("--init-from", default=None, help="model checkpoint to start from (import-hf "
                   "output, or a finished run folder: its parameters, not its optimizer state); "
                   "overrides the config's init_from; ignored when RUN_DIR has a checkpoint")
    g = s.add_argument_group("multi-host (on a Cloud TPU VM slice nothing is needed: every worker "
                             "runs the same command and JAX finds the others)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address, elsewhere (env CSLM_JAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="processes in the job (env CSLM_JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process, 0..N-1 (env CSLM_JAX_PROCESS_ID)")
    g.add_argument("--data-shards", type=int, default=None,
                   help="input shards of a new run (default: one per process); fixed for the "
                   "run, so it can resume on any process count that divides it")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    s.set_defaults(func=_cmd_train)

    demo_cfg = str(config_path("data", "demo.yaml"))
    s = sub.add_parser("validate-data", help="check JSONL corpora (JSON, fields, unit ids, speech "
                       "spans, timings, languages); strict unless --skip-bad")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--kind", choices=("paired", "translation", "instruction", "spoken_instruction"),
                   default=None, help="record kind (default: told from each record's fields)")
    s.add_argument("--skip-bad", action="store_true", help="count and report bad records instead "
                   "of stopping at the first")
    s.add_argument("--data-config", default=demo_cfg,
                   help="languages and codebook size come from here (default: %(default)s)")
    s.add_argument("--show", type=int, default=5, help="skipped records to print per file")
    s.set_defaults(func=_cmd_validate_data)

    s = sub.add_parser("inspect-data", help="print rendered examples with input ids and loss mask")
    s.add_argument("--tokenizer", required=True, help="the CSLM-extended tokenizer folder "
                   "(a checkpoint's tokenizer/)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="a SeqIO task registered from --data-config")
    g.add_argument("--jsonl", help="a JSONL file, rendered as --kind")
    s.add_argument("--kind", help="with --jsonl: task kind (asr, tts, mt, instruct, s2s) or record "
                   "kind (paired -> asr and tts, ...)")
    s.add_argument("--data-config", default=demo_cfg, help="default: %(default)s")
    s.add_argument("--split", default="train")
    s.add_argument("-n", type=int, default=3, help="examples to print")
    s.set_defaults(func=_cmd_inspect_data)

    s = sub.add_parser("make-demo-data", help="write the bundled demo corpus and its tokenizer")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=int, default=1, help="multiply the corpus size")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=_cmd_make_demo_data)

    s = sub.add_parser("demo", help="the bundled end-to-end run on CPU (see README)")
    s.add_argument("--out", required=True, help="folder for everything the demo writes")
    s.add_argument("--force", action="store_true", help="reuse a non-empty --out")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("decode", help="answer spoken questions (one unit sequence per line) with "
                       "streamed transcript / text / speech chunks, as the reference's "
                       "decode_general.py; appends OUT/responses.json and OUT/responses.jsonl")
    s.add_argument("--lang", required=True, choices=("en", "zh"), help="answer language")
    s.add_argument("--cross-lingual", action="store_true", help="the questions are spoken in the "
                   "other language (the reference's decode_general_cross.py prompt)")
    s.add_argument("--unit", required=True, metavar="FILE", help="one question per line as unit "
                   "tokens, <12><907><33> (spaces are removed)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--ckpt", help="cslm_jax model checkpoint (or a train run folder)")
    g.add_argument("--hf-dir", help="Hugging Face folder with the CSLM tokens (export-hf output)")
    s.add_argument("--output-dir", required=True, help="responses.json, responses.jsonl and "
                   "latency_summary.json go here")
    s.add_argument("--data-config", default=None, help="take the prompts (s2s_prompt, "
                   "s2s_cross_prompt), chunk unit and merge_repeats from this data config "
                   "(default: the reference recipe's prompts, CSLM.md section 5)")
    s.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    s.add_argument("--temperature", type=float, default=1.0, help="default: %(default)s (reference)")
    s.add_argument("--top-p", type=float, default=0.7, help="default: %(default)s (reference)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-new-tokens", type=int, default=2048, help="default: %(default)s (reference)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--chunk-size", type=int, default=1, help="decoding steps per host round trip "
                   "(1: every token reaches the host, and the timings, as soon as it exists)")
    s.add_argument("--stream", action="store_true", help="print each event (transcript, text "
                   "chunk, speech chunk, end) as soon as it completes")
    s.add_argument("--constrain-speech", action="store_true", help="only units and <eosp> inside "
                   "a speech span, neither outside")
    s.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: the checkpoint's")
    s.set_defaults(func=_cmd_decode)

    s = sub.add_parser("compile", help="ahead-of-time compile the train step for a TPU slice on "
                       "this (CPU) host: per-chip memory vs HBM, FLOPs per step, FITS / DOES NOT "
                       "FIT (exit 0 / 1; needs the libtpu package)",
                       epilog="topologies: v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB in chips, e.g. "
                       "v4:2x2x4 (v4-32), v5p:4x4x4 (v5p-128), v5e:8x8 (v5litepod-64)")
    s.add_argument("--config", required=True, help="run config YAML (as for train)")
    s.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1")
    s.add_argument("--model", default=None, help="base model YAML (configs/model/*.yaml), extended "
                   "with the CSLM vocabulary as import-hf would; default: the config's init_from "
                   "checkpoint")
    s.add_argument("--speech-units", type=int, default=4096, help="with --model (default 4096)")
    s.add_argument("--pad-vocab-multiple", type=int, default=128, help="with --model (default 128)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="run config overrides "
                   "(mesh.tensor=4, train.micro_batch_size=32, model.remat_policy=full, ...)")
    s.set_defaults(func=_cmd_compile)

    s = sub.add_parser("evaluate", help="decode a SeqIO task's validation records greedily and "
                       "score them (ASR WER/CER, MT BLEU/chrF, spoken QA transcript and answer "
                       "error rates, off-target ratio, text/speech consistency, TTS unit error "
                       "rate); writes JSON and prints a table")
    s.add_argument("--config", required=True, help="run config (its data.config), a train run "
                   "folder (its config.yaml) or a data config")
    s.add_argument("--task", required=True, help="task name, e.g. cslm_pretrain_asr_en, "
                   "cslm_sft_s2s_en2zh (as registered by tasks/cslm.py)")
    s.add_argument("--ckpt", default=None, help="model checkpoint, train run folder (its "
                   "model/) or Hugging Face folder (export-hf output); default: the run's model/ "
                   "when --config is a train run folder or its config.yaml")
    s.add_argument("--split", default="validation", choices=("validation", "train"))
    s.add_argument("--max-examples", type=int, default=None, help="first N examples (MT: each "
                   "direction of a pair is one example)")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: twice the longest "
                   "reference answer in tokens + 16, at most 2048")
    s.add_argument("--output", default=None, help="JSON file (default: eval_TASK_SPLIT.json)")
    s.add_argument("--unit-lexicon", default="auto", help="unit -> text mapper for text/speech "
                   "consistency and TTS read-back: auto (the demo table where it reads the "
                   "task's reference units back exactly), demo, none, or a JSON file "
                   "{\"silence\": [0], \"table\": {\"cat\": [17], ...}}")
    s.add_argument("--language-id", default="script", help="off-target language identifier "
                   "(cslm_jax.eval.metrics.LANGUAGE_IDS; default: script-based zh/en)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. "
                   "data.config=runs/demo_data/data.yaml")
    s.set_defaults(func=_cmd_evaluate)
    return p


def _quiet_tpu_probe() -> None:
    """libtpu (installed for `cslm-jax compile`) makes JAX probe for TPUs at start-up and print
    initialisation errors on machines that have none. Where no TPU chip is attached, no CUDA
    plugin is installed and the user set no JAX_PLATFORMS, ask JAX for the CPU only: the same
    backend it would end up with, without the noise. `compile` reaches libtpu through its own
    topology API either way."""
    import importlib.util

    from cslm_jax.parallel.distributed import tpu_chips_on_host

    if os.environ.get("JAX_PLATFORMS") or tpu_chips_on_host():
        return
    if any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)) \
            if importlib.util.find_spec("jax_plugins") else False:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_tpu_probe()                  # before anything imports JAX
    if args.command in TRAINING_COMMANDS and os.environ.get("CSLM_JAX_KEEP_FREED_MEMORY", "1") != "0":
        from cslm_jax.train.cpu_malloc import keep_freed_memory
        keep_freed_memory()    # before JAX starts its threads; a no-op where it does not apply
    from cslm_jax.storage.checkpoint import CheckpointError
    from cslm_jax.convert.hf import ConversionError
    from cslm_jax.data.formats import RecordError
    from cslm_jax.train.loop import TrainError
    from cslm_jax.model.vocab import VocabError

    if args.command == "inspect-data" and args.jsonl and not args.kind:
        build_parser().error("inspect-data --jsonl needs --kind")
    try:
        return args.func(args)
    except (ConversionError, CheckpointError, ConfigError, VocabError, FileExistsError,
            RecordError, ValueError, TrainError) as e:
        print(f"cslm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
