"""Speech-unit extraction throughput on this CPU: cslm_jax's S3 tokenizer (JAX) against the
`s3tokenizer` package's batched PyTorch model, same audio, same weights, batch 32.

Every side goes from 16 kHz waveforms to a list of codes per utterance, over the same corpus of
`--utterances` speech-like synthetic utterances (uniform `--min-seconds`..`--max-seconds`):
- `s3tokenizer`: batches of 32 in corpus order, as its `s3tokenizer` CLI's DataLoader makes them:
  per-utterance `log_mel_spectrogram`, `padding` to the longest, `model.quantize`;
- `cslm_jax`: the same batches, `SpeechTokenizer.encode` (padded to a multiple of 1 s; the
  encoder's projections and MLP run on the valid frames packed into rows, attention on the
  padded batch, as `encode` does for a list of mixed lengths: `--pack off` runs all of it
  padded);
- `cslm_jax sorted`: batches of 32 after sorting the corpus by length (what `extract-units`'
  length buckets do), so less padding is computed.
Random weights at the official sizes of `--version` (v1: 6 x 1280, 20 heads, 4096 codes).
Compiles happen in a warm-up pass (timed, reported, not counted). Sides alternate within each
repeat, in reversed order every other repeat; medians; the load average is printed before and after (this VM is shared).

    python benchmarks/extract_units.py [--version v1] [--batch 32] [--utterances 64] [--repeats 3]
        [--pack auto|off] [--precision highest|bfloat16|...]
    python benchmarks/extract_units.py --agreement bfloat16 [--version v1] [--utterances 32]

`--agreement P`: no timing; the codes of precision P against `highest` (the package's float32)
on the same audio, at the official sizes with a codebook drawn around the encoder's own outputs
(`tests/s3_reference.with_data_codebook`: codes vary and nearest codewords come close, as with
trained weights). `bfloat16` computes on this CPU what a TPU computes at `default` precision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
# s3tokenizer.utils imports torchaudio (to read files only, unused here): a bare stand-in.
sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default="v1", choices=("v1", "v1_25hz", "v2_25hz"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--utterances", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--pack",
        choices=("auto", "off"),
        default="auto",
        help="ours: dense layers on the packed valid frames (auto, encode's default "
        "for lists) or on the padded batch",
    )
    p.add_argument(
        "--precision", default="highest", choices=("highest", "high", "default", "bfloat16")
    )
    p.add_argument(
        "--agreement",
        default=None,
        choices=("high", "default", "bfloat16"),
        help="print this precision's code agreement with highest and exit",
    )
    args = p.parse_args()
    if args.agreement:
        return agreement(args)

    import jax
    import torch

    from cslm_jax.speech import random_speech_tokenizer
    from cslm_jax.speech.weights import to_state_dict
    from s3_reference import package_mels, package_model, speechlike

    torch.set_num_threads(args.threads)
    print(
        f"load average before: {os.getloadavg()}; cpus {os.cpu_count()}; torch threads "
        f"{torch.get_num_threads()}; jax {jax.__version__} ({jax.devices()[0].platform}); "
        f"torch {torch.__version__}"
    )
    rng = np.random.default_rng(0)
    lengths = rng.integers(
        int(args.min_seconds * 16000), int(args.max_seconds * 16000) + 1, args.utterances
    )
    waves = speechlike(lengths.tolist(), seed=1)
    audio_s = float(lengths.sum()) / 16000
    tok = random_speech_tokenizer(args.version, seed=0, precision=args.precision)
    pack = None if args.pack == "auto" else False
    model = package_model(tok.config, to_state_dict(tok.config, tok.params))
    b = args.batch
    corpus = [list(range(i, min(i + b, len(waves)))) for i in range(0, len(waves), b)]
    order = np.argsort(lengths, kind="stable")
    by_length = [order[i : i + b].tolist() for i in range(0, len(waves), b)]

    def ours(batches):
        def run():
            out = {}
            for idx in batches:
                for i, c in zip(idx, tok.encode([waves[i] for i in idx], pack=pack)):
                    out[i] = c
            return [out[i] for i in range(len(waves))]

        return run

    def theirs():
        out = []
        for idx in corpus:
            with torch.inference_mode():
                _, mel, mel_len = package_mels([waves[i] for i in idx])
                codes, code_len = model.quantize(mel, mel_len)
            out += [codes[j, : int(code_len[j])].numpy() for j in range(len(idx))]
        return out

    sides = {"s3tokenizer": theirs, "cslm_jax": ours(corpus), "cslm_jax sorted": ours(by_length)}
    results = {}
    for name, fn in sides.items():
        t0 = time.perf_counter()
        results[name] = fn()
        print(
            f"warm-up {name}: {time.perf_counter() - t0:.1f} s"
            + (" (compiles included)" if name != "s3tokenizer" else "")
        )
    ref = results["s3tokenizer"]
    for name in ("cslm_jax", "cslm_jax sorted"):
        same = sum(int((x == y).sum()) for x, y in zip(results[name], ref)) / sum(map(len, ref))
        print(f"{name}: codes equal to the package's: {same:.3%}")
    print(
        f"{args.utterances} utterances, {audio_s:.1f} s of audio ({args.min_seconds}-"
        f"{args.max_seconds} s each), batch {b}, {args.version}, precision {args.precision}, "
        f"pack {args.pack}"
    )
    times = {k: [] for k in sides}
    for r in range(args.repeats):
        # the order flips every repeat (A B C, C B A, ...): a load that rises or falls on this
        # shared machine favours no side
        for name, fn in list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(
                f"  repeat {r}: {name} {times[name][-1]:.2f} s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(
            f"{k:16s} median {v:6.2f} s: {audio_s / v:6.2f} s of audio per s, real-time factor "
            f"{v / audio_s:.4f}, {audio_s / v:.2f} h of audio per hour"
        )
    for k in ("cslm_jax", "cslm_jax sorted"):
        print(f"ratio {k} / s3tokenizer throughput: {med['s3tokenizer'] / med[k]:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    return 0


def agreement(args) -> int:
    from cslm_jax.speech import SpeechTokenizer, random_speech_tokenizer
    from s3_reference import speechlike, with_data_codebook

    print(f"load average before: {os.getloadavg()}")
    rng = np.random.default_rng(0)
    lengths = rng.integers(
        int(args.min_seconds * 16000), int(args.max_seconds * 16000) + 1, args.utterances
    )
    waves = speechlike(lengths.tolist(), seed=1)
    ref = with_data_codebook(random_speech_tokenizer(args.version, seed=0))
    other = SpeechTokenizer(ref.config, ref.params, precision=args.agreement)
    same = total = 0
    for i in range(0, len(waves), args.batch):
        a = ref.encode(waves[i : i + args.batch])
        b = other.encode(waves[i : i + args.batch])
        same += sum(int((x == y).sum()) for x, y in zip(a, b))
        total += sum(len(x) for x in a)
    mel, mel_len = ref.log_mel(waves[:4])
    h1, n = ref.hidden(mel, mel_len)
    h2, _ = other.hidden(mel, mel_len)
    err = max(float(np.abs(h1[j, : n[j]] - h2[j, : n[j]]).max()) for j in range(len(n)))
    print(
        f"{args.version}, {args.utterances} utterances of {args.min_seconds}-{args.max_seconds} "
        f"s: codes at {args.agreement} equal to highest's: {same}/{total} = {same / total:.3%}; "
        f"encoder output max |diff| {err:.3g} (first 4 utterances)"
    )
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
