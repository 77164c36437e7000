"""`cslm-jax decode`: spoken questions -> streamed CSLM answers (cslm_jax.infer.responses)."""

from cslm_jax.resources import config_path

# Path arguments that must be local (cslm_jax.cli.main.refuse_urls)
LOCAL_PATHS = ("unit", "output_dir", "speech_out", "token2wav")


def add_parser(sub):
    s = sub.add_parser(
        "decode",
        help="answer spoken questions (one unit sequence per line) with "
        "streamed transcript / text / speech chunks, as the reference's "
        "decode_general.py; writes OUT/responses.json and OUT/responses.jsonl "
        "(a rerun after an interruption resumes; --append: adds to a folder that "
        "holds answers already)",
    )
    s.add_argument(
        "--lang",
        required=True,
        help="answer language: a language of --data-config (the default config has en and zh)",
    )
    s.add_argument(
        "--cross-lingual",
        action="store_true",
        help="the questions are spoken in "
        "another language (the reference's decode_general_cross.py prompt)",
    )
    s.add_argument(
        "--unit",
        required=True,
        metavar="FILE",
        help="one question per line as unit tokens, <12><907><33> (spaces are removed)",
    )
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--ckpt", help="cslm_jax model checkpoint (or a train run folder)")
    g.add_argument("--hf-dir", help="Hugging Face folder with the CSLM tokens (export-hf output)")
    s.add_argument(
        "--output-dir",
        required=True,
        help="responses.json, responses.jsonl and latency_summary.json go here",
    )
    s.add_argument(
        "--data-config",
        default=str(config_path("data", "cslm_en_zh.yaml")),
        help="the languages, their prompts (s2s_prompt, s2s_cross_prompt) and chunk "
        "unit, and merge_repeats come from this data config (default: %(default)s, "
        "the reference recipe's prompts, CSLM.md section 5)",
    )
    s.add_argument(
        "--prompt-style",
        choices=("training", "reference"),
        default="training",
        help="training (default): the prompt the model was trained on (user turn + "
        "assistant header); reference: the prompt and responses.json 'result' exactly "
        "as the authors' decode_general.py builds them (for numbers comparable with "
        "the paper's; see README)",
    )
    s.add_argument(
        "--append",
        action="store_true",
        help="add the answers after those an "
        "existing --output-dir already holds (without it such a folder is refused; "
        "an interrupted run is resumed with or without it: rerun the same command)",
    )
    s.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    s.add_argument(
        "--temperature", type=float, default=1.0, help="default: %(default)s (reference)"
    )
    s.add_argument("--top-p", type=float, default=0.7, help="default: %(default)s (reference)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--max-new-tokens", type=int, default=2048, help="default: %(default)s (reference)"
    )
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument(
        "--chunk-size",
        type=int,
        default=1,
        help="decoding steps per host round trip "
        "(1: every token reaches the host, and the timings, as soon as it exists)",
    )
    s.add_argument(
        "--stream",
        action="store_true",
        help="print each event (transcript, text chunk, speech chunk, end) as soon as it completes",
    )
    s.add_argument(
        "--constrain-speech",
        action="store_true",
        help="only units and <eosp> inside a speech span, neither outside",
    )
    s.add_argument(
        "--compute-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: the checkpoint's",
    )
    s.add_argument(
        "--tensor",
        type=int,
        default=None,
        metavar="N",
        help="split the weights and the KV cache over N devices of this host (the mesh's "
        "tensor axis, as training shards them: heads, MLP, vocabulary); N must divide the "
        "device count and the model's kv heads (an 8B model in bfloat16 on a v5e-4: --tensor 4)",
    )
    s.add_argument(
        "--speech-out",
        metavar="DIR",
        help="synthesise every answer while decoding "
        "(each speech chunk as its <eosp> closes, CosyVoice's streaming schemes, v1 or v2) "
        "into DIR/<line>.wav, the answer's line in responses.jsonl (0000.wav, ...; "
        "--append adds after earlier ones); needs --token2wav and --voice; adds "
        "time_to_first_audio_s, speech_rtf and audio_s to responses.jsonl's timing",
    )
    s.add_argument(
        "--token2wav",
        metavar="DIR",
        help="with --speech-out: a token2wav folder (import-token2wav output)",
    )
    s.add_argument(
        "--voice",
        metavar="V",
        help="with --speech-out: a voice name of the "
        "token2wav's voices.npz, a .npy x-vector (192 floats), or a prompt recording "
        "(its x-vector by the folder's campplus.onnx; as synthesize --voice)",
    )
    s.add_argument(
        "--speech-rate",
        type=float,
        default=None,
        metavar="R",
        help="with "
        "--speech-out: mean run length of the (merged) units, scales the mel length "
        "(default: --data-config's format.speech_rate; 1.0 where its units are not "
        "merged or it sets none)",
    )
    return s


def speech_out(args):
    """The --speech-out synthesiser (None without it), checked before any model loads."""
    from cslm_jax.config import ConfigError

    if args.speech_out is None:
        extra = [
            f
            for f, v in (
                ("--token2wav", args.token2wav),
                ("--voice", args.voice),
                ("--speech-rate", args.speech_rate),
            )
            if v is not None
        ]
        if extra:
            raise ConfigError(
                f"{' and '.join(extra)} {'go' if len(extra) > 1 else 'goes'} "
                f"only with --speech-out DIR"
            )
        return None
    missing = [f for f, v in (("--token2wav", args.token2wav), ("--voice", args.voice)) if not v]
    if missing:
        raise ConfigError(f"--speech-out needs {' and '.join(missing)}")
    from cslm_jax.speech.stream import SpeechOut
    from cslm_jax.speech.token2wav import configured_rate

    rate, rate_from = configured_rate(args.speech_rate, args.data_config)
    out = SpeechOut.open(
        args.speech_out,
        args.token2wav,
        args.voice,
        rate,
        inputs=[
            ("--unit", args.unit),
            ("--ckpt", args.ckpt),
            ("--hf-dir", args.hf_dir),
            ("--data-config", args.data_config),
        ],
    )
    print(f"--speech-out: speech rate {rate:g} ({rate_from})", flush=True)
    return out


def run(args) -> int:
    from cslm_jax.infer.decode import Sampling
    from cslm_jax.infer.responses import decode_unit_file

    sampling = Sampling(
        greedy=args.greedy,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        constrain_speech=args.constrain_speech,
    )
    decode_unit_file(
        unit_file=args.unit,
        output_dir=args.output_dir,
        lang=args.lang,
        data_config=args.data_config,
        cross_lingual=args.cross_lingual,
        ckpt=args.ckpt,
        hf_dir=args.hf_dir,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        stream=args.stream,
        compute_dtype=args.compute_dtype,
        prompt_style=args.prompt_style,
        append=args.append,
        speech_out=speech_out(args),
        log=lambda msg: print(msg, flush=True),
        tensor=args.tensor,
    )
    return 0
