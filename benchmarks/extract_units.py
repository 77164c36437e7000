"""Speech-unit extraction throughput on this machine: cslm_jax's S3 tokenizer (JAX) against the
`s3tokenizer` package's batched PyTorch model, same audio, same weights, same batch.

Both sides go from 16 kHz waveforms to lists of codes: the package computes each utterance's
log-mel (`log_mel_spectrogram`), pads them (`padding`) and runs `model.quantize` on the batch (its
README's batched recipe); ours runs `SpeechTokenizer.encode` on the list (compiled once per padded
shape: the compile is timed once, separately). Random weights at the official v1 sizes (6 x 1280,
20 heads, 4096 codes), speech-like synthetic audio of 2-6 s. Sides alternate (A B A B ...);
medians of the repeats; the load average is printed before and after.

    python benchmarks/extract_units.py [--version v1] [--batch 32] [--repeats 3]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
# s3tokenizer.utils imports torchaudio (for reading files only, unused here): a bare stand-in.
sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default="v1", choices=("v1", "v1_25hz", "v2_25hz"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import jax
    import torch

    from s3_reference import package_mels, package_model, speechlike
    from cslm_jax.speech import random_speech_tokenizer
    from cslm_jax.speech.weights import to_state_dict

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; cpus {os.cpu_count()}; torch threads "
          f"{torch.get_num_threads()}; jax {jax.__version__} {jax.devices()[0].platform}; "
          f"torch {torch.__version__}")
    rng = np.random.default_rng(0)
    lengths = rng.integers(int(args.min_seconds * 16000), int(args.max_seconds * 16000),
                           args.batch)
    waves = speechlike(lengths.tolist(), seed=1)
    audio_s = float(lengths.sum()) / 16000
    tok = random_speech_tokenizer(args.version, seed=0)
    model = package_model(tok.config, to_state_dict(tok.config, tok.params))

    def ours():
        return tok.encode(waves)

    def theirs():
        with torch.inference_mode():
            _, mel, mel_len = package_mels(waves)
            codes, code_len = model.quantize(mel, mel_len)
        return [codes[i, :int(code_len[i])].numpy() for i in range(len(waves))]

    t0 = time.perf_counter()
    a = ours()
    print(f"ours: first call (compile + run) {time.perf_counter() - t0:.1f} s")
    b = theirs()
    same = sum(int((x == y).sum()) for x, y in zip(a, b)) / sum(len(x) for x in a)
    print(f"batch {args.batch}, {audio_s:.1f} s of audio ({args.min_seconds}-{args.max_seconds} s "
          f"each), {args.version}; codes equal to the package's: {same:.2%}")
    times = {"cslm_jax": [], "s3tokenizer": []}
    for r in range(args.repeats):
        for name, fn in (("cslm_jax", ours), ("s3tokenizer", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  repeat {r}: {name} {times[name][-1]:.2f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:12s} median {v:.2f} s: {audio_s / v:.1f} s of audio per s (real-time factor "
              f"{v / audio_s:.4f})")
    print(f"ratio cslm_jax / s3tokenizer throughput: {med['s3tokenizer'] / med['cslm_jax']:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
