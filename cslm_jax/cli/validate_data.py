"""`cslm-jax validate-data`: check JSONL corpora (cslm_jax.data.checks)."""

from cslm_jax.resources import config_path


def add_parser(sub):
    s = sub.add_parser(
        "validate-data",
        help="check JSONL corpora (JSON, fields, unit ids, speech "
        "spans, timings, languages); strict unless --skip-bad",
    )
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument(
        "--kind",
        choices=("paired", "translation", "instruction", "spoken_instruction"),
        default=None,
        help="record kind (default: told from each record's fields)",
    )
    s.add_argument(
        "--skip-bad",
        action="store_true",
        help="count and report bad records instead of stopping at the first",
    )
    s.add_argument(
        "--data-config",
        default=str(config_path("data", "demo.yaml")),
        help="languages and codebook size come from here (default: %(default)s)",
    )
    s.add_argument("--show", type=int, default=5, help="skipped records to print per file")
    return s


def run(args) -> int:
    from cslm_jax.data.checks import validate_file
    from cslm_jax.data.formats import load_data_config

    fmt = load_data_config(args.data_config, check_files=False).format
    total_bad = 0
    for path in args.files:
        kinds, skipped = validate_file(path, fmt=fmt, kind=args.kind, skip_bad=args.skip_bad)
        total_bad += len(skipped)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no valid records"
        print(f"{path}: {sum(kinds.values())} valid ({summary}), {len(skipped)} skipped")
        for err in skipped[: args.show]:
            print(f"  skipped {err}")
        if len(skipped) > args.show:
            print(f"  ... and {len(skipped) - args.show} more")
    print(
        f"validate-data: {len(args.files)} file(s), {total_bad} bad record(s) skipped"
        if args.skip_bad
        else f"validate-data: {len(args.files)} file(s) valid"
    )
    return 0
