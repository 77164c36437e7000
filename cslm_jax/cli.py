"""`cslm-jax`: one command-line tool with a subcommand per job."""
from __future__ import annotations

import argparse
import sys

from cslm_jax.checkpoint import CheckpointError
from cslm_jax.config import ConfigError
from cslm_jax.vocab import VocabError


def _cmd_import_hf(args) -> int:
    from cslm_jax.convert import import_hf

    import_hf(args.hf_dir, args.out, speech_units=args.speech_units,
              pad_vocab_multiple=args.pad_vocab_multiple, new_rows=args.new_rows,
              dtype=args.dtype, seed=args.seed, force=args.force)
    return 0


def _cmd_export_hf(args) -> int:
    from cslm_jax.convert import export_hf

    export_hf(args.ckpt, args.out, dtype=args.dtype, force=args.force,
              max_shard_bytes=int(args.max_shard_size_mb * 1024 ** 2))
    return 0


def _cmd_demo(args) -> int:
    from cslm_jax.demo import run_demo

    return run_demo(args.out, force=args.force)


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

    s = sub.add_parser("demo", help="the bundled end-to-end run on CPU (see README)")
    s.add_argument("--out", required=True, help="folder for everything the demo writes")
    s.add_argument("--force", action="store_true", help="reuse a non-empty --out")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cslm_jax.convert import ConversionError

    try:
        return args.func(args)
    except (ConversionError, CheckpointError, ConfigError, VocabError, FileExistsError) as e:
        print(f"cslm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
