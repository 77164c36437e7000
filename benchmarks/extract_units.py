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

`--command WAV_DIR`: the whole commands as users run them, each in its own process (start-up,
reading and resampling, writing included), on the first `--files` audio files of WAV_DIR in file
order (numeric names in numeric order; the BELLE-eval-S2S questions: `BELLE-eval-S2S/wav` of
github.com/ictnlp/CSLM, 22.05 kHz): `cslm-jax extract-units` (path-list manifest, default
batch 32 and buckets) against the package's own CLI (`s3tokenizer.cli.main`: batch 32 in file
order, its DataLoader with 4 workers), both with the same random weights (an official-size
tokenizer folder written here) and the same samples (the package's `torchaudio` reading and
resampling stood in by soundfile + soxr HQ, what extract-units uses). Sides alternate, the
order reversed every other repeat; wall-clock medians and the processes' CPU seconds; the load
average around every run (this VM is shared: say how busy it was); the codes compared.

    python benchmarks/extract_units.py --command /tmp/belle_wavs [--files 250] [--repeats 3]
        [--threads N] [--workdir DIR] [--before OLD_CHECKOUT]
    python benchmarks/extract_units.py --wavs /tmp/belle_wavs [--files 64]   # the API, real speech

`--agreement P`: no timing; the codes of precision P against `highest` (the package's float32)
on the same audio, at the official sizes with a codebook drawn around the encoder's own outputs
(`tests/s3_reference.with_data_codebook`: codes vary and nearest codewords come close, as with
trained weights). `bfloat16` computes on this CPU what a TPU computes at `default` precision.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument(
        "--command",
        metavar="WAV_DIR",
        default=None,
        help="time the whole commands (extract-units vs the package's CLI) on this folder's audio",
    )
    p.add_argument(
        "--wavs",
        metavar="WAV_DIR",
        default=None,
        help="the API figures on the first --files audio files of this folder (16 kHz after "
        "extract-units' reading and resampling) instead of synthetic utterances",
    )
    p.add_argument(
        "--files", type=int, default=250, help="with --command / --wavs: the first N files"
    )
    p.add_argument(
        "--before",
        metavar="REPO",
        default=None,
        help="with --command: also time extract-units of this checkout (e.g. a git worktree "
        "of an older commit) as a third side",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="with --command: where the tokenizer, manifests and outputs go (default: a temp dir)",
    )
    p.add_argument(
        "--run-package", nargs=3, metavar=("SCP", "TOKDIR", "OUT"), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if args.run_package:
        return run_package(*args.run_package, threads=args.threads)
    if args.agreement:
        return agreement(args)
    if args.command:
        return command(args)

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
    if args.wavs:  # real speech: the first --files of the folder, read as extract-units reads
        from cslm_jax.data.audio import load_audio

        waves = [load_audio(f) for f in audio_files(Path(args.wavs), args.files)]
        lengths = np.array([len(w) for w in waves])
        args.utterances = len(waves)
        args.min_seconds, args.max_seconds = lengths.min() / 16000, lengths.max() / 16000
    else:
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


def audio_files(folder: Path, n: int) -> list[Path]:
    """The first `n` audio files of `folder` in file order (numeric names numerically)."""
    files = [f for f in folder.iterdir() if f.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3")]
    files.sort(key=lambda f: (0, int(f.stem), "") if f.stem.isdigit() else (1, 0, f.name))
    if not files:
        raise SystemExit(f"--command {folder}: no wav/flac/ogg/mp3 files")
    return files[:n]


def run_package(scp: str, tokdir: str, out: str, threads: int) -> int:
    """One run of the package's own CLI (its process: the benchmark's subprocess)."""
    import soundfile as sf
    import soxr
    import torch

    # s3tokenizer.utils reads audio with torchaudio (not installed: it would pull a second
    # torch); its two calls stood in by what extract-units reads and resamples with
    ta = types.ModuleType("torchaudio")

    def load(path):
        data, rate = sf.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(data.T)), rate

    class Resample:
        def __init__(self, rate, to):
            self.rate, self.to = rate, to

        def __call__(self, audio):
            return torch.from_numpy(
                np.stack(
                    [
                        np.ascontiguousarray(
                            soxr.resample(c, self.rate, self.to, quality="HQ"), np.float32
                        )
                        for c in audio.numpy()
                    ]
                )
            )

    ta.load, ta.transforms = load, types.SimpleNamespace(Resample=Resample)
    sys.modules["torchaudio"] = ta
    import s3tokenizer
    import s3tokenizer.cli
    from s3tokenizer.model import S3Tokenizer
    from safetensors.torch import load_file

    def load_model(name):  # the package's load_model with our random weights for the ONNX file
        model = S3Tokenizer(name)
        model.load_state_dict(load_file(str(Path(tokdir) / "model.safetensors")), strict=True)
        return model

    s3tokenizer.load_model = load_model
    torch.set_num_threads(threads)
    sys.argv = [
        "s3tokenizer",
        "--model",
        "speech_tokenizer_v1",
        "--wav_scp",
        scp,
        "--device",
        "cpu",
        "--output_dir",
        out,
        "--batch_size",
        "32",
    ]
    s3tokenizer.cli.main()
    return 0


def command(args) -> int:
    import resource
    import shutil
    import subprocess
    import tempfile

    from cslm_jax.speech import save_random_tokenizer

    files = audio_files(Path(args.command), args.files)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cslm_extract_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    tokdir = work / "tokenizer_v1"
    if not (tokdir / "model.safetensors").is_file():
        save_random_tokenizer(tokdir, "v1", seed=0, force=True)
    manifest, scp = work / "files.txt", work / "wav.scp"
    manifest.write_text("".join(f"{f.resolve()}\n" for f in files))
    scp.write_text("".join(f"{f.stem} {f.resolve()}\n" for f in files))
    import soundfile as sf

    audio_s = sum(sf.info(str(f)).duration for f in files)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cli = shutil.which("cslm-jax") or str(Path(sys.executable).parent / "cslm-jax")
    outs = {"extract-units": work / "units", "s3tokenizer": work / "package"}
    cmds = {
        "extract-units": [
            cli,
            "extract-units",
            "--manifest",
            str(manifest),
            "--tokenizer",
            str(tokdir),
            "--out",
            str(outs["extract-units"]),
            "--no-progress",
        ],
        "s3tokenizer": [
            sys.executable,
            str(Path(__file__).resolve()),
            "--run-package",
            str(scp),
            str(tokdir),
            str(outs["s3tokenizer"]),
            "--threads",
            str(args.threads),
        ],
    }
    print(
        f"load average before: {os.getloadavg()}; cpus {os.cpu_count()}; {len(files)} files of "
        f"{args.command} ({files[0].name} .. {files[-1].name}), {audio_s:.1f} s of audio; "
        f"torch threads {args.threads}; work folder {work}",
        flush=True,
    )
    if args.before:
        outs["before"] = work / "units_before"
        code = (
            f"import sys; sys.path.insert(0, {str(Path(args.before).resolve())!r}); "
            "from cslm_jax.cli.main import main; sys.exit(main(sys.argv[1:]))"
        )
        cmds["before"] = [sys.executable, "-c", code, *cmds["extract-units"][1:]]
        cmds["before"][cmds["before"].index(str(outs["extract-units"]))] = str(outs["before"])
    times = {k: [] for k in cmds}
    cpu = {k: [] for k in cmds}
    for r in range(args.repeats):
        for name in list(cmds) if r % 2 == 0 else list(cmds)[::-1]:
            shutil.rmtree(outs[name], ignore_errors=True)
            before = os.getloadavg()[0]
            u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            done = subprocess.run(cmds[name], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
                raise SystemExit(f"{name} failed (exit {done.returncode})")
            times[name].append(wall)
            cpu[name].append((u1.ru_utime - u0.ru_utime) + (u1.ru_stime - u0.ru_stime))
            print(
                f"  repeat {r}: {name:13s} {wall:7.1f} s wall, {cpu[name][-1]:7.1f} s CPU "
                f"(load {before:.1f} before, {os.getloadavg()[0]:.1f} after)",
                flush=True,
            )
        if r == 0:
            for name in (n for n in cmds if n != "s3tokenizer"):
                codes = compare_outputs(outs[name], outs["s3tokenizer"], files)
                print(f"  {name} codes: {codes}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in cmds:
        print(
            f"{k:13s} median {med[k]:7.1f} s wall ({audio_s / med[k]:.2f} s of audio per s, "
            f"real-time factor {med[k] / audio_s:.4f}), CPU median {statistics.median(cpu[k]):.1f} s"
        )
    if args.before:
        print(
            f"ratio before / s3tokenizer throughput: "
            f"{med['s3tokenizer'] / med['before']:.2f}x wall, "
            f"{statistics.median(cpu['s3tokenizer']) / statistics.median(cpu['before']):.2f}x CPU"
        )
    print(
        f"ratio extract-units / s3tokenizer throughput: "
        f"{med['s3tokenizer'] / med['extract-units']:.2f}x wall, "
        f"{statistics.median(cpu['s3tokenizer']) / statistics.median(cpu['extract-units']):.2f}x CPU"
    )
    print(f"load average after: {os.getloadavg()}")
    return 0


def compare_outputs(units: Path, package: Path, files: list[Path]) -> str:
    """extract-units' records (in `units`) against the package CLI's lines, file by file."""
    ours = {}
    for shard in sorted(units.glob("units-*.jsonl")):
        for line in shard.read_text().splitlines():
            r = json.loads(line)
            ours[Path(r["audio"]).stem] = r["units"]
    theirs = {}
    for part in package.glob("part_*"):
        for line in part.read_text().splitlines():
            r = json.loads(line)
            theirs[r["key"]] = r["code"]
    same = total = 0
    for f in files:
        a, b = ours.get(f.stem), theirs.get(f.stem)
        if a is None or b is None or len(a) != len(b):
            return f"file {f.name}: {len(a or [])} codes here, {len(b or [])} in the package's"
        same += sum(x == y for x, y in zip(a, b))
        total += len(b)
    return f"{same}/{total} equal to the package's ({same / total:.3%}), {len(files)} files"


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
