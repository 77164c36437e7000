"""`cslm-jax extract-units`: audio manifest -> speech-unit corpus (cslm_jax.speech.extract)."""

import argparse

from cslm_jax.cli import setup

EPILOG = """\
manifest: JSON lines with an 'audio' path and optional 'text', 'lang', 'id' (any other field is
passed on), or 'question_audio' / 'answer_audio' for spoken-instruction (s2s) records, whose
'question_units' / 'answer_units' are filled; or a plain list of audio paths, one a line.
Relative paths resolve against the manifest's folder (in a bucket too; gs:// audio paths are
read as they are). Audio: wav/flac/ogg/mp3 at any rate, any channels (averaged to mono,
resampled to 16 kHz).

--tfds NAME:VERSION instead of a manifest reads a prepared TFDS audio dataset (e.g.
librispeech:2.1.1 --tfds-split train_clean100 --lang en): each example's Audio feature is
tokenized and its text / id / number features are copied into the record (--tfds-fields maps
them otherwise, e.g. question_audio=q,answer_audio=a for spoken instructions).

output (--out): units-SSSSS-of-NNNNN.jsonl shards (paired / spoken_instruction records with raw
codes, before repeat merging), a .done.json marker per shard, skipped.jsonl and COMPLETE.json at
the end. Rerunning the same command resumes a killed run (finished shards are kept) and does
nothing for a finished one; a folder holding anything else is refused unless --force, which
removes the files extract-units writes there and starts over (a folder holding other files is
refused even then, and --out may not be, hold or lie inside an input, the current folder or home).
A strict run stopped by bad input before its first shard does not block a rerun.

exit codes: 0 done; 2 bad input (strict mode names the file and reason), or an output folder
that holds something else.
"""


def add_parser(sub):
    s = sub.add_parser(
        "extract-units",
        help="tokenize the audio of a manifest into speech "
        "units (paired / s2s JSONL corpora), on every device of every host",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--manifest",
        help="JSONL (audio, text, lang, id) or a list of audio paths "
        "(local or gs://, as the audio it names)",
    )
    src.add_argument(
        "--tfds",
        metavar="NAME[/CONFIG]:VERSION",
        help="a prepared TFDS audio "
        "dataset instead of a manifest, e.g. librispeech:2.1.1 (never downloaded)",
    )
    s.add_argument(
        "--tfds-split",
        default=None,
        help="with --tfds: the split, slicing "
        "allowed (train_clean100, train_clean100[:5000]; default train)",
    )
    s.add_argument(
        "--tfds-data-dir",
        default=None,
        help="with --tfds: where it was prepared "
        "(default: TFDS's own, $TFDS_DATA_DIR; gs:// is read by TFDS itself)",
    )
    s.add_argument(
        "--tfds-fields",
        default=None,
        metavar="FIELD=FEATURE,...",
        help="with --tfds: record field -> feature (audio / question_audio / "
        "answer_audio name Audio features); default: the one Audio feature is 'audio' "
        "and every text or number feature keeps its name",
    )
    s.add_argument(
        "--tokenizer",
        required=True,
        help="speech tokenizer folder (import-speech-tokenizer output; local or gs://)",
    )
    s.add_argument(
        "--out", required=True, help="output folder (local or gs://); the same command resumes it"
    )
    s.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="utterances per batch up to 30 s "
        "(rounded up to a multiple of the local devices; fewer for longer audio)",
    )
    s.add_argument(
        "--on-bad",
        choices=("strict", "skip"),
        default="strict",
        help="missing, unreadable, empty or non-finite audio (and bad manifest lines): "
        "stop naming the file and reason, or skip and list them in skipped.jsonl",
    )
    s.add_argument(
        "--long-audio",
        choices=("window", "refuse"),
        default="window",
        help="audio over 30 s: tokenize in overlapping 30 s windows stitched at the "
        "seams (the s3tokenizer package's logic), or treat as bad",
    )
    s.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="manifest lines per output shard (the unit of resumption and of work between hosts)",
    )
    s.add_argument(
        "--lang", default=None, help="language code for paired records whose line has no 'lang'"
    )
    s.add_argument(
        "--data-config",
        default=None,
        help="check every output record against this "
        "data config (languages, codebook size) before writing it",
    )
    s.add_argument(
        "--buckets",
        default=None,
        metavar="S1,S2,...",
        help="padded lengths in seconds (default 2,4,6,8,10,12,15,20,25,30; longer "
        "audio pads to multiples of the last): one compiled shape each on accelerators; on "
        "CPUs a batch is cut to its longest utterance and each device packs its valid frames",
    )
    s.add_argument(
        "--precision",
        choices=("highest", "high", "default", "bfloat16"),
        default="highest",
        help="matmul precision: highest matches the s3tokenizer package's float32 on "
        "any backend; default is faster on TPU (more codes differ where two codewords "
        "nearly tie); bfloat16 computes what a TPU's default does on any backend",
    )
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

    return Options(
        batch_size=args.batch_size,
        on_bad=args.on_bad,
        long_audio=args.long_audio,
        shard_size=args.shard_size,
        lang=args.lang,
        buckets=_buckets(args.buckets),
        workers=args.workers,
        progress=not args.no_progress,
    )


def uses_tensorflow(args) -> bool:
    return args.tfds is not None


def tfds_source(args):
    """--tfds and its flags as a `TfdsAudio` source (None without --tfds)."""
    from cslm_jax.data.audio import TfdsAudio
    from cslm_jax.speech.extract import ExtractError

    if args.tfds is None:
        if (
            args.tfds_fields is not None
            or args.tfds_data_dir is not None
            or args.tfds_split is not None
        ):
            raise ExtractError(
                "--tfds-split, --tfds-data-dir and --tfds-fields go with --tfds, "
                "not with --manifest"
            )
        return None
    fields = []
    for part in (args.tfds_fields or "").split(","):
        if not part.strip():
            continue
        field, sep, feature = part.partition("=")
        if not sep or not field.strip() or not feature.strip():
            raise ExtractError(
                f"--tfds-fields {args.tfds_fields!r}: expected FIELD=FEATURE "
                f"pairs separated by commas"
            )
        fields.append((field.strip(), feature.strip()))
    return TfdsAudio(args.tfds, args.tfds_split or "train", args.tfds_data_dir, tuple(fields))


def check(args, parser) -> None:
    """Flags, the manifest and the tokenizer folder (local or gs://), before JAX starts."""
    from cslm_jax.speech.extract import ExtractError, check_out
    from cslm_jax.storage import fs

    options(args)
    tfds_source(args)
    for flag, value in (
        ("--manifest", args.manifest),
        ("--tokenizer", args.tokenizer),
        ("--out", args.out),
        ("--data-config", args.data_config),
    ):
        if value is not None:
            fs.path(value, flag)  # gs:// or local; other schemes are refused
            fs.check_bucket(value, flag)
    for flag, value, folder in (
        ("--manifest", args.manifest, False),
        ("--tokenizer", args.tokenizer, True),
        ("--data-config", args.data_config, False),
    ):
        if value is None:
            continue
        p = fs.path(value)
        if folder and p.is_file():
            raise ExtractError(
                f"{flag} {value}: is a file; give the speech tokenizer folder "
                f"(import-speech-tokenizer's output)"
            )
        if not folder and p.is_dir():
            raise ExtractError(f"{flag} {value}: is a folder; give the file")
        if not (p.is_dir() if folder else p.is_file()):
            raise ExtractError(f"{flag} {value}: no such {'folder' if folder else 'file'}")
    check_out(
        args.out,
        args.force,
        [
            ("--manifest", args.manifest),
            ("--tokenizer", args.tokenizer),
            ("--tfds-data-dir", args.tfds_data_dir),
            ("--data-config", args.data_config),
        ],
    )


def run(args) -> int:
    import jax

    from cslm_jax.parallel.distributed import initialize
    from cslm_jax.speech.extract import extract, open_tokenizer

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
    primary = jax.process_index() == 0
    fmt = None
    if args.data_config is not None:
        from cslm_jax.data.formats import load_data_config

        fmt = load_data_config(args.data_config, check_files=False).format
    opts = options(args)
    from cslm_jax.storage import fs

    tokenizer = fs.local_dir(args.tokenizer, "speech tokenizer folder")  # gs://: downloaded
    # the weights load while the manifest is indexed and the first batches' audio is read
    encoder = open_tokenizer(tokenizer, precision=args.precision, background=True)
    source = tfds_source(args) or args.manifest
    summary = extract(
        source,
        args.out,
        encoder,
        tokenizer_dir=tokenizer,
        opts=opts,
        force=args.force,
        fmt=fmt,
        tokenizer_source=str(args.tokenizer),
    )
    # a tokenizer folder that failed to load raises here too when no batch needed it (every
    # line skipped): loaded in the background, its error would otherwise go unseen
    _ = encoder.tokenizer
    if primary or summary.shards_done_here:
        for line in summary.lines():
            print(line, flush=True)
    return 0
