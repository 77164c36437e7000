"""Everything a training run is built from before its first step, one named step each:

    preflight            the arguments, before TensorFlow starts (run folder, config, init_from,
                         the data config's stage)
    check_resume_config  a resume's config against its checkpoint's (RESUME_FIXED)
    prepare_run          -> start_point   where the model comes from (a checkpoint or init_from)
                         -> train_layout  the mesh and the shardings of the state and the batch
                         -> stage_data    the stage's data: checked, prepared, registered
    abstract_state / initial_state / make_train_fn / global_batch   the state and the step

`cslm_jax.train.loop` runs the steps; `cslm_jax.tpu.aot` compiles the same step for a TPU slice
(`Run`, `train_layout`, `stage_data_config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import NamedSharding, PartitionSpec

from cslm_jax.config import ConfigError, ModelConfig, RunConfig, load_run_config
from cslm_jax.data.formats import check_stage_files, load_data_config
from cslm_jax.errors import CslmError
from cslm_jax.model.llama import param_shardings
from cslm_jax.model.schema import is_spec, param_shapes
from cslm_jax.model.vocab import VocabInfo, load_tokenizer, require_cslm_tokens
from cslm_jax.parallel.distributed import barrier, run_together
from cslm_jax.parallel.sharding import check_batch_split, make_mesh, named_sharding
from cslm_jax.storage import fs
from cslm_jax.storage.checkpoint import (
    is_committed_step,
    load_params,
    read_metadata,
    read_train_config,
    resolve_model_dir,
)
from cslm_jax.storage.outputs import check_output_place
from cslm_jax.train.step import make_optimizer, make_train_step


class TrainError(CslmError):
    """The run cannot start or continue; the message says why and what to do."""


# -- checks before the run starts ------------------------------------------------------------------


def has_checkpoint(run_dir) -> bool:
    """Whether `run_dir` holds a committed training checkpoint (a resume, not a new run)."""
    ckpts = fs.path(run_dir) / "checkpoints"
    return ckpts.is_dir() and any(is_committed_step(p) for p in ckpts.iterdir())


def check_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainError(
            f"--run-dir {run_dir}: is a file, not a folder; give a folder (a new one "
            f"starts a run, an existing run folder resumes it)"
        )


def init_source(cfg: RunConfig, init_from=None) -> tuple[str | Path, str]:
    """(what a new run starts from, the flag or field that named it): --init-from, else the
    config's init_from; TrainError when neither is set."""
    if init_from:
        return init_from, "--init-from"
    if cfg.init_from:
        return cfg.init_from, "init_from"
    raise TrainError(
        "train: nothing to start from: set init_from in the config or pass "
        "--init-from (a checkpoint written by `cslm-jax import-hf`)"
    )


def stage_data_config(cfg: RunConfig, data_cache=None, check_files: bool = True):
    """The data config of the run's stage (`data.max_length` applied); ConfigError when it has no
    stage `data.stage`. With `check_files`, the stage's input files must exist unless the run reads
    a prepared cache (`--data-cache` or the data config's `cache_dir`), which needs none of them."""
    length = cfg.data.max_length
    overrides = [] if length is None else [f"packing.max_length={length}"]
    data_cfg = load_data_config(cfg.data.config, overrides, check_files=False)
    if cfg.data.stage not in data_cfg.stages:
        raise ConfigError(
            f"data.stage is {cfg.data.stage!r}; {cfg.data.config} has stages "
            f"{sorted(data_cfg.stages)}"
        )
    if check_files and data_cache is None and data_cfg.cache_dir is None:
        check_stage_files(data_cfg, cfg.data.stage)  # this stage's files, not every stage's
    return data_cfg


def preflight(config, overrides, run_dir, init_from=None, data_cache=None) -> RunConfig:
    """What `cslm-jax train` checks before TensorFlow starts and before anything is printed or
    written: the run folder, the config (overrides named as such), and for a new run its
    init_from and the data config's stage. Raises CslmError; returns the run config."""
    run_dir = fs.path(run_dir, "--run-dir")
    fs.check_bucket(run_dir, "--run-dir")
    check_run_dir(run_dir)
    cfg = load_run_config(config, overrides)
    check_output_place(
        run_dir,
        flag="--run-dir",
        inside_ok=True,
        inputs=[
            ("--init-from" if init_from else "init_from", init_from or cfg.init_from),
            ("--data-cache", data_cache),
            ("data.config", cfg.data.config),
        ],
    )
    if not has_checkpoint(run_dir) and (run_dir / "model").exists():
        raise TrainError(
            f"--run-dir {run_dir}: holds model/ but no checkpoint, so it is no run "
            f"to resume, and a new run would replace model/ when it ends; give "
            f"another --run-dir (nothing was written)"
        )
    if not has_checkpoint(run_dir):
        resolve_model_dir(*init_source(cfg, init_from))
    stage_data_config(cfg, data_cache)
    return cfg


# -- a resume's config ----------------------------------------------------------------------------

# Fields of a run config that change how an existing run optimises: a resume that changes one is
# refused unless allowed (--allow-config-change). Every other field may change (shown on resume).
RESUME_FIXED = (
    "optimizer",
    "train.steps",
    "train.global_batch_size",
    "train.micro_batch_size",
    "data",
    "model",
)
RESUME_IGNORED = ("path", "optimizer.total_steps")  # informational / follows train.steps


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


def write_config(path: Path, cfg: RunConfig) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))


def check_resume_config(cfg: RunConfig, run_dir: Path, manager, allow: bool, log) -> None:
    """A resume whose config changes a RESUME_FIXED field is refused (TrainError listing every
    change) unless `allow`; other changes are logged and kept in config.<step>.yaml."""
    latest = manager.latest_step()
    saved = read_train_config(manager, latest).get("run", {})
    fixed, free = config_changes(saved, cfg.to_dict())
    if fixed and not allow:
        raise TrainError(
            f"{run_dir}: resuming at step {latest} with a config that changes how the "
            f"run optimises: {'; '.join(fixed)}. Rerun with the run's settings, start "
            f"a new --run-dir (--init-from {run_dir} takes its parameters), or pass "
            f"--allow-config-change to resume with these"
        )
    if fixed or free:
        log(
            f"train: resuming at step {latest} with changed settings: {'; '.join(fixed + free)}"
            f" (kept in {run_dir / f'config.{latest}.yaml'}; config.yaml keeps the first)"
        )
        if jax.process_index() == 0:
            write_config(run_dir / f"config.{latest}.yaml", cfg)


# -- the run: where it starts, its layout, its data ------------------------------------------------


@dataclasses.dataclass
class Layout:
    """Where the train state and batches live: mesh, shardings, optimizer."""

    mesh: object
    rules: dict | None
    param_sh: dict
    state_sh: dict
    batch_sh: NamedSharding
    optimizer: object


@dataclasses.dataclass
class Run:
    """Everything a training run holds besides its state (built by `prepare_run`)."""

    cfg: RunConfig
    run_dir: Path
    model_cfg: ModelConfig
    vocab: VocabInfo
    source_meta: dict
    layout: Layout  # mesh, shardings, optimizer
    task_names: list
    mixture: str
    max_length: int
    data_shards: int = 1  # input shards (cslm_jax.parallel.distributed); fixed for the whole run

    def config_item(self) -> dict:
        """The checkpoints' `config` item."""
        return {
            "run": self.cfg.to_dict(),
            "model": self.model_cfg.to_dict(),
            "vocab": self.vocab.to_dict(),
            "source": self.source_meta,
            "data_shards": self.data_shards,
        }


@dataclasses.dataclass
class StartPoint:
    """Where a run's model comes from: its latest checkpoint (a resume) or `init` (a new run)."""

    model_cfg: ModelConfig
    vocab: VocabInfo
    source_meta: dict
    data_shards: int | None  # a resume's count (fixed when the run started); None: choose
    init: Path | None = None  # the model checkpoint a new run starts from


def resumed_start(
    cfg: RunConfig, run_dir: Path, manager, latest: int, init_from, log, data_shards: int | None
) -> StartPoint:
    """The model, vocabulary and data shard count that checkpoint `latest` was written with."""
    saved = read_train_config(manager, latest)
    where = f"{run_dir} checkpoint {latest}"
    model_cfg = ModelConfig.from_dict(saved["model"], where=where).replace(**cfg.model)
    vocab = VocabInfo.from_dict(saved["vocab"], where=where)
    if init_from or cfg.init_from:
        log(f"train: resuming {run_dir} from step {latest}; init_from is not used")
    saved_shards = int(saved.get("data_shards", jax.process_count()))
    if data_shards is not None and data_shards != saved_shards:
        raise TrainError(
            f"{run_dir}: the run reads {saved_shards} data shard(s) (fixed when "
            f"it started); drop --data-shards {data_shards} to resume it"
        )
    return StartPoint(model_cfg, vocab, saved.get("source", {}), saved_shards)


def new_start(cfg: RunConfig, run_dir: Path, init_from, data_shards: int | None) -> StartPoint:
    """The model checkpoint a new run starts from; its tokenizer is copied into the run folder."""
    init = resolve_model_dir(*init_source(cfg, init_from))
    meta, model_cfg, vocab = read_metadata(init)
    model_cfg = model_cfg.replace(**cfg.model)
    source_meta = {k: v for k, v in meta.items() if k not in ("format", "model", "vocab")}
    source_meta["init_from"] = str(init)
    if jax.process_index() == 0 and not (run_dir / "tokenizer").is_dir():
        if not (init / "tokenizer").is_dir():
            raise TrainError(f"{init}/tokenizer: missing; the checkpoint carries no tokenizer")
        fs.copytree(init / "tokenizer", run_dir / "tokenizer")
    barrier("cslm_jax: tokenizer copied into the run folder")
    return StartPoint(model_cfg, vocab, source_meta, data_shards, init)


def start_point(
    cfg: RunConfig,
    run_dir: Path,
    manager,
    init_from=None,
    log=print,
    data_shards: int | None = None,
) -> StartPoint:
    latest = manager.latest_step()
    start = (
        new_start(cfg, run_dir, init_from, data_shards)
        if latest is None
        else resumed_start(cfg, run_dir, manager, latest, init_from, log, data_shards)
    )
    if start.vocab.unit_count == 0:
        raise TrainError(
            f"{start.init or run_dir}: the vocabulary has no speech units; import the "
            f"base model with `cslm-jax import-hf --speech-units N`"
        )
    return start


def opt_state_shardings(abstract_opt_state, params_sharding: dict, params_shape: dict, mesh):
    """Optimizer-state leaves shaped like a parameter (Adam's mu and nu) share its sharding;
    everything else (counts) is replicated. Matched by the trailing dict keys of the leaf's path."""

    def keys(path) -> tuple:
        return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))

    flat_sh = {keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_sharding)[0]}
    flat_shape = {
        keys(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(params_shape)[0]
    }
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        leaf_keys = keys(path)
        for n in range(len(leaf_keys)):
            tail = leaf_keys[n:]
            if tail in flat_sh and flat_shape[tail] == tuple(leaf.shape):
                return flat_sh[tail]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def run_devices(cfg: RunConfig) -> list:
    """The devices the run uses: all of them, or the first `train.num_devices`."""
    devices = jax.devices()
    wanted = cfg.train.num_devices
    if wanted is not None:
        if wanted > len(devices):
            raise ConfigError(
                f"train.num_devices is {wanted} but only {len(devices)} devices exist"
            )
        devices = devices[:wanted]
    return devices


def train_layout(cfg: RunConfig, model_cfg: ModelConfig, devices, process_count: int) -> Layout:
    """The mesh over `devices` (config `mesh`) and the shardings of the state and the batch.
    Raises ConfigError when the mesh does not fit the devices or the batch does not split."""
    t = cfg.train
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.sharding_rules
    check_batch_split(t.micro_batch_size or t.global_batch_size, mesh.shape)
    if t.global_batch_size % process_count:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"the process count ({process_count})"
        )

    param_sh = param_shardings(model_cfg, mesh, rules)
    pdtype = jnp.dtype(model_cfg.param_dtype)
    abstract_params = jax.tree.map(
        lambda spec: jax.ShapeDtypeStruct(spec[0], pdtype), param_shapes(model_cfg), is_leaf=is_spec
    )
    optimizer = make_optimizer(cfg.optimizer)
    opt_sh = opt_state_shardings(
        jax.eval_shape(optimizer.init, abstract_params), param_sh, abstract_params, mesh
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = {"step": replicated, "skipped": replicated, "params": param_sh, "opt_state": opt_sh}
    batch_sh = named_sharding(mesh, (None, "batch", "length"), rules, what="batch")
    return Layout(mesh, rules, param_sh, state_sh, batch_sh, optimizer)


@dataclasses.dataclass
class StageData:
    """The stage's examples as the pipeline reads them."""

    mixture: str  # the registered SeqIO mixture
    task_names: list
    max_length: int


def stage_data(cfg: RunConfig, run_dir: Path, data_cache=None, log=print) -> StageData:
    """The stage's data config checked against the run's tokenizer; without a prepared cache
    (`data_cache`, or the data config's `cache_dir`) process 0 prepares the stage in-process
    first and the others wait, then read what it wrote; the stage's mixture registered."""
    # seqio and TensorFlow: imported only once the run starts (preflight runs before them)
    from cslm_jax.tasks.cslm import prepare_stage, register

    data_cfg = stage_data_config(cfg, data_cache)
    tokenizer_dir = fs.local_dir(run_dir / "tokenizer", "tokenizer folder")  # gs://: staged once
    require_cslm_tokens(
        load_tokenizer(tokenizer_dir),
        str(run_dir / "tokenizer"),
        data_cfg.format.unit_count,
        f"format.unit_count of the data config {cfg.data.config}",
    )
    if data_cache is None:  # every process stops if process 0 cannot
        run_together(
            lambda: prepare_stage(data_cfg, tokenizer_dir, cfg.data.stage),
            TrainError("process 0 could not prepare the data (its error says why)"),
            only_primary=True,
        )
    [mixture] = register(data_cfg, tokenizer_dir, stages=[cfg.data.stage], cache_dir=data_cache)
    task_names = [s.name for s in data_cfg.tasks(cfg.data.stage)]
    if data_cache is not None or data_cfg.cache_dir is not None:
        log(
            f"train: reading the prepared cache {data_cache or data_cfg.cache_dir} (stage "
            f"{cfg.data.stage}: {len(task_names)} task(s), max_length {data_cfg.max_length}; "
            f"checked against the data config, tokenizer and input files)"
        )
    return StageData(mixture, task_names, data_cfg.max_length)


def prepare_run(
    cfg: RunConfig,
    run_dir: Path,
    manager,
    init_from=None,
    log=print,
    data_shards: int | None = None,
    data_cache: str | None = None,
) -> tuple[Run, int | None, Path | None]:
    """Where the run starts (its latest checkpoint, else init_from), its mesh and shardings, its
    data. Returns (run, step to resume from or None, init checkpoint or None).
    `data_shards`: input shards of a new run (default: one per process); a resumed run keeps
    its checkpoint's count. `data_cache`: a cache written by `cslm-jax prepare-data` (default:
    the data config's `cache_dir`; see `stage_data`)."""
    latest = manager.latest_step()
    start = start_point(cfg, run_dir, manager, init_from, log, data_shards)
    layout = train_layout(cfg, start.model_cfg, run_devices(cfg), jax.process_count())
    data = stage_data(cfg, run_dir, data_cache, log)
    shards = jax.process_count() if start.data_shards is None else int(start.data_shards)
    run = Run(
        cfg,
        run_dir,
        start.model_cfg,
        start.vocab,
        start.source_meta,
        layout,
        data.task_names,
        data.mixture,
        data.max_length,
        shards,
    )
    return run, latest, start.init


# -- the state and the step ------------------------------------------------------------------------


def abstract_state(run: Run):
    pdtype = jnp.dtype(run.model_cfg.param_dtype)
    params = jax.tree.map(
        lambda spec, sh: jax.ShapeDtypeStruct(spec[0], pdtype, sharding=sh),
        param_shapes(run.model_cfg),
        run.layout.param_sh,
        is_leaf=is_spec,
    )
    opt = jax.eval_shape(run.layout.optimizer.init, params)
    opt = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        opt,
        run.layout.state_sh["opt_state"],
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=run.layout.state_sh["step"])
    return {"step": scalar, "skipped": scalar, "params": params, "opt_state": opt}


def initial_state(run: Run, init: Path) -> dict:
    """Parameters restored straight into their shardings; a fresh optimizer state."""
    params = load_params(
        init, shardings=run.layout.param_sh, dtype=jnp.dtype(run.model_cfg.param_dtype)
    )
    opt_state = jax.jit(run.layout.optimizer.init, out_shardings=run.layout.state_sh["opt_state"])(
        params
    )

    def zero():  # two buffers: step and skipped are donated separately
        return jax.device_put(jnp.zeros((), jnp.int32), run.layout.state_sh["step"])

    return {"step": zero(), "skipped": zero(), "params": params, "opt_state": opt_state}


def make_train_fn(run: Run):
    """The jit-compiled step: (state, batch [k, b, T]) -> (state, metrics); state donated."""
    vocab = run.vocab
    step = make_train_step(
        run.model_cfg,
        run.layout.optimizer,
        (vocab.unit_offset, vocab.unit_offset + vocab.unit_count),
        run.layout.rules,
        num_tasks=len(run.task_names),
    )
    schedule = run.cfg.optimizer.schedule()

    def train_fn(state, batch):
        params, opt_state, metrics = step(state["params"], state["opt_state"], batch)
        applied = state["step"] - state["skipped"]  # optax counts only applied updates
        metrics["learning_rate"] = schedule(applied)
        new = {
            "step": state["step"] + 1,
            "skipped": state["skipped"] + 1 - metrics["finite"],
            "params": params,
            "opt_state": opt_state,
        }
        return new, metrics

    replicated = NamedSharding(run.layout.mesh, PartitionSpec())
    return jax.jit(
        train_fn,
        in_shardings=(run.layout.state_sh, run.layout.batch_sh),
        out_shardings=(run.layout.state_sh, replicated),
        donate_argnums=(0,),
    )


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
