"""`cslm-jax train`: one CSLM stage on any device mesh, resumable after preemption.

    cslm-jax train --config configs/demo.yaml --run-dir runs/stage1 [key=value ...]

The run: a mesh from config -> parameters from `init_from` (a model checkpoint written by
`import-hf`, or a finished run's `model/`) placed directly in their shardings -> the stage's
SeqIO mixture, per host -> a jit-compiled step (explicit in/out shardings, donated state,
gradient accumulation) -> metrics each step (JSON lines, TensorBoard, progress bar) -> Orbax
checkpoints (items `state`, `data`, `config`) every N steps, keep K, async -> on SIGTERM a
checkpoint and exit code 75 -> at the end `RUN_DIR/model/`, a model checkpoint that `export-hf`
converts and `--init-from` starts the next stage from.

Run folder:
    config.yaml        the resolved run config it started with (the current one is inside
                       every checkpoint, item `config`); config.<N>.yaml: a changed config that
                       a resume at step N brought in
    tokenizer/         the CSLM tokenizer the run trains with
    checkpoints/<N>/   Orbax: state (step, params, optimizer state), data (pipeline position per
                       process), config (run + model config + vocabulary)
    metrics.jsonl      one JSON object per logged step (`step`, `loss`, ...)
    tensorboard/       the same scalars as TensorBoard events
    model/             the final parameters as a model checkpoint (when the run completes)

Exit codes: 0 done; 75 preempted (SIGTERM or Ctrl-C): a checkpoint was written, run the same
command again to resume; 130 a second Ctrl-C aborted without one; 3 a non-finite loss stopped
the run (the last checkpoint is intact); 2 bad configuration or data, or a resume whose config
changes the optimisation (RESUME_FIXED) without allow_config_change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from cslm_jax.config import ConfigError, ModelConfig, RunConfig
from cslm_jax.errors import CslmError
from cslm_jax.model.vocab import VocabInfo
from cslm_jax.storage import fs
from cslm_jax.storage.outputs import check_output_place
from cslm_jax.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from cslm_jax.train.preemption import PreemptionFlag

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75          # sysexits' EX_TEMPFAIL: temporary failure, run again to resume


class TrainError(CslmError):
    """The run cannot start or continue; the message says why and what to do."""


# -- shardings of the train state -------------------------------------------------------------------

def _keys(path) -> tuple:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, params_sharding: dict, params_shape: dict, mesh):
    """Optimizer-state leaves shaped like a parameter (Adam's mu and nu) share its sharding;
    everything else (counts) is replicated. Matched by the trailing dict keys of the leaf's path."""
    flat_sh = {_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
    flat_shape = {_keys(p): tuple(s.shape) for p, s in
                  jax.tree_util.tree_flatten_with_path(params_shape)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = _keys(path)
        for n in range(len(keys)):
            tail = keys[n:]
            if tail in flat_sh and flat_shape[tail] == tuple(leaf.shape):
                return flat_sh[tail]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


# -- checks before the run starts ------------------------------------------------------------------

def has_checkpoint(run_dir) -> bool:
    """Whether `run_dir` holds a committed training checkpoint (a resume, not a new run)."""
    from cslm_jax.storage.checkpoint import is_committed_step

    ckpts = fs.path(run_dir) / "checkpoints"
    return ckpts.is_dir() and any(is_committed_step(p) for p in ckpts.iterdir())


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(f"--run-dir {run_dir}: is a file, not a folder; give a folder (a new one "
                         f"starts a run, an existing run folder resumes it)")


def _load_data_config(cfg: RunConfig, data_cache=None):
    """The run's data config. Training from a prepared cache (`--data-cache` or the data
    config's `cache_dir`) does not need the JSONL files on this host."""
    from cslm_jax.data.formats import check_stage_files, load_data_config

    length = cfg.data.max_length
    overrides = [] if length is None else [f"packing.max_length={length}"]
    data_cfg = load_data_config(cfg.data.config, overrides, check_files=False)
    if data_cache is None and data_cfg.cache_dir is None and cfg.data.stage in data_cfg.stages:
        check_stage_files(data_cfg, cfg.data.stage)       # this stage's files, not every stage's
    return data_cfg


def preflight(config, overrides, run_dir, init_from=None, data_cache=None) -> RunConfig:
    """What `cslm-jax train` checks before TensorFlow starts and before anything is printed or
    written: the run folder, the config (overrides named as such), and for a new run its
    init_from and the data config's stage. Raises CslmError; returns the run config."""
    from cslm_jax.config import load_run_config
    from cslm_jax.storage.checkpoint import resolve_model_dir

    run_dir = fs.path(run_dir, "--run-dir")
    fs.check_bucket(run_dir, "--run-dir")
    check_run_dir(run_dir)
    cfg = load_run_config(config, overrides)
    check_output_place(run_dir, flag="--run-dir", inside_ok=True, inputs=[
        ("--init-from" if init_from else "init_from", init_from or cfg.init_from),
        ("--data-cache", data_cache), ("data.config", cfg.data.config)])
    if not has_checkpoint(run_dir) and (run_dir / "model").exists():
        raise TrainError(f"--run-dir {run_dir}: holds model/ but no checkpoint, so it is no run "
                         f"to resume, and a new run would replace model/ when it ends; give "
                         f"another --run-dir (nothing was written)")
    if not has_checkpoint(run_dir):
        where = init_from or cfg.init_from
        if not where:
            raise TrainError("train: nothing to start from: set init_from in the config or pass "
                             "--init-from (a checkpoint written by `cslm-jax import-hf`)")
        resolve_model_dir(where, flag="--init-from" if init_from else "init_from")
    data_cfg = _load_data_config(cfg, data_cache)
    if cfg.data.stage not in data_cfg.stages:
        raise ConfigError(f"data.stage is {cfg.data.stage!r}; {cfg.data.config} has stages "
                          f"{sorted(data_cfg.stages)}")
    return cfg


# Fields of a run config that change how an existing run optimises: a resume that changes one is
# refused unless allowed (--allow-config-change). Every other field may change (shown on resume).
RESUME_FIXED = ("optimizer", "train.steps", "train.global_batch_size", "train.micro_batch_size",
                "data", "model")
RESUME_IGNORED = ("path", "optimizer.total_steps")      # informational / follows train.steps


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(fixed, free): 'field: old -> new' for each field that differs between two run configs
    (dicts), split by whether a resume may change it freely (RESUME_FIXED)."""
    a, b = _flatten(old), _flatten(new)
    fixed, free = [], []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_IGNORED or a.get(key, "(unset)") == b.get(key, "(unset)"):
            continue
        line = f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}"
        is_fixed = any(key == f or key.startswith(f + ".") for f in RESUME_FIXED)
        (fixed if is_fixed else free).append(line)
    return fixed, free


# -- the run ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything a training run holds besides its state (built by `prepare_run`)."""

    cfg: RunConfig
    run_dir: Path
    model_cfg: ModelConfig
    vocab: VocabInfo
    source_meta: dict
    layout: "Layout"               # mesh, shardings, optimizer
    task_names: list
    mixture: str
    max_length: int
    data_shards: int = 1           # input shards (cslm_jax.parallel.distributed); fixed for the whole run


def _config_item(run: Run) -> dict:
    return {"run": run.cfg.to_dict(), "model": run.model_cfg.to_dict(),
            "vocab": run.vocab.to_dict(), "source": run.source_meta,
            "data_shards": run.data_shards}


@dataclasses.dataclass
class Layout:
    """Where the train state and batches live: mesh, shardings, optimizer."""

    mesh: object
    rules: dict | None
    param_sh: dict
    state_sh: dict
    batch_sh: NamedSharding
    optimizer: object


def train_layout(cfg: RunConfig, model_cfg: ModelConfig, devices, process_count: int) -> Layout:
    """The mesh over `devices` (config `mesh`) and the shardings of the state and the batch.
    Raises ConfigError when the mesh does not fit the devices or the batch does not split."""
    from cslm_jax.model.llama import param_shardings
    from cslm_jax.model.schema import is_spec, param_shapes
    from cslm_jax.parallel.sharding import make_mesh, named_sharding
    from cslm_jax.train.step import make_optimizer

    t = cfg.train
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.sharding_rules
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = t.micro_batch_size or t.global_batch_size
    if micro % batch_ways:
        raise ConfigError(f"train.micro_batch_size ({micro}) must be a multiple of the mesh's "
                          f"data x fsdp size ({batch_ways}): each device needs whole rows")
    if t.global_batch_size % process_count:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                          f"the process count ({process_count})")

    param_sh = param_shardings(model_cfg, mesh, rules)
    pdtype = jnp.dtype(model_cfg.param_dtype)
    abstract_params = jax.tree.map(lambda spec: jax.ShapeDtypeStruct(spec[0], pdtype),
                                   param_shapes(model_cfg), is_leaf=is_spec)
    optimizer = make_optimizer(cfg.optimizer)
    opt_sh = opt_state_shardings(jax.eval_shape(optimizer.init, abstract_params), param_sh,
                                 abstract_params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = {"step": replicated, "skipped": replicated, "params": param_sh, "opt_state": opt_sh}
    batch_sh = named_sharding(mesh, (None, "batch", "length"), rules, what="batch")
    return Layout(mesh, rules, param_sh, state_sh, batch_sh, optimizer)


def prepare_run(cfg: RunConfig, run_dir: Path, manager, init_from=None, log=print,
                data_shards: int | None = None,
                data_cache: str | None = None) -> tuple[Run, int | None, Path | None]:
    """Model/vocab (from the latest checkpoint when resuming, else from init_from), mesh,
    shardings, data registration. Returns (run, step to resume from or None, init checkpoint).
    `data_shards`: input shards of a new run (default: one per process); a resumed run keeps
    its checkpoint's count. `data_cache`: a cache written by `cslm-jax prepare-data` (default:
    the data config's `cache_dir`; without one, process 0 prepares the stage in-process first
    and the others wait, then read what it wrote)."""
    from cslm_jax.storage.checkpoint import read_metadata, read_train_config, resolve_model_dir
    from cslm_jax.parallel.distributed import barrier, run_together
    from cslm_jax.tasks.cslm import prepare_stage, register

    latest = manager.latest_step()
    init = None
    overrides = dict(cfg.model)
    if latest is not None:
        saved = read_train_config(manager, latest)
        model_cfg = ModelConfig.from_dict(saved["model"], where=f"{run_dir} checkpoint {latest}")
        model_cfg = model_cfg.replace(**overrides)
        vocab = VocabInfo.from_dict(saved["vocab"], where=f"{run_dir} checkpoint {latest}")
        source_meta = saved.get("source", {})
        if init_from or cfg.init_from:
            log(f"train: resuming {run_dir} from step {latest}; init_from is not used")
        saved_shards = int(saved.get("data_shards", jax.process_count()))
        if data_shards is not None and data_shards != saved_shards:
            raise TrainError(f"{run_dir}: the run reads {saved_shards} data shard(s) (fixed when "
                             f"it started); drop --data-shards {data_shards} to resume it")
        data_shards = saved_shards
    else:
        where = init_from or cfg.init_from
        if not where:
            raise TrainError("train: nothing to start from: set init_from in the config or pass "
                             "--init-from (a checkpoint written by `cslm-jax import-hf`)")
        init = resolve_model_dir(where, flag="--init-from")
        meta, model_cfg, vocab = read_metadata(init)
        model_cfg = model_cfg.replace(**overrides)
        source_meta = {k: v for k, v in meta.items() if k not in ("format", "model", "vocab")}
        source_meta["init_from"] = str(init)
        if jax.process_index() == 0 and not (run_dir / "tokenizer").is_dir():
            if not (init / "tokenizer").is_dir():
                raise TrainError(f"{init}/tokenizer: missing; the checkpoint carries no tokenizer")
            fs.copytree(init / "tokenizer", run_dir / "tokenizer")
        barrier("cslm_jax: tokenizer copied into the run folder")
    if vocab.unit_count == 0:
        raise TrainError(f"{init or run_dir}: the vocabulary has no speech units; import the base "
                         f"model with `cslm-jax import-hf --speech-units N`")

    t = cfg.train
    devices = jax.devices()
    if t.num_devices is not None:
        if t.num_devices > len(devices):
            raise ConfigError(f"train.num_devices is {t.num_devices} but only {len(devices)} "
                              f"devices exist")
        devices = devices[:t.num_devices]
    layout = train_layout(cfg, model_cfg, devices, jax.process_count())
    data_shards = jax.process_count() if data_shards is None else int(data_shards)

    data_cfg = _load_data_config(cfg, data_cache)
    if cfg.data.stage not in data_cfg.stages:
        raise ConfigError(f"data.stage is {cfg.data.stage!r}; {cfg.data.config} has stages "
                          f"{sorted(data_cfg.stages)}")
    from cslm_jax.model.vocab import load_tokenizer, require_cslm_tokens
    tokenizer_dir = fs.local_dir(run_dir / "tokenizer", "tokenizer folder")   # gs://: staged once
    require_cslm_tokens(load_tokenizer(tokenizer_dir), str(run_dir / "tokenizer"),
                        data_cfg.format.unit_count,
                        f"format.unit_count of the data config {cfg.data.config}")
    if data_cache is None:                  # every process stops if process 0 cannot
        run_together(lambda: prepare_stage(data_cfg, tokenizer_dir, cfg.data.stage),
                     TrainError("process 0 could not prepare the data (its error says why)"),
                     only_primary=True)
    [mixture] = register(data_cfg, tokenizer_dir, stages=[cfg.data.stage], cache_dir=data_cache)
    task_names = [s.name for s in data_cfg.tasks(cfg.data.stage)]
    if data_cache is not None or data_cfg.cache_dir is not None:
        log(f"train: reading the prepared cache {data_cache or data_cfg.cache_dir} (stage "
            f"{cfg.data.stage}: {len(task_names)} task(s), max_length {data_cfg.max_length}; "
            f"checked against the data config, tokenizer and input files)")
    run = Run(cfg, run_dir, model_cfg, vocab, source_meta, layout, task_names, mixture,
              data_cfg.max_length, data_shards)
    return run, latest, init


def abstract_state(run: Run):
    from cslm_jax.model.schema import is_spec, param_shapes

    pdtype = jnp.dtype(run.model_cfg.param_dtype)
    params = jax.tree.map(lambda spec, sh: jax.ShapeDtypeStruct(spec[0], pdtype, sharding=sh),
                          param_shapes(run.model_cfg), run.layout.param_sh, is_leaf=is_spec)
    opt = jax.eval_shape(run.layout.optimizer.init, params)
    opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), opt,
                       run.layout.state_sh["opt_state"])
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=run.layout.state_sh["step"])
    return {"step": scalar, "skipped": scalar, "params": params, "opt_state": opt}


def initial_state(run: Run, init: Path) -> dict:
    """Parameters restored straight into their shardings; a fresh optimizer state."""
    from cslm_jax.storage.checkpoint import load_params

    params = load_params(init, shardings=run.layout.param_sh, dtype=jnp.dtype(run.model_cfg.param_dtype))
    opt_state = jax.jit(run.layout.optimizer.init, out_shardings=run.layout.state_sh["opt_state"])(params)
    def zero():      # two buffers: step and skipped are donated separately
        return jax.device_put(jnp.zeros((), jnp.int32), run.layout.state_sh["step"])
    return {"step": zero(), "skipped": zero(), "params": params, "opt_state": opt_state}


def make_train_fn(run: Run):
    """The jit-compiled step: (state, batch [k, b, T]) -> (state, metrics); state donated."""
    from cslm_jax.train.step import make_train_step

    vocab = run.vocab
    step = make_train_step(run.model_cfg, run.layout.optimizer,
                           (vocab.unit_offset, vocab.unit_offset + vocab.unit_count),
                           run.layout.rules, num_tasks=len(run.task_names))
    schedule = run.cfg.optimizer.schedule()

    def train_fn(state, batch):
        params, opt_state, metrics = step(state["params"], state["opt_state"], batch)
        applied = state["step"] - state["skipped"]      # optax counts only applied updates
        metrics["learning_rate"] = schedule(applied)
        new = {"step": state["step"] + 1, "skipped": state["skipped"] + 1 - metrics["finite"],
               "params": params, "opt_state": opt_state}
        return new, metrics

    replicated = NamedSharding(run.layout.mesh, PartitionSpec())
    return jax.jit(train_fn, in_shardings=(run.layout.state_sh, run.layout.batch_sh),
                   out_shardings=(run.layout.state_sh, replicated), donate_argnums=(0,))


def global_batch(run: Run, local: dict) -> dict:
    """Host rows [rows, T] -> global arrays [k, b, T] sharded over the batch axes. Each process
    passes its own rows; together they form the global batch."""
    k = run.cfg.train.accumulation
    out = {}
    for name in ("tokens", "positions", "segment_ids", "targets", "loss_weights", "task_ids"):
        x = np.asarray(local[name], np.int32)
        x = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        # explicit global shape: JAX then checks this process's rows are what its devices hold
        shape = (k, run.cfg.train.global_batch_size // k, *x.shape[2:])
        out[name] = jax.make_array_from_process_local_data(run.layout.batch_sh, x, shape)
    return out


def _row(run: Run, step: int, m: dict, elapsed: float, tokens: int, flops_tok: float,
         peak: float, skipped: int) -> dict:
    row = {"step": step, "loss": float(m["loss"]), "text_loss": float(m["text_loss"]),
           "unit_loss": float(m["unit_loss"]), "learning_rate": float(m["learning_rate"]),
           "grad_norm": float(m["grad_norm"]), "trained_tokens": int(m["tokens_trained"]),
           "text_tokens": int(m["text_tokens"]), "unit_tokens": int(m["unit_tokens"]),
           "step_time_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
           "mfu": flops_tok * tokens / elapsed / (peak * run.layout.mesh.size) if elapsed > 0 else 0.0,
           "skipped_steps": skipped, "finite": bool(m["finite"])}
    for name, loss, count in zip(run.task_names, np.asarray(m["task_loss"]),
                                 np.asarray(m["task_tokens"])):
        if count > 0:
            row[f"loss/{name}"] = float(loss)
    return row


def train(cfg: RunConfig, run_dir: str | Path, init_from: str | Path | None = None,
          log=print, on_step=None, data_shards: int | None = None,
          allow_config_change: bool = False, data_cache: str | None = None) -> int:
    """Run (or resume) one stage; returns an exit code (module docstring). `on_step(step)` is
    called after each step is dispatched (tests use it to deliver signals at a known step).
    `data_shards`: input shards of a new run (default: one per process, see
    cslm_jax.parallel.distributed). With several processes, all of them call this with the same
    arguments and a `run_dir` they all see.

    A resume whose config changes a RESUME_FIXED field is refused (TrainError listing every
    change) unless `allow_config_change`; other changes are logged. config.yaml keeps the config
    the run started with, config.<step>.yaml each changed config from the step it resumed at. A
    new run that fails before its first checkpoint leaves the file system as it was."""
    run_dir = fs.path(run_dir, "--run-dir")
    check_run_dir(run_dir)
    fresh = not has_checkpoint(run_dir)
    before = fs.listdir(run_dir) if run_dir.is_dir() else None
    top = run_dir                     # the topmost folder this call creates
    while not top.parent.exists():
        top = top.parent
    try:
        return _train(cfg, run_dir, init_from, log, on_step, data_shards, allow_config_change,
                      data_cache)
    except BaseException:
        if fresh and not has_checkpoint(run_dir) and jax.process_index() == 0:
            with contextlib.suppress(OSError):
                if before is None:
                    fs.rmtree(top)
                elif run_dir.is_dir():
                    for name in fs.listdir(run_dir) - before:
                        fs.rmtree(run_dir / name)
        raise


def _train(cfg, run_dir: Path, init_from, log, on_step, data_shards, allow_config_change,
           data_cache=None) -> int:
    from cslm_jax.storage.checkpoint import (remove_partial_checkpoints, save_model_checkpoint,
                                     train_checkpoint_manager, train_restore_args, train_save_args)
    from cslm_jax.data.pipeline import BatchIterator
    from cslm_jax.parallel.distributed import ProcessInput, check_shared_dir
    from cslm_jax.model.vocab import load_tokenizer

    run_dir.mkdir(parents=True, exist_ok=True)
    check_shared_dir(run_dir)
    t = cfg.train
    if jax.process_index() == 0:
        for name in remove_partial_checkpoints(run_dir / "checkpoints"):
            log(f"train: removed {run_dir / 'checkpoints' / name}, a save that never committed")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("cslm_jax: partial checkpoints removed")
    manager = train_checkpoint_manager(run_dir / "checkpoints", cfg.checkpoint.every,
                                       cfg.checkpoint.keep, cfg.checkpoint.async_save)
    try:
        if manager.latest_step() is not None:
            _check_resume_config(cfg, run_dir, manager, allow_config_change, log)
        run, latest, init = prepare_run(cfg, run_dir, manager, init_from, log, data_shards,
                                        data_cache)
        if jax.process_index() == 0 and not (run_dir / "config.yaml").exists():
            _write_config(run_dir / "config.yaml", cfg)
        log(f"train: {run.mixture} ({len(run.task_names)} tasks), {run.model_cfg.num_params() / 1e6:.1f}M "
            f"params, mesh {dict(run.layout.mesh.shape)} over {run.layout.mesh.size} {jax.devices()[0].platform} "
            f"device(s), {jax.process_count()} process(es); batch {t.global_batch_size} x "
            f"{run.max_length} = {t.accumulation} x {t.micro_batch_size or t.global_batch_size}; "
            f"{t.steps} steps, checkpoint every {cfg.checkpoint.every} (keep {cfg.checkpoint.keep}); "
            f"{run.data_shards} data shard(s)")
        data = ProcessInput(
            lambda shard, rows: BatchIterator(run.mixture, max_length=run.max_length,
                                              batch_size=rows, seed=cfg.data.seed,
                                              shard_index=shard, num_shards=run.data_shards),
            num_shards=run.data_shards, global_batch=t.global_batch_size,
            accumulation=t.accumulation, process_index=jax.process_index(),
            process_count=jax.process_count())
        with jax.set_mesh(run.layout.mesh):
            if latest is not None:
                restored = manager.restore(latest, args=train_restore_args(abstract_state(run), data))
                state = restored["state"]
                log(f"train: resumed from {run_dir / 'checkpoints' / str(latest)} (step {latest}, "
                    f"data position {data.position} batches)")
            else:
                state = initial_state(run, init)
                log(f"train: initialised from {init}")
            start = int(state["step"])
            if start >= t.steps:
                log(f"train: already at step {start} of {t.steps}")
            train_fn = make_train_fn(run)
            flops_tok = flops_per_token(run.model_cfg, run.max_length)
            peak, peak_src = peak_flops_per_device(t.peak_flops_per_device, run.model_cfg.compute_dtype)
            log(f"train: {flops_tok / 1e6:.1f} MFLOP/token (6N + 12LHDhT); peak "
                f"{peak / 1e12:.3f} TFLOP/s per device ({peak_src})")
            writer = MetricsWriter(run_dir, t.steps, start, t.progress_bar, log)
            # A signal after the last step (the metrics upload, the final model write) is held
            # until the model is written: the run is then finished, and exits 0 saying so.
            with PreemptionFlag() as late:
                code = _loop(run, manager, data, state, train_fn, writer, start, flops_tok,
                             peak, log, on_step, train_save_args)
                writer.close()
                manager.wait_until_finished()
                if code != EXIT_OK:
                    return code
                final = manager.latest_step()
                save_model_checkpoint(run_dir / "model", _final_params(run, manager, final),
                                      run.model_cfg, run.vocab,
                                      load_tokenizer(run_dir / "tokenizer"),
                                      extra=run.source_meta, force=True, owned=True,
                                      tool="train")
            if late.raised:
                log(f"train: {late.signal_name} arrived after the last step; the final model "
                    f"was written first and the run is finished (exit {EXIT_OK})")
            log(f"train: done at step {final}; model checkpoint {run_dir / 'model'} "
                f"(export with `cslm-jax export-hf --ckpt {run_dir / 'model'} --out DIR`)")
            return EXIT_OK
    finally:
        manager.close()


def _write_config(path: Path, cfg: RunConfig) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def _check_resume_config(cfg: RunConfig, run_dir: Path, manager, allow: bool, log) -> None:
    """Compare the config with the latest checkpoint's (see `train`)."""
    from cslm_jax.storage.checkpoint import read_train_config

    latest = manager.latest_step()
    saved = read_train_config(manager, latest).get("run", {})
    fixed, free = config_changes(saved, cfg.to_dict())
    if fixed and not allow:
        raise TrainError(f"{run_dir}: resuming at step {latest} with a config that changes how the "
                         f"run optimises: {'; '.join(fixed)}. Rerun with the run's settings, start "
                         f"a new --run-dir (--init-from {run_dir} takes its parameters), or pass "
                         f"--allow-config-change to resume with these")
    if fixed or free:
        log(f"train: resuming at step {latest} with changed settings: {'; '.join(fixed + free)}"
            f" (kept in {run_dir / f'config.{latest}.yaml'}; config.yaml keeps the first)")
        if jax.process_index() == 0:
            _write_config(run_dir / f"config.{latest}.yaml", cfg)


def _final_params(run: Run, manager, step: int):
    import orbax.checkpoint as ocp

    from cslm_jax.storage.checkpoint import train_restore_args

    restored = manager.restore(step, args=ocp.args.Composite(
        state=train_restore_args(abstract_state(run))["state"]))
    return restored["state"]["params"]


def _loop(run: Run, manager, data, state, train_fn, writer, start, flops_tok, peak, log, on_step,
          save_args) -> int:
    t = run.cfg.train
    tokens_per_step = t.global_batch_size * run.max_length
    config_item = _config_item(run)
    pending = None                # (step, metrics) not yet fetched: fetching waits for the device
    last = time.perf_counter()
    skipped = int(state["skipped"])

    def flush():
        """Fetch the pending step's metrics (blocks until it ran); False if the run must stop."""
        nonlocal pending, last, skipped
        if pending is None:
            return True
        step, m = pending
        pending = None
        m = jax.device_get(m)
        now = time.perf_counter()
        elapsed, last = now - last, now
        go_on = True
        if not m["finite"]:
            skipped += 1
            if t.on_nonfinite == "stop":
                log(f"train: step {step}: loss {float(m['loss'])} / grad norm "
                    f"{float(m['grad_norm'])} is not finite; stopping. Parameters were left as they "
                    f"were before the step; the last checkpoint is intact. Lower the learning rate, "
                    f"check the data, or set train.on_nonfinite=skip.")
                go_on = False
            elif skipped > t.max_skipped_steps:
                log(f"train: step {step}: more than train.max_skipped_steps "
                    f"({t.max_skipped_steps}) non-finite steps skipped; stopping")
                go_on = False
            else:
                log(f"train: step {step}: non-finite loss, update skipped ({skipped} so far)")
        if step % t.log_every == 0 or step == t.steps or not m["finite"]:
            writer.write(_row(run, step, m, elapsed, tokens_per_step, flops_tok, peak, skipped))
        return go_on

    with PreemptionFlag() as preempt:
        for step in range(start + 1, t.steps + 1):
            batch = global_batch(run, next(data))
            state, metrics = train_fn(state, batch)
            if not flush():
                manager.wait_until_finished()
                return EXIT_NONFINITE
            pending = (step, metrics)
            if on_step is not None:
                on_step(step)
            stop = preempt.agreed()
            if stop or step == t.steps or step % run.cfg.checkpoint.every == 0:
                if not flush():           # never checkpoint a step that was not finite
                    manager.wait_until_finished()
                    return EXIT_NONFINITE
                manager.save(step, args=save_args(state, data, config_item), force=True)
            if stop:
                manager.wait_until_finished()
                name = preempt.signal_name or "SIGTERM/SIGINT to another process"
                log(f"train: {name}: checkpoint of step {step} written; exiting with code "
                    f"{EXIT_PREEMPTED}. Run the same command again to resume.")
                return EXIT_PREEMPTED
        if not flush():
            manager.wait_until_finished()
            return EXIT_NONFINITE
    return EXIT_OK
