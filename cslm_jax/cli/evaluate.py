"""`cslm-jax evaluate`: decode a task's validation records and score them (cslm_jax.eval.run)."""

# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("output",)


def add_parser(sub):
    s = sub.add_parser(
        "evaluate",
        help="decode a SeqIO task's validation records greedily and "
        "score them (ASR WER/CER, MT BLEU/chrF, spoken QA transcript and answer "
        "error rates, off-target ratio, text/speech consistency, TTS unit error "
        "rate); writes JSON and prints a table",
    )
    s.add_argument(
        "--config",
        required=True,
        help="run config (its data.config), a train run folder (its config.yaml) or a data config",
    )
    s.add_argument(
        "--task",
        required=True,
        help="task name, e.g. cslm_pretrain_asr_en, "
        "cslm_sft_s2s_en2zh (as registered by tasks/cslm.py)",
    )
    s.add_argument(
        "--ckpt",
        default=None,
        help="model checkpoint, train run folder (its "
        "model/) or Hugging Face folder (export-hf output); default: the run's model/ "
        "when --config is a train run folder or its config.yaml",
    )
    s.add_argument("--split", default="validation", choices=("validation", "train"))
    s.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="first N examples (MT: each direction of a pair is one example)",
    )
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: twice the longest reference answer in tokens + 16, at most 2048",
    )
    s.add_argument("--output", default=None, help="JSON file (default: eval_TASK_SPLIT.json)")
    s.add_argument("--force", action="store_true", help="replace --output if it exists")
    s.add_argument(
        "--unit-lexicon",
        default="auto",
        help="unit -> text mapper for text/speech "
        "consistency and TTS read-back: auto (the demo table where it reads the "
        "task's reference units back exactly), demo, none, or a JSON file "
        '{"silence": [0], "table": {"cat": [17], ...}}',
    )
    s.add_argument(
        "--language-id",
        default="script",
        help="off-target language identifier "
        "(cslm_jax.eval.metrics.LANGUAGE_IDS; default: script-based zh/en)",
    )
    s.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. data.config=runs/demo_data/data.yaml",
    )
    return s


def run(args) -> int:
    from cslm_jax.eval.run import evaluate_task

    evaluate_task(
        config=args.config,
        task=args.task,
        ckpt=args.ckpt,
        split=args.split,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        output=args.output,
        unit_lexicon=args.unit_lexicon,
        language_id_name=args.language_id,
        overrides=args.overrides,
        force=args.force,
        log=lambda msg: print(msg, flush=True),
    )
    return 0
