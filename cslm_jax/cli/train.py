"""`cslm-jax train`: one CSLM stage (cslm_jax.train.loop)."""

import argparse

from cslm_jax.cli import setup

TRAINS = True  # glibc malloc keeps freed memory (cslm_jax.cli.setup)

EPILOG = """\
overrides (key=value, values parsed as YAML; sections of the run config, see configs/demo.yaml):
  train.steps=N                 optimizer steps (the cosine schedule's length)
  checkpoint.every=N            save a checkpoint every N steps (and at the end and on SIGTERM)
  checkpoint.keep=K             keep the last K checkpoints
  checkpoint.async_save=false   save in the foreground
  train.global_batch_size=288 train.micro_batch_size=32   accumulation = global / micro
  mesh.data=1 mesh.fsdp=-1 mesh.tensor=1                  -1 takes the remaining devices
  optimizer.learning_rate=6e-5 optimizer.warmup_ratio=0.03 optimizer.clip_norm=1.0
  model.remat_policy=dots_no_batch model.compute_dtype=bfloat16
  data.config=FILE data.stage=pretrain data.max_length=1024 train.on_nonfinite=stop|skip

exit codes: 0 done; 75 preempted (SIGTERM: checkpoint written, rerun the same command to
resume); 3 non-finite loss (last checkpoint intact); 2 bad configuration or data, or a
resume whose config changes the optimisation (see --allow-config-change). Ctrl-C (SIGINT)
does what SIGTERM does; a second Ctrl-C aborts at once (exit 130) without a checkpoint.
"""


def uses_tensorflow(args) -> bool:
    return True


def add_parser(sub):
    s = sub.add_parser(
        "train",
        help="train one CSLM stage on the device mesh (resumes "
        "automatically from RUN_DIR's latest checkpoint)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument(
        "--config",
        required=True,
        help="run config YAML (configs/cslm_pretrain.yaml, "
        "configs/cslm_sft.yaml, configs/demo.yaml)",
    )
    s.add_argument(
        "--run-dir",
        required=True,
        help="folder for checkpoints, metrics and the "
        "final model; rerunning with the same folder resumes",
    )
    s.add_argument(
        "--init-from",
        default=None,
        help="model checkpoint to start from (import-hf "
        "output, or a finished run folder: its parameters, not its optimizer state); "
        "overrides the config's init_from; ignored when RUN_DIR has a checkpoint",
    )
    g = setup.add_multihost_arguments(s, "JAX finds the others")
    g.add_argument(
        "--data-shards",
        type=int,
        default=None,
        help="input shards of a new run (default: one per process); fixed for the "
        "run, so it can resume on any process count that divides it",
    )
    s.add_argument(
        "--data-cache",
        default=None,
        metavar="DIR",
        help="read the stage's examples from a cache written by `cslm-jax prepare-data` "
        "(default: the data config's cache_dir; without one they are prepared "
        "in-process, fine for small corpora)",
    )
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the "
        "config changes how the run optimises (optimizer, steps, batch, data, model "
        "fields); without it such a resume is refused with the list of changes",
    )
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return s


def check(args, parser) -> None:
    """Before TensorFlow starts or anything is printed or written: the run folder, the config,
    and (for a new run) init_from and the data config's stage."""
    from cslm_jax.train.setup import preflight

    preflight(
        args.config,
        args.overrides,
        args.run_dir,
        init_from=args.init_from,
        data_cache=args.data_cache,
    )


def run(args) -> int:
    """With several processes only process 0 prints (the others' errors still reach stderr):
    every worker's log would otherwise repeat the same lines."""
    import jax
    import yaml

    from cslm_jax.config import load_run_config
    from cslm_jax.parallel.distributed import initialize
    from cslm_jax.train.loop import train

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any device use
    cfg = load_run_config(args.config, args.overrides)
    primary = jax.process_index() == 0
    if primary:
        extra = " + " + " ".join(args.overrides) if args.overrides else ""
        print(f"# run config ({args.config}{extra})")
        print(
            yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="", flush=True
        )
    return train(
        cfg,
        args.run_dir,
        init_from=args.init_from,
        data_shards=args.data_shards,
        allow_config_change=args.allow_config_change,
        data_cache=args.data_cache,
        log=print if primary else (lambda *a, **k: None),
    )
