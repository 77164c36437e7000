"""`cslm-jax export-hf`: a cslm_jax checkpoint -> a Hugging Face LlamaForCausalLM folder."""


def add_parser(sub):
    s = sub.add_parser(
        "export-hf", help="write a Hugging Face LlamaForCausalLM folder from a cslm_jax checkpoint"
    )
    s.add_argument(
        "--ckpt",
        required=True,
        help="cslm_jax model checkpoint folder, or a finished train run folder (its model/)",
    )
    s.add_argument("--out", required=True, help="folder to write (must be empty unless --force)")
    s.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    s.add_argument(
        "--max-shard-size-mb",
        type=float,
        default=5 * 1024,
        help="split safetensors above this size (with an index)",
    )
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return s


def run(args) -> int:
    from cslm_jax.convert.hf import export_hf

    export_hf(
        args.ckpt,
        args.out,
        dtype=args.dtype,
        force=args.force,
        max_shard_bytes=int(args.max_shard_size_mb * 1024**2),
    )
    return 0
