"""`cslm-jax prepare-data` on Apache Beam: the in-process preparation (cslm_jax.data.prepare),
parallel over input files and byte ranges of large files, writing the SeqIO cache layout.

    files --plan (one pass counting newlines)--> byte ranges starting at line starts
          --reshuffle--> Preparer per range: examples appended to per-(range, shard) pieces
                         in a temporary folder; counts and (strict) the range's first error
          --group by shard--> each shard file = its pieces in (file, range) order, written under
                         a temporary name and renamed: whole or absent
          --combine per split--> stats.{split}.json, info.{split}.json
    then, in this process, after the job succeeded: COMPLETED per task, last.

A shard holds its examples in (file, line) order, exactly as the in-process writer puts them, so
the output is the same bytes for the same shard count. An interrupted job leaves no COMPLETED:
running the same command again prepares the unfinished tasks from scratch (finished ones, whose
COMPLETED matches, are kept). Strict mode: each range stops at its first bad record; the job's
error is the first one in file order, as the in-process path reports it.
"""
from __future__ import annotations

import json
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


class _PrepareRange:
    """DoFn body (built lazily so this module imports without Beam): prepare one byte range."""

    def __init__(self, specs: dict, cfg: DataConfig, tokenizer_dir: str, num_shards: int,
                 tmp: str, fast: bool):
        self.specs, self.cfg, self.tokenizer_dir = specs, cfg, tokenizer_dir
        self.num_shards, self.tmp, self.fast = num_shards, tmp, fast
        self.preparers = {}

    def setup(self):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # one core per worker
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        with _IMPORT_LOCK:       # transformers' lazy imports are not safe from several threads
            from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    def process(self, job):
        import apache_beam as beam

        from cslm_jax.data.prepare import Preparer, numbered_lines, record_writer

        task, split, file_index, path, range_index, start, end, first_line = job
        prep = self.preparers.get(task)
        if prep is None:
            with _IMPORT_LOCK:
                prep = self.preparers[task] = Preparer(self.specs[task], self.cfg,
                                                       self.tokenizer_dir, fast=self.fast)
        counts = new_counts()
        folder = f"{self.tmp}/{task}/{split}"
        _makedirs(folder)
        tag = f"f{file_index:05d}-r{range_index:06d}"
        writers, error = {}, None
        try:
            for shard, data in prep.lines(path, file_index,
                                          numbered_lines(path, start, end, first_line),
                                          self.num_shards, counts):
                w = writers.get(shard)
                if w is None:
                    w = writers[shard] = record_writer(f"{folder}/{tag}.s{shard:05d}")
                w.write(data)
        except CslmError as e:            # strict: the range's first bad record
            line = getattr(e, "where", f"{path}:0").rsplit(":", 1)[-1]
            error = (task, split, file_index, int(line) if line.isdigit() else 0,
                     type(e).__name__, str(e))
        finally:
            for w in writers.values():
                w.close()
        for shard in sorted(writers):
            yield beam.pvalue.TaggedOutput("pieces", ((task, split, shard),
                                                      (file_index, range_index,
                                                       f"{folder}/{tag}.s{shard:05d}")))
        yield beam.pvalue.TaggedOutput("counts", ((task, split), counts))
        if error is not None:
            yield beam.pvalue.TaggedOutput("errors", error)


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


class _Counts:
    """CombineFn over count dicts (sums; max lengths; the first skip messages)."""

    @staticmethod
    def make():
        import apache_beam as beam

        class CountsFn(beam.CombineFn):
            def create_accumulator(self):
                return new_counts()

            def add_input(self, acc, counts):
                return merge_counts(acc, counts)

            def merge_accumulators(self, accs):
                accs = list(accs)
                out = accs[0]
                for a in accs[1:]:
                    out = merge_counts(out, a)
                return out

            def extract_output(self, acc):
                return acc

        return CountsFn()


def _write_split_meta(item, out: str, keys: dict, num_shards: int):
    (task, split), counts = item
    write_json(f"{out}/{task}/stats.{split}.json", stats_json(counts))
    write_json(f"{out}/{task}/info.{split}.json", info_json(num_shards, keys[task]))
    return task, split


def _write_error(error, tmp: str):
    _makedirs(f"{tmp}/errors")
    with _open(f"{tmp}/errors/{uuid.uuid4().hex}.json", "w") as f:
        f.write(json.dumps(error, ensure_ascii=False))


def _plan(job, range_bytes: int):
    from cslm_jax.data.prepare import plan_ranges

    task, split, file_index, path = job
    for range_index, (start, end, line) in enumerate(plan_ranges(path, range_bytes)):
        yield task, split, file_index, path, range_index, start, end, line


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
    gfile = _gfile()
    gfile.makedirs(out)
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
        if gfile.exists(task_dir):          # an interrupted run's partial output
            gfile.rmtree(task_dir)
        if spec.tfds is not None:           # one reader for a dataset: prepared in this process
            if "://" in out:
                raise CslmError(f"--out {out}: task {spec.name} reads a TFDS dataset, which is "
                                f"prepared in this process into a local --out only")
            log(f"prepare-data: {spec.name}: TFDS {spec.tfds.name}, prepared in this process")
            prepare_task_local(spec, cfg, local_tokenizer_dir(tokenizer_dir), task_dir,
                               num_shards, fast=fast)
            result[spec.name] = "prepared"
            continue
        gfile.makedirs(task_dir)
        todo.append(spec)
    for stale in gfile.glob(f"{out}/.prepare-tmp-*"):    # an interrupted job's pieces
        log(f"prepare-data: removing {stale}, left by an interrupted job")
        gfile.rmtree(stale)
    if not todo:
        return result
    tmp = f"{out}/.prepare-tmp-{uuid.uuid4().hex[:8]}"
    jobs = [(s.name, split, i, path) for s in todo for split, files in splits_of(s).items()
            for i, path in enumerate(files)]
    seeds = [((s.name, split, shard), None) for s in todo for split in splits_of(s)
             for shard in range(num_shards)]
    args = [f"--runner={runner}", *pipeline_args]
    if runner == "DirectRunner" and not any(a.startswith("--direct_num_workers") for a in args):
        args.append(f"--direct_num_workers={num_workers or os.cpu_count() or 1}")
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        args.append("--direct_running_mode=multi_processing")
    options = PipelineOptions(args)
    body = _PrepareRange({s.name: s for s in todo}, cfg, tokenizer_dir, num_shards, tmp, fast)

    class PrepareRange(beam.DoFn):
        def setup(self):
            body.setup()

        def process(self, job):
            yield from body.process(job)

    log(f"prepare-data: {len(todo)} task(s), {len(jobs)} file(s) -> {out} ({num_shards} shards "
        f"per split, runner {runner})")
    try:
        with beam.Pipeline(options=options) as p:
            ranges = (p | "files" >> beam.Create(jobs)
                      | "plan" >> beam.FlatMap(_plan, range_bytes)
                      | "spread" >> beam.Reshuffle())
            results = ranges | "prepare" >> beam.ParDo(PrepareRange()).with_outputs(
                "pieces", "counts", "errors")
            shards = ((results.pieces, p | "all shards" >> beam.Create(seeds))
                      | "flatten" >> beam.Flatten()
                      | "by shard" >> beam.GroupByKey()
                      | "write shards" >> beam.Map(_write_shard, out, num_shards))
            _ = (results.counts
                 | "count" >> beam.CombinePerKey(_Counts.make())
                 | "write stats" >> beam.Map(_write_split_meta, out, keys, num_shards))
            _ = results.errors | "write errors" >> beam.Map(_write_error, tmp)
            del shards
        errors = []
        for path in gfile.glob(f"{tmp}/errors/*.json"):
            with gfile.GFile(path) as f:
                errors.append(json.load(f))
        if errors:
            order = {s.name: i for i, s in enumerate(todo)}
            first = min(errors, key=lambda e: (order[e[0]], e[1] != "train", e[2], e[3]))
            raise DataError(first[5])
        for spec in todo:
            task_dir = f"{out}/{spec.name}"
            for split in splits_of(spec):
                missing = [f for f in [f"info.{split}.json", f"stats.{split}.json"] +
                           [shard_name(split, s, num_shards) for s in range(num_shards)]
                           if not gfile.exists(f"{task_dir}/{f}")]
                if missing:
                    raise CacheError(f"{task_dir}: the job finished without writing {missing[:3]}")
            write_json(f"{task_dir}/COMPLETED", keys[spec.name])
            result[spec.name] = "prepared"
    finally:
        if gfile.exists(tmp):
            gfile.rmtree(tmp)
    return result


__all__ = ["prepare_data", "DEFAULT_NUM_SHARDS", "DEFAULT_RANGE_BYTES", "MAX_SKIP_MESSAGES"]
