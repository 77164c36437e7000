"""`cslm-jax synthesize`: speech units -> wav files through a token2wav folder
(cslm_jax.speech.token2wav: CosyVoice's flow and HiFT in JAX)."""

import argparse
from pathlib import Path

from cslm_jax.resources import config_path

LOCAL_PATHS = ("units", "token2wav", "out", "prompt_tokenizer")
TOOL = "synthesize"
REPORT = "synthesize.json"

EPILOG = """\
--units: one unit sequence per line (<12><907>..., optionally inside <sosp> ... <eosp>), or a
decode responses.jsonl (a .jsonl file, or lines starting with '{'): each record's speech_chunks
joined in order (an answer without speech, text only, gets an empty wav, as decode
--speech-out writes; a unit file's empty line is an error). One wav per line: OUT/0000.wav, OUT/0001.wav, ... (PCM 16-bit, mono, at the
token2wav's rate: 22,050 Hz for v1), and OUT/synthesize.json (what was done). Every line is
checked before anything is synthesised; the folder is written atomically (complete or absent).

--speech-rate R: mel frames = int(units x R / 50 x 22050 / 256) (v2: int(2 x units x R)); for
merged units (CSLM merges
repeats) give the corpus's mean run length (raw units / merged units) for speech of natural speed.

--batch-size N: lines are sorted by length and synthesised N at a time (one compiled call per
batch: the flow on the padded batch, each line masked to its own length, then HiFT); a line's
audio is the same whatever N (with --noise random, line i draws from fold_in(seed, i)).

exit codes: 0 done; 2 bad input (a bad line names FILE:LINE), or an output folder that holds
something else (--force replaces an earlier synthesize output).
"""


def add_parser(sub):
    s = sub.add_parser(
        "synthesize",
        help="speech units (a unit file or decode's "
        "responses.jsonl) -> wav files, via a token2wav folder",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--units",
        required=True,
        metavar="FILE",
        help="unit file (one sequence per line) or a decode responses.jsonl",
    )
    s.add_argument(
        "--token2wav",
        required=True,
        metavar="DIR",
        help="token2wav folder (import-token2wav output)",
    )
    s.add_argument(
        "--voice",
        required=True,
        metavar="V",
        help="a voice name of the folder's voices.npz, a .npy x-vector (192 floats), or a "
        "prompt recording (a wav, flac, ...: its x-vector by the folder's campplus.onnx, "
        "import-token2wav --campplus; needs onnxruntime)",
    )
    s.add_argument(
        "--prompt-tokenizer",
        default=None,
        metavar="DIR",
        help="with a prompt recording as --voice: also use it as CosyVoice's zero-shot "
        "prompt (its units by this speech tokenizer folder, of the flow's units, and its mel "
        "condition the flow), not only its x-vector",
    )
    s.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    s.add_argument(
        "--noise",
        choices=("zero", "random"),
        default="zero",
        help="zero: deterministic; random: the flow's and HiFT's noise drawn from "
        "--seed (one key per line)",
    )
    s.add_argument("--seed", type=int, default=0, help="with --noise random (default 0)")
    s.add_argument(
        "--speech-rate",
        type=float,
        default=None,
        metavar="R",
        help="the mean run length of merged units: scales the mel length (default: "
        "--data-config's format.speech_rate; 1.0 where its units are not merged or "
        "it sets none)",
    )
    s.add_argument(
        "--data-config",
        default=str(config_path("data", "cslm_en_zh.yaml")),
        metavar="CFG",
        help="the data config the units come from, for the default "
        "--speech-rate (default: %(default)s)",
    )
    s.add_argument(
        "--batch-size",
        type=int,
        default=8,
        metavar="N",
        help="lines synthesised together, sorted by length (default 8)",
    )
    s.add_argument(
        "--force", action="store_true", help="replace an earlier synthesize output at --out"
    )
    return s


def read_requests(path) -> list[tuple[str, list[int]]]:
    """(FILE:LINE, units) per line of a unit file or a responses.jsonl; errors name the line. A
    unit file's line must hold units; a responses.jsonl answer without speech (a text-only
    answer, no speech chunk) gives no units (synthesize writes an empty wav for it)."""
    import json

    from cslm_jax.infer.responses import UnitFileError, parse_unit_line

    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnitFileError(f"--units {path}: no such file") from None
    except OSError as e:
        raise UnitFileError(f"--units {path}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UnitFileError(f"{path}: not UTF-8 text ({e})") from None
    lines = raw.splitlines()
    if not any(line.strip() for line in lines):
        raise UnitFileError(f"{path}: empty; write one unit sequence per line")
    first = next(line for line in lines if line.strip())
    jsonl = path.suffix.lower() == ".jsonl" or first.lstrip().startswith("{")
    out = []
    for i, line in enumerate(lines):
        where = f"{path}:{i + 1}"
        if not jsonl:
            out.append((where, parse_unit_line(line, where)))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UnitFileError(f"{where}: not a JSON record ({e.msg}, column {e.colno})") from None
        chunks = rec.get("speech_chunks") if isinstance(rec, dict) else None
        if not isinstance(chunks, list) or not all(
            isinstance(c, list) and all(isinstance(u, int) and not isinstance(u, bool) for u in c)
            for c in chunks
        ):
            raise UnitFileError(
                f"{where}: no speech_chunks list of unit lists (a decode "
                f"responses.jsonl record has one)"
            )
        # a text-only answer (no speech chunk) is a valid record: an empty wav, as
        # decode --speech-out writes for it
        out.append((where, [u for c in chunks for u in c]))
    return out


def check(args, parser):
    from cslm_jax.speech.hift import Token2WavError
    from cslm_jax.storage.outputs import check_output_dir

    if args.speech_rate is not None and not (0 < args.speech_rate < float("inf")):
        raise Token2WavError(f"--speech-rate {args.speech_rate}: must be a positive number")
    if args.batch_size < 1:
        raise Token2WavError(f"--batch-size {args.batch_size}: must be at least 1")
    if not Path(args.units).is_file():
        raise Token2WavError(f"--units {args.units}: no such file")
    if not Path(args.token2wav).is_dir():
        raise Token2WavError(
            f"--token2wav {args.token2wav}: no such folder (make one with "
            f"cslm-jax import-token2wav)"
        )
    inputs = [("--units", args.units), ("--token2wav", args.token2wav)]
    recording = not args.voice.endswith(".npy") and Path(args.voice).is_file()
    if args.voice.endswith(".npy") or recording:
        inputs.append(("--voice", args.voice))
    if args.prompt_tokenizer is not None:
        if not recording:
            raise Token2WavError(
                f"--prompt-tokenizer: give a prompt recording as --voice (not {args.voice!r}); "
                f"its units and mel are the zero-shot prompt"
            )
        if not Path(args.prompt_tokenizer).is_dir():
            raise Token2WavError(
                f"--prompt-tokenizer {args.prompt_tokenizer}: no such speech tokenizer folder"
            )
        inputs.append(("--prompt-tokenizer", args.prompt_tokenizer))
    check_output_dir(args.out, args.force, inputs=inputs, tool=TOOL)


def run(args) -> int:
    import json
    import time

    import numpy as np
    import soundfile as sf

    from cslm_jax.infer.responses import UnitFileError
    from cslm_jax.speech import token2wav as t2w_mod
    from cslm_jax.speech.hift import Token2WavError
    from cslm_jax.storage.checkpoint import atomic_dir

    args.speech_rate, rate_from = t2w_mod.configured_rate(args.speech_rate, args.data_config)
    print(f"speech rate {args.speech_rate:g} ({rate_from})", flush=True)
    requests = read_requests(args.units)
    t2w = t2w_mod.load_token2wav(args.token2wav)
    emb = t2w_mod.voice(t2w, args.voice)
    prompt = None
    if args.prompt_tokenizer is not None:
        from cslm_jax.speech import load_speech_tokenizer
        from cslm_jax.speech.prompt import zero_shot_prompt

        prompt = zero_shot_prompt(t2w, args.voice, load_speech_tokenizer(args.prompt_tokenizer))
        print(
            f"zero-shot prompt from {args.voice}: {len(prompt.units)} units, "
            f"{len(prompt.mel)} mel frames",
            flush=True,
        )
    checked = []
    for where, units in requests:  # every line before any synthesis
        if not units:  # an answer without speech: an empty wav
            checked.append((np.zeros((0,), np.int32), 0))
            continue
        try:
            checked.append(t2w_mod.check_request(t2w, units, args.speech_rate))
        except Token2WavError as e:
            raise UnitFileError(f"{where}: {e}") from None
    empty = [i for i in range(len(checked)) if not len(checked[i][0])]
    speech = [i for i in range(len(checked)) if len(checked[i][0])]
    keys = None
    if args.noise == "random":  # one key per line, independent of the others
        import jax

        key = jax.random.PRNGKey(args.seed)
        keys = [jax.random.fold_in(key, i) for i in range(len(checked))]
    # batches of lines of similar lengths (less padding); wavs written in line order
    order = sorted(speech, key=lambda i: checked[i][1])
    batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    items, runs, start = [None] * len(checked), [], time.perf_counter()
    with atomic_dir(Path(args.out), force=args.force, tool=TOOL) as tmp:
        for i in empty:
            name = f"{i:04d}.wav"
            sf.write(
                str(tmp / name),
                np.zeros((0,), np.float32),
                t2w.sample_rate,
                subtype="PCM_16",
                format="WAV",
            )
            items[i] = {
                "wav": name,
                "source": requests[i][0],
                "units": 0,
                "mel_frames": 0,
                "samples": 0,
                "seconds": 0.0,
                "batch": None,
                "empty": "the answer has no speech",
            }
        for b, idx in enumerate(batches):
            t0 = time.perf_counter()
            waves = t2w_mod.synthesize_batch(
                t2w,
                [checked[i][0] for i in idx],
                emb,
                noise="zero" if keys is None else [keys[i] for i in idx],
                speech_rate=args.speech_rate,
                max_batch=args.batch_size,
                prompt=prompt,
            )
            runs.append({"lines": len(idx), "synthesis_s": round(time.perf_counter() - t0, 3)})
            for i, wave in zip(idx, waves):
                name = f"{i:04d}.wav"
                sf.write(str(tmp / name), wave, t2w.sample_rate, subtype="PCM_16", format="WAV")
                items[i] = {
                    "wav": name,
                    "source": requests[i][0],
                    "units": len(checked[i][0]),
                    "mel_frames": int(checked[i][1]),
                    "samples": len(wave),
                    "seconds": round(len(wave) / t2w.sample_rate, 4),
                    "batch": b,
                }
        report = {
            "units": str(args.units),
            "token2wav": str(args.token2wav),
            "version": t2w.version,
            "voice": args.voice,
            "prompt": None
            if prompt is None
            else {"units": len(prompt.units), "mel_frames": len(prompt.mel)},
            "noise": args.noise,
            "seed": args.seed if args.noise == "random" else None,
            "speech_rate": args.speech_rate,
            "speech_rate_from": rate_from,
            "sample_rate": t2w.sample_rate,
            "batch_size": args.batch_size,
            "wavs": items,
            "empty_wavs": len(empty),
            "batches": runs,
            "total_s": round(time.perf_counter() - start, 3),
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    audio = sum(it["seconds"] for it in items)
    blank = f" ({len(empty)} empty: answers without speech)" if empty else ""
    print(
        f"wrote {len(items)} wav(s){blank}, {audio:.1f} s of audio at {t2w.sample_rate} Hz, "
        f"to {args.out}"
    )
    return 0
