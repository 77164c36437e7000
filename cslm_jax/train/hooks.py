"""What the training loop does besides stepping, as hooks that decide their own frequency (the
idea of levanter's trainer hooks): checkpoints, metrics, non-finite steps, preemption.

A hook has `due(info)` (default: every `every`-th step and the run's last step) and
`__call__(info)`, which returns None to go on or an exit code to stop the run. The loop
(`cslm_jax.train.loop.run_steps`) has two kinds:

- step hooks run right after a step is dispatched and see the state it produced
  (`info.state`, device arrays): preemption, checkpoints, callbacks. Every due hook of a step
  runs, and a hook sees in `info.stop` the code an earlier one stopped the run with (a
  preemption makes the checkpoint due). A step hook with `needs_metrics` runs only once that
  step's metrics hooks ran, and not at all if they stop the run (a checkpoint never saves a
  non-finite step).
- metrics hooks see a step's metrics on the host (`info.metrics`). The loop fetches them one
  step late, after the next step is dispatched, so the host never waits for the device while
  it could be feeding it.
"""

from __future__ import annotations

import dataclasses

from cslm_jax.train.metrics import MetricsWriter
from cslm_jax.train.preemption import PreemptionFlag

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: temporary failure, run again to resume


@dataclasses.dataclass
class StepInfo:
    """What a hook sees of a step."""

    step: int  # the step that ran (1-based: the state after it is at step)
    last_step: int  # the run's final step (train.steps)
    state: dict | None = None  # step hooks: the train state after the step (device arrays)
    metrics: dict | None = None  # metrics hooks: the step's metrics on the host
    elapsed: float = 0.0  # metrics hooks: seconds since the previous step's metrics
    skipped: int = 0  # metrics hooks: non-finite steps so far, this one included
    stop: int | None = None  # the exit code an earlier hook of this step stopped the run with


class Hook:
    """Runs after every `every`-th step and after the last one (override `due` for another
    rule). `needs_metrics`: a step hook that must not run before its step's metrics hooks."""

    every: int = 1
    needs_metrics: bool = False

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or info.step == info.last_step

    def __call__(self, info: StepInfo) -> int | None:
        raise NotImplementedError


class Callback(Hook):
    """`fn(step)` after every step (`train(on_step=...)`: tests deliver signals at a known step)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, info: StepInfo) -> None:
        self.fn(info.step)


class Preemption(Hook):
    """Stops the run (EXIT_PREEMPTED) once SIGTERM or Ctrl-C reached any process; every process
    asks every step, so all stop at the same one (and the checkpoint hook saves it)."""

    def __init__(self, flag: PreemptionFlag):
        self.flag = flag

    def __call__(self, info: StepInfo) -> int | None:
        return EXIT_PREEMPTED if self.flag.agreed() else None


class Checkpoint(Hook):
    """An Orbax checkpoint every `every` steps, of the last step, and of a step the run stops at
    (preemption). `save_args(state)`: the manager's args for that state."""

    needs_metrics = True  # never checkpoint a step that was not finite

    def __init__(self, manager, every: int, save_args):
        self.manager, self.every, self.save_args = manager, every, save_args

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or info.stop is not None

    def __call__(self, info: StepInfo) -> None:
        self.manager.save(info.step, args=self.save_args(info.state), force=True)


class NonFinite(Hook):
    """A step whose loss or gradient is not finite (its update was not applied: the step
    function keeps the parameters): stops the run (`train.on_nonfinite: stop`, or more than
    `max_skipped` such steps) or goes on past it (`skip`)."""

    def __init__(self, policy: str, max_skipped: int, log=print):
        self.policy, self.max_skipped, self.log = policy, max_skipped, log

    def due(self, info: StepInfo) -> bool:
        return not info.metrics["finite"]

    def __call__(self, info: StepInfo) -> int | None:
        m = info.metrics
        if self.policy == "stop":
            self.log(
                f"train: step {info.step}: loss {float(m['loss'])} / grad norm "
                f"{float(m['grad_norm'])} is not finite; stopping. Parameters were left as "
                f"they were before the step; the last checkpoint is intact. Lower the "
                f"learning rate, check the data, or set train.on_nonfinite=skip."
            )
            return EXIT_NONFINITE
        if info.skipped > self.max_skipped:
            self.log(
                f"train: step {info.step}: more than train.max_skipped_steps "
                f"({self.max_skipped}) non-finite steps skipped; stopping"
            )
            return EXIT_NONFINITE
        self.log(
            f"train: step {info.step}: non-finite loss, update skipped ({info.skipped} so far)"
        )
        return None


class LogMetrics(Hook):
    """A row of metrics (`row(info)`) to metrics.jsonl, TensorBoard and the progress bar every
    `every` steps, at the last step and at every non-finite step."""

    def __init__(self, writer: MetricsWriter, every: int, row):
        self.writer, self.every, self.row = writer, every, row

    def due(self, info: StepInfo) -> bool:
        return super().due(info) or not info.metrics["finite"]

    def __call__(self, info: StepInfo) -> None:
        self.writer.write(self.row(info))
