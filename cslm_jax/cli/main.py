"""`cslm-jax`: one command-line tool with a subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import sys

# Nothing imported here (nor by the command modules at import) may import JAX: `main` tunes
# glibc malloc for training commands first.
from cslm_jax import __version__
from cslm_jax.cli import setup
from cslm_jax.errors import CslmError

# One module of cslm_jax.cli per command, in the order `cslm-jax --help` lists them.
COMMANDS = (
    "import_hf",
    "export_hf",
    "train",
    "validate_data",
    "inspect_data",
    "prepare_data",
    "make_demo_data",
    "demo",
    "decode",
    "compile",
    "evaluate",
    "join_timings",
    "import_speech_tokenizer",
    "extract_units",
    "import_token2wav",
    "synthesize",
    "serve",
)


# Options whose value may itself start with '-' (`--pipeline-options '--opt=1 --b=2'`): argparse
# would read such a value as an option and refuse it ("expected one argument"), so `parse_args`
# attaches it to its flag (`--pipeline-options=--opt=1 --b=2`), as a user may write it anyway.
DASH_VALUE_OPTIONS = ("--pipeline-options", "--pipeline-option")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cslm-jax", description=__doc__)
    p.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the package version and exit",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"cslm_jax.cli.{name}")
        s = module.add_parser(sub)
        s.set_defaults(module=module, subparser=s)
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None):
    """`argv` parsed by `parser` (default: a new `build_parser()`), the values of
    `DASH_VALUE_OPTIONS` attached to their flags first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fixed = []
    while argv:
        arg = argv.pop(0)
        if arg in DASH_VALUE_OPTIONS and argv and argv[0].startswith("-"):
            arg = f"{arg}={argv.pop(0)}"
        fixed.append(arg)
    return (parser or build_parser()).parse_args(fixed)


def refuse_urls(args, names) -> None:
    """A command's path arguments that are local only (`LOCAL_PATHS` of its module) must not be
    URLs: `gs://b/x` would otherwise become a local folder `gs:/b/x`. Every other path argument
    reaches `cslm_jax.storage.fs`, which takes gs:// or refuses the path itself."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and "://" in str(value):
            flag = "--" + name.replace("_", "-")
            raise CslmError(
                f"{flag} {value}: `cslm-jax {args.command}` reads and writes local "
                f"paths only here; give a local path (or a gcsfuse mount)"
            )


def main(argv: list[str] | None = None) -> int:
    """Run one command. A CslmError (bad input, configuration, data or checkpoint) is printed as
    one line, `cslm-jax COMMAND: error: MESSAGE`, and returns exit code 2; anything else is a bug
    and propagates with its traceback (exit code 1). Ctrl-C outside a training loop (which
    checkpoints first, exit code 75) ends the command with one line and exit code 130."""
    args = parse_args(argv)
    module = args.module
    setup.prepare(trains=getattr(module, "TRAINS", False), tensorflow=False)
    try:
        # Arguments and paths are checked before any heavy work (TensorFlow's start-up included)
        refuse_urls(args, getattr(module, "LOCAL_PATHS", ()))
        if hasattr(module, "check"):
            module.check(args, args.subparser)
        if hasattr(module, "uses_tensorflow") and module.uses_tensorflow(args):
            setup.start_tensorflow()
        return module.run(args)
    except CslmError as e:
        print(f"cslm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cslm-jax {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
