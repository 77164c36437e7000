"""`cslm-jax prepare-data` on Apache Beam: the in-process preparation (cslm_jax.data.prepare),
parallel over input files and byte ranges of large files, writing the SeqIO cache layout.

    files --plan (one pass counting newlines: here for local files on the DirectRunner, else
          by the workers, file by file)--> byte ranges starting at line starts, grouped into
          work units (DirectRunner, local files: one per worker, each a contiguous 1/N of every
          file, so the workers get equal shares; otherwise: one per range)
          --by unit--> one fused step per unit: Preparer over its ranges, examples appended to
                         per-(file, unit, shard) pieces in a temporary folder; the unit's counts
                         and (strict) its first error written there as small JSON files
          --group by shard--> each shard file = its pieces in (file, line) order, written under
                         a temporary name and renamed: whole or absent
    then, in this process, after the job succeeded: counts summed into stats.{split}.json,
    info.{split}.json, and COMPLETED per task, last.

A shard holds its examples in (file, line) order, exactly as the in-process writer puts them, so
the output is the same bytes for the same shard count. An interrupted job leaves no COMPLETED:
running the same command again prepares the unfinished tasks from scratch (finished ones, whose
COMPLETED matches, are kept). COMPLETED holds the settings (`task_key`) and each input file's
size, modification time (a gs:// object's generation and md5 instead) and line count: a task
whose inputs changed since, or whose settings differ, is refused (`force`: prepared again).
Strict mode: each range stops at its first bad record; the job's error is the first one in
file order, as the in-process path reports it. The runner and its options are checked before
anything is written.

Fixed costs are kept out of the workers' way: a worker imports neither TensorFlow nor seqio
(TFRecords are written by `RecordWriter`, the SeqIO version read from the package metadata); it
loads transformers and the tokenizer once, when its first unit starts. This process does not
import TensorFlow either (every path, gs:// included, goes through cslm_jax.storage.fs; a TFDS
task excepted). Planning (a pass counting newlines, so that errors and shards know each line's
number) reads local files here, for the DirectRunner's equal shares; on other runners, or with
remote files, the workers plan the files, in parallel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import uuid
from pathlib import Path

from cslm_jax.data.formats import DataConfig
from cslm_jax.data.prepare import (
    MAX_SKIP_MESSAGES,
    CacheError,
    Preparer,
    completed_key,
    info_json,
    input_record,
    input_stamp,
    inputs_changed,
    key_differences,
    local_tokenizer_dir,
    merge_counts,
    new_counts,
    numbered_lines,
    plan_ranges,
    prepare_task_local,
    record_writer,
    shard_name,
    splits_of,
    stats_json,
    task_key,
    write_batch,
    write_json,
)
from cslm_jax.errors import CslmError, DataError
from cslm_jax.storage import fs

DEFAULT_NUM_SHARDS = 64  # divides 1, 2, 4, 8, 16, 32, 64 hosts
_IMPORT_LOCK = threading.Lock()
DEFAULT_RANGE_BYTES = 64 << 20


class _PrepareUnit:
    """DoFn body (built lazily so this module imports without Beam): prepare one work unit (a
    list of byte ranges) in one call."""

    def __init__(
        self,
        specs: dict,
        cfg: DataConfig,
        tokenizer_dir: str,
        num_shards: int,
        tmp: str,
        fast: bool,
    ):
        self.specs, self.cfg, self.tokenizer_dir = specs, cfg, tokenizer_dir
        self.num_shards, self.tmp, self.fast = num_shards, tmp, fast
        self.preparers = {}

    def setup(self):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def _preparer(self, task: str):
        prep = self.preparers.get(task)
        if prep is None:
            with _IMPORT_LOCK:  # transformers' lazy imports are not safe from several threads
                prep = self.preparers.get(task)
                if prep is None:
                    prep = self.preparers[task] = Preparer(
                        self.specs[task], self.cfg, self.tokenizer_dir, fast=self.fast
                    )
        return prep

    def process(self, item):
        unit, groups = item
        for jobs in groups:
            for job in jobs:
                yield from self._range(unit, job)

    def _range(self, unit: int, job):
        task, split, file_index, path, start, end, first_line = job
        prep = self._preparer(task)
        counts = new_counts()
        folder = f"{self.tmp}/{task}/{split}"
        _makedirs(folder)
        tag = f"f{file_index:05d}-l{first_line:012d}"
        writers, error, tally = {}, None, {"lines": 0}
        try:
            for batch in prep.line_batches(
                path,
                file_index,
                numbered_lines(path, start, end, first_line, tally),
                self.num_shards,
                counts,
            ):
                write_batch(
                    writers, batch, lambda shard: record_writer(f"{folder}/{tag}.s{shard:05d}")
                )
        except CslmError as e:  # strict: the range's first bad record
            line = getattr(e, "where", f"{path}:0").rsplit(":", 1)[-1]
            error = (
                task,
                split,
                file_index,
                int(line) if line.isdigit() else 0,
                type(e).__name__,
                str(e),
            )
        finally:
            for w in writers.values():
                w.close()
        _write_small_json(
            f"{self.tmp}/counts/{task}.{split}.{tag}.json",
            [task, split, counts, [file_index, first_line, tally["lines"]]],
        )
        if error is not None:
            _write_small_json(f"{self.tmp}/errors/{task}.{split}.{tag}.json", error)
        for shard in sorted(writers):
            yield (task, split, shard), (file_index, first_line, f"{folder}/{tag}.s{shard:05d}")


# Every file operation on the output (local, file://, gs://) goes through cslm_jax.storage.fs:
# local paths stay on plain open/os, gs:// on the one GCS client.
_makedirs, _open, _exists, _glob, _rmtree = fs.makedirs, fs.open_file, fs.exists, fs.glob, fs.remove


def _write_shard(item, out: str, num_shards: int):
    """Concatenate a shard's pieces (TFRecord files) in (file, range) order into its file, whole
    or absent (`fs.atomic_open`: a temporary file renamed locally, one object upload on GCS)."""
    (task, split, shard), pieces = item
    final = f"{out}/{task}/{shard_name(split, shard, num_shards)}"
    with fs.atomic_open(final, "wb") as f:
        for _, _, piece in sorted(p for p in pieces if p is not None):
            with _open(piece, "rb") as src:
                while True:
                    block = src.read(8 << 20)
                    if not block:
                        break
                    f.write(block)
    return final


def _write_small_json(path: str, data) -> None:
    _makedirs(os.path.dirname(path))
    with _open(path, "w") as f:
        f.write(json.dumps(data, ensure_ascii=False))


def plan_units(jobs: list, range_bytes: int, units: int | None) -> list[list]:
    """Work units from `jobs` ((task, split, file index, path) per input file): lists of
    (task, split, file index, path, start, end, first line) byte ranges. `units` given (the
    DirectRunner's worker count): that many units, unit k holding the k-th contiguous 1/units
    of every file (cut at line starts), so each worker gets an equal share of every task; None:
    one unit per range of about `range_bytes`."""
    planned: dict = {}
    out: list[list] = [[] for _ in range(units)] if units else []
    for task, split, file_index, path in jobs:
        if units:
            size = os.path.getsize(path) if "://" not in path else fs.file_size(path)
            rb = max(1, min(range_bytes, math.ceil(size / units)))
        else:
            rb = range_bytes
        ranges = planned.get((path, rb))
        if ranges is None:
            ranges = planned[(path, rb)] = plan_ranges(path, rb)
        if not units:
            out += [[(task, split, file_index, path, s, e, line)] for s, e, line in ranges]
            continue
        # contiguous runs of about equally many (equal-sized) ranges, merged into one per unit
        n = len(ranges)
        for u in range(units):
            first, last = u * n // units, (u + 1) * n // units
            if last > first:
                out[u].append(
                    (
                        task,
                        split,
                        file_index,
                        path,
                        ranges[first][0],
                        ranges[last - 1][1],
                        ranges[first][2],
                    )
                )
    return [u for u in out if u]


def _plan_file(job, range_bytes: int):
    """A file's byte ranges (one pass counting newlines, run by a worker), keyed one unit each."""
    for unit in plan_units([job], range_bytes, None):
        task, split, file_index, _, start = unit[0][:5]
        yield f"{task}/{split}/{file_index:05d}/{start:015d}", unit


# Beam's start-up chatter on stderr, from this process and from every DirectRunner worker (a
# harness's INFO lines, which each worker prints before it reads its log level from the options,
# and warnings about what this job does not use: BigQuery's client library, a session folder,
# two options the DirectRunner passes itself). Its other warnings and errors pass.
_BEAM_NOISE = re.compile(
    rb"^INFO:(root|__main__|apache_beam[\w.]*):"
    rb"|apitools not found, and bigquery client libraries are not available"
    rb"|No semi_persistent_directory found"
    rb"|Discarding unparseable args: \[(\\?'--(pipeline_type_check|"
    rb"direct_runner_use_stacked_bundle)\\?'(, )?){2}\]"
)


def _forward_stderr(source: int, target: int) -> None:
    """Copy lines from the pipe `source` to the file descriptor `target`, Beam's noise left out."""
    rest = b""
    try:
        while True:
            chunk = os.read(source, 1 << 16)
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            keep = [line + b"\n" for line in lines if not _BEAM_NOISE.search(line)]
            if keep:
                os.write(target, b"".join(keep))
        if rest and not _BEAM_NOISE.search(rest):
            os.write(target, rest)
    finally:
        os.close(source)
        os.close(target)


@contextlib.contextmanager
def quiet_beam_logs():
    """Beam's loggers at WARNING here and its workers' (`--default_sdk_harness_log_level`, set
    by `prepare_data`), and its known-harmless lines dropped from standard error (file
    descriptor 2, which the DirectRunner's worker processes inherit: the only way to reach what
    they print before reading their options)."""
    beam_logger = logging.getLogger("apache_beam")
    level = beam_logger.level
    if level == logging.NOTSET:
        beam_logger.setLevel(logging.WARNING)
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        saved = None
    if saved is None:
        try:
            yield
        finally:
            beam_logger.setLevel(level)
        return
    source, sink = os.pipe()
    os.dup2(sink, 2)
    os.close(sink)
    forward = threading.Thread(
        target=_forward_stderr, args=(source, os.dup(saved)), daemon=True, name="cslm_jax-stderr"
    )
    forward.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe is left to workers still ending, if any
        os.close(saved)
        forward.join(timeout=5)
        beam_logger.setLevel(level)


def _option_value(args: list, name: str) -> str | None:
    """The last value of `--name=value` or `--name value` among Beam arguments, else None."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _create_runner(runner: str):
    """The Beam runner named `runner`, or a CslmError naming the choices."""
    from apache_beam.options.pipeline_options import StandardOptions  # heavy: beam
    from apache_beam.runners.runner import create_runner  # heavy: beam

    try:
        return create_runner(runner)
    except (ValueError, AttributeError, ModuleNotFoundError) as e:
        if isinstance(e, ModuleNotFoundError) and "." not in runner:
            raise CslmError(f"--runner {runner}: cannot be loaded here: {e}") from None
        raise CslmError(
            f"--runner {runner}: not a Beam runner; choose one of "
            f"{', '.join(StandardOptions.KNOWN_RUNNER_NAMES)} (or the module.Class "
            f"name of a PipelineRunner subclass)"
        ) from None
    except ImportError as e:
        raise CslmError(f"--runner {runner}: cannot be loaded here: {e}") from None


def _check_runner_options(runner: str, options, runner_obj) -> None:
    """Beam's own validation of the options for the runner (DataflowRunner: project, region, a
    gs:// temp_location), as one CslmError naming what is missing."""
    # heavy: beam
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    errors = [e.strip() for e in PipelineOptionsValidator(options, runner_obj).validate()]
    if not errors:
        return
    missing = [
        m.group(2)
        for e in errors
        for m in [re.match(r"Missing (required|GCS path) option: (\w+)", e)]
        if m
    ]
    other = [
        e.rstrip(".")
        for e in errors
        if not re.match(r"Missing (required|GCS path) option: (\w+)", e)
    ]
    what = []
    if missing:
        what.append("missing " + ", ".join(f"--{m}" for m in missing))
    what += other
    raise CslmError(
        f"--runner {runner}: {'; '.join(what)}; give Beam's options with "
        f"--pipeline-options='--project=PROJECT --region=REGION "
        f"--temp_location=gs://BUCKET/tmp' (or --pipeline-option KEY=VALUE, repeated)"
    )


_OUR_FILES = re.compile(
    r"(COMPLETED|(info|stats)\..+\.json|.+\.tfrecord-\d{5,}-of-\d{5,})"
    r"(\.tmp-[0-9a-f]+)?"
)


def _remove_cache(task_dir: str) -> None:
    """Remove a task's cache folder, refusing (CacheError) when it holds anything prepare-data
    does not write: never a user's file."""
    names = [os.path.basename(p.rstrip("/")) for p in _glob(f"{task_dir}/*")]
    if "://" not in task_dir:
        names = os.listdir(task_dir) if os.path.isdir(task_dir) else names
    foreign = sorted(n for n in names if not _OUR_FILES.fullmatch(n))
    if foreign:
        raise CacheError(
            f"{task_dir}: holds {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}, which prepare-data did not "
            f"write; move it away or choose another --out"
        )
    _rmtree(task_dir)


def _stamps(spec) -> dict:
    """{split: [input_stamp of each file]} of a task, taken before its files are read."""
    out = {}
    for split, files in splits_of(spec).items():
        out[split] = []
        for f in files:
            try:
                out[split].append(input_stamp(f))
            except Exception as e:  # noqa: BLE001 - a missing file is bad input
                if isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError":
                    raise DataError(f"{f}: no such file (task {spec.name}, {split})") from None
                raise
    return out


def prepare_data(
    cfg: DataConfig,
    stage: str,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    tasks=None,
    num_shards: int = DEFAULT_NUM_SHARDS,
    runner: str = "DirectRunner",
    num_workers: int | None = None,
    range_bytes: int = DEFAULT_RANGE_BYTES,
    pipeline_args=(),
    fast: bool = True,
    force: bool = False,
    log=print,
) -> dict:
    """Prepare a stage's tasks (or the named `tasks`) into `out/<task>/` with Beam. Returns
    {task: "prepared" | "kept"}. Raises CslmError (one line) for bad input; a strict data error
    is the first bad record in file order. One job per `out` at a time: a job removes what an
    interrupted one left there (tasks without COMPLETED, temporary pieces). A task already
    prepared with the same settings from its input files as they are now (sizes, times, line
    counts recorded in COMPLETED) is kept; one prepared with other settings or from changed
    inputs is refused, or with `force` prepared again. Beam's known-harmless log lines are
    left out of stderr (`quiet_beam_logs`)."""
    with quiet_beam_logs():
        return _prepare_data(
            cfg,
            stage,
            tokenizer_dir,
            out,
            tasks=tasks,
            num_shards=num_shards,
            runner=runner,
            num_workers=num_workers,
            range_bytes=range_bytes,
            pipeline_args=pipeline_args,
            fast=fast,
            force=force,
            log=log,
        )


def _prepare_data(
    cfg: DataConfig,
    stage: str,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    tasks,
    num_shards: int,
    runner: str,
    num_workers: int | None,
    range_bytes: int,
    pipeline_args,
    fast: bool,
    force: bool,
    log,
) -> dict:
    import apache_beam as beam  # heavy: beam
    from apache_beam.options.pipeline_options import PipelineOptions  # heavy: beam

    if num_shards < 1:
        raise CslmError(f"--num-shards must be >= 1, got {num_shards}")
    if range_bytes < 1:
        raise CslmError(f"--range-mb must be > 0, got {range_bytes / (1 << 20):g}")
    specs = cfg.tasks(stage)
    if tasks:
        known = {s.name for s in specs}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise CslmError(
                f"--tasks: {unknown} not in stage {stage!r} of {cfg.path}; tasks: {sorted(known)}"
            )
        specs = [s for s in specs if s.name in tasks]
    # the runner and its options first: a job that cannot start touches nothing
    runner_obj = _create_runner(runner)
    direct = type(runner_obj).__name__ in ("DirectRunner", "SwitchingDirectRunner")
    args = [f"--runner={runner}", *pipeline_args]
    workers = None
    if direct:
        given = _option_value(args, "direct_num_workers")
        try:
            workers = int(given) if given is not None else (num_workers or os.cpu_count() or 1)
        except ValueError:
            raise CslmError(
                f"--pipeline-options: --direct_num_workers={given} is not a whole number"
            ) from None
        if given is None:
            args.append(f"--direct_num_workers={workers}")
        if _option_value(args, "direct_running_mode") is None:
            args.append("--direct_running_mode=multi_processing")
    if _option_value(args, "default_sdk_harness_log_level") is None:
        args.append("--default_sdk_harness_log_level=WARNING")
    options = PipelineOptions(args)
    _check_runner_options(runner, options, runner_obj)

    if "://" not in str(tokenizer_dir):
        tokenizer_dir = str(Path(tokenizer_dir).absolute())
    out = str(out)
    keys = {s.name: task_key(s, cfg, tokenizer_dir, num_shards) for s in specs}
    result, todo, replace = {}, [], []
    for spec in specs:  # decided before anything is written
        task_dir = f"{out}/{spec.name}"
        found = completed_key(task_dir)
        if found is None:
            continue
        diff = key_differences(found, keys[spec.name])
        why = (
            f"prepared with other settings ({'; '.join(d for _, d in diff)})"
            if diff
            else inputs_changed(found, spec)
        )
        if why is None:
            result[spec.name] = "kept"
            log(f"prepare-data: {spec.name}: already prepared in {task_dir}; kept")
        elif not force:
            raise CacheError(
                f"{task_dir}: {why}; rerun with --force to prepare it again (or "
                f"choose another --out)"
            )
        else:
            replace.append((spec.name, why))
    created_out = not _exists(out)
    _makedirs(out)
    made = []  # task folders this call created
    try:
        for name, why in replace:
            log(f"prepare-data: {name}: {why}; preparing it again (--force)")
            _remove_cache(f"{out}/{name}")
        for spec in specs:
            if spec.name in result:
                continue
            task_dir = f"{out}/{spec.name}"
            if _exists(task_dir):  # an interrupted run's partial output
                _remove_cache(task_dir)
            if spec.tfds is not None:  # one reader for a dataset: prepared in this process
                if "://" in out:
                    raise CslmError(
                        f"--out {out}: task {spec.name} reads a TFDS dataset, which is "
                        f"prepared in this process into a local --out only"
                    )
                log(f"prepare-data: {spec.name}: TFDS {spec.tfds.name}, prepared in this process")
                counts = prepare_task_local(
                    spec, cfg, local_tokenizer_dir(tokenizer_dir), task_dir, num_shards, fast=fast
                )
                for split, c in counts.items():
                    if c["skipped"]:
                        first = c["skipped_messages"][0][2] if c["skipped_messages"] else ""
                        log(
                            f"prepare-data: {spec.name}: skipped {c['skipped']} bad record(s) of "
                            f"{spec.tfds.name} ({split}; packing.skip_bad); first: {first}"
                        )
                result[spec.name] = "prepared"
                continue
            _makedirs(task_dir)
            made.append(task_dir)
            todo.append(spec)
        for stale in _glob(f"{out}/.prepare-tmp-*"):  # an interrupted job's pieces
            log(f"prepare-data: removing {stale}, left by an interrupted job")
            _rmtree(stale)
        if todo:
            _run_job(
                beam,
                options,
                todo,
                cfg,
                tokenizer_dir,
                out,
                num_shards,
                range_bytes,
                workers if direct else None,
                runner,
                fast,
                keys,
                result,
                log,
            )
    except BaseException:
        if "://" not in out:  # what a job that failed to start made is removed
            for task_dir in made + ([out] if created_out else []):
                with contextlib.suppress(OSError):
                    os.rmdir(task_dir)  # empty folders only
        raise
    return {s.name: result[s.name] for s in specs}


def _run_job(
    beam,
    options,
    todo,
    cfg,
    tokenizer_dir,
    out,
    num_shards,
    range_bytes,
    workers,
    runner,
    fast,
    keys,
    result,
    log,
) -> None:
    stamps = {s.name: _stamps(s) for s in todo}
    tmp = f"{out}/.prepare-tmp-{uuid.uuid4().hex[:8]}"
    jobs = [
        (s.name, split, i, path)
        for s in todo
        for split, files in splits_of(s).items()
        for i, path in enumerate(files)
    ]
    seeds = [
        ((s.name, split, shard), None)
        for s in todo
        for split in splits_of(s)
        for shard in range(num_shards)
    ]
    # Local files on the DirectRunner are planned here, into one unit per worker (it hands the
    # i-th key of a grouped collection to worker i % N, in the order the keys arrive: each worker
    # gets one equal share). Anything else (remote files, a cluster) is planned by the workers,
    # file by file in parallel: the newline-counting pass over a corpus in a bucket must not be
    # the launching machine's serial job.
    plan_here = workers is not None and not any("://" in str(j[3]) for j in jobs)
    units = plan_units(jobs, range_bytes, workers) if plan_here else None
    body = _PrepareUnit({s.name: s for s in todo}, cfg, tokenizer_dir, num_shards, tmp, fast)

    class PrepareUnit(beam.DoFn):
        def setup(self):
            body.setup()

        def process(self, item):
            yield from body.process(item)

    where = f"{len(units)} unit(s)" if plan_here else "ranges planned by the workers"
    log(
        f"prepare-data: {len(todo)} task(s), {len(jobs)} file(s) in {where} -> "
        f"{out} ({num_shards} shards per split, runner {runner})"
    )
    try:
        with beam.Pipeline(options=options) as p:
            keyed = (
                p | "units" >> beam.Create(list(enumerate(units)))
                if plan_here
                else p
                | "files" >> beam.Create(jobs)
                | "plan" >> beam.FlatMap(_plan_file, range_bytes)
            )
            pieces = keyed | "spread" >> beam.GroupByKey() | "prepare" >> beam.ParDo(PrepareUnit())
            _ = (
                (pieces, p | "all shards" >> beam.Create(seeds))
                | "flatten" >> beam.Flatten()
                | "by shard" >> beam.GroupByKey()
                | "write shards" >> beam.Map(_write_shard, out, num_shards)
            )
        errors = []
        for path in _glob(f"{tmp}/errors/*.json"):
            with _open(path, "r") as f:
                errors.append(json.load(f))
        if errors:
            order = {s.name: i for i, s in enumerate(todo)}
            first = min(errors, key=lambda e: (order[e[0]], e[1] != "train", e[2], e[3]))
            raise DataError(first[5])
        counts: dict = {}
        lines: dict = {}  # (task, split, file index) -> lines, and skipped records
        skipped: dict = {}
        for path in _glob(f"{tmp}/counts/*.json"):
            with _open(path, "r") as f:
                task, split, c, (file_index, first_line, n) = json.load(f)
            c["skipped_messages"] = [tuple(m) for m in c["skipped_messages"]]
            counts[task, split] = merge_counts(counts.get((task, split), new_counts()), c)
            k = (task, split, file_index)
            lines[k] = max(lines.get(k, 0), first_line + n - 1)
            skipped[k] = skipped.get(k, 0) + c["skipped"]
        for spec in todo:
            task_dir = f"{out}/{spec.name}"
            inputs = {}
            for split, files in splits_of(spec).items():
                c = counts.get((spec.name, split), new_counts())
                write_json(f"{task_dir}/stats.{split}.json", stats_json(c))
                write_json(f"{task_dir}/info.{split}.json", info_json(num_shards, keys[spec.name]))
                missing = [
                    f
                    for f in [shard_name(split, s, num_shards) for s in range(num_shards)]
                    if not _exists(f"{task_dir}/{f}")
                ]
                if missing:
                    raise CacheError(f"{task_dir}: the job finished without writing {missing[:3]}")
                inputs[split] = input_record(
                    files,
                    stamps[spec.name][split],
                    [lines.get((spec.name, split, i), 0) for i in range(len(files))],
                )
                for i, path in enumerate(files):
                    n = skipped.get((spec.name, split, i), 0)
                    if n:
                        first = next((m for fi, _, m in c["skipped_messages"] if fi == i), None)
                        log(
                            f"prepare-data: {spec.name}: skipped {n} bad record(s) of "
                            f"{lines.get((spec.name, split, i), 0)} line(s) in {path} "
                            f"(packing.skip_bad)"
                            + (f"; first: {first}" if first else "")
                            + f"; up to {MAX_SKIP_MESSAGES} reasons in {task_dir}/stats.{split}.json"
                        )
            write_json(f"{task_dir}/COMPLETED", dict(keys[spec.name], inputs=inputs))
            result[spec.name] = "prepared"
    finally:
        if _exists(tmp):
            _rmtree(tmp)


__all__ = ["prepare_data", "DEFAULT_NUM_SHARDS", "DEFAULT_RANGE_BYTES", "MAX_SKIP_MESSAGES"]
