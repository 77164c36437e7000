"""Time to the first audio of a streamed answer on this CPU (issue 25): cslm_jax's
`speech.stream.SpeechStream` (CosyVoice v1's streaming scheme, the flow window padded to the
batched flow's buckets) against upstream CosyVoice's first streamed chunk, same weights.

Both sides at the official v1 sizes (flow 104.9M parameters, HiFT 20.5M) with random weights
(`flow.init_random("v1")`, `hift.init_random("v1")`: note that `save_random_token2wav` without
size overrides gives the tests' reduced sizes, not these), one random voice:
- `cslm_jax`: one answer streamed as three speech chunks of 60, 60 and 80 units (`push` each,
  then `finish`): windows of 60, 80 and 100 units and the final 20 (the 20 units of look-ahead
  carried over, as upstream). Its time to first audio is the seconds `push` of the first chunk
  takes to return audio; also the answer's compile seconds (0 when its window shapes were
  compiled before) and its real-time factor (synthesis seconds / audio seconds). A warm-up
  answer first streams chunks of 58, 62 and 78 units: other window lengths (58, 82, 98 units)
  in the same buckets of units, flow frames and HiFT frames, so the measured answer compiles
  nothing (its compile seconds say so); the warm-up's compile seconds are printed.
- `upstream`: `CosyVoiceModel.token2wav(finalize=False)` (`cosyvoice.cli.model`, built from the
  same tensors by tests/cosyvoice_reference.py) on its first window of 120 units with fresh
  caches: `tts(stream=True)` waits for 100 + 20 units before this call, whose audio is its
  first. Its own random noise, `torch.inference_mode`, `--threads` threads.
Neither side counts the time to decode the units: ours needs 60 of them before its first audio,
upstream's 120 (at the decoder's pace that is a further lead for ours, not counted here).

The sides alternate within each repeat, reversed every other repeat; medians; the load average
is printed before and after (this VM is shared). On a loaded VM give upstream `--threads 1`: with
two threads its 120-unit window took 207 s at a load of 12 on 2 cores (torch's threads wait on
each other), against 16-22 s on one (tests/cosyvoice_reference.py's streaming driver
runs on one thread for the same reason).

    python benchmarks/token2wav_stream.py [--repeats 3] [--threads N] [--seed 0]
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

CHUNKS = (60, 60, 80)  # the measured answer's speech chunks (units)
WARM_CHUNKS = (58, 62, 78)  # the warm-up's: other windows, the same buckets
UPSTREAM_FIRST = 120  # upstream's first streamed window: 100 + 20 units


def streamed_answer(t2w, voice, chunks, key) -> dict:
    """Stream one answer of `chunks` (lists of units) through `SpeechStream`: the seconds to its
    first audio (the first `push` that returns samples, from the start; compile seconds taken
    off, as decode's timings), the compile seconds, synthesis seconds, audio seconds and the
    real-time factor."""
    from cslm_jax.speech.stream import SpeechStream

    s = SpeechStream(t2w, voice, noise=key)
    first = None
    t0 = time.perf_counter()
    parts = []
    for c in chunks:
        out = s.push(c)
        parts.append(out)
        if len(out) and first is None:
            first = time.perf_counter() - t0 - s.compile_s
    parts.append(s.finish())
    audio_s = sum(len(p) for p in parts) / t2w.sample_rate
    assert sum(len(p) for p in parts) == s.expected_samples()
    return {
        "first_audio_s": first,
        "compile_s": s.compile_s,
        "synthesis_s": s.synthesis_s,
        "audio_s": audio_s,
        "rtf": s.synthesis_s / audio_s,
        "windows": [len(w) for w, _ in s.windows],
    }


def upstream_first_chunk(model, units, emb) -> float:
    """Seconds of upstream's `token2wav` on its first streamed window (`units`, not final) with
    fresh caches, as `tts(stream=True)` makes it."""
    import warnings

    import torch

    uid = "bench"
    model.mel_overlap_dict[uid] = torch.zeros(1, 80, 0)
    model.flow_cache_dict[uid] = torch.zeros(1, 80, 0, 2)
    model.hift_cache_dict[uid] = None
    tok = torch.as_tensor(np.asarray(units, np.int64))[None]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        t0 = time.perf_counter()
        out = model.token2wav(
            token=tok,
            prompt_token=torch.zeros(1, 0, dtype=torch.int64),
            prompt_feat=torch.zeros(1, 0, 80),
            embedding=emb,
            uuid=uid,
            finalize=False,
        )
        secs = time.perf_counter() - t0
    for d in (model.mel_overlap_dict, model.flow_cache_dict, model.hift_cache_dict):
        d.pop(uid, None)
    assert out.shape[1] > 0
    return secs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import jax
    import torch

    import cosyvoice_reference as ref
    from cslm_jax.speech import flow, hift
    from cslm_jax.speech.stream import compiled_window_programs
    from cslm_jax.speech.token2wav import Token2Wav
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
    assert fcfg == flow.FlowConfig() and hcfg == hift.HiFTConfig()  # the official sizes
    rng = np.random.default_rng(args.seed + 2)
    voice = rng.standard_normal(fcfg.spk_embed_dim).astype(np.float32)
    t2w = Token2Wav("v1", fcfg, fparams, hcfg, hparams, {"random": voice})
    print(
        f"flow {sum(int(np.prod(v.shape)) for v in fparams.values()) / 1e6:.2f}M parameters, "
        f"HiFT {sum(int(np.prod(v.shape)) for v in hparams.values()) / 1e6:.2f}M",
        flush=True,
    )

    def answer(sizes):
        return [rng.integers(0, fcfg.vocab_size, n).tolist() for n in sizes]

    key = jax.random.PRNGKey(args.seed)
    warm = streamed_answer(t2w, voice, answer(WARM_CHUNKS), key)
    print(
        f"warm-up answer (chunks {WARM_CHUNKS}, windows {warm['windows']}): compile "
        f"{warm['compile_s']:.1f} s, synthesis {warm['synthesis_s']:.1f} s; flow window "
        f"programs {compiled_window_programs()}",
        flush=True,
    )
    chunks = answer(CHUNKS)

    fmodel = ref.flow_reference(fcfg, flow_to_state_dict(fcfg, fparams))
    hmodel = ref.hift_reference(hcfg, hift_to_state_dict(hcfg, hparams, "weight_norm"))
    upstream = ref.CosyVoiceModel(None, fmodel, hmodel)
    emb = torch.as_tensor(voice)[None]
    first_units = rng.integers(0, fcfg.vocab_size, UPSTREAM_FIRST).tolist()

    ours: list[dict] = []
    theirs: list[float] = []
    for r in range(args.repeats):
        order = ["cslm_jax", "upstream"] if r % 2 == 0 else ["upstream", "cslm_jax"]
        for side in order:
            if side == "cslm_jax":
                ours.append(streamed_answer(t2w, voice, chunks, jax.random.fold_in(key, r + 1)))
                o = ours[-1]
                print(
                    f"  repeat {r}: cslm_jax first audio {o['first_audio_s']:.2f} s, compile "
                    f"{o['compile_s']:.2f} s, RTF {o['rtf']:.2f} ({o['synthesis_s']:.1f} s "
                    f"for {o['audio_s']:.2f} s of audio; windows {o['windows']}) (load "
                    f"{os.getloadavg()[0]:.1f})",
                    flush=True,
                )
            else:
                theirs.append(upstream_first_chunk(upstream, first_units, emb))
                print(
                    f"  repeat {r}: upstream first chunk ({UPSTREAM_FIRST} units) "
                    f"{theirs[-1]:.2f} s (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    med = {k: statistics.median(o[k] for o in ours) for k in ("first_audio_s", "compile_s", "rtf")}
    up = statistics.median(theirs)
    print(
        f"cslm_jax  time to first audio (median of {args.repeats}): "
        f"{med['first_audio_s']:.2f} s (after {CHUNKS[0]} units); compile "
        f"{med['compile_s']:.2f} s; RTF {med['rtf']:.2f}"
    )
    print(
        f"upstream  time to first audio (median of {args.repeats}): {up:.2f} s "
        f"(after {UPSTREAM_FIRST} units)"
    )
    print(f"ratio upstream / cslm_jax time to first audio: {up / med['first_audio_s']:.2f}x")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
