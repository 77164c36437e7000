"""`cslm-jax import-hf`: a Hugging Face Llama folder -> a cslm_jax checkpoint."""


def add_parser(sub):
    s = sub.add_parser(
        "import-hf",
        help="convert a Hugging Face Llama folder into a cslm_jax "
        "checkpoint, adding speech units and CSLM tokens to the vocabulary",
    )
    s.add_argument(
        "--hf-dir", required=True, help="folder with config.json, safetensors, tokenizer"
    )
    s.add_argument("--out", required=True, help="checkpoint folder to write")
    s.add_argument(
        "--speech-units",
        type=int,
        default=None,
        help="number of unit tokens <0>..<N-1> (default 4096; 0: import the text model "
        "unchanged; a tokenizer that already holds CSLM tokens keeps its count)",
    )
    s.add_argument(
        "--speech-tokenizer",
        default=None,
        metavar="VERSION|DIR",
        help="take the number of unit tokens from the speech tokenizer the corpus was "
        "extracted with: a version (v1: 4096, v1_25hz: 4096, v2_25hz: 6561), an "
        "import-speech-tokenizer folder or an extract-units output folder",
    )
    s.add_argument(
        "--pad-vocab-multiple",
        type=int,
        default=128,
        help="pad embedding rows to this multiple (padding logits are masked)",
    )
    s.add_argument(
        "--new-rows",
        choices=("mean", "normal"),
        default="mean",
        help="initialise added rows as the mean of the base rows, or N(0, init range)",
    )
    s.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="stored parameter dtype (default: the source's)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed for --new-rows normal")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return s


def run(args) -> int:
    from cslm_jax.convert.hf import import_hf

    import_hf(
        args.hf_dir,
        args.out,
        speech_units=args.speech_units,
        pad_vocab_multiple=args.pad_vocab_multiple,
        new_rows=args.new_rows,
        dtype=args.dtype,
        seed=args.seed,
        force=args.force,
        speech_tokenizer=args.speech_tokenizer,
    )
    return 0
