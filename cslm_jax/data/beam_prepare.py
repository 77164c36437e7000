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
COMPLETED matches, are kept). Strict mode: each range stops at its first bad record; the job's
error is the first one in file order, as the in-process path reports it.

Fixed costs are kept out of the workers' way: a worker imports neither TensorFlow nor seqio
(TFRecords are written by `RecordWriter`, the SeqIO version read from the package metadata); it
loads transformers and the tokenizer once, when its first unit starts. With local paths this
process does not import TensorFlow either. Planning (a pass counting newlines, so that errors and
shards know each line's number) reads local files here, for the DirectRunner's equal shares; on
other runners, or with remote files, the workers plan the files, in parallel.
"""
from __future__ import annotations

import json
import math
import os
import threading
import uuid
from pathlib import Path

from cslm_jax.data.formats import DataConfig
from cslm_jax.data.prepare import (MAX_SKIP_MESSAGES, CacheError, completed_key, info_json,
                                   local_tokenizer_dir, merge_counts, new_counts,
                                   prepare_task_local, shard_name, splits_of, stats_json,
                                   task_key, write_json)
from cslm_jax.errors import CslmError, DataError

DEFAULT_NUM_SHARDS = 64          # divides 1, 2, 4, 8, 16, 32, 64 hosts
_IMPORT_LOCK = threading.Lock()
DEFAULT_RANGE_BYTES = 64 << 20


def _gfile():
    import tensorflow as tf
    return tf.io.gfile


class _PrepareUnit:
    """DoFn body (built lazily so this module imports without Beam): prepare one work unit (a
    list of byte ranges) in one call."""

    def __init__(self, specs: dict, cfg: DataConfig, tokenizer_dir: str, num_shards: int,
                 tmp: str, fast: bool):
        self.specs, self.cfg, self.tokenizer_dir = specs, cfg, tokenizer_dir
        self.num_shards, self.tmp, self.fast = num_shards, tmp, fast
        self.preparers = {}

    def setup(self):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # one core per worker
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def _preparer(self, task: str):
        from cslm_jax.data.prepare import Preparer

        prep = self.preparers.get(task)
        if prep is None:
            with _IMPORT_LOCK:   # transformers' lazy imports are not safe from several threads
                prep = self.preparers.get(task)
                if prep is None:
                    prep = self.preparers[task] = Preparer(self.specs[task], self.cfg,
                                                           self.tokenizer_dir, fast=self.fast)
        return prep

    def process(self, item):
        unit, groups = item
        for jobs in groups:
            for job in jobs:
                yield from self._range(unit, job)

    def _range(self, unit: int, job):
        from cslm_jax.data.prepare import numbered_lines, record_writer, write_batch

        task, split, file_index, path, start, end, first_line = job
        prep = self._preparer(task)
        counts = new_counts()
        folder = f"{self.tmp}/{task}/{split}"
        _makedirs(folder)
        tag = f"f{file_index:05d}-l{first_line:012d}"
        writers, error = {}, None
        try:
            for batch in prep.line_batches(path, file_index,
                                           numbered_lines(path, start, end, first_line),
                                           self.num_shards, counts):
                write_batch(writers, batch,
                            lambda shard: record_writer(f"{folder}/{tag}.s{shard:05d}"))
        except CslmError as e:            # strict: the range's first bad record
            line = getattr(e, "where", f"{path}:0").rsplit(":", 1)[-1]
            error = (task, split, file_index, int(line) if line.isdigit() else 0,
                     type(e).__name__, str(e))
        finally:
            for w in writers.values():
                w.close()
        _write_small_json(f"{self.tmp}/counts/{task}.{split}.{tag}.json", [task, split, counts])
        if error is not None:
            _write_small_json(f"{self.tmp}/errors/{task}.{split}.{tag}.json", error)
        for shard in sorted(writers):
            yield (task, split, shard), (file_index, first_line, f"{folder}/{tag}.s{shard:05d}")


def _makedirs(path: str) -> None:
    if "://" in path:
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def _open(path: str, mode: str):
    return _gfile().GFile(path, mode) if "://" in path else open(path, mode)


def _rename(src: str, dst: str) -> None:
    if "://" in src:
        _gfile().rename(src, dst, overwrite=True)
    else:
        os.replace(src, dst)


def _write_shard(item, out: str, num_shards: int):
    """Concatenate a shard's pieces (TFRecord files) in (file, range) order into its file."""
    (task, split, shard), pieces = item
    final = f"{out}/{task}/{shard_name(split, shard, num_shards)}"
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    with _open(tmp, "wb") as f:
        for _, _, piece in sorted(p for p in pieces if p is not None):
            with _open(piece, "rb") as src:
                while True:
                    block = src.read(8 << 20)
                    if not block:
                        break
                    f.write(block)
    _rename(tmp, final)
    return final


def _write_small_json(path: str, data) -> None:
    _makedirs(os.path.dirname(path))
    with _open(path, "w") as f:
        f.write(json.dumps(data, ensure_ascii=False))


def _exists(path: str) -> bool:
    return _gfile().exists(path) if "://" in path else os.path.exists(path)


def _glob(pattern: str) -> list:
    if "://" in pattern:
        return _gfile().glob(pattern)
    import glob
    return glob.glob(pattern)


def _rmtree(path: str) -> None:
    if "://" in path:
        _gfile().rmtree(path)
    else:
        import shutil
        shutil.rmtree(path)


def plan_units(jobs: list, range_bytes: int, units: int | None) -> list[list]:
    """Work units from `jobs` ((task, split, file index, path) per input file): lists of
    (task, split, file index, path, start, end, first line) byte ranges. `units` given (the
    DirectRunner's worker count): that many units, unit k holding the k-th contiguous 1/units
    of every file (cut at line starts), so each worker gets an equal share of every task; None:
    one unit per range of about `range_bytes`."""
    from cslm_jax.data.prepare import plan_ranges

    planned: dict = {}
    out: list[list] = [[] for _ in range(units)] if units else []
    for task, split, file_index, path in jobs:
        if units:
            size = os.path.getsize(path) if "://" not in path else _gfile().stat(path).length
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
                out[u].append((task, split, file_index, path, ranges[first][0],
                               ranges[last - 1][1], ranges[first][2]))
    return [u for u in out if u]


def _plan_file(job, range_bytes: int):
    """A file's byte ranges (one pass counting newlines, run by a worker), keyed one unit each."""
    for unit in plan_units([job], range_bytes, None):
        task, split, file_index, _, start = unit[0][:5]
        yield f"{task}/{split}/{file_index:05d}/{start:015d}", unit


def prepare_data(cfg: DataConfig, stage: str, tokenizer_dir: str | Path, out: str | Path, *,
                 tasks=None, num_shards: int = DEFAULT_NUM_SHARDS, runner: str = "DirectRunner",
                 num_workers: int | None = None, range_bytes: int = DEFAULT_RANGE_BYTES,
                 pipeline_args=(), fast: bool = True, log=print) -> dict:
    """Prepare a stage's tasks (or the named `tasks`) into `out/<task>/` with Beam. Returns
    {task: "prepared" | "kept"}. Raises CslmError (one line) for bad input; a strict data error
    is the first bad record in file order. One job per `out` at a time: a job removes what an
    interrupted one left there (tasks without COMPLETED, temporary pieces)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    if num_shards < 1:
        raise CslmError(f"--num-shards must be >= 1, got {num_shards}")
    specs = cfg.tasks(stage)
    if tasks:
        known = {s.name for s in specs}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise CslmError(f"--tasks: {unknown} not in stage {stage!r} of {cfg.path}; tasks: "
                            f"{sorted(known)}")
        specs = [s for s in specs if s.name in tasks]
    if "://" not in str(tokenizer_dir):
        tokenizer_dir = str(Path(tokenizer_dir).absolute())
    out = str(out)
    _makedirs(out)
    keys = {s.name: task_key(s, cfg, tokenizer_dir, num_shards) for s in specs}
    result, todo = {}, []
    for spec in specs:
        task_dir = f"{out}/{spec.name}"
        found = completed_key(task_dir)
        if found is not None:
            if found == keys[spec.name]:
                result[spec.name] = "kept"
                log(f"prepare-data: {spec.name}: already prepared in {task_dir}; kept")
                continue
            raise CacheError(f"{task_dir}: already holds a cache prepared with other settings; "
                             f"choose another --out or delete it")
        if _exists(task_dir):               # an interrupted run's partial output
            _rmtree(task_dir)
        if spec.tfds is not None:           # one reader for a dataset: prepared in this process
            if "://" in out:
                raise CslmError(f"--out {out}: task {spec.name} reads a TFDS dataset, which is "
                                f"prepared in this process into a local --out only")
            log(f"prepare-data: {spec.name}: TFDS {spec.tfds.name}, prepared in this process")
            prepare_task_local(spec, cfg, local_tokenizer_dir(tokenizer_dir), task_dir,
                               num_shards, fast=fast)
            result[spec.name] = "prepared"
            continue
        _makedirs(task_dir)
        todo.append(spec)
    for stale in _glob(f"{out}/.prepare-tmp-*"):    # an interrupted job's pieces
        log(f"prepare-data: removing {stale}, left by an interrupted job")
        _rmtree(stale)
    if not todo:
        return result
    tmp = f"{out}/.prepare-tmp-{uuid.uuid4().hex[:8]}"
    jobs = [(s.name, split, i, path) for s in todo for split, files in splits_of(s).items()
            for i, path in enumerate(files)]
    seeds = [((s.name, split, shard), None) for s in todo for split in splits_of(s)
             for shard in range(num_shards)]
    args = [f"--runner={runner}", *pipeline_args]
    workers = None
    if runner == "DirectRunner":
        given = [a for a in args if a.startswith("--direct_num_workers")]
        workers = int(given[-1].split("=", 1)[1]) if given and "=" in given[-1] else \
            (num_workers or os.cpu_count() or 1)
        if not given:
            args.append(f"--direct_num_workers={workers}")
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        args.append("--direct_running_mode=multi_processing")
    options = PipelineOptions(args)
    # Local files on the DirectRunner are planned here, into one unit per worker (it hands the
    # i-th key of a grouped collection to worker i % N, in the order the keys arrive: each worker
    # gets one equal share). Anything else (remote files, a cluster) is planned by the workers,
    # file by file in parallel: the newline-counting pass over a corpus in a bucket must not be
    # the launching machine's serial job.
    plan_here = runner == "DirectRunner" and not any("://" in str(j[3]) for j in jobs)
    units = plan_units(jobs, range_bytes, workers) if plan_here else None
    body = _PrepareUnit({s.name: s for s in todo}, cfg, tokenizer_dir, num_shards, tmp, fast)

    class PrepareUnit(beam.DoFn):
        def setup(self):
            body.setup()

        def process(self, item):
            yield from body.process(item)

    where = f"{len(units)} unit(s)" if plan_here else "ranges planned by the workers"
    log(f"prepare-data: {len(todo)} task(s), {len(jobs)} file(s) in {where} -> "
        f"{out} ({num_shards} shards per split, runner {runner})")
    try:
        with beam.Pipeline(options=options) as p:
            keyed = (p | "units" >> beam.Create(list(enumerate(units))) if plan_here else
                     p | "files" >> beam.Create(jobs) | "plan" >> beam.FlatMap(_plan_file,
                                                                               range_bytes))
            pieces = (keyed
                      | "spread" >> beam.GroupByKey()
                      | "prepare" >> beam.ParDo(PrepareUnit()))
            _ = ((pieces, p | "all shards" >> beam.Create(seeds))
                 | "flatten" >> beam.Flatten()
                 | "by shard" >> beam.GroupByKey()
                 | "write shards" >> beam.Map(_write_shard, out, num_shards))
        errors = []
        for path in _glob(f"{tmp}/errors/*.json"):
            with _open(path, "r") as f:
                errors.append(json.load(f))
        if errors:
            order = {s.name: i for i, s in enumerate(todo)}
            first = min(errors, key=lambda e: (order[e[0]], e[1] != "train", e[2], e[3]))
            raise DataError(first[5])
        counts: dict = {}
        for path in _glob(f"{tmp}/counts/*.json"):
            with _open(path, "r") as f:
                task, split, c = json.load(f)
            c["skipped_messages"] = [tuple(m) for m in c["skipped_messages"]]
            counts[task, split] = merge_counts(counts.get((task, split), new_counts()), c)
        for spec in todo:
            task_dir = f"{out}/{spec.name}"
            for split in splits_of(spec):
                write_json(f"{task_dir}/stats.{split}.json",
                           stats_json(counts.get((spec.name, split), new_counts())))
                write_json(f"{task_dir}/info.{split}.json", info_json(num_shards, keys[spec.name]))
                missing = [f for f in [shard_name(split, s, num_shards) for s in range(num_shards)]
                           if not _exists(f"{task_dir}/{f}")]
                if missing:
                    raise CacheError(f"{task_dir}: the job finished without writing {missing[:3]}")
            write_json(f"{task_dir}/COMPLETED", keys[spec.name])
            result[spec.name] = "prepared"
    finally:
        if _exists(tmp):
            _rmtree(tmp)
    return result


__all__ = ["prepare_data", "DEFAULT_NUM_SHARDS", "DEFAULT_RANGE_BYTES", "MAX_SKIP_MESSAGES"]
