"""`cslm-jax inspect-data`: rendered examples with input ids and loss mask (cslm_jax.data.checks)."""

import json

from cslm_jax.resources import config_path


def uses_tensorflow(args) -> bool:
    return bool(args.task)  # a SeqIO task; --jsonl renders in plain Python


def add_parser(sub):
    s = sub.add_parser("inspect-data", help="print rendered examples with input ids and loss mask")
    s.add_argument(
        "--tokenizer",
        required=True,
        help="the CSLM-extended tokenizer folder (a checkpoint's tokenizer/)",
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--task", help="a SeqIO task registered from --data-config")
    g.add_argument("--jsonl", help="a JSONL file, rendered as --kind")
    s.add_argument(
        "--kind",
        help="with --jsonl: task kind (asr, tts, mt, instruct, s2s) or record "
        "kind (paired -> asr and tts, ...)",
    )
    s.add_argument(
        "--data-config", default=str(config_path("data", "demo.yaml")), help="default: %(default)s"
    )
    s.add_argument("--split", default="train")
    s.add_argument("-n", type=int, default=3, help="examples to print")
    return s


def check(args, parser) -> None:
    if args.jsonl and not args.kind:
        parser.error("inspect-data --jsonl needs --kind")


def run(args) -> int:
    from cslm_jax.data.checks import jsonl_examples, task_examples

    if args.jsonl:
        shown = jsonl_examples(
            jsonl=args.jsonl,
            kind=args.kind,
            data_config=args.data_config,
            tokenizer_dir=args.tokenizer,
            n=args.n,
        )
    else:
        shown = task_examples(
            task=args.task,
            split=args.split,
            data_config=args.data_config,
            tokenizer_dir=args.tokenizer,
            n=args.n,
        )
    for example in shown:
        print(json.dumps(example, ensure_ascii=False))
    return 0
