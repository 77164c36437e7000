"""`cslm-jax join-timings`: word timings from a forced aligner into records (cslm_jax.data.alignments)."""

from cslm_jax.resources import config_path

# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("records", "alignments", "out")


def add_parser(sub):
    s = sub.add_parser(
        "join-timings",
        help="fill spoken_instruction (and paired) records' word "
        "timings from MFA TextGrids, whisperX JSON or ctc-forced-aligner output, "
        "joined by record id",
    )
    s.add_argument(
        "--records",
        required=True,
        metavar="FILE",
        help="JSONL records, each with an id (--id-field)",
    )
    s.add_argument(
        "--alignments",
        required=True,
        metavar="DIR|FILE",
        help="a folder of aligner "
        "outputs named by record id (searched recursively), one such file, or a JSONL "
        "file of whisperx/ctc results with an id each",
    )
    s.add_argument(
        "--format",
        required=True,
        choices=("mfa", "whisperx", "ctc"),
        help="mfa: TextGrid (words tier); whisperx: JSON (segments[].words or "
        "word_segments); ctc: ctc-forced-aligner JSON (a top-level text and its segments) or "
        "START-END: TEXT lines",
    )
    s.add_argument(
        "--out", required=True, metavar="FILE", help="the joined JSONL (written atomically)"
    )
    s.add_argument(
        "--data-config",
        default=str(config_path("data", "demo.yaml")),
        help="languages (word or character timing), punctuation, unit rate (default: %(default)s)",
    )
    s.add_argument("--id-field", default="id", help="record field holding the id (default: id)")
    s.add_argument(
        "--tier",
        default=None,
        help="TextGrid tier with the words (default: 'words' or '<speaker> - words')",
    )
    s.add_argument(
        "--untimed",
        choices=("interpolate", "error"),
        default="interpolate",
        help="aligner words without a timing (whisperX: numbers, symbols): share the "
        "gap between their neighbours, or stop (default: %(default)s)",
    )
    s.add_argument(
        "--allow-missing",
        action="store_true",
        help="count and leave out records without an alignment instead of stopping",
    )
    s.add_argument(
        "--skip-bad",
        action="store_true",
        help="count and leave out records whose "
        "alignment does not match their text instead of stopping",
    )
    s.add_argument("--force", action="store_true", help="replace --out if it exists")
    return s


def run(args) -> int:
    from cslm_jax.data.alignments import join_timings
    from cslm_jax.data.formats import load_data_config

    cfg = load_data_config(args.data_config, check_files=False).format
    join_timings(
        args.records,
        args.alignments,
        args.format,
        args.out,
        cfg,
        id_field=args.id_field,
        tier=args.tier,
        allow_missing=args.allow_missing,
        skip_bad=args.skip_bad,
        untimed=args.untimed,
        force=args.force,
    )
    return 0
