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

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ConfigError(ValueError):
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

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // max(self.num_heads, 1))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self, where: str = "model config") -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{where}: num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"{where}: field 'head_dim' must be even for RoPE, got {self.head_dim}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{where}: field '{name}' must be one of {DTYPES}, "
                                  f"got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"{where}: field 'remat_policy' must be one of {REMAT_POLICIES}, "
                              f"got {self.remat_policy!r}")
        if self.unpadded_vocab_size is not None and not 0 < self.unpadded_vocab_size <= self.vocab_size:
            raise ConfigError(f"{where}: field 'unpadded_vocab_size' ({self.unpadded_vocab_size}) "
                              f"must be in 1..vocab_size ({self.vocab_size})")
        check_rope_scaling(self.rope_scaling, where)

    @property
    def rope_type(self) -> str:
        return "default" if not self.rope_scaling else self.rope_scaling["rope_type"]

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
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in data]
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
        raise ConfigError(f"{where}: field 'rope_scaling.rope_type' is {rope_type!r}; "
                          f"supported: {ROPE_TYPES}")
    rope_scaling["rope_type"] = rope_type
    rope_scaling.pop("type", None)
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope_scaling]
        if missing:
            raise ConfigError(f"{where}: field 'rope_scaling' of type llama3 lacks {missing}")
        if not rope_scaling["high_freq_factor"] > rope_scaling["low_freq_factor"]:
            raise ConfigError(f"{where}: field 'rope_scaling.high_freq_factor' must exceed "
                              f"low_freq_factor")


# -- YAML loading with overrides ------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3). Values are parsed as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw else ""


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


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
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
