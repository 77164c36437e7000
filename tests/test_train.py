"""`cslm-jax train` end to end on the demo corpus: meshes agree with one device, SIGTERM + resume
reproduces an uninterrupted run, checkpoints move between meshes, a SIGKILL mid-save loses
nothing complete, non-finite losses stop (or skip) cleanly, and stage 2 starts from stage 1."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cslm_jax.config import ConfigError, load_run_config
from cslm_jax.storage.checkpoint import CheckpointError
from cslm_jax.train.loop import (
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_PREEMPTED,
    TrainError,
    abstract_state,
    global_batch,
    initial_state,
    make_train_fn,
    prepare_run,
    train,
)
from cslm_jax.train.metrics import flops_per_token

REPO = Path(__file__).resolve().parents[1]


def run_cfg(demo, base_ckpt, *overrides):
    data_dir, _ = demo
    return load_run_config(
        REPO / "configs" / "demo.yaml",
        [
            f"init_from={base_ckpt}",
            f"data.config={data_dir / 'data.yaml'}",
            "data.max_length=128",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.log_every=1",
            "train.progress_bar=false",
            "optimizer.learning_rate=1e-2",
            "train.steps=8",
            "checkpoint.every=3",
            "checkpoint.keep=5",
            *overrides,
        ],
    )


def losses(run_dir):
    """(steps, losses) of a run folder's metrics.jsonl (local or gs://)."""
    from cslm_jax.storage import fs

    rows = [
        json.loads(line) for line in (fs.path(run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    return [r["step"] for r in rows], np.array([r["loss"] for r in rows])


def model_params(run_dir):
    from cslm_jax.storage import fs
    from cslm_jax.storage.checkpoint import load_params

    return load_params(fs.path(run_dir) / "model")


def quiet(*_):
    pass


# -- the step on every mesh equals the single-device step -----------------------------------------


def one_step(demo, base_ckpt, tmp_path, mesh, num_devices, batch):
    from cslm_jax.storage.checkpoint import train_checkpoint_manager

    cfg = run_cfg(
        demo,
        base_ckpt,
        f"train.num_devices={num_devices}",
        "train.global_batch_size=16",
        "train.micro_batch_size=8",
        *[f"mesh.{k}={v}" for k, v in mesh.items()],
    )
    run_dir = tmp_path / f"mesh_{num_devices}_{'_'.join(map(str, mesh.values()))}"
    manager = train_checkpoint_manager(run_dir / "checkpoints", 3, 1)
    run, _, init = prepare_run(cfg, run_dir, manager, log=quiet)
    with jax.set_mesh(run.layout.mesh):
        state = initial_state(run, init)
        step = make_train_fn(run)
        metrics = []
        for _ in range(2):
            state, m = step(state, global_batch(run, batch))
            metrics.append(jax.device_get(m))
        params = jax.device_get(state["params"])
        specs = {k: v.sharding.spec for k, v in state["params"]["layers"].items()}
    manager.close()
    return metrics, params, specs


def test_step_on_meshes_equals_single_device(demo, base_ckpt, tmp_path):
    from cslm_jax.data.formats import load_data_config
    from cslm_jax.data.pipeline import BatchIterator
    from cslm_jax.tasks.cslm import register

    data_dir, tok_dir = demo
    # assistant_only: with the reference mask every example's identical system block trains too,
    # and Adam's first step turns the reduction-order noise of those many coherent float32
    # gradient terms into weight differences up to 3e-4 (measured), which would hide the ~1e-2
    # of a sharding error less clearly than this batch does
    data_cfg = load_data_config(
        data_dir / "data.yaml", ["packing.max_length=128", "format.loss_mask=assistant_only"]
    )
    [mixture] = register(data_cfg, tok_dir, stages=["pretrain"])
    batch = next(BatchIterator(mixture, max_length=128, batch_size=16, seed=5))
    assert batch["loss_weights"].sum() > 50

    ref_m, ref_p, _ = one_step(
        demo, base_ckpt, tmp_path, {"data": 1, "fsdp": 1, "tensor": 1}, 1, batch
    )
    for mesh in (
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
    ):
        m, p, specs = one_step(demo, base_ckpt, tmp_path, mesh, 8, batch)
        if mesh["fsdp"] > 1:
            assert "fsdp" in str(specs["gate_proj"])  # really sharded, not replicated
        for a, b in zip(ref_m, m):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-6)
            np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=2e-5)
            np.testing.assert_allclose(a["task_loss"], b["task_loss"], rtol=2e-5)
        # Adam divides by sqrt(v): an embedding row of a token seen once has a near-zero
        # gradient whose last bits follow the reduction order, so a few such weights move by
        # ~1e-5 more or less; a real sharding error moves weights by ~lr = 1e-2.
        for x, y in zip(jax.tree.leaves(ref_p), jax.tree.leaves(p)):
            np.testing.assert_allclose(x, y, atol=1e-4)


# -- preemption: SIGTERM, checkpoint, exit 75, automatic resume -----------------------------------


def test_sigterm_and_resume_reproduce_an_uninterrupted_run(demo, base_ckpt, tmp_path):
    cfg = run_cfg(demo, base_ckpt, "train.num_devices=2")
    assert train(cfg, tmp_path / "straight", log=quiet) == EXIT_OK
    steps, straight = losses(tmp_path / "straight")
    assert steps == list(range(1, 9))
    assert straight[-1] < straight[0] - 0.5  # it learns

    def sigterm_at_4(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = tmp_path / "interrupted"
    assert train(cfg, interrupted, log=quiet, on_step=sigterm_at_4) == EXIT_PREEMPTED
    assert sorted(int(p.name) for p in (interrupted / "checkpoints").iterdir()) == [3, 4]
    assert not (interrupted / "model").exists()
    assert losses(interrupted)[0] == [1, 2, 3, 4]
    # the same command again resumes from step 4 (data position included) and finishes
    assert train(cfg, interrupted, log=quiet) == EXIT_OK
    steps2, resumed = losses(interrupted)
    assert steps2 == steps
    np.testing.assert_array_equal(resumed, straight)  # bit-identical trace
    for a, b in zip(
        jax.tree.leaves(model_params(tmp_path / "straight")),
        jax.tree.leaves(model_params(interrupted)),
    ):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_written_on_8_devices_restores_on_4(demo, base_ckpt, tmp_path):
    from cslm_jax.storage.checkpoint import train_checkpoint_manager, train_restore_args

    run_dir = tmp_path / "run"
    cfg8 = run_cfg(demo, base_ckpt, "train.steps=2", "mesh.fsdp=-1", "train.micro_batch_size=8")
    assert train(cfg8, run_dir, log=quiet) == EXIT_OK
    saved = model_params(run_dir)

    cfg4 = run_cfg(
        demo,
        base_ckpt,
        "train.steps=3",
        "mesh.fsdp=-1",
        "train.num_devices=4",
        "train.micro_batch_size=8",
    )
    manager = train_checkpoint_manager(run_dir / "checkpoints", 3, 5)
    run, latest, _ = prepare_run(cfg4, run_dir, manager, log=quiet)
    assert latest == 2 and dict(run.layout.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    restored = manager.restore(latest, args=train_restore_args(abstract_state(run)))["state"]
    manager.close()
    gate = restored["params"]["layers"]["gate_proj"]
    assert len(gate.sharding.device_set) == 4 and gate.sharding.spec[1] == "fsdp"
    assert gate.addressable_shards[0].data.shape[1] == gate.shape[1] // 4
    assert int(restored["step"]) == 2
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored["params"]))):
        np.testing.assert_array_equal(a, b)
    # and training goes on from there on the 4-device mesh (one more step: train.steps 2 -> 3)
    assert train(cfg4, run_dir, log=quiet, allow_config_change=True) == EXIT_OK
    assert losses(run_dir)[0] == [1, 2, 3]


# -- SIGKILL during an async save -----------------------------------------------------------------


def kill_overrides(demo, base_ckpt) -> list[str]:
    """The run the SIGKILL-during-save tests interrupt: 8 steps, a checkpoint every 2."""
    data_dir, _ = demo
    return [
        f"init_from={base_ckpt}",
        f"data.config={data_dir / 'data.yaml'}",
        "data.max_length=128",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.progress_bar=false",
        "train.steps=8",
        "checkpoint.every=2",
        "checkpoint.keep=5",
        "train.num_devices=1",
    ]


def stalled_save_child(run_dir: str, overrides: list[str], temporary_class: str, marker) -> str:
    """Python source of a `cslm-jax train` process whose Orbax commit of step 4 (the class
    `temporary_class` of orbax's atomicity module finalizes it) stalls after every file is
    written: it writes the step's final path to `marker` and sleeps, to be SIGKILLed there."""
    return textwrap.dedent(f"""
        import asyncio, sys
        from pathlib import Path
        from orbax.checkpoint._src.path import atomicity
        cls = atomicity.{temporary_class}
        original = cls.finalize
        async def stalled(self):
            if self.get_final().name == "4":
                Path({str(marker)!r}).write_text(str(self.get()))
                await asyncio.sleep(600)
            return await original(self)
        cls.finalize = stalled
        from cslm_jax.cli.main import main
        sys.exit(main(["train", "--config", {str(REPO / "configs" / "demo.yaml")!r},
                       "--run-dir", {run_dir!r}] + {overrides!r}))
    """)


def test_sigkill_during_async_save_keeps_previous_checkpoint(demo, base_ckpt, tmp_path):
    """The child process stalls Orbax's commit of step 4 (all its files are written, the
    rename that commits it is not done) and is SIGKILLed there: step 2 stays the latest complete
    checkpoint, the partial one is ignored and cleaned up, and the resume finishes the run."""
    run_dir = tmp_path / "killed"
    overrides = kill_overrides(demo, base_ckpt)
    child = stalled_save_child(
        str(run_dir), overrides, "AtomicRenameTemporaryPath", run_dir / "stalled"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run_dir / "stalled").exists():
        assert proc.poll() is None, (
            f"child exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
        )
        assert time.time() < deadline, "the child never reached the save of step 4"
        time.sleep(0.2)
    partial = Path((run_dir / "stalled").read_text())
    assert partial.is_dir() and (partial / "state").is_dir()  # the data is on disk...
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert partial.exists() and not (ckpts / "4").exists()  # ...but never committed

    from cslm_jax.storage.checkpoint import train_checkpoint_manager

    manager = train_checkpoint_manager(ckpts, 2, 5)
    assert manager.latest_step() == 2 and list(manager.all_steps()) == [2]
    manager.close()
    cfg = load_run_config(REPO / "configs" / "demo.yaml", overrides + ["train.log_every=1"])
    assert train(cfg, run_dir, log=quiet) == EXIT_OK
    assert not partial.exists()  # cleaned up on resume
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6, 8]
    assert losses(run_dir)[0][0] == 3  # resumed after step 2


# -- non-finite losses ------------------------------------------------------------------------------


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(demo, base_ckpt, tmp_path):
    from cslm_jax.storage.checkpoint import train_checkpoint_manager

    # a learning rate this large overflows the weights within a few steps
    cfg = run_cfg(
        demo,
        base_ckpt,
        "train.num_devices=1",
        "optimizer.learning_rate=1e30",
        "optimizer.warmup_ratio=0.0",
        "checkpoint.every=1",
        "train.steps=20",
    )
    messages = []
    assert train(cfg, tmp_path / "nan", log=messages.append) == EXIT_NONFINITE
    assert any("not finite" in m and "last checkpoint is intact" in m for m in messages)
    manager = train_checkpoint_manager(tmp_path / "nan" / "checkpoints", 1, 5)
    last = manager.latest_step()
    assert last is not None and last < 20
    import orbax.checkpoint as ocp

    restored = manager.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert not (tmp_path / "nan" / "model").exists()

    skip = run_cfg(
        demo,
        base_ckpt,
        "train.num_devices=1",
        "optimizer.learning_rate=1e30",
        "optimizer.warmup_ratio=0.0",
        "train.steps=20",
        "train.on_nonfinite=skip",
        "train.max_skipped_steps=3",
    )
    assert train(skip, tmp_path / "skip", log=messages.append) == EXIT_NONFINITE
    assert any("max_skipped_steps" in m for m in messages)
    rows = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if not r["finite"]] == [1, 2, 3, 4]


# -- stage 2 from stage 1, configs, FLOPs --------------------------------------------------------


def test_stage2_inits_from_stage1_parameters_without_optimizer_state(demo, base_ckpt, tmp_path):
    from cslm_jax.storage.checkpoint import train_checkpoint_manager

    stage1 = tmp_path / "stage1"
    assert (
        train(run_cfg(demo, base_ckpt, "train.steps=2", "train.num_devices=1"), stage1, log=quiet)
        == EXIT_OK
    )
    sft = load_run_config(
        REPO / "configs" / "demo_sft.yaml",
        [
            f"data.config={demo[0] / 'data.yaml'}",
            "data.max_length=128",
            "train.global_batch_size=8",
            "train.micro_batch_size=8",
            "train.steps=2",
            "train.num_devices=1",
            "train.progress_bar=false",
            "checkpoint.every=1",
            "checkpoint.keep=5",
        ],
    )
    assert sft.data.stage == "sft" and sft.optimizer.learning_rate == 1e-3
    stage2 = tmp_path / "stage2"
    with pytest.raises(TrainError, match="nothing to start from"):
        train(sft, stage2, log=quiet)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="did not finish"):
        train(sft, stage2, init_from=unfinished, log=quiet)
    manager = train_checkpoint_manager(stage2 / "checkpoints", 1, 5)
    run, _, init = prepare_run(sft, stage2, manager, init_from=stage1, log=quiet)
    with jax.set_mesh(run.layout.mesh):
        state = initial_state(run, init)
    manager.close()
    assert init == stage1 / "model" and int(state["step"]) == 0
    for a, b in zip(jax.tree.leaves(model_params(stage1)), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    mu = state["opt_state"][1][0].mu  # fresh Adam moments
    assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(mu))
    assert train(sft, stage2, init_from=stage1, log=quiet) == EXIT_OK
    rows = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("loss/cslm_sft_") for k in rows[-1])


@pytest.mark.parametrize("name", ["demo", "demo_sft", "cslm_pretrain", "cslm_sft"])
def test_stage_configs_load_with_reference_settings(name):
    cfg = load_run_config(REPO / "configs" / f"{name}.yaml")
    if name == "cslm_pretrain":
        assert (
            cfg.data.max_length,
            cfg.train.global_batch_size,
            cfg.optimizer.learning_rate,
            cfg.optimizer.warmup_ratio,
            cfg.optimizer.weight_decay,
        ) == (1024, 288, 6e-5, 0.03, 0.0)
        assert cfg.model["compute_dtype"] == "bfloat16" and cfg.model["param_dtype"] == "float32"
    if name == "cslm_sft":
        assert (
            cfg.data.max_length,
            cfg.data.stage,
            cfg.optimizer.learning_rate,
            cfg.optimizer.warmup_ratio,
        ) == (4096, "sft", 1e-5, 0.03)


def test_bad_run_configs_name_the_field(demo, base_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        run_cfg(demo, base_ckpt, "train.micro_batch_size=3")
    with pytest.raises(ConfigError, match="on_nonfinite"):
        run_cfg(demo, base_ckpt, "train.on_nonfinite=maybe")
    with pytest.raises(ConfigError, match="hidden_size"):
        run_cfg(demo, base_ckpt, "model.hidden_size=8")
    with pytest.raises(ConfigError, match="unknown field"):
        run_cfg(demo, base_ckpt, "train.stepz=3")
    with pytest.raises(ConfigError, match="data x fsdp"):
        train(
            run_cfg(demo, base_ckpt, "mesh.data=8", "train.micro_batch_size=4"),
            tmp_path / "x",
            log=quiet,
        )


def test_cli_train_help_names_the_step_and_checkpoint_keys():
    out = subprocess.run(
        [sys.executable, "-m", "cslm_jax.cli.main", "train", "--help"],
        text=True,
        capture_output=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0
    assert "train.steps=N" in out.stdout and "checkpoint.every=N" in out.stdout
    assert "75" in out.stdout


def test_flops_formula_matches_a_hand_count():
    from cslm_jax.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
    )
    per_layer = 8 * 4 * (2 * 2 + 2 * 1) + 3 * 8 * 16  # q,k,v,o + gate,up,down
    assert flops_per_token(cfg, 10) == 6 * (2 * per_layer + 100 * 8) + 12 * 2 * 2 * 4 * 10


# -- the loop's hooks ------------------------------------------------------------------------------


def test_hooks_run_at_the_steps_they_ask_for_and_a_stop_ends_the_loop():
    """`run_steps` with a step function of plain numbers: a hook with `every=k` runs after every
    k-th step and the last; metrics hooks see each step once, in order, one step late unless a
    `needs_metrics` hook asks for them first; a hook's exit code stops the loop after the step's
    other due hooks (which see it in `info.stop`)."""
    from cslm_jax.train.hooks import Hook
    from cslm_jax.train.loop import LoopState, run_steps

    calls = []

    class Record(Hook):
        def __init__(self, name, every, needs_metrics=False, stop_at=None):
            self.name, self.every, self.needs_metrics, self.stop_at = (
                name,
                every,
                needs_metrics,
                stop_at,
            )

        def __call__(self, info):
            calls.append((self.name, info.step, info.state, info.stop))
            return 75 if info.step == self.stop_at else None

    class Metrics(Hook):
        def __call__(self, info):
            calls.append(("metrics", info.step, float(info.metrics["loss"]), info.skipped))

    def step_fn(state, batch):
        return state + batch, {"loss": np.float32(state), "finite": np.bool_(state != 5)}

    loop = LoopState(0, skipped=0)
    code = run_steps(
        loop,
        range(1, 11),
        last_step=10,
        next_batch=lambda: 1,
        step_fn=step_fn,
        hooks=[Record("three", 3), Record("save", 4, needs_metrics=True)],
        metrics_hooks=[Metrics()],
    )
    assert code == 0 and loop.state == 10 and loop.pending is None
    assert [c[1] for c in calls if c[0] == "three"] == [3, 6, 9, 10]
    assert [c[1] for c in calls if c[0] == "save"] == [4, 8, 10]
    assert all(c[2] == c[1] for c in calls if c[0] != "metrics")  # the state after the step
    metrics = [c for c in calls if c[0] == "metrics"]
    assert [c[1] for c in metrics] == list(range(1, 11))
    assert [c[2] for c in metrics] == [float(s - 1) for s in range(1, 11)]
    assert [c[3] for c in metrics] == [0] * 5 + [1] * 5  # step 6 ran from state 5
    order = [c[:2] for c in calls]
    assert order[order.index(("three", 3)) - 1] == ("metrics", 2)  # one step late
    assert order[order.index(("save", 4)) - 1] == ("metrics", 4)  # fetched before saving
    assert order.index(("metrics", 3)) < order.index(("metrics", 4)) < order.index(("save", 4))

    class SaveOnStop(Record):  # as the checkpoint hook: due at a stop too
        def due(self, info):
            return super().due(info) or info.stop is not None

    calls.clear()
    code = run_steps(
        LoopState(0, skipped=0),
        range(1, 11),
        last_step=10,
        next_batch=lambda: 1,
        step_fn=step_fn,
        hooks=[Record("stop", 1, stop_at=5), SaveOnStop("save", 4)],
        metrics_hooks=[Metrics()],
    )
    assert code == 75
    assert [c[:2] for c in calls if c[0] != "metrics"][-2:] == [("stop", 5), ("save", 5)]
    assert calls[-1][3] == 75  # saw the stop


def test_a_custom_hook_runs_in_a_real_run_at_every_kth_step_and_the_last(demo, base_ckpt, tmp_path):
    from cslm_jax.train.hooks import Hook

    class EveryThird(Hook):
        every = 3

        def __init__(self):
            self.seen = []

        def __call__(self, info):
            self.seen.append((info.step, int(info.state["step"])))

    hook = EveryThird()
    cfg = run_cfg(demo, base_ckpt, "train.num_devices=1", "train.steps=7", "checkpoint.every=10")
    assert train(cfg, tmp_path / "run", log=quiet, hooks=[hook]) == EXIT_OK
    assert hook.seen == [(3, 3), (6, 6), (7, 7)]
    assert losses(tmp_path / "run")[0] == list(range(1, 8))
