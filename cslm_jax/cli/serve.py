"""`cslm-jax serve`: a streaming speech-to-speech server (cslm_jax.serve)."""

import os

from cslm_jax.resources import config_path

# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("speech_tokenizer", "token2wav")


def add_parser(sub):
    s = sub.add_parser(
        "serve",
        help="talk to a CSLM model: WebSocket /v1/s2s (streamed transcript, answer "
        "text and audio), POST /v1/s2s, a web page at /, /healthz, /metrics; answers "
        "decoded with continuous batching over --slots",
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--ckpt", help="cslm_jax model checkpoint (or a train run folder)")
    g.add_argument("--hf-dir", help="Hugging Face folder with the CSLM tokens (export-hf output)")
    s.add_argument(
        "--speech-tokenizer",
        default=None,
        help="speech tokenizer folder (import-speech-tokenizer): questions as audio; "
        "without it, questions come as units only",
    )
    s.add_argument(
        "--token2wav",
        default=None,
        help="token2wav folder (import-token2wav): answers spoken; without it, text only",
    )
    s.add_argument("--voice", default=None, help="speaker of the answers (as synthesize --voice)")
    s.add_argument(
        "--speech-rate",
        type=float,
        default=None,
        help="mel frames per unit over the unmerged rate (default: --data-config's "
        "format.speech_rate)",
    )
    s.add_argument(
        "--data-config",
        default=str(config_path("data", "cslm_en_zh.yaml")),
        help="languages, their s2s prompts and merge_repeats (default: %(default)s)",
    )
    s.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    s.add_argument("--slots", type=int, default=8, help="answers decoded at once")
    s.add_argument("--max-length", type=int, default=4096, help="cache positions per slot")
    s.add_argument("--max-new-tokens", type=int, default=2048)
    s.add_argument(
        "--max-queue", type=int, default=64, help="questions waiting for a slot; more get 503"
    )
    s.add_argument(
        "--max-seconds", type=float, default=60.0, help="longest question audio accepted"
    )
    s.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: how long answers in flight may take to finish",
    )
    s.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"))
    s.add_argument(
        "--tensor",
        type=int,
        default=None,
        help="split the weights and the slots' KV cache over N devices of this host (as decode "
        "--tensor; cslm-jax compile --decode --slots --max-length tells what fits a chip)",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help="every route needs 'Authorization: Bearer KEY' (default: $CSLM_SERVE_API_KEY)",
    )
    s.add_argument("--no-warmup", action="store_true", help="skip compiling before listening")
    return s


def check(args, parser):
    from cslm_jax.errors import CslmError

    for name in ("slots", "max_length", "max_new_tokens", "max_queue"):
        if getattr(args, name) < 1:
            raise CslmError(f"--{name.replace('_', '-')} must be >= 1")
    if not (0 < args.max_seconds < float("inf")):
        raise CslmError("--max-seconds must be a positive number")
    if not 0 <= args.port < 65536:
        raise CslmError(f"--port {args.port}: not a port number")
    if (args.token2wav is None) != (args.voice is None):
        raise CslmError("--token2wav and --voice go together (speech out needs both)")
    if args.speech_rate is not None and args.token2wav is None:
        raise CslmError("--speech-rate goes only with --token2wav")


def run(args) -> int:
    from cslm_jax.serve.server import serve

    return serve(args, api_key=args.api_key or os.environ.get("CSLM_SERVE_API_KEY") or None)
