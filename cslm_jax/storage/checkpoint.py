"""Model checkpoints on disk: an Orbax parameter tree plus the metadata needed to use it.

A model checkpoint is a folder:

    cslm_checkpoint.json   format version, model config, vocabulary layout, HF passthrough fields
    params/                Orbax PyTree checkpoint of the parameter tree (schema: cslm_jax.model.llama)
    tokenizer/             the (extended) tokenizer, loadable with `transformers.AutoTokenizer`

It is written into a hidden sibling folder and renamed into place as the last step, so a crash
never leaves a folder that looks complete. Restores go straight into the shardings the caller
asks for (the current mesh), whatever mesh wrote the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses as dc
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import jax
import numpy as np

from cslm_jax.config import ConfigError, ModelConfig
from cslm_jax.errors import CslmError
from cslm_jax.model.schema import is_spec, param_shapes
from cslm_jax.model.vocab import VocabError, VocabInfo
from cslm_jax.parallel.distributed import barrier, broadcast_int
from cslm_jax.storage import fs
from cslm_jax.storage.outputs import check_output_dir, mark_entries, write_marker

META_FILE = "cslm_checkpoint.json"
CHECKPOINT_FORMAT = 1
SAVE_CONCURRENT_GB = 1


class CheckpointError(CslmError):
    """A checkpoint is missing, incomplete or inconsistent; the message names the path and field."""


@contextlib.contextmanager
def atomic_dir(
    target,
    force: bool = False,
    staged: bool = False,
    last: str | None = None,
    owned: bool = False,
    tool: str | None = None,
):
    """Yield a folder to write an output into; the output at `target` is complete or absent.

    A non-empty `target` is refused unless `force` is set, and even then unless it is an output
    of `tool` (the command writing it) holding nothing else (`storage.outputs.check_output_dir`;
    `owned`: the caller manages the folder, e.g. a run's `model/`). The output carries the
    `storage.outputs.MARKER` file naming `tool` and its entries. With several JAX processes (a
    multi-host run, the folder on shared storage) every process gets the same folder: process 0
    creates and commits it, the others wait for it at barriers, so all can join Orbax saves.

    On a local disk the folder is a hidden temporary sibling renamed into place on success and
    removed on failure. Where a rename is not atomic (GCS, gcsfuse: `fs.commit_file_mode`), the
    output is written in place and `last` (the file readers require: a checkpoint's metadata,
    an HF folder's config.json) is written last; a replaced output loses its `last` file first.
    With `staged` the caller gets a local temporary folder there (for writers that need local
    files), whose files are uploaded on success, `last` at the end.
    """
    target = fs.path(target)
    check_output_dir(target, force, flag=None, owned=owned, tool=tool)
    tool = tool or "cslm-jax"
    primary = jax.process_index() == 0
    if fs.commit_file_mode(target):
        with _commit_file_dir(target, primary, staged, last, tool) as out:
            yield out
        return
    tag = f"{broadcast_int(uuid.uuid4().int >> 68):08x}"  # process 0's 60 random bits
    tmp = target.parent / f".{target.name}.partial-{tag}"
    if primary:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    barrier(f"cslm_jax: {tmp} created")
    try:
        yield Path(os.fspath(tmp))
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(f"cslm_jax: {tmp} written")
    if primary:
        mark_entries(tmp, tool)
        apply_umask(Path(os.fspath(tmp)))
        _replace_dir(Path(os.fspath(tmp)), Path(os.fspath(target)))
    barrier(f"cslm_jax: {target} in place")


@contextlib.contextmanager
def _commit_file_dir(target, primary: bool, staged: bool, last: str | None, tool: str):
    if primary:
        if target.exists():  # replacing (force): unmark it first
            if last is not None and (target / last).exists():
                (target / last).unlink()
            fs.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        write_marker(target, tool)  # all of it ours until the final list
    barrier(f"cslm_jax: {target} created")
    local = Path(tempfile.mkdtemp(prefix="cslm_jax-out-")) if staged and primary else None
    try:
        yield local if staged else target
        barrier(f"cslm_jax: {target} written")
        if primary and staged:
            names = sorted(p.name for p in local.iterdir())
            for name in [n for n in names if n != last] + ([last] if last in names else []):
                src = local / name
                if src.is_dir():
                    fs.copytree(src, target / name)
                else:
                    fs.path(src).copy(target / name, overwrite=True)
        if primary:
            mark_entries(target, tool)
    except BaseException:
        if primary:
            fs.rmtree(target)
        raise
    finally:
        if local is not None:
            shutil.rmtree(local, ignore_errors=True)
    barrier(f"cslm_jax: {target} committed")


def process_umask() -> int:
    """The process umask, read without changing it where Linux tells it (os.umask would set it
    for a moment, under other threads' feet)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_umask(root: Path) -> None:
    """Give every file and folder under `root` (itself included) the mode the process umask
    gives new ones (0644 / 0755 under umask 0022): some writers (safetensors) create files
    0600, which others on a shared file system could not read."""
    umask = process_umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~umask)


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def _leaf_name(path) -> str:
    """'embed', 'layers.q_proj': the folder name of one parameter under params/."""
    return ".".join(str(getattr(k, "key", k)) for k in path)


def _array_bytes(a) -> int:
    return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


def _checkpointer(nbytes: int, restore: bool = False):
    """An Orbax PyTree checkpointer whose bytes in flight are bounded (Orbax needs room for the
    largest single array): neither saving nor restoring needs a second copy of the weights."""
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    limit_gb = max(SAVE_CONCURRENT_GB, math.ceil(nbytes / 1e9))
    key = "restore_concurrent_gb" if restore else "save_concurrent_gb"
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**{key: limit_gb}))


def save_tokenizer(tokenizer, dst) -> None:
    """`tokenizer.save_pretrained` to a local or remote folder (transformers writes local files:
    a remote one is written locally first and uploaded)."""
    if not fs.is_remote(dst):
        tokenizer.save_pretrained(os.fspath(dst))
        return
    with tempfile.TemporaryDirectory(prefix="cslm_jax-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        fs.upload_dir(tmp, dst)


def save_model_checkpoint(
    path: str | Path,
    params: dict,
    cfg: ModelConfig,
    vocab: VocabInfo,
    tokenizer=None,
    extra: dict | None = None,
    force: bool = False,
    owned: bool = False,
    tool: str = "import-hf",
) -> Path:
    """Write params (schema of cslm_jax.model.llama) with their metadata, one Orbax item per parameter
    under params/<name>. A leaf may be an array or a zero-argument function returning one (built
    only when its turn comes and dropped after), so a converter can stream: peak host memory is
    then about one parameter, not one model."""
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    path = fs.path(path)
    primary = jax.process_index() == 0  # other processes only join the Orbax saves
    with atomic_dir(path, force=force, last=META_FILE, owned=owned, tool=tool) as tmp:
        if primary:
            (tmp / "params").mkdir()
        leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=callable)[0]
        for key_path, leaf in leaves:
            array = leaf() if callable(leaf) else leaf
            if isinstance(array, np.ndarray):
                array = jax.device_put(array)  # Orbax copies numpy leaves whole; jax arrays stream
            _checkpointer(_array_bytes(array)).save(
                tmp / "params" / _leaf_name(key_path), args=ocp.args.PyTreeSave({"value": array})
            )
            del array
        if primary and tokenizer is not None:
            save_tokenizer(tokenizer, tmp / "tokenizer")
        meta = {
            "format": CHECKPOINT_FORMAT,
            "model": cfg.to_dict(),
            "vocab": vocab.to_dict(),
            **(extra or {}),
        }
        if primary:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> tuple[dict, ModelConfig, VocabInfo]:
    """(raw metadata, model config, vocabulary layout) of a model checkpoint, validated. The
    metadata file is written last: a folder without it is an unfinished write, never read."""
    path = fs.path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not meta_file.is_file():
        raise CheckpointError(
            f"{meta_file}: missing; {path} is not a complete cslm_jax model checkpoint"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: invalid JSON: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{meta_file}: field 'format' is {meta.get('format')!r}, this version "
            f"reads format {CHECKPOINT_FORMAT}"
        )
    if "model" not in meta:
        raise CheckpointError(f"{meta_file}: missing field 'model'")
    try:
        cfg = ModelConfig.from_dict(meta["model"], where=f"{meta_file} field 'model'")
        vocab = VocabInfo.from_dict(meta.get("vocab"), where=str(meta_file))
    except (ConfigError, VocabError) as e:
        raise CheckpointError(str(e)) from None
    if vocab.padded_size != cfg.vocab_size or vocab.size != cfg.real_vocab_size:
        raise CheckpointError(
            f"{meta_file}: field 'vocab' (size {vocab.size}, padded {vocab.padded_size}) "
            f"disagrees with 'model.vocab_size' ({cfg.vocab_size}) / "
            f"'model.unpadded_vocab_size' ({cfg.real_vocab_size})"
        )
    if not (path / "params").is_dir():
        raise CheckpointError(f"{path}/params: missing; the checkpoint holds no parameters")
    return meta, cfg, vocab


def _expected_shapes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda spec: tuple(spec[0]), param_shapes(cfg), is_leaf=is_spec)


def param_names(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every parameter, in the order `iter_params` yields them."""
    return {
        _leaf_name(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(
            _expected_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
        )[0]
    }


def iter_params(path: str | Path, shardings=None, dtype=None):
    """(name, array) per parameter, restored one at a time: host numpy arrays, or with
    `shardings` (tree matching the schema) jax arrays placed directly in those shardings.
    Shapes are checked against the checkpoint's model config first, naming any mismatch."""
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    path = fs.path(path)
    _, cfg, _ = read_metadata(path)
    expected = param_names(cfg)
    stored = {p.name for p in (path / "params").iterdir() if p.is_dir()}
    for name in expected:
        if name not in stored:
            raise CheckpointError(f"{path}/params: parameter '{name}' is missing")
    extra = sorted(stored - set(expected))
    if extra:
        raise CheckpointError(
            f"{path}/params: unexpected parameter(s) {extra} for this model config"
        )
    metas = {}
    for name, shape in expected.items():
        meta = ocp.PyTreeCheckpointer().metadata(path / "params" / name).item_metadata.tree["value"]
        if tuple(meta.shape) != shape:
            raise CheckpointError(
                f"{path}/params: parameter '{name}' has shape {tuple(meta.shape)}, "
                f"the model config expects {shape}"
            )
        metas[name] = meta
    flat_shardings = (
        None
        if shardings is None
        else {_leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    )
    for name, meta in metas.items():
        nbytes = int(np.prod(meta.shape)) * np.dtype(dtype or meta.dtype).itemsize
        if flat_shardings is None:
            arg = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
        else:
            arg = ocp.ArrayRestoreArgs(
                sharding=flat_shardings[name],
                global_shape=tuple(meta.shape),
                dtype=dtype or meta.dtype,
            )
        restored = _checkpointer(nbytes, restore=True).restore(
            path / "params" / name, args=ocp.args.PyTreeRestore(restore_args={"value": arg})
        )
        yield name, restored["value"]


def load_params(path: str | Path, shardings=None, dtype=None) -> dict:
    """The whole parameter tree of a model checkpoint (see `iter_params`)."""
    tree: dict = {}
    for name, array in iter_params(path, shardings, dtype):
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = array
    return tree


# -- training checkpoints: Orbax CheckpointManager with separate items ---------------------------

TRAIN_ITEMS = ("state", "data", "config")


def _data_handler_classes():
    """A synchronous Orbax handler for the input pipeline's position. Every process saves its
    own part into the item's folder (`cslm_jax.parallel.distributed.ProcessInput`: one tf.data iterator
    checkpoint per data shard it reads). Built lazily: Orbax and TensorFlow load only when a
    trainer needs them."""
    global _DATA_HANDLER
    if _DATA_HANDLER is not None:
        return _DATA_HANDLER
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    class DataPositionHandler(ocp.CheckpointHandler):
        def save(self, directory, args):
            args.iterator.save(directory)

        def restore(self, directory, args):
            args.iterator.restore(directory)
            return args.iterator.position

        def metadata(self, directory):
            return None

    @ocp.args.register_with_handler(DataPositionHandler, for_save=True)
    @dc.dataclass
    class DataPositionSave(ocp.args.CheckpointArgs):
        iterator: object

    @ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
    @dc.dataclass
    class DataPositionRestore(ocp.args.CheckpointArgs):
        iterator: object

    _DATA_HANDLER = (DataPositionHandler, DataPositionSave, DataPositionRestore)
    return _DATA_HANDLER


_DATA_HANDLER = None


ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


COMMIT_FILE = "commit_success.txt"  # Orbax's marker where a rename is not atomic


def is_committed_step(step_dir) -> bool:
    """A training checkpoint step folder that Orbax finished: renamed into place (local disk), or
    holding its commit file where folders are committed by a marker (GCS, gcsfuse)."""
    step_dir = fs.path(step_dir)
    if not (step_dir.name.isdigit() and step_dir.is_dir()):
        return False
    return not fs.commit_file_mode(step_dir) or (step_dir / COMMIT_FILE).exists()


def remove_partial_checkpoints(directory) -> list[str]:
    """Delete the saves that never committed (a process killed mid-save); returns their names:
    Orbax's temporary folders on a local disk, step folders without their commit file on GCS or
    gcsfuse. Done here, synchronously, because Orbax 0.12's own background clean-up
    (`cleanup_tmp_directories`) races with the next save of the same step and can crash it."""
    directory = fs.path(directory)
    if not directory.is_dir():
        return []
    commit_file = fs.commit_file_mode(directory)
    partial = sorted(
        (
            p
            for p in directory.iterdir()
            if ORBAX_TMP_MARK in p.name
            or (commit_file and p.name.isdigit() and not (p / COMMIT_FILE).exists())
        ),
        key=lambda p: p.name,
    )
    for p in partial:
        fs.rmtree(p)
    return [p.name for p in partial]


def train_checkpoint_manager(directory, every: int, keep: int, async_save: bool = True):
    """Orbax CheckpointManager over `directory` with items `state` (train state: step, params,
    optimizer state), `data` (input pipeline position) and `config` (the run config, model config
    and vocabulary as JSON). On a local disk saves go to a temporary folder renamed on commit; on
    GCS and gcsfuse (`fs.commit_file_mode`) into the step folder with a commit file written last.
    Either way a process killed mid-save leaves the previous checkpoint as the latest complete
    one; `remove_partial_checkpoints` clears such leftovers before a run resumes. Keeping the
    last `keep` deletes older steps wherever they are."""
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    directory = fs.path(directory)
    handler, _, _ = _data_handler_classes()
    atomicity = ocp.path.atomicity
    temporary = (
        atomicity.CommitFileTemporaryPath
        if fs.commit_file_mode(directory)
        else atomicity.AtomicRenameTemporaryPath
    )
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every,
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,
        temporary_path_class=temporary,
    )
    return ocp.CheckpointManager(
        directory,
        options=options,
        item_names=TRAIN_ITEMS,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": handler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def train_save_args(state, iterator, config: dict):
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    _, save, _ = _data_handler_classes()
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=save(iterator), config=ocp.args.JsonSave(config)
    )


def train_restore_args(abstract_state, iterator=None):
    """Restore args: the state straight into `abstract_state`'s shardings (the current mesh,
    whatever mesh wrote it); the data position into `iterator` when given."""
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    _, _, restore = _data_handler_classes()
    items = {"state": ocp.args.StandardRestore(abstract_state), "config": ocp.args.JsonRestore()}
    if iterator is not None:
        items["data"] = restore(iterator)
    return ocp.args.Composite(**items)


def read_train_config(manager, step: int) -> dict:
    import orbax.checkpoint as ocp  # heavy: orbax (~1 s), kept off the import of this module

    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def resolve_model_dir(path: str | Path, flag: str = "--ckpt", hf: bool = False) -> Path:
    """The model a user names, as a folder to load: a model checkpoint (itself), a `cslm-jax
    train` run folder (its `model/`, written when the run completes) or, with `hf`, a Hugging
    Face folder (`config.json`: export-hf output). CheckpointError otherwise, naming `flag` and
    saying what is missing (a run that has not finished has checkpoints/ but no model/ yet)."""
    path = fs.path(path, flag)
    fs.check_bucket(path, flag)
    if (path / META_FILE).is_file() or (hf and (path / "config.json").is_file()):
        return path
    if (path / "model" / META_FILE).is_file():
        return path / "model"
    if (path / "checkpoints").is_dir():
        raise CheckpointError(
            f"{flag} {path}: this run has no model/ yet (it did not finish); "
            f"resume it to the end first (`cslm-jax train` with --run-dir {path})"
        )
    hf_kind = ", a Hugging Face folder (config.json)," if hf else ""
    raise CheckpointError(
        f"{flag} {path}: neither a model checkpoint ({META_FILE}; write one with "
        f"`cslm-jax import-hf`){hf_kind} nor a finished train run folder (with "
        f"model/)"
    )
