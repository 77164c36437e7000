"""`cslm-jax make-demo-data`: the bundled demo corpus and its tokenizer."""

from cslm_jax.resources import config_path

# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("out",)


def add_parser(sub):
    s = sub.add_parser("make-demo-data", help="write the bundled demo corpus and its tokenizer")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scale", type=int, default=1, help="multiply the corpus size")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return s


def run(args) -> int:
    from cslm_jax.demo.corpus import make_demo_data

    make_demo_data(
        args.out,
        config_path("data", "demo.yaml"),
        seed=args.seed,
        scale=args.scale,
        force=args.force,
    )
    return 0
