"""`cslm-jax import-token2wav`: CosyVoice's flow.pt + hift.pt (+ spk2info.pt, campplus.onnx) -> a token2wav
folder (cslm_jax.speech.token2wav) for `cslm-jax synthesize`."""

from pathlib import Path

VERSIONS = ("v1", "v2")
LOCAL_PATHS = ("flow", "hift", "voices", "campplus", "out")


def add_parser(sub):
    s = sub.add_parser(
        "import-token2wav",
        help="write a token2wav folder (for synthesize) from CosyVoice's flow.pt, "
        "hift.pt and spk2info.pt",
    )
    s.add_argument(
        "--flow",
        required=True,
        metavar="FILE",
        help="flow.pt (MaskedDiffWithXvec, v2 CausalMaskedDiffWithXvec, state "
        "dict; or a .safetensors of it)",
    )
    s.add_argument(
        "--hift",
        required=True,
        metavar="FILE",
        help="hift.pt (HiFTGenerator state dict; or a .safetensors of it)",
    )
    s.add_argument(
        "--version",
        required=True,
        choices=VERSIONS,
        help="v1: CosyVoice-300M (50 units/s, 22,050 Hz); v2: CosyVoice2-0.5B (25 "
        "units/s, 24,000 Hz)",
    )
    s.add_argument(
        "--voices",
        metavar="FILE",
        default=None,
        help="spk2info.pt: speaker name -> {'embedding': x-vector, ...} (needs torch)",
    )
    s.add_argument(
        "--campplus",
        metavar="FILE",
        default=None,
        help="campplus.onnx (CosyVoice's CAM++ speaker model): copied into the folder, so "
        "that a prompt recording can be a voice (synthesize --voice prompt.wav; needs "
        "onnxruntime)",
    )
    s.add_argument("--out", required=True, help="folder to write (must be empty unless --force)")
    s.add_argument(
        "--force", action="store_true", help="replace an earlier import-token2wav output at --out"
    )
    return s


def _inputs(args):
    return [
        (flag, v)
        for flag, v in (
            ("--flow", args.flow),
            ("--hift", args.hift),
            ("--voices", args.voices),
            ("--campplus", args.campplus),
        )
        if v is not None
    ]


def check(args, parser):
    from cslm_jax.speech.hift import Token2WavError
    from cslm_jax.speech.token2wav import TOOL
    from cslm_jax.speech.token2wav import VERSIONS as PORTED
    from cslm_jax.storage.outputs import check_output_dir

    if args.version not in PORTED:
        raise Token2WavError(
            f"--version {args.version}: not ported yet; import-token2wav takes {', '.join(PORTED)}"
        )
    for flag, value in _inputs(args):
        p = Path(value)
        if p.is_dir():
            raise Token2WavError(f"{flag} {value}: is a folder; give the file")
        if not p.is_file():
            raise Token2WavError(f"{flag} {value}: no such file")
    check_output_dir(args.out, args.force, inputs=_inputs(args), tool=TOOL)


def read_voices(path, dim: int) -> dict:
    """spk2info.pt (upstream's speaker table: name -> {"embedding": [1, dim] or [dim], ...}) ->
    {name: [dim] float32}. Needs torch (optional): read with weights_only, no code run."""
    from cslm_jax.speech.hift import Token2WavError

    try:
        import torch
    except ImportError:
        raise Token2WavError(
            f"--voices {path}: reading spk2info.pt needs torch (pip install "
            f"torch, the CPU build is enough), or leave --voices out"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle / zip errors of many kinds)
        why = (
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if "weights_only" not in str(e)
            else "damaged, not a PyTorch file, or holding objects other than tensors"
        )
        raise Token2WavError(f"--voices {path}: not a spk2info.pt ({why})") from None
    if not isinstance(obj, dict) or not obj:
        raise Token2WavError(
            f"--voices {path}: holds a {type(obj).__name__}"
            f"{' (empty)' if isinstance(obj, dict) else ''}, expected a dict "
            f"speaker name -> {{'embedding': tensor, ...}}"
        )
    out = {}
    for name, info in obj.items():
        emb = info.get("embedding") if isinstance(info, dict) else None
        if emb is None or not hasattr(emb, "numpy"):
            raise Token2WavError(f"--voices {path}: speaker {name!r} has no 'embedding' tensor")
        v = emb.detach().float().numpy().reshape(-1) if emb.ndim in (1, 2) else None
        if v is None or v.shape != (dim,):
            raise Token2WavError(
                f"--voices {path}: speaker {name!r} has an embedding of shape "
                f"{tuple(emb.shape)}, expected [1, {dim}] or [{dim}]"
            )
        out[str(name)] = v
    return out


def run(args) -> int:
    import numpy as np

    from cslm_jax.speech.hift import Token2WavError
    from cslm_jax.speech.token2wav import save_token2wav
    from cslm_jax.speech.token2wav_weights import read_flow, read_hift

    fcfg, fparams = read_flow(args.flow, args.version)
    try:
        hcfg, hparams = read_hift(args.hift, args.version)
    except Token2WavError as e:
        raise Token2WavError(f"--hift: {e}") from None
    if args.voices is not None:
        voices = read_voices(args.voices, fcfg.spk_embed_dim)
    else:
        # No speaker table: a neutral voice (the zero x-vector, which the flow normalises to 0).
        voices = {"zero": np.zeros(fcfg.spk_embed_dim, np.float32)}
    if args.campplus is not None:
        from cslm_jax.speech.campplus import check_campplus

        try:
            check_campplus(args.campplus, fcfg.spk_embed_dim)
        except Token2WavError as e:
            raise Token2WavError(f"--campplus {e}") from None
    out = save_token2wav(
        args.out, fcfg, fparams, hcfg, hparams, voices, force=args.force, campplus=args.campplus
    )
    speaker = ", the speaker model campplus.onnx" if args.campplus else ""
    print(
        f"wrote {out}: token2wav {args.version} ({hcfg.sampling_rate} Hz, "
        f"{fcfg.input_frame_rate} units/s, {fcfg.vocab_size} codes), {len(voices)} voice(s)"
        f"{speaker}"
    )
    return 0
