"""Model checkpoints on disk: an Orbax parameter tree plus the metadata needed to use it.

A model checkpoint is a folder:

    cslm_checkpoint.json   format version, model config, vocabulary layout, HF passthrough fields
    params/                Orbax PyTree checkpoint of the parameter tree (schema: cslm_jax.model)
    tokenizer/             the (extended) tokenizer, loadable with `transformers.AutoTokenizer`

It is written into a hidden sibling folder and renamed into place as the last step, so a crash
never leaves a folder that looks complete. Restores go straight into the shardings the caller
asks for (the current mesh), whatever mesh wrote the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np

from cslm_jax.config import ConfigError, ModelConfig
from cslm_jax.vocab import VocabError, VocabInfo

META_FILE = "cslm_checkpoint.json"
CHECKPOINT_FORMAT = 1
SAVE_CONCURRENT_GB = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or inconsistent; the message names the path and field."""


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False):
    """Yield a temporary sibling folder; on success it replaces `target`, on failure it is removed.

    A non-empty `target` is refused unless `force` is set.
    """
    target = Path(target).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"{target} exists and is not empty; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def save_model_checkpoint(path: str | Path, params: dict, cfg: ModelConfig, vocab: VocabInfo,
                          tokenizer=None, extra: dict | None = None, force: bool = False) -> Path:
    """Write params (jax arrays, schema of cslm_jax.model) with their metadata. (Orbax copies
    numpy leaves whole before writing; jax arrays are written in bounded pieces.)"""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    with atomic_dir(path, force=force) as tmp:
        # Bounded bytes in flight (Orbax needs room for the largest single array): saving never
        # needs a second full copy of the weights.
        largest = max(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(params))
        limit_gb = max(SAVE_CONCURRENT_GB, math.ceil(largest / 1e9))
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(save_concurrent_gb=limit_gb))
        ckptr.save(tmp / "params", args=ocp.args.PyTreeSave(params))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": CHECKPOINT_FORMAT, "model": cfg.to_dict(), "vocab": vocab.to_dict(),
                **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | Path) -> tuple[dict, ModelConfig, VocabInfo]:
    """(raw metadata, model config, vocabulary layout) of a model checkpoint, validated."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing; {path} is not a complete cslm_jax model "
                              f"checkpoint")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file}: invalid JSON: {e}") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta_file}: field 'format' is {meta.get('format')!r}, this version "
                              f"reads format {CHECKPOINT_FORMAT}")
    if "model" not in meta:
        raise CheckpointError(f"{meta_file}: missing field 'model'")
    try:
        cfg = ModelConfig.from_dict(meta["model"], where=f"{meta_file} field 'model'")
        vocab = VocabInfo.from_dict(meta.get("vocab"), where=str(meta_file))
    except (ConfigError, VocabError) as e:
        raise CheckpointError(str(e)) from None
    if vocab.padded_size != cfg.vocab_size or vocab.size != cfg.real_vocab_size:
        raise CheckpointError(f"{meta_file}: field 'vocab' (size {vocab.size}, padded {vocab.padded_size}) "
                              f"disagrees with 'model.vocab_size' ({cfg.vocab_size}) / "
                              f"'model.unpadded_vocab_size' ({cfg.real_vocab_size})")
    if not (path / "params").is_dir():
        raise CheckpointError(f"{path}/params: missing; the checkpoint holds no parameters")
    return meta, cfg, vocab


def load_params(path: str | Path, shardings=None, dtype=None) -> dict:
    """The parameter tree of a model checkpoint.

    With `shardings` (a tree of `jax.sharding.Sharding` matching the schema), arrays are restored
    directly into them; otherwise as host numpy arrays. `dtype` casts on restore.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    _, cfg, _ = read_metadata(path)
    ckptr = ocp.PyTreeCheckpointer()
    stored = ckptr.metadata(path / "params").item_metadata.tree
    expected = _expected_shapes(cfg)
    _check_tree(stored, expected, path / "params")
    if shardings is None:
        args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype), stored)
    else:
        args = jax.tree.map(
            lambda m, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=tuple(m.shape),
                                              dtype=dtype or m.dtype),
            stored, shardings)
    return ckptr.restore(path / "params", args=ocp.args.PyTreeRestore(restore_args=args))


def _expected_shapes(cfg: ModelConfig) -> dict:
    from cslm_jax.model import param_shapes

    return jax.tree.map(lambda spec: tuple(spec[0]), param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2
                        and isinstance(x[1], tuple))


def _check_tree(stored, expected, where) -> None:
    flat_stored = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    flat_expected = {jax.tree_util.keystr(k): v for k, v in
                     jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]}
    for key, shape in flat_expected.items():
        if key not in flat_stored:
            raise CheckpointError(f"{where}: parameter {key} is missing")
        if tuple(flat_stored[key].shape) != shape:
            raise CheckpointError(f"{where}: parameter {key} has shape {tuple(flat_stored[key].shape)}, "
                                  f"the model config expects {shape}")
    extra = sorted(set(flat_stored) - set(flat_expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected parameter(s) {extra} for this model config")
