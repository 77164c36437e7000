"""Token-to-waveform throughput on this CPU (issue 25): cslm_jax's batched synthesis (CosyVoice's
v1 flow and HiFT in JAX) against upstream CosyVoice's PyTorch models one answer at a time (the
only way its `inference` runs: it asserts batch 1), same weights, seconds of audio per second.

Both sides synthesise the same `--answers` random unit sequences of `--seconds-min` ..
`--seconds-max` seconds each (50 units per second, mel frames `int(n / 50 * 22050 / 256)`), one
random voice, at the official v1 sizes (flow 104.9M parameters, HiFT 20.5M) with random weights
(`flow.init_random`, `hift.init_random`; the reference is loaded with the same tensors from
`tests/cosyvoice_reference.py`):
- `cslm_jax`: `token2wav.synthesize_batch` (answers sorted by length, `--batch-size` at a time:
  the flow on the padded batch with each row masked to its length, then HiFT), a PRNG key's
  noise. Compiles happen in a warm-up pass, timed and reported apart, not counted;
- `upstream`: `MaskedDiffWithXvec.inference` then `HiFTGenerator.inference` per answer, under
  `torch.inference_mode`, its own random noise.
The two sides alternate within each repeat, in reversed order every other repeat; medians; the
load average is printed before and after (this VM is shared). Time to the first audio of a
streamed answer is not measured here. Parity of the two (same noise) is tested in
tests/test_flow.py, tests/test_hift.py; batched = one by one in tests/test_flow_batch.py.

The reference takes ~20 s per second of speech on this idle 2-core VM and ~90 s when it is
busy (measured: benchmarks/RESULTS.md), so the defaults are small (4 answers of 2-2.5 s, one
repeat: ~20 minutes on the busy VM, a few on an idle one); the issue's run is
`--answers 16 --seconds-min 2 --seconds-max 10 --repeats 3` (about an hour of reference time per
repeat).

    python benchmarks/token2wav.py [--answers 4] [--seconds-min 2] [--seconds-max 2.5]
        [--repeats 1] [--batch-size 8] [--threads N] [--skip-reference]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", type=int, default=4)
    p.add_argument("--seconds-min", type=float, default=2.0)
    p.add_argument("--seconds-max", type=float, default=2.5)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="ours: answers per batch")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-reference", action="store_true", help="time ours only (no ratio)")
    args = p.parse_args()

    import jax
    import torch

    from cslm_jax.speech import flow, hift
    from cslm_jax.speech.token2wav import Token2Wav, synthesize_batch
    from cslm_jax.speech.token2wav_weights import flow_to_state_dict, hift_to_state_dict

    torch.set_num_threads(args.threads)
    print(
        f"load average before: {os.getloadavg()}; nproc {os.cpu_count()}; torch threads "
        f"{torch.get_num_threads()}; jax {jax.__version__} ({jax.devices()[0].platform}); "
        f"torch {torch.__version__}",
        flush=True,
    )
    fcfg, fparams = flow.init_random("v1", seed=args.seed)
    hcfg, hparams = hift.init_random("v1", seed=args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    voice = rng.standard_normal(fcfg.spk_embed_dim).astype(np.float32)
    t2w = Token2Wav("v1", fcfg, fparams, hcfg, hparams, {"random": voice})
    seconds = rng.uniform(args.seconds_min, args.seconds_max, args.answers)
    answers = [rng.integers(0, fcfg.vocab_size, max(1, int(round(s * 50)))) for s in seconds]
    frames = [fcfg.mel_len(len(u)) for u in answers]
    audio_s = sum(frames) * hcfg.samples_per_frame / hcfg.sampling_rate
    n_params = sum(int(np.prod(v.shape)) for v in fparams.values())
    print(
        f"{args.answers} answers, {audio_s:.1f} s of audio ({args.seconds_min}-"
        f"{args.seconds_max} s each: units {sorted(len(u) for u in answers)}); flow "
        f"{n_params / 1e6:.2f}M parameters, HiFT "
        f"{sum(int(np.prod(v.shape)) for v in hparams.values()) / 1e6:.2f}M; ours in batches "
        f"of {args.batch_size}",
        flush=True,
    )

    key = jax.random.PRNGKey(args.seed)

    def ours():
        return synthesize_batch(t2w, answers, voice, noise=key, max_batch=args.batch_size)

    sides = {"cslm_jax": ours}
    if not args.skip_reference:
        import cosyvoice_reference as ref

        fmodel = ref.flow_reference(fcfg, flow_to_state_dict(fcfg, fparams))
        hmodel = ref.hift_reference(hcfg, hift_to_state_dict(hcfg, hparams, "weight_norm"))
        emb = torch.as_tensor(voice)[None]

        def theirs():
            out = []
            with torch.inference_mode():
                for u in answers:
                    tok = torch.as_tensor(np.asarray(u, np.int64))[None]
                    empty = torch.zeros((1, 0), dtype=torch.int64)
                    mel, _ = fmodel.inference(
                        token=tok,
                        token_len=torch.tensor([tok.shape[1]]),
                        prompt_token=empty,
                        prompt_token_len=torch.tensor([0]),
                        prompt_feat=torch.zeros((1, 0, 80)),
                        prompt_feat_len=torch.tensor([0]),
                        embedding=emb,
                        flow_cache=torch.zeros(1, 80, 0, 2),
                    )
                    wave, _ = hmodel.inference(speech_feat=mel)
                    out.append(wave[0].numpy())
            return out

        sides["upstream"] = theirs

    t0 = time.perf_counter()
    waves = ours()
    warm = time.perf_counter() - t0
    print(
        f"warm-up cslm_jax (compiles included): {warm:.1f} s; programs compiled: flow "
        f"{flow.compiled_batch_programs()}",
        flush=True,
    )
    assert [len(w) for w in waves] == [m * hcfg.samples_per_frame for m in frames]
    times = {k: [] for k in sides}
    for r in range(args.repeats):
        for name, fn in list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]:
            t0 = time.perf_counter()
            got = fn()
            times[name].append(time.perf_counter() - t0)
            assert [len(w) for w in got] == [len(w) for w in waves], name
            print(
                f"  repeat {r}: {name} {times[name][-1]:.1f} s (load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(
            f"{k:9s} median {v:8.1f} s: {audio_s / v:6.3f} s of audio per s (real-time factor "
            f"{v / audio_s:.2f})"
        )
    if "upstream" in med:
        print(f"ratio cslm_jax / upstream throughput: {med['upstream'] / med['cslm_jax']:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
