"""`cslm-jax compile`: will a run fit a TPU slice? (cslm_jax.tpu.aot) With --speech-tokenizer:
the speech-unit extraction step instead (cslm_jax.tpu.extraction); with --token2wav: speech
synthesis (cslm_jax.tpu.synthesis); with --decode: a decoding step (cslm_jax.tpu.decoding)."""


def add_parser(sub):
    s = sub.add_parser(
        "compile",
        help="ahead-of-time compile the train step for a TPU slice on "
        "this (CPU) host: per-chip memory vs HBM, FLOPs per step, FITS / DOES NOT "
        "FIT (exit 0 / 1; needs the libtpu package); with --speech-tokenizer the "
        "extract-units step: memory per chip, FLOPs per second of audio, hours of "
        "audio per chip-hour; with --token2wav the synthesis step (flow + HiFT): memory "
        "per chip, FLOPs and seconds of audio per chip-second; with --decode a decoding "
        "step: memory per chip (weights + KV cache) and the tokens/s bound",
        epilog="topologies: v4:AxBxC, v5p:AxBxC, v5e:AxB, v6e:AxB in chips, e.g. "
        "v4:2x2x4 (v4-32), v5p:4x4x4 (v5p-128), v5e:8x8 (v5litepod-64); one chip: "
        "v5e:1x1, v5p:1x1x1",
    )
    s.add_argument(
        "--config",
        default=None,
        help="run config YAML (as for train); required unless --speech-tokenizer",
    )
    s.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1")
    s.add_argument(
        "--model",
        default=None,
        help="base model YAML (configs/model/*.yaml), extended "
        "with the CSLM vocabulary as import-hf would; default: the config's init_from "
        "checkpoint",
    )
    s.add_argument(
        "--speech-units",
        type=int,
        default=None,
        help="with --model (default: the "
        "data config's format.unit_count, the codebook the run trains on)",
    )
    s.add_argument("--pad-vocab-multiple", type=int, default=128, help="with --model (default 128)")
    s.add_argument(
        "--search",
        action="store_true",
        help="find the lightest remat policy (none, "
        "dots, dots_no_batch, qkv_proj, full) with which some micro-batch fits, and the "
        "largest micro-batch that fits with it; prints every attempt, then its report",
    )
    g = s.add_argument_group("speech-unit extraction (instead of a train step)")
    g.add_argument(
        "--speech-tokenizer",
        default=None,
        metavar="VERSION",
        help="compile the extract-units step of this S3 tokenizer (v1, v1_25hz, "
        "v2_25hz) at its official sizes (overrides: n_state=, n_head=, n_layer=)",
    )
    g.add_argument(
        "--batch",
        type=int,
        default=None,
        help="rows per step, all chips together "
        "(default 32, extract-units' --batch-size; with --token2wav 8 answers)",
    )
    g.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="padded row length, the bucket "
        "(default 30, the longest; with --token2wav 10 s of speech per answer)",
    )
    g.add_argument(
        "--precision",
        default="highest",
        choices=("highest", "high", "default", "bfloat16"),
        help="matmul precision, as extract-units --precision (default highest)",
    )
    t = s.add_argument_group("speech synthesis (instead of a train step)")
    t.add_argument(
        "--token2wav",
        default=None,
        metavar="VERSION",
        help="compile the synthesis step (flow + HiFT, as synthesize runs it) of this "
        "token2wav version (v1 or v2) at its official sizes (overrides: flow.NAME=N, "
        "hift.NAME=N); --batch answers of --seconds each",
    )
    d = s.add_argument_group("decoding step (instead of a train step)")
    d.add_argument(
        "--decode",
        action="store_true",
        help="compile one decoding step (every KV-cache slot advances a token, as the serving "
        "engine steps) of --model (default: Llama 3.1 8B with the CSLM vocabulary, "
        "--speech-units default 4096) in its "
        "compute dtype, weights and cache split over --tensor chips: memory per chip and the "
        "tokens/s bound (HBM bandwidth)",
    )
    d.add_argument("--slots", type=int, default=8, help="KV-cache rows (default %(default)s)")
    d.add_argument(
        "--max-length",
        type=int,
        default=4096,
        help="cache positions per slot: prompt + answer (default %(default)s)",
    )
    d.add_argument(
        "--tensor",
        type=int,
        default=None,
        help="chips that split the weights and the cache (default: every chip of the slice; "
        "the others hold copies for more slots)",
    )
    s.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="run config overrides "
        "(mesh.tensor=4, train.micro_batch_size=32, model.remat_policy=full, ...)",
    )
    return s


def check(args, parser) -> None:
    if args.decode:
        other = [
            flag
            for flag, given in (
                ("--config", args.config),
                ("--search", args.search),
                ("--speech-tokenizer", args.speech_tokenizer),
                ("--token2wav", args.token2wav),
                ("--batch", args.batch is not None),
                ("--seconds", args.seconds is not None),
                ("key=value overrides", args.overrides),
            )
            if given
        ]
        if other:
            parser.error(f"--decode compiles the decoding step: it takes no {', '.join(other)}")
        return
    if args.tensor is not None or args.slots != 8 or args.max_length != 4096:
        parser.error("--slots, --max-length and --tensor go with --decode")
    if args.speech_tokenizer is not None and args.token2wav is not None:
        parser.error("--speech-tokenizer and --token2wav compile different steps: give one")
    if args.speech_tokenizer is None and args.token2wav is None and args.config is None:
        parser.error(
            "--config is required (or --speech-tokenizer VERSION to compile the "
            "speech-unit extraction step, --token2wav VERSION the synthesis step)"
        )
    for flag, value in (
        ("--speech-tokenizer", args.speech_tokenizer),
        ("--token2wav", args.token2wav),
    ):
        if value is not None and (args.config or args.search or args.model):
            parser.error(f"{flag} compiles its own step: it takes no --config, --model or --search")
    if (
        args.speech_tokenizer is None
        and args.token2wav is None
        and (args.batch is not None or args.seconds is not None)
    ):
        parser.error(
            "--batch and --seconds go with --speech-tokenizer or --token2wav (a train "
            "step's batch is the run config's: train.micro_batch_size=...)"
        )


def run(args) -> int:
    from cslm_jax.tpu.aot import check_fit, gib, search_fit

    if args.decode:
        from cslm_jax.tpu.decoding import compile_decode_step

        return _print(
            compile_decode_step(
                args.topology,
                args.slots,
                args.max_length,
                args.tensor,
                args.model,
                4096 if args.speech_units is None else args.speech_units,
                args.pad_vocab_multiple,
            )
        )
    if args.token2wav is not None or args.speech_tokenizer is not None:
        # a speech step instead of a train step: (version, compile function, default batch and
        # seconds per row)
        if args.token2wav is not None:
            from cslm_jax.tpu.synthesis import compile_synthesis_step as compile_step

            version, batch, seconds = args.token2wav, 8, 10.0
        else:
            from cslm_jax.tpu.extraction import compile_extraction_step as compile_step

            version, batch, seconds = args.speech_tokenizer, 32, 30.0
        report = compile_step(
            version,
            args.topology,
            batch if args.batch is None else args.batch,
            seconds if args.seconds is None else args.seconds,
            args.precision,
            args.overrides,
        )
        return _print(report)
    if args.search:
        result = search_fit(
            args.config,
            args.topology,
            args.overrides,
            model_path=args.model,
            speech_units=args.speech_units,
            pad_vocab_multiple=args.pad_vocab_multiple,
        )
        if result.best is None:
            last = result.attempts[-1][2] if result.attempts else None
            need = (
                ""
                if last is None
                else f" (it needs {last.error[:300]})"
                if last.error
                else f" (it needs {gib(last.used_bytes)} per chip of "
                f"{gib(last.topology.hbm_bytes)})"
            )
            print(
                f"search: nothing fits {args.topology}, not even full remat at the smallest "
                f"micro-batch{need}; DOES NOT FIT"
            )
            return 1
        return _print(result.best)
    report = check_fit(
        args.config,
        args.topology,
        args.overrides,
        model_path=args.model,
        speech_units=args.speech_units,
        pad_vocab_multiple=args.pad_vocab_multiple,
    )
    return _print(report)


def _print(report) -> int:
    """A compile report's lines; exit 0 where it fits, 1 where it does not."""
    for line in report.lines():
        print(line)
    return 0 if report.fits else 1
