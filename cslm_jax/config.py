"""Typed configuration: dataclasses loaded from YAML with `key=value` overrides, validated.

Model hyperparameters mirror Hugging Face's `LlamaConfig` names where they exist so that a reader
can check them against a `config.json` line by line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import yaml

from cslm_jax.errors import CslmError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
ROPE_TYPES = ("default", "llama3")
CROSS_ENTROPY = ("auto", "full", "chunked")
ATTENTION = ("auto", "einsum", "splash")
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


class ConfigError(CslmError):
    """A configuration value is missing, unknown or inconsistent; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-3 family decoder.

    `vocab_size` is the number of embedding rows the model holds (after padding to a shardable
    multiple); `unpadded_vocab_size` (None: all rows are real) marks where padding rows start:
    their logits are masked so they can never be predicted or sampled.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    unpadded_vocab_size: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat_policy: str = "none"
    scan_layers: bool = True
    # The training loss: "full" logits [B, T, V] in float32, or "chunked" (the LM head and the
    # cross-entropy `loss_chunk` positions of each row at a time, rematerialised: the full
    # logits never exist); "auto": chunked for vocabularies of 32768+ rows when rows are longer
    # than one chunk (the CSLM Llama-3 case), else full.
    cross_entropy: str = "auto"
    loss_chunk: int = 512
    # Training self-attention: "einsum" (XLA; a hand-written gradient), "splash" (the Pallas
    # splash-attention kernel: Mosaic on TPU, interpret mode elsewhere), "auto": splash when the
    # devices are TPUs. Decoding with a KV cache always uses the einsum path.
    attention: str = "auto"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self, where: str = "model config") -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"{where}: field '{name}' must be a positive integer, got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{where}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"{where}: field 'head_dim' must be even for RoPE, got {self.head_dim}"
            )
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(
                    f"{where}: field '{name}' must be one of {DTYPES}, got {getattr(self, name)!r}"
                )
        if self.attention not in ATTENTION:
            raise ConfigError(
                f"{where}: field 'attention' must be one of {ATTENTION}, got {self.attention!r}"
            )
        if self.cross_entropy not in CROSS_ENTROPY:
            raise ConfigError(
                f"{where}: field 'cross_entropy' must be one of {CROSS_ENTROPY}, "
                f"got {self.cross_entropy!r}"
            )
        if not isinstance(self.loss_chunk, int) or self.loss_chunk <= 0:
            raise ConfigError(
                f"{where}: field 'loss_chunk' must be a positive integer, got {self.loss_chunk!r}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(
                f"{where}: field 'remat_policy' must be one of {REMAT_POLICIES}, "
                f"got {self.remat_policy!r}"
            )
        if (
            self.unpadded_vocab_size is not None
            and not 0 < self.unpadded_vocab_size <= self.vocab_size
        ):
            raise ConfigError(
                f"{where}: field 'unpadded_vocab_size' ({self.unpadded_vocab_size}) "
                f"must be in 1..vocab_size ({self.vocab_size})"
            )
        check_rope_scaling(self.rope_scaling, where)

    @property
    def rope_type(self) -> str:
        return "default" if not self.rope_scaling else self.rope_scaling["rope_type"]

    def loss_chunk_for(self, seq_len: int) -> int | None:
        """Positions per chunk of the chunked cross-entropy for rows of `seq_len`, or None for
        the full logits (see `cross_entropy`)."""
        if self.cross_entropy == "full":
            return None
        if self.cross_entropy == "auto" and (self.vocab_size < 32768 or seq_len <= self.loss_chunk):
            return None
        return min(self.loss_chunk, seq_len)

    @property
    def real_vocab_size(self) -> int:
        return self.unpadded_vocab_size or self.vocab_size

    def num_params(self) -> int:
        d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + l * per_layer + d + head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in data
        ]
        if required:
            raise ConfigError(f"{where}: missing required field(s) {required}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None


def check_rope_scaling(rope_scaling: dict | None, where: str) -> None:
    """Refuse rope-scaling types this model does not implement, naming the field."""
    if not rope_scaling:
        return
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: field 'rope_scaling.rope_type' is {rope_type!r}; supported: {ROPE_TYPES}"
        )
    rope_scaling["rope_type"] = rope_type
    rope_scaling.pop("type", None)
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope_scaling]
        if missing:
            raise ConfigError(f"{where}: field 'rope_scaling' of type llama3 lacks {missing}")
        if not rope_scaling["high_freq_factor"] > rope_scaling["low_freq_factor"]:
            raise ConfigError(
                f"{where}: field 'rope_scaling.high_freq_factor' must exceed low_freq_factor"
            )


# -- YAML loading with overrides ------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3). Values are parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return key.split("."), yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML: {yaml_error_text(e)}"
        ) from None


def yaml_error_text(e) -> str:
    """A YAML error on one line: what is wrong and where (line, column), without the multi-line
    excerpt PyYAML prints."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}" + (f" ({context})" if context else "")


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{where}: override {text!r}: '{part}' is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def load_yaml(path) -> dict:
    """A YAML mapping from a local or gs:// file."""
    from cslm_jax.storage import fs

    path = fs.path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {yaml_error_text(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    data = apply_overrides(load_yaml(path), list(overrides), str(path))
    return ModelConfig.from_dict(data, where=str(path))


def pad_to_multiple(n: int, multiple: int) -> int:
    if multiple <= 0:
        raise ConfigError(f"padding multiple must be positive, got {multiple}")
    return int(math.ceil(n / multiple) * multiple)


# -- run configuration (cslm-jax train) ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay to zero, global-norm clipping. Defaults are the
    reference's (PyTorch AdamW betas/eps, weight decay 0, HF Trainer's clip 1.0, warmup 3%)."""

    learning_rate: float = 6e-5
    total_steps: int = 1000
    warmup_ratio: float = 0.03
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    # dtype Adam's two moments are stored in (computed in float32 either way): bfloat16 halves
    # the optimizer state (8 of the 16 bytes per parameter of fp32 AdamW), what lets Llama-3.1-8B
    # train on fewer chips (README fit table); float32 is the reference's PyTorch AdamW
    moment_dtype: str = "float32"

    def schedule(self):
        import optax

        warmup = int(round(self.warmup_ratio * self.total_steps))
        if warmup == 0:  # as HF's cosine schedule: no warmup means the peak rate at step 0
            return optax.cosine_decay_schedule(self.learning_rate, max(self.total_steps, 1))
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warmup, max(self.total_steps, warmup + 1), end_value=0.0
        )


@dataclasses.dataclass(frozen=True)
class DataSection:
    config: str  # a data config (configs/data/*.yaml)
    stage: str  # one of its stages: the mixture cslm_<stage> is trained
    max_length: int | None = None  # packed row length; None: the data config's packing.max_length
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int  # optimizer steps (the schedule's length)
    global_batch_size: int  # packed rows per optimizer step, all hosts together
    micro_batch_size: int | None = None  # rows per forward/backward; accumulation = global/micro
    log_every: int = 1
    on_nonfinite: str = "stop"  # stop | skip
    max_skipped_steps: int = 10  # with skip: stop after this many skipped steps
    peak_flops_per_device: float | None = None  # for MFU; None: known TPU/GPU table or measured
    progress_bar: bool = True
    num_devices: int | None = None  # use the first N devices (None: all)

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size or self.global_batch_size)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 500  # save every N steps (and at the end, and on SIGTERM)
    keep: int = 3  # keep the last K
    async_save: bool = True  # write in the background while training continues


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run (`cslm-jax train --config CFG.yaml`); see configs/demo.yaml."""

    data: DataSection
    train: TrainSection
    init_from: str | None = None  # model checkpoint (import-hf output) or a finished run dir
    model: dict = dataclasses.field(default_factory=dict)  # overrides of training-side fields
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    sharding_rules: dict | None = None  # logical axis -> mesh axes; None: DEFAULT_RULES
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointSection = CheckpointSection()
    path: str = ""  # the file it was read from (informational)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RUN_MODEL_FIELDS = (
    "param_dtype",
    "compute_dtype",
    "remat_policy",
    "scan_layers",
    "cross_entropy",
    "loss_chunk",
    "attention",
)
RUN_PATH_FIELDS = (("init_from",), ("data", "config"))


def _section(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in data
    ]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    data = dict(data)
    for f in dataclasses.fields(cls):
        # YAML reads `1e-5` (no dot) as a string: numbers are coerced by the field's type
        if (
            f.name in data
            and str(f.type).startswith("float")
            and data[f.name] is not None
            and not isinstance(data[f.name], bool)
        ):
            try:
                data[f.name] = float(data[f.name])
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{where}: field '{f.name}' must be a number, got {data[f.name]!r}"
                ) from None
    return cls(**data)


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths in a config file resolve against that file's folder; URLs stay as given."""
    for keys in RUN_PATH_FIELDS:
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            if "://" in node[keys[-1]]:  # gs://...: checked where it is opened
                continue
            p = Path(node[keys[-1]]).expanduser()
            node[keys[-1]] = str(p if p.is_absolute() else (base / p).resolve())
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_with_bases(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back on itself")
    data = _resolve_paths(load_yaml(path), path.parent)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    return _merge(_load_with_bases(base_path, seen + (path,)), data)


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A run config from YAML (`base: other.yaml` inherits and deep-merges) and `key=value`
    overrides. Paths in files resolve against the file's folder; paths in overrides against the
    working directory. Every section is validated; errors name the file and field."""
    where = str(path)
    data = _load_with_bases(Path(path))
    for section in ("data", "train", "model", "mesh", "optimizer", "checkpoint"):
        if data.get(section) is None:
            data[section] = {}  # so that `section.key=value` overrides always apply
    try:
        data = apply_overrides(data, list(overrides), where)
        # overridden paths are relative to the working directory
        over_keys = {tuple(parse_override(o)[0]) for o in overrides}
        for keys in RUN_PATH_FIELDS:
            if keys in over_keys:
                _resolve_paths(data, Path.cwd())
        return run_config_from_dict(data, where)
    except ConfigError as e:
        raise _blame_override(e, overrides, where) from None


def _blame_override(error: ConfigError, overrides, where: str) -> ConfigError:
    """An error about a field some `key=value` override set names that override and the command
    line, not the config file."""
    message = str(error)
    rest = message[len(where) + 2 :] if message.startswith(f"{where}: ") else message
    message = message.split("; known", 1)[0]  # not the list of known fields
    for text in reversed(list(overrides)):
        if "=" not in text:
            continue
        key = text.split("=", 1)[0]
        section, _, field = key.partition(".")
        if (
            f"'{key}'" in message
            or f"{text!r}" in message
            or (
                field
                and f"section '{section}'" in message
                and (f"'{field}'" in message or f"['{field}']" in message)
            )
        ):
            return ConfigError(f"command-line override {text!r}: {rest}")
    return error


def run_config_from_dict(data: dict, where: str = "run config") -> RunConfig:
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown section(s) {unknown}; known: {sorted(known - {'path'})}"
        )
    for name in ("data", "train"):
        if name not in data:
            raise ConfigError(f"{where}: missing section '{name}'")
    for name in ("data", "train"):
        if not data[name]:
            raise ConfigError(f"{where}: section '{name}' is empty")
    model = dict(data.get("model") or {})
    bad = sorted(set(model) - set(RUN_MODEL_FIELDS))
    if bad:
        raise ConfigError(
            f"{where}: section 'model': field(s) {bad} cannot change in training (the "
            f"architecture comes from init_from); allowed: {list(RUN_MODEL_FIELDS)}"
        )
    train = _section(TrainSection, data["train"], f"{where}: section 'train'")
    optimizer = _section(
        OptimizerConfig,
        dict(data.get("optimizer") or {}, total_steps=train.steps),
        f"{where}: section 'optimizer'",
    )
    cfg = RunConfig(
        data=_section(DataSection, data["data"], f"{where}: section 'data'"),
        train=train,
        init_from=data.get("init_from"),
        model=model,
        mesh=dict(data.get("mesh") or {"data": 1, "fsdp": -1, "tensor": 1}),
        sharding_rules=data.get("sharding_rules"),
        optimizer=optimizer,
        checkpoint=_section(
            CheckpointSection, data.get("checkpoint"), f"{where}: section 'checkpoint'"
        ),
        path=str(where),
    )
    validate_run_config(cfg, where)
    return cfg


def validate_run_config(cfg: RunConfig, where: str) -> None:
    t = cfg.train

    def positive(value, field):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{where}: field '{field}' must be a positive integer, got {value!r}")

    positive(t.steps, "train.steps")
    positive(t.global_batch_size, "train.global_batch_size")
    positive(t.log_every, "train.log_every")
    positive(cfg.checkpoint.every, "checkpoint.every")
    positive(cfg.checkpoint.keep, "checkpoint.keep")
    if t.micro_batch_size is not None:
        positive(t.micro_batch_size, "train.micro_batch_size")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(
                f"{where}: field 'train.global_batch_size' ({t.global_batch_size}) must "
                f"be a multiple of 'train.micro_batch_size' ({t.micro_batch_size})"
            )
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(
            f"{where}: field 'train.on_nonfinite' must be 'stop' or 'skip', got {t.on_nonfinite!r}"
        )
    if t.num_devices is not None:
        positive(t.num_devices, "train.num_devices")
    if cfg.data.max_length is not None:
        positive(cfg.data.max_length, "data.max_length")
    for name in ("learning_rate", "eps", "clip_norm"):
        if not float(getattr(cfg.optimizer, name)) > 0:
            raise ConfigError(f"{where}: field 'optimizer.{name}' must be positive")
    if not 0 <= cfg.optimizer.warmup_ratio < 1:
        raise ConfigError(f"{where}: field 'optimizer.warmup_ratio' must be in [0, 1)")
    if cfg.optimizer.moment_dtype not in ("float32", "bfloat16"):
        raise ConfigError(
            f"{where}: field 'optimizer.moment_dtype' must be float32 or bfloat16, "
            f"got {cfg.optimizer.moment_dtype!r}"
        )
    for name, allowed in (
        ("compute_dtype", DTYPES),
        ("param_dtype", DTYPES),
        ("remat_policy", REMAT_POLICIES),
    ):
        if name in cfg.model and cfg.model[name] not in allowed:
            raise ConfigError(
                f"{where}: field 'model.{name}' must be one of {allowed}, got {cfg.model[name]!r}"
            )
