"""`cslm-jax import-speech-tokenizer`: official S3 tokenizer weights -> a tokenizer folder."""

from pathlib import Path

VERSIONS = ("v1", "v1_25hz", "v2_25hz")


def add_parser(sub):
    s = sub.add_parser(
        "import-speech-tokenizer",
        help="write an S3 speech tokenizer folder (for extract-units) from the "
        "official ONNX file or an s3tokenizer state dict",
    )
    s.add_argument(
        "--from",
        dest="src",
        required=True,
        metavar="FILE",
        help="speech_tokenizer_v1.onnx / speech_tokenizer_v2.onnx (CosyVoice), or a "
        ".pt/.pth/.safetensors state dict in the s3tokenizer package's naming",
    )
    s.add_argument(
        "--version",
        required=True,
        choices=VERSIONS,
        help="v1: CosyVoice-300M (50 units/s, 4096 codes); v1_25hz: CosyVoice-300M-25Hz "
        "(25/s, 4096); v2_25hz: CosyVoice2 (25/s, 6561)",
    )
    s.add_argument("--out", required=True, help="folder to write (must be empty unless --force)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return s


def check(args, parser):
    from cslm_jax.speech.s3 import SpeechTokenizerError
    from cslm_jax.storage.outputs import check_output_dir

    for flag, value in (("--from", args.src), ("--out", args.out)):
        if "://" in str(value):
            raise SpeechTokenizerError(
                f"{flag} {value}: import-speech-tokenizer reads and writes local paths only"
            )
    src = Path(args.src)
    if src.is_dir():
        raise SpeechTokenizerError(
            f"--from {args.src}: is a folder; give the weights file "
            f"(.onnx, .pt/.pth or .safetensors)"
        )
    if not src.is_file():
        raise SpeechTokenizerError(f"--from {args.src}: no such file")
    check_output_dir(
        args.out, args.force, inputs=[("--from", args.src)], tool="import-speech-tokenizer"
    )


def run(args) -> int:
    from cslm_jax.speech.weights import import_speech_tokenizer

    cfg, out = import_speech_tokenizer(args.src, args.version, args.out, force=args.force)
    print(
        f"wrote {out}: {cfg.spec.name} ({cfg.n_layer} blocks of {cfg.n_state}, "
        f"{cfg.codebook_size} codes, {cfg.units_per_second} units/s)"
    )
    return 0
