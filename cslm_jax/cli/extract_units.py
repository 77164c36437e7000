"""`cslm-jax extract-units`: audio manifest -> speech-unit corpus (cslm_jax.speech.extract)."""
import argparse

from cslm_jax.cli import setup

EPILOG = """\
manifest: JSON lines with an 'audio' path and optional 'text', 'lang', 'id' (any other field is
passed on), or 'question_audio' / 'answer_audio' for spoken-instruction (s2s) records, whose
'question_units' / 'answer_units' are filled; or a plain list of audio paths, one a line.
Relative paths resolve against the manifest's folder. Audio: wav/flac/ogg/mp3 at any rate, any
channels (averaged to mono, resampled to 16 kHz).

output (--out): units-SSSSS-of-NNNNN.jsonl shards (paired / spoken_instruction records with raw
codes, before repeat merging), a .done.json marker per shard, skipped.jsonl and COMPLETE.json at
the end. Rerunning the same command resumes a killed run (finished shards are kept) and does
nothing for a finished one; a folder holding anything else is refused unless --force, which
discards it and starts over.

exit codes: 0 done; 2 bad input (strict mode names the file and reason), or an output folder
that holds something else.
"""


def add_parser(sub):
    s = sub.add_parser("extract-units", help="tokenize the audio of a manifest into speech "
                       "units (paired / s2s JSONL corpora), on every device of every host",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--manifest", required=True, help="JSONL (audio, text, lang, id) or a list "
                   "of audio paths")
    s.add_argument("--tokenizer", required=True, help="speech tokenizer folder "
                   "(import-speech-tokenizer output)")
    s.add_argument("--out", required=True, help="output folder; the same command resumes it")
    s.add_argument("--batch-size", type=int, default=32, help="utterances per batch up to 30 s "
                   "(rounded up to a multiple of the local devices; fewer for longer audio)")
    s.add_argument("--on-bad", choices=("strict", "skip"), default="strict",
                   help="missing, unreadable, empty or non-finite audio (and bad manifest lines): "
                   "stop naming the file and reason, or skip and list them in skipped.jsonl")
    s.add_argument("--long-audio", choices=("window", "refuse"), default="window",
                   help="audio over 30 s: tokenize in overlapping 30 s windows stitched at the "
                   "seams (the s3tokenizer package's logic), or treat as bad")
    s.add_argument("--shard-size", type=int, default=1000, help="manifest lines per output "
                   "shard (the unit of resumption and of work between hosts)")
    s.add_argument("--lang", default=None, help="language code for paired records whose line "
                   "has no 'lang'")
    s.add_argument("--data-config", default=None, help="check every output record against this "
                   "data config (languages, codebook size) before writing it")
    s.add_argument("--buckets", default=None, metavar="S1,S2,...",
                   help="padded lengths in seconds (default 2,4,6,8,10,12,15,20,25,30; longer "
                   "audio pads to multiples of the last): one compiled shape each")
    s.add_argument("--precision", choices=("highest", "high", "default", "bfloat16"),
                   default="highest",
                   help="matmul precision: highest matches the s3tokenizer package's float32 on "
                   "any backend; default is faster on TPU (more codes differ where two codewords "
                   "nearly tie); bfloat16 computes what a TPU's default does on any backend")
    s.add_argument("--workers", type=int, default=4, help="threads reading and resampling audio")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--force", action="store_true", help="discard what --out holds and start over")
    setup.add_multihost_arguments(s, "takes its share of the shards")
    return s


def _buckets(text):
    from cslm_jax.speech.extract import DEFAULT_BUCKETS, ExtractError

    if text is None:
        return DEFAULT_BUCKETS
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ExtractError(f"--buckets {text!r}: expected seconds separated by commas") from None


def options(args):
    from cslm_jax.speech.extract import Options

    return Options(batch_size=args.batch_size, on_bad=args.on_bad, long_audio=args.long_audio,
                   shard_size=args.shard_size, lang=args.lang, buckets=_buckets(args.buckets),
                   workers=args.workers, progress=not args.no_progress)


def check(args, parser) -> None:
    """Flags, the manifest and the tokenizer folder, before JAX starts."""
    from pathlib import Path

    from cslm_jax.speech.extract import ExtractError

    options(args)
    for flag, value in (("--manifest", args.manifest), ("--tokenizer", args.tokenizer),
                        ("--out", args.out), ("--data-config", args.data_config)):
        if value is not None and "://" in str(value):
            raise ExtractError(f"{flag} {value}: extract-units reads and writes local paths only "
                               f"(audio is read by libsndfile); copy the audio to local disk or "
                               f"mount the bucket with gcsfuse, then copy the unit shards to "
                               f"gs:// for training")
    if not Path(args.manifest).is_file():
        raise ExtractError(f"--manifest {args.manifest}: no such file")
    if not Path(args.tokenizer).is_dir():
        raise ExtractError(f"--tokenizer {args.tokenizer}: no such folder")
    if args.data_config is not None and not Path(args.data_config).is_file():
        raise ExtractError(f"--data-config {args.data_config}: no such file")


def run(args) -> int:
    import jax

    from cslm_jax.parallel.distributed import initialize
    from cslm_jax.speech.extract import extract, open_tokenizer

    initialize(args.coordinator, args.num_processes, args.process_id)   # before any device use
    primary = jax.process_index() == 0
    fmt = None
    if args.data_config is not None:
        from cslm_jax.data.formats import load_data_config
        fmt = load_data_config(args.data_config, check_files=False).format
    opts = options(args)
    encoder = open_tokenizer(args.tokenizer, precision=args.precision)
    summary = extract(args.manifest, args.out, encoder, tokenizer_dir=args.tokenizer, opts=opts,
                      force=args.force, fmt=fmt)
    if primary or summary.shards_done_here:
        for line in summary.lines():
            print(line, flush=True)
    return 0
