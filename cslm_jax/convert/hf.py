"""Two-way conversion between Hugging Face `LlamaForCausalLM` folders and cslm_jax checkpoints.

One table (`cslm_jax.model.schema.WEIGHTS`: HF tensor name <-> our parameter path, with a
layout) serves both directions. Weights stream tensor by tensor: import fills one preallocated tree from safetensors
read one tensor at a time; export writes safetensors shard by shard from the restored tree, so
neither direction ever holds two full copies of the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import ml_dtypes
import numpy as np

from cslm_jax.config import ConfigError, ModelConfig, check_rope_scaling, pad_to_multiple
from cslm_jax.errors import CslmError
from cslm_jax.model.schema import Weight, hf_shape, param_shapes, weights
from cslm_jax.model.vocab import VocabInfo, existing_layout, extend_tokenizer, load_tokenizer
from cslm_jax.storage import fs
from cslm_jax.storage.checkpoint import (
    atomic_dir,
    iter_params,
    param_names,
    read_metadata,
    resolve_model_dir,
    save_model_checkpoint,
)
from cslm_jax.storage.outputs import check_output_dir

NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_SPEECH_UNITS = 4096
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# HF config fields carried from the source checkpoint to the export unchanged.
HF_PASSTHROUGH = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "attention_dropout",
    "pretraining_tp",
)
# Buffers some checkpoints store that carry no learned weights.
IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionError(CslmError):
    """A Hugging Face folder or checkpoint cannot be converted; the message names file and field."""


# -- layouts (the table of weights, HF names included, is cslm_jax.model.schema) ----------------


def to_ours(m: Weight, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """HF layout -> ours (without the vocabulary extension, done by the caller)."""
    d, dh = cfg.hidden_size, cfg.head_dim
    if m.hf_layout == "copy":
        return w
    if m.hf_layout == "linear":
        return w.T
    if m.hf_layout == "qkv":  # [N*Dh, D] -> [D, N, Dh]
        return w.T.reshape(d, w.shape[0] // dh, dh)
    if m.hf_layout == "out":  # [D, H*Dh] -> [H, Dh, D]
        return w.T.reshape(w.shape[1] // dh, dh, d)
    raise AssertionError(m.hf_layout)


def to_hf(m: Weight, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Ours -> HF layout (inverse of `to_ours`), contiguous."""
    d = cfg.hidden_size
    if m.hf_layout == "copy":
        out = w
    elif m.hf_layout == "linear":
        out = w.T
    elif m.hf_layout == "qkv":  # [D, N, Dh] -> [N*Dh, D]
        out = w.reshape(d, -1).T
    elif m.hf_layout == "out":  # [H, Dh, D] -> [D, H*Dh]
        out = w.reshape(-1, d).T
    else:
        raise AssertionError(m.hf_layout)
    return np.ascontiguousarray(out)


# -- reading Hugging Face folders ----------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing; --hf-dir must be a Hugging Face model folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: top level must be an object")
    return data


def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """Our ModelConfig from an HF Llama config.json (transformers v4 `rope_scaling` + `rope_theta`
    or v5 `rope_parameters`). Refuses other architectures and unsupported options by field."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (archs and "LlamaForCausalLM" not in archs):
        raise ConversionError(
            f"{where}: fields 'model_type'={hf.get('model_type')!r}, "
            f"'architectures'={archs!r}: only Llama (LlamaForCausalLM) "
            f"checkpoints are supported"
        )
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ConversionError(
                f"{where}: field '{field}' is true; Llama-3 has no biases and "
                f"this model does not implement them"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu'")
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        if field not in hf:
            raise ConversionError(f"{where}: missing field '{field}'")
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict):
        rope = dict(rope)
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = None if rope.get("rope_type", rope.get("type")) in (None, "default") else rope
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
    try:
        check_rope_scaling(scaling, where)
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
    except ConfigError as e:
        raise ConversionError(str(e).replace("model config", where)) from None


SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class SafetensorsFile:
    """Reads tensors from one safetensors file with plain reads into fresh buffers.

    (The `safetensors` package memory-maps the file; every page it touches then counts as
    resident memory until the map closes, which for a multi-GB shard looks like a second copy.)
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ConversionError(f"{path}: not a safetensors file (shorter than its header)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ConversionError(
                    f"{path}: not a safetensors file (header length {n} exceeds the file)"
                )
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConversionError(f"{path}: not a safetensors file (bad header: {e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                begin, end = e["data_offsets"]
                entry = (e["dtype"], tuple(int(d) for d in e["shape"]), int(begin), int(end))
            except (KeyError, TypeError, ValueError):
                raise ConversionError(
                    f"{path}: tensor {name}: malformed header entry {e!r}"
                ) from None
            if not 0 <= entry[2] <= entry[3] <= size - self.data_start:
                raise ConversionError(
                    f"{path}: tensor {name}: data offsets {e['data_offsets']} lie "
                    f"outside the file (truncated download?)"
                )
            self.entries[name] = entry

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> str:
        code = self.entries[name][0]
        if code not in SAFETENSORS_DTYPES:
            raise ConversionError(
                f"{self.path}: tensor {name} has dtype {code}; supported: "
                f"{sorted(SAFETENSORS_DTYPES)}"
            )
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        dtype = NP_DTYPES[self.dtype(name)]
        _, shape, begin, end = self.entries[name]
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ConversionError(
                f"{self.path}: tensor {name}: {end - begin} bytes do not hold "
                f"shape {shape} of {dtype}"
            )
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
                raise ConversionError(f"{self.path}: tensor {name}: file ends early")
        return out


class SafetensorsFolder:
    """The tensors of an HF folder: `model.safetensors`, or the shards listed by
    `model.safetensors.index.json`. Headers are read up front; weights only by `get`."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(
                    f"{index}: invalid index (needs field 'weight_map'): {e}"
                ) from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files, weight_map = [single.name], None
        else:
            raise ConversionError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
        self.files: dict[str, SafetensorsFile] = {}
        for fname in files:
            path = hf_dir / fname
            if not path.is_file():
                raise ConversionError(f"{index}: lists shard {fname}, which does not exist")
            f = SafetensorsFile(path)
            for key in f.entries:
                self.files[key] = f
        if weight_map is not None:
            for key, fname in weight_map.items():
                if key not in self.files or self.files[key].path.name != fname:
                    raise ConversionError(
                        f"{index}: tensor {key} is mapped to {fname} but that file does not hold it"
                    )
        self.where = {k: f.path for k, f in self.files.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[name].shape(name)

    def dtype(self, name: str) -> str:
        return self.files[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[name].get(name)


# -- import ------------------------------------------------------------------------------------


def import_hf(
    hf_dir,
    out,
    speech_units: int | None = None,
    pad_vocab_multiple: int = 128,
    new_rows: str = "mean",
    dtype: str | None = None,
    seed: int = 0,
    force: bool = False,
    log=print,
    speech_tokenizer: str | None = None,
) -> Path:
    """Convert an HF Llama folder into a cslm_jax model checkpoint, extending the vocabulary with
    `speech_units` units and the CSLM control tokens (none when 0; default 4096, CosyVoice's
    codebook; `speech_tokenizer`, a version or a tokenizer / extract-units folder, gives its
    codebook size). A folder whose tokenizer already holds the CSLM tokens (one we exported)
    keeps its layout."""
    if speech_tokenizer is not None:
        from cslm_jax.speech.units import SpeechUnitsError, speech_units_info

        try:
            info = speech_units_info(speech_tokenizer, "--speech-tokenizer")
        except SpeechUnitsError as e:
            raise ConversionError(str(e)) from None
        if speech_units is not None and speech_units != info.codebook_size:
            raise ConversionError(
                f"--speech-units {speech_units} disagrees with --speech-tokenizer "
                f"{speech_tokenizer} ({info.source}: {info.codebook_size} codes); "
                f"give one of them"
            )
        speech_units = info.codebook_size
    inputs = [("--hf-dir", hf_dir)]
    if speech_tokenizer is not None and (
        fs.is_remote(speech_tokenizer) or Path(speech_tokenizer).exists()
    ):  # not a version
        inputs.append(("--speech-tokenizer", speech_tokenizer))
    check_output_dir(out, force, inputs=inputs, tool="import-hf")  # before reading any weights
    hf_dir = fs.local_dir(fs.path(hf_dir, "--hf-dir"), "Hugging Face folder")  # gs://: staged
    hf = read_hf_config(hf_dir)
    base_cfg = model_config_from_hf(hf, str(hf_dir / "config.json"))
    if new_rows not in ("mean", "normal"):
        raise ConversionError(f"--new-rows must be 'mean' or 'normal', got {new_rows!r}")
    tensors = SafetensorsFolder(hf_dir)

    # Check every tensor's presence and shape before reading any weights.
    base_rows = base_cfg.vocab_size
    expected: set[str] = set()
    for m in weights(base_cfg):
        for i in range(base_cfg.num_layers) if m.per_layer else [None]:
            name = m.hf_name.format(i=i)
            want = hf_shape(m, base_cfg, base_rows)
            if name not in tensors.where:
                raise ConversionError(f"{hf_dir}: tensor {name} is missing (expected shape {want})")
            got = tensors.shape(name)
            if got != want:
                raise ConversionError(
                    f"{tensors.where[name]}: tensor {name} has shape {got}, "
                    f"config.json implies {want}"
                )
            expected.add(name)
    unexpected = sorted(
        k
        for k in tensors.where
        if k not in expected
        and not k.endswith(IGNORED_TENSOR_SUFFIXES)
        and not (k == "lm_head.weight" and base_cfg.tie_word_embeddings)
    )
    if unexpected:
        raise ConversionError(
            f"{tensors.where[unexpected[0]]}: unexpected tensor(s) {unexpected[:5]} "
            f"for a Llama model; is config.json the right one?"
        )

    tokenizer = load_tokenizer(hf_dir)
    layout = existing_layout(tokenizer, str(hf_dir))
    if layout is not None:
        if speech_units is not None and speech_units != layout.unit_count:
            raise ConversionError(
                f"{hf_dir}: tokenizer already holds {layout.unit_count} speech units, "
                f"--speech-units asks for {speech_units}"
            )
        if layout.size != base_rows:
            raise ConversionError(
                f"{hf_dir}: tokenizer holds {layout.size} tokens with CSLM tokens, "
                f"config.json field 'vocab_size' is {base_rows}"
            )
        info = layout
    else:
        units = DEFAULT_SPEECH_UNITS if speech_units is None else speech_units
        info = extend_tokenizer(tokenizer, units, base_rows, where=str(hf_dir))
    padded = pad_to_multiple(info.size, pad_vocab_multiple)
    info = dataclasses.replace(info, padded_size=padded)

    store = dtype or tensors.dtype("model.embed_tokens.weight")
    np_dtype = NP_DTYPES[store]
    cfg = base_cfg.replace(
        vocab_size=padded, unpadded_vocab_size=info.size, param_dtype=store, compute_dtype=store
    )
    shapes = param_shapes(cfg)
    rng = np.random.default_rng(seed)

    def build(m: Weight):
        """One parameter of ours, filled from its HF tensor(s) read one at a time."""
        if m.per_layer:
            key = m.name
            arr = np.empty(shapes["layers"][key][0], np_dtype)
            for i in range(cfg.num_layers):
                arr[i] = to_ours(m, tensors.get(m.hf_name.format(i=i)), cfg)
        elif m.vocab_rows:
            arr = np.zeros(shapes[m.path][0], np_dtype)
            rows = arr if m.axes[0] == "vocab" else arr.T  # embed [V, D], lm_head [D, V]
            rows[:base_rows] = tensors.get(m.hf_name)
            _init_new_rows(rows, base_rows, info.size, new_rows, cfg.initializer_range, rng)
        else:
            arr = np.asarray(to_ours(m, tensors.get(m.hf_name), cfg), np_dtype)
        return arr

    # Lazy leaves: each parameter is built when the checkpoint writer reaches it, then dropped.
    params: dict = {"layers": {}}
    for m in weights(cfg):
        if m.per_layer:
            params["layers"][m.name] = functools.partial(build, m)
        else:
            params[m.path] = functools.partial(build, m)
    log(
        f"import-hf: {hf_dir} -> {out}: {cfg.num_params() / 1e6:.1f}M parameters ({store}), "
        f"vocabulary {base_rows} + {info.size - base_rows} CSLM tokens, padded to {padded}"
    )
    extra = {
        "hf": {
            "config": hf,
            "generation_config": _read_json(hf_dir / "generation_config.json"),
            "source": str(hf_dir.absolute()),
        }
    }
    return save_model_checkpoint(
        out, params, cfg, info, tokenizer, extra, force=force, tool="import-hf"
    )


def _init_new_rows(rows: np.ndarray, start: int, stop: int, how: str, std: float, rng) -> None:
    """Fill rows[start:stop] (the added tokens) from the base rows[:start]; padding stays zero."""
    if stop <= start:
        return
    if how == "mean":
        # float64 accumulation without materialising a float64 copy of the whole table
        rows[start:stop] = np.mean(rows[:start], axis=0, dtype=np.float64).astype(rows.dtype)
    else:
        rows[start:stop] = rng.normal(0.0, std, size=(stop - start, rows.shape[1])).astype(
            rows.dtype
        )


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON: {e}") from None


# -- export ------------------------------------------------------------------------------------


def hf_config_for(cfg: ModelConfig, vocab: VocabInfo, meta: dict, dtype: str) -> dict:
    """config.json for `LlamaForCausalLM`, in the transformers-v4 layout that real Llama-3.1
    folders use (`rope_theta` + `rope_scaling`); transformers v5 reads it too."""
    source = (meta.get("hf") or {}).get("config") or {}
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab.size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    for key in HF_PASSTHROUGH:
        if key in source:
            out[key] = source[key]
    if vocab.unit_count:
        out["cslm_vocab"] = {k: v for k, v in vocab.to_dict().items() if k != "padded_size"}
    return out


def generation_config_for(vocab: VocabInfo, meta: dict, hf_config: dict) -> dict:
    """The source's generation config; with speech units, `<eoa>` also stops generation and the
    reference's sampling defaults (temperature 1.0, top-p 0.7) apply."""
    gen = dict((meta.get("hf") or {}).get("generation_config") or {})
    for key in ("bos_token_id", "eos_token_id"):
        if key not in gen and key in hf_config:
            gen[key] = hf_config[key]
    if vocab.unit_count:
        eos = gen.get("eos_token_id")
        eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
        eoa = vocab.token_id("<eoa>")
        gen["eos_token_id"] = eos + ([eoa] if eoa not in eos else [])
        gen.update(do_sample=True, temperature=1.0, top_p=0.7)
    gen.pop("transformers_version", None)
    return gen


def plan_shards(items: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group (name, nbytes) in order into shards of at most max_bytes (a bigger tensor alone)."""
    shards, current, size = [], [], 0
    for name, nbytes in items:
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def export_hf(
    ckpt,
    out,
    dtype: str = "bfloat16",
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log=print,
) -> Path:
    """Write an HF `LlamaForCausalLM` folder (config, generation config, safetensors, tokenizer)
    from a cslm_jax model checkpoint, trimming vocabulary padding. Atomic: the folder appears
    only when complete."""
    from safetensors import numpy as safetensors_numpy

    if dtype not in NP_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
    check_output_dir(out, force, inputs=[("--ckpt", ckpt)], tool="export-hf")
    ckpt = resolve_model_dir(ckpt, flag="--ckpt")  # a checkpoint, or a run folder's model/
    meta, cfg, vocab = read_metadata(ckpt)
    np_dtype = NP_DTYPES[dtype]
    tok_dir = ckpt / "tokenizer"
    if not tok_dir.is_dir():
        raise ConversionError(f"{tok_dir}: missing; the checkpoint carries no tokenizer to export")
    by_ours = {m.path.replace("/", "."): m for m in weights(cfg)}
    # HF tensors in the order parameters are restored, so shards fill as parameters stream in.
    sizes = [
        (m.hf_name.format(i=i), int(np.prod(hf_shape(m, cfg, vocab.size))) * np_dtype.itemsize)
        for m in (by_ours[name] for name in param_names(cfg))
        for i in (range(cfg.num_layers) if m.per_layer else [None])
    ]
    shards = plan_shards(sizes, max_shard_bytes)
    fname_of = {
        n: (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        for k, shard in enumerate(shards)
        for n in shard
    }
    with atomic_dir(out, force=force, staged=True, last="config.json", tool="export-hf") as tmp:
        pending: dict[str, np.ndarray] = {}
        total = 0
        shard_iter = iter(shards)
        current = set(next(shard_iter))
        for name, w in iter_params(ckpt):
            m = by_ours[name]
            for i in range(cfg.num_layers) if m.per_layer else [None]:
                t = to_hf(m, w if i is None else w[i], cfg)
                if m.vocab_rows:
                    t = t[: vocab.size]
                hf_name = m.hf_name.format(i=i)
                pending[hf_name] = np.ascontiguousarray(t.astype(np_dtype, copy=False))
                if set(pending) == current:
                    safetensors_numpy.save_file(
                        pending, str(tmp / fname_of[hf_name]), metadata={"format": "pt"}
                    )
                    total += sum(a.nbytes for a in pending.values())
                    pending = {}
                    current = set(next(shard_iter, []))
            del w
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": fname_of}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf_config = hf_config_for(cfg, vocab, meta, dtype)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = generation_config_for(vocab, meta, hf_config)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for f in tok_dir.iterdir():
            f.copy(fs.path(tmp / f.name), overwrite=True)
    log(
        f"export-hf: {ckpt} -> {out}: {len(shards)} safetensors file(s), {total / 1e6:.1f} MB "
        f"({dtype}), vocabulary {vocab.size} (padding to {vocab.padded_size} trimmed)"
    )
    return fs.path(out)
