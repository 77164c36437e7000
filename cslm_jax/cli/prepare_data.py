"""`cslm-jax prepare-data`: prepare a stage's tasks into the SeqIO cache layout on Apache Beam
(cslm_jax.data.beam_prepare); training reads it with `--data-cache DIR` or `cache_dir:`."""

import shlex

DEFAULT_NUM_SHARDS = 64  # as cslm_jax.data.beam_prepare (not imported here: Beam is heavy)


def add_parser(sub):
    s = sub.add_parser(
        "prepare-data",
        help="validate, render, tokenize and mask a stage's corpora "
        "into sharded SeqIO caches on Apache Beam (DirectRunner here, Dataflow/"
        "Flink/Spark on a cluster)",
    )
    s.add_argument("--data-config", required=True, help="data config (configs/data/*.yaml)")
    s.add_argument(
        "--stage", required=True, help="the stage whose tasks to prepare (pretrain, sft)"
    )
    s.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these tasks of the stage (default: all)",
    )
    s.add_argument(
        "--tokenizer",
        required=True,
        help="the CSLM tokenizer training uses: an "
        "imported checkpoint (import-hf output) or its tokenizer/ folder",
    )
    s.add_argument("--out", required=True, help="cache folder: one subfolder per task")
    s.add_argument(
        "--num-shards",
        type=int,
        default=DEFAULT_NUM_SHARDS,
        help="TFRecord files per split; hosts read whole files, so use a multiple of "
        "the host count (default: %(default)s)",
    )
    s.add_argument(
        "--runner",
        default="DirectRunner",
        help="Beam runner: DirectRunner, "
        "DataflowRunner (needs --project, --region, --temp_location in the pipeline "
        "options), FlinkRunner, SparkRunner, PortableRunner, PrismRunner, or a "
        "module.Class name (default: %(default)s)",
    )
    s.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DirectRunner worker processes (default: one per CPU core)",
    )
    s.add_argument(
        "--range-mb",
        type=float,
        default=64.0,
        help="large files are split into byte ranges of at most about this size "
        "(MiB, > 0; default: %(default)s); with DirectRunner each worker takes one "
        "contiguous share of every file",
    )
    s.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="override packing.max_length (must equal the training run's data.max_length)",
    )
    s.add_argument(
        "--no-fast-render",
        action="store_true",
        help="render every example with the tokenizer's Jinja template (slower; the same output)",
    )
    s.add_argument(
        "--pipeline-options",
        default="",
        metavar="'--opt=value ...'",
        help="more Beam pipeline options, one quoted string: --pipeline-options "
        "'--project=P --region=R --temp_location=gs://B/tmp' (or attached: "
        "--pipeline-options='...'); e.g. Dataflow's --project, --region, "
        "--temp_location, --requirements_file",
    )
    s.add_argument(
        "--pipeline-option",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="one more Beam pipeline option, without its dashes (repeatable): "
        "--pipeline-option project=P --pipeline-option region=R",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="prepare again the tasks whose cache in --out was prepared from input "
        "files that changed since, or with other settings (default: refuse them; "
        "up-to-date tasks are kept either way)",
    )
    return s


def check(args, parser) -> None:
    from pathlib import Path

    from cslm_jax.data.formats import check_stage_files, load_data_config
    from cslm_jax.errors import CslmError
    from cslm_jax.storage import fs
    from cslm_jax.storage.outputs import check_output_place

    if args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1, got {args.num_shards}")
    if args.num_workers is not None and args.num_workers < 1:
        parser.error(f"--num-workers must be >= 1, got {args.num_workers}")
    if not 0 < args.range_mb < float("inf"):
        parser.error(f"--range-mb must be > 0 (MiB per byte range), got {args.range_mb:g}")
    try:
        args.pipeline_args = shlex.split(args.pipeline_options)
    except ValueError as e:
        parser.error(f"--pipeline-options {args.pipeline_options!r}: {e}")
    for option in args.pipeline_option:
        if not option.lstrip("-"):
            parser.error(f"--pipeline-option {option!r}: give KEY or KEY=VALUE")
        args.pipeline_args.append("--" + option.lstrip("-"))
    tok = Path(args.tokenizer)
    if "://" in args.tokenizer:  # gs://...: workers copy it (cslm_jax.data.prepare)
        args.tokenizer_dir = args.tokenizer
    else:
        if (tok / "tokenizer").is_dir():
            tok = tok / "tokenizer"
        if not (tok / "tokenizer.json").is_file() and not (tok / "tokenizer_config.json").is_file():
            raise CslmError(
                f"--tokenizer {args.tokenizer}: no tokenizer there (expected an "
                f"imported checkpoint or its tokenizer/ folder)"
            )
        args.tokenizer_dir = str(tok)
    overrides = [] if args.max_length is None else [f"packing.max_length={args.max_length}"]
    args.cfg = load_data_config(args.data_config, overrides, check_files=False)
    check_stage_files(args.cfg, args.stage, args.tasks)

    def where(p):  # file:// URLs as the local paths they name
        return fs.local_file(p) or p

    inputs = [("--data-config", args.data_config), ("--tokenizer", where(args.tokenizer))]
    inputs += [
        (f"stages.{args.stage}[{i}].{split}[{j}]", where(f))
        for i, s in enumerate(args.cfg.tasks(args.stage))
        for split, files in (("train", s.train), ("validation", s.validation))
        for j, f in enumerate(files)
    ]
    check_output_place(where(args.out), inputs=inputs, flag="--out")


def uses_tensorflow(args) -> bool:
    """Only TFDS tasks need TensorFlow here (files, local or in a bucket, go through
    cslm_jax.storage.fs); preparation starts without it (seconds of the job's serial start-up)."""
    return any(s.tfds is not None for s in args.cfg.tasks(args.stage))


def _check_tokenizer(tokenizer_dir: str, unit_count: int) -> None:
    """`require_cslm_tokens` on the tokenizer; its tokenizer.json read with the `tokenizers`
    library first (no transformers import: seconds of start-up), the full check (and its error)
    where that does not find every CSLM token."""
    from pathlib import Path

    from cslm_jax.data.prepare import local_tokenizer_dir
    from cslm_jax.model.vocab import load_tokenizer, require_cslm_tokens

    local = Path(local_tokenizer_dir(tokenizer_dir))
    if (local / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        class _Vocab:
            def __init__(self, tok):
                self.tok = tok

            def get_vocab(self):
                return self.tok.get_vocab(with_added_tokens=True)

        try:
            require_cslm_tokens(
                _Vocab(Tokenizer.from_file(str(local / "tokenizer.json"))),
                tokenizer_dir,
                unit_count,
            )
            return
        except Exception:  # noqa: BLE001 - the full check below decides and reports
            pass
    require_cslm_tokens(load_tokenizer(local), tokenizer_dir, unit_count)


def run(args) -> int:
    from cslm_jax.data.beam_prepare import prepare_data

    _check_tokenizer(args.tokenizer_dir, args.cfg.format.unit_count)
    result = prepare_data(
        args.cfg,
        args.stage,
        args.tokenizer_dir,
        args.out,
        tasks=args.tasks,
        num_shards=args.num_shards,
        runner=args.runner,
        num_workers=args.num_workers,
        range_bytes=int(args.range_mb * (1 << 20)),
        pipeline_args=args.pipeline_args,
        fast=not args.no_fast_render,
        force=args.force,
    )
    for task, what in result.items():
        print(f"prepare-data: {task}: {what} -> {args.out}/{task}")
    return 0
