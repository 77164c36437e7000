"""`cslm-jax demo`: the bundled end-to-end run on CPU (cslm_jax.demo.run)."""

TRAINS = True  # glibc malloc keeps freed memory (cslm_jax.cli.setup)


def uses_tensorflow(args) -> bool:
    return True


# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("out",)


def add_parser(sub):
    s = sub.add_parser("demo", help="the bundled end-to-end run on CPU (see README)")
    s.add_argument("--out", required=True, help="folder for everything the demo writes")
    s.add_argument("--force", action="store_true", help="reuse a non-empty --out")
    return s


def run(args) -> int:
    from cslm_jax.demo.run import run_demo

    return run_demo(args.out, force=args.force)
