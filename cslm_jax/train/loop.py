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
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cslm_jax.config import RunConfig
from cslm_jax.model.vocab import load_tokenizer
from cslm_jax.parallel.distributed import ProcessInput, check_shared_dir
from cslm_jax.storage import checkpoint, fs
from cslm_jax.train.hooks import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    Callback,
    Checkpoint,
    Hook,
    LogMetrics,
    NonFinite,
    Preemption,
    StepInfo,
)
from cslm_jax.train.metrics import (
    MetricsWriter,
    flops_per_token,
    metrics_row,
    peak_flops_per_device,
)
from cslm_jax.train.preemption import PreemptionFlag
from cslm_jax.train.setup import (
    Run,
    TrainError,
    abstract_state,
    check_resume_config,
    check_run_dir,
    global_batch,
    has_checkpoint,
    initial_state,
    make_train_fn,
    preflight,
    prepare_run,
    write_config,
)

# the command's interface: exit codes, its error, its checks (cslm_jax.cli.train)
__all__ = [
    "EXIT_NONFINITE",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "TrainError",
    "preflight",
    "train",
    "run_steps",
    "LoopState",
]


# -- the loop --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopState:
    """What the loop carries from one step to the next."""

    state: dict  # the train state (device arrays, donated to each step)
    skipped: int  # non-finite steps so far
    step: int = 0  # the last step dispatched
    pending: tuple[int, dict] | None = None  # (step, device metrics) whose hooks have not run
    fetched_at: float = dataclasses.field(default_factory=time.perf_counter)


def run_steps(
    loop: LoopState,
    steps: Sequence[int],
    *,
    last_step: int,
    next_batch: Callable[[], dict],
    step_fn,
    hooks: Sequence[Hook] = (),
    metrics_hooks: Sequence[Hook] = (),
) -> int:
    """The training loop: for each step, its batch -> `step_fn` (dispatched: the device runs
    it) -> the metrics hooks of the step before (`cslm_jax.train.hooks`) -> this step's due
    hooks. Returns the exit code a hook stopped the run with, or EXIT_OK after the last step."""
    for step in steps:
        loop.state, metrics = step_fn(loop.state, next_batch())
        loop.step = step
        code = run_metrics_hooks(loop, last_step, metrics_hooks)  # the step before's
        if code is not None:
            return code
        loop.pending = (step, metrics)
        info = StepInfo(step, last_step, state=loop.state)
        for hook in hooks:
            if not hook.due(info):
                continue
            if hook.needs_metrics:
                code = run_metrics_hooks(loop, last_step, metrics_hooks)
                if code is not None:
                    return code
            code = hook(info)
            if info.stop is None:
                info.stop = code
        if info.stop is not None:
            return info.stop
    code = run_metrics_hooks(loop, last_step, metrics_hooks)
    return EXIT_OK if code is None else code


def run_metrics_hooks(loop: LoopState, last_step: int, hooks: Sequence[Hook]) -> int | None:
    """The due metrics hooks of the pending step, if any: fetching its metrics waits for the
    device to finish it. Returns the exit code one of them stopped the run with, else None."""
    if loop.pending is None:
        return None
    step, metrics = loop.pending
    loop.pending = None
    metrics = jax.device_get(metrics)
    now = time.perf_counter()
    elapsed, loop.fetched_at = now - loop.fetched_at, now
    if not metrics["finite"]:
        loop.skipped += 1
    info = StepInfo(step, last_step, metrics=metrics, elapsed=elapsed, skipped=loop.skipped)
    for hook in hooks:
        if hook.due(info):
            code = hook(info)
            if info.stop is None:
                info.stop = code
    return info.stop


# -- the command -----------------------------------------------------------------------------------


def train(
    cfg: RunConfig,
    run_dir: str | Path,
    init_from: str | Path | None = None,
    log=print,
    on_step=None,
    data_shards: int | None = None,
    allow_config_change: bool = False,
    data_cache: str | None = None,
    hooks: Sequence[Hook] = (),
) -> int:
    """Run (or resume) one stage; returns an exit code (module docstring). `on_step(step)` is
    called after each step is dispatched (tests use it to deliver signals at a known step);
    `hooks`: more step hooks (`cslm_jax.train.hooks.Hook`), run after each step they are due at,
    before the preemption check and the checkpoint. `data_shards`: input shards of a new run
    (default: one per process, see cslm_jax.parallel.distributed). With several processes, all
    of them call this with the same arguments and a `run_dir` they all see.

    A resume whose config changes a RESUME_FIXED field is refused (TrainError listing every
    change) unless `allow_config_change`; other changes are logged. config.yaml keeps the config
    the run started with, config.<step>.yaml each changed config from the step it resumed at. A
    new run that fails before its first checkpoint leaves the file system as it was."""
    run_dir = fs.path(run_dir, "--run-dir")
    check_run_dir(run_dir)
    fresh = not has_checkpoint(run_dir)
    before = fs.listdir(run_dir) if run_dir.is_dir() else None
    top = run_dir  # the topmost folder this call creates
    while not top.parent.exists():
        top = top.parent
    extra = [*hooks, *([Callback(on_step)] if on_step is not None else [])]
    try:
        return _train(
            cfg, run_dir, init_from, log, extra, data_shards, allow_config_change, data_cache
        )
    except BaseException:
        if fresh and not has_checkpoint(run_dir) and jax.process_index() == 0:
            with contextlib.suppress(OSError):
                if before is None:
                    fs.rmtree(top)
                elif run_dir.is_dir():
                    for name in fs.listdir(run_dir) - before:
                        fs.rmtree(run_dir / name)
        raise


def _train(
    cfg: RunConfig,
    run_dir: Path,
    init_from,
    log,
    extra_hooks,
    data_shards,
    allow_config_change,
    data_cache,
) -> int:
    manager = open_run_dir(cfg, run_dir, log)
    try:
        if manager.latest_step() is not None:
            check_resume_config(cfg, run_dir, manager, allow_config_change, log)
        run, latest, init = prepare_run(
            cfg, run_dir, manager, init_from, log, data_shards, data_cache
        )
        if jax.process_index() == 0 and not (run_dir / "config.yaml").exists():
            write_config(run_dir / "config.yaml", cfg)
        log_summary(run, log)
        data = process_input(run)
        with jax.set_mesh(run.layout.mesh):
            state = restore_or_init(run, manager, data, latest, init, log)
            # A signal after the last step (the metrics upload, the final model write) is held
            # until the model is written: the run is then finished, and exits 0 saying so.
            with PreemptionFlag() as late:
                code = train_steps(run, manager, data, state, extra_hooks, log)
                if code != EXIT_OK:
                    return code
                final = write_model(run, manager)
            if late.raised:
                log(
                    f"train: {late.signal_name} arrived after the last step; the final model "
                    f"was written first and the run is finished (exit {EXIT_OK})"
                )
            log(
                f"train: done at step {final}; model checkpoint {run_dir / 'model'} "
                f"(export with `cslm-jax export-hf --ckpt {run_dir / 'model'} --out DIR`)"
            )
            return EXIT_OK
    finally:
        manager.close()


def open_run_dir(cfg: RunConfig, run_dir: Path, log):
    """The run folder, shared by every process, cleared of saves that never committed; its
    checkpoint manager."""
    run_dir.mkdir(parents=True, exist_ok=True)
    check_shared_dir(run_dir)
    if jax.process_index() == 0:
        for name in checkpoint.remove_partial_checkpoints(run_dir / "checkpoints"):
            log(f"train: removed {run_dir / 'checkpoints' / name}, a save that never committed")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("cslm_jax: partial checkpoints removed")
    c = cfg.checkpoint
    return checkpoint.train_checkpoint_manager(
        run_dir / "checkpoints", c.every, c.keep, c.async_save
    )


def log_summary(run: Run, log) -> None:
    """One line: the mixture, model size, mesh, processes, batch, steps, checkpoints, shards."""
    t, mesh = run.cfg.train, run.layout.mesh
    log(
        f"train: {run.mixture} ({len(run.task_names)} tasks), "
        f"{run.model_cfg.num_params() / 1e6:.1f}M params, mesh {dict(mesh.shape)} over "
        f"{mesh.size} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
        f"batch {t.global_batch_size} x {run.max_length} = {t.accumulation} x "
        f"{t.micro_batch_size or t.global_batch_size}; "
        f"{t.steps} steps, checkpoint every {run.cfg.checkpoint.every} (keep "
        f"{run.cfg.checkpoint.keep}); {run.data_shards} data shard(s)"
    )


def process_input(run: Run) -> ProcessInput:
    """This process's rows of every global batch, from its data shards."""
    # seqio and TensorFlow: imported only once the run starts (preflight runs before them)
    from cslm_jax.data.pipeline import BatchIterator

    t = run.cfg.train
    return ProcessInput(
        lambda shard, rows: BatchIterator(
            run.mixture,
            max_length=run.max_length,
            batch_size=rows,
            seed=run.cfg.data.seed,
            shard_index=shard,
            num_shards=run.data_shards,
        ),
        num_shards=run.data_shards,
        global_batch=t.global_batch_size,
        accumulation=t.accumulation,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def restore_or_init(
    run: Run, manager, data: ProcessInput, latest: int | None, init: Path | None, log
) -> dict:
    """The train state: checkpoint `latest` (and the data position into `data`), else the
    parameters of `init` with a fresh optimizer state."""
    if latest is None:
        state = initial_state(run, init)
        log(f"train: initialised from {init}")
        return state
    args = checkpoint.train_restore_args(abstract_state(run), data)
    state = manager.restore(latest, args=args)["state"]
    log(
        f"train: resumed from {run.run_dir / 'checkpoints' / str(latest)} (step {latest}, "
        f"data position {data.position} batches)"
    )
    return state


def train_steps(run: Run, manager, data: ProcessInput, state: dict, extra_hooks, log) -> int:
    """The steps left, with the run's hooks; returns the exit code once the last checkpoint
    committed and the metrics are closed."""
    t = run.cfg.train
    start = int(state["step"])
    if start >= t.steps:
        log(f"train: already at step {start} of {t.steps}")
    train_fn = make_train_fn(run)
    flops_tok = flops_per_token(run.model_cfg, run.max_length)
    peak, peak_src = peak_flops_per_device(t.peak_flops_per_device, run.model_cfg.compute_dtype)
    log(
        f"train: {flops_tok / 1e6:.1f} MFLOP/token (6N + 12LHDhT); peak "
        f"{peak / 1e12:.3f} TFLOP/s per device ({peak_src})"
    )
    writer = MetricsWriter(run.run_dir, t.steps, start, t.progress_bar, log)
    tokens = t.global_batch_size * run.max_length

    def row(info: StepInfo) -> dict:
        return metrics_row(
            info.step,
            info.metrics,
            info.elapsed,
            info.skipped,
            run.task_names,
            tokens,
            flops_tok,
            peak,
            run.layout.mesh.size,
        )

    config_item = run.config_item()
    metrics_hooks = [
        NonFinite(t.on_nonfinite, t.max_skipped_steps, log),
        LogMetrics(writer, t.log_every, row),
    ]
    with PreemptionFlag() as preempt:
        hooks = [
            *extra_hooks,
            Preemption(preempt),
            Checkpoint(
                manager,
                run.cfg.checkpoint.every,
                lambda state: checkpoint.train_save_args(state, data, config_item),
            ),
        ]
        loop = LoopState(state, skipped=int(state["skipped"]), step=start)
        code = run_steps(
            loop,
            range(start + 1, t.steps + 1),
            last_step=t.steps,
            next_batch=lambda: global_batch(run, next(data)),
            step_fn=train_fn,
            hooks=hooks,
            metrics_hooks=metrics_hooks,
        )
        manager.wait_until_finished()
        if code == EXIT_PREEMPTED:
            name = preempt.signal_name or "SIGTERM/SIGINT to another process"
            log(
                f"train: {name}: checkpoint of step {loop.step} written; exiting "
                f"with code {EXIT_PREEMPTED}. Run the same command again to resume."
            )
    writer.close()
    return code


def write_model(run: Run, manager) -> int:
    """The last checkpoint's parameters as RUN_DIR/model/ (a model checkpoint); its step."""
    final = manager.latest_step()
    restored = manager.restore(
        final,
        args=ocp.args.Composite(state=checkpoint.train_restore_args(abstract_state(run))["state"]),
    )
    checkpoint.save_model_checkpoint(
        run.run_dir / "model",
        restored["state"]["params"],
        run.model_cfg,
        run.vocab,
        load_tokenizer(run.run_dir / "tokenizer"),
        extra=run.source_meta,
        force=True,
        owned=True,
        tool="train",
    )
    return final
