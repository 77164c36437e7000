"""S3 speech tokenizer weights: import from the official ONNX files and from PyTorch state dicts
in the `s3tokenizer` naming; save to and load from a tokenizer folder.

A tokenizer folder holds
- `model.safetensors`: the tensors under the `s3tokenizer` state-dict names and layouts
  (`encoder.conv1.weight` [D, n_mels, 3], `encoder.blocks.0.attn.query.weight` [out, in], ...,
  `quantizer._codebook.embed` [4096, D] for v1, `quantizer._codebook.project_down.*` for v2),
  float32, so the folder's weights load into the package as they are;
- `speech_tokenizer.json`: format, version, official name, codebook size, units per second,
  sample rate and the sizes (mels, width, heads, layers).
Both are written into a temporary sibling folder that replaces the target only when complete.

ONNX import reads the graph's initializers by the names `s3tokenizer.utils.onnx2torch` (0.3.0)
maps: the convs by their initializer names (`onnx::Conv_1519`... for v1, `encoders.conv1.*` for
v1_25hz, `onnx::Conv_2216`... for v2), the block weights by the name of the node that consumes
them (`/blocks.0/attn/query/MatMul` -> `...attn.query.weight`, transposed; `.../Add` -> bias;
LayerNorm as `Mul`/`Add_1` or a `LayerNormalization` node), the v1 codebook as the input of
`/quantizer/rq/model/layers.0/_codebook/Pow_1` (stored [D, K]), the v2 projection as
`onnx::MatMul_2536` and `quantizer.project_in.bias`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cslm_jax.speech.s3 import (
    VERSIONS,
    S3Config,
    SpeechTokenizerError,
    canonical_version,
    check_params,
    param_shapes,
)
from cslm_jax.speech.units import TOKENIZER_FILE

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = TOKENIZER_FILE
FORMAT = "cslm_jax.speech_tokenizer"
FORMAT_VERSION = 1
OFFICIAL_HEAD_DIM = 64

# Per-block tensors: our name -> (state-dict suffix, layout). Layouts: "vec" as is, "linear"
# [out, in] <-> [in, out], "fsmn" [D, 1, 31] <-> [31, D].
BLOCK_TENSORS = {
    "attn_ln_w": ("attn_ln.weight", "vec"),
    "attn_ln_b": ("attn_ln.bias", "vec"),
    "q_w": ("attn.query.weight", "linear"),
    "q_b": ("attn.query.bias", "vec"),
    "k_w": ("attn.key.weight", "linear"),
    "v_w": ("attn.value.weight", "linear"),
    "v_b": ("attn.value.bias", "vec"),
    "o_w": ("attn.out.weight", "linear"),
    "o_b": ("attn.out.bias", "vec"),
    "mlp_ln_w": ("mlp_ln.weight", "vec"),
    "mlp_ln_b": ("mlp_ln.bias", "vec"),
    "fc1_w": ("mlp.0.weight", "linear"),
    "fc1_b": ("mlp.0.bias", "vec"),
    "fc2_w": ("mlp.2.weight", "linear"),
    "fc2_b": ("mlp.2.bias", "vec"),
    "fsmn_w": ("attn.fsmn_block.weight", "fsmn"),
}
TOP_TENSORS = {
    "conv1_w": ("encoder.conv1.weight", "conv"),
    "conv1_b": ("encoder.conv1.bias", "vec"),
    "conv2_w": ("encoder.conv2.weight", "conv"),
    "conv2_b": ("encoder.conv2.bias", "vec"),
    "pos_emb": ("encoder.positional_embedding", "vec"),
    "codebook": ("quantizer._codebook.embed", "vec"),
    "proj_w": ("quantizer._codebook.project_down.weight", "linear"),
    "proj_b": ("quantizer._codebook.project_down.bias", "vec"),
}


def _to_ours(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return w.T
    if layout == "conv":  # [out, in, k] -> [k, in, out]
        return w.transpose(2, 1, 0)
    if layout == "fsmn":  # [D, 1, k] -> [k, D]
        return w[:, 0, :].T
    return w


def _to_torch(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return w.T
    if layout == "conv":
        return w.transpose(2, 1, 0)
    if layout == "fsmn":
        return w.T[:, None, :]
    return w


def _torch_shape(shape: tuple, layout: str) -> tuple:
    return tuple(_to_torch(np.empty(shape, np.uint8), layout).shape)


# -- state dict <-> parameters -------------------------------------------------------------------


def infer_config(sd: dict, version: str, source: str, n_head: int | None = None) -> S3Config:
    """Sizes from the tensors (width and mels from conv1, layers from the block indices); heads
    from `n_head`, else width / 64 (the official head size)."""
    version = canonical_version(version)
    arch = VERSIONS[version].arch
    if "encoder.conv1.weight" not in sd:
        raise SpeechTokenizerError(
            f"{source}: missing tensor encoder.conv1.weight (not an S3 "
            f"speech tokenizer state dict?)"
        )
    w = np.shape(sd["encoder.conv1.weight"])
    if len(w) != 3 or w[2] != 3:
        raise SpeechTokenizerError(
            f"{source}: tensor encoder.conv1.weight has shape {w}, expected [width, mels, 3]"
        )
    has_v2 = any("fsmn_block" in k or "project_down" in k for k in sd)
    has_v1 = "quantizer._codebook.embed" in sd
    if arch == "v1" and has_v2 and not has_v1:
        raise SpeechTokenizerError(
            f"{source}: holds a v2 tokenizer (FSMN blocks, FSQ projection), "
            f"not {version}; pass --version v2_25hz"
        )
    if arch == "v2" and has_v1 and not has_v2:
        raise SpeechTokenizerError(
            f"{source}: holds a v1 tokenizer (VQ codebook), not {version}; "
            f"pass --version v1 or v1_25hz"
        )
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.blocks\.(\d+)\.", k)] if m}
    if not layers:
        raise SpeechTokenizerError(f"{source}: no encoder.blocks.N.* tensors")
    d = int(w[0])
    n_ctx = (
        int(np.shape(sd["encoder.positional_embedding"])[0])
        if arch == "v1" and "encoder.positional_embedding" in sd
        else 1500
    )
    return S3Config(
        version=version,
        n_mels=int(w[1]),
        n_state=d,
        n_head=n_head or max(1, d // OFFICIAL_HEAD_DIM),
        n_layer=max(layers) + 1,
        n_ctx=n_ctx,
    )


def from_state_dict(sd: dict, cfg: S3Config, source: str, strict: bool = True) -> dict:
    """An `s3tokenizer` state dict (numpy arrays) -> our parameter pytree. Names a missing or
    mis-shaped tensor, and (if `strict`) an unexpected one."""
    shapes = param_shapes(cfg)
    used = set()

    def get(name, layout, shape):
        if name not in sd:
            raise SpeechTokenizerError(f"{source}: missing tensor {name} (for {cfg.version})")
        w = np.asarray(sd[name])
        want = _torch_shape(shape, layout)
        if tuple(w.shape) != want:
            raise SpeechTokenizerError(
                f"{source}: tensor {name} has shape {tuple(w.shape)}, "
                f"expected {want} for {cfg.version}"
            )
        used.add(name)
        return np.ascontiguousarray(_to_ours(w.astype(np.float32), layout))

    params = {
        k: get(TOP_TENSORS[k][0], TOP_TENSORS[k][1], s) for k, s in shapes.items() if k != "blocks"
    }
    params["blocks"] = {}
    for k, shape in shapes["blocks"].items():
        suffix, layout = BLOCK_TENSORS[k]
        params["blocks"][k] = np.stack(
            [get(f"encoder.blocks.{i}.{suffix}", layout, shape[1:]) for i in range(cfg.n_layer)]
        )
    extra = sorted(set(sd) - used)
    if strict and extra:
        raise SpeechTokenizerError(
            f"{source}: unexpected tensor {extra[0]} for {cfg.version}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return params


def to_state_dict(cfg: S3Config, params: dict) -> dict:
    """Our parameter pytree -> an `s3tokenizer` state dict (numpy float32, contiguous)."""
    check_params(cfg, params)
    out = {}
    for k, w in params.items():
        if k != "blocks":
            name, layout = TOP_TENSORS[k]
            out[name] = np.ascontiguousarray(_to_torch(np.asarray(w, np.float32), layout))
    for k, w in params["blocks"].items():
        suffix, layout = BLOCK_TENSORS[k]
        for i in range(cfg.n_layer):
            out[f"encoder.blocks.{i}.{suffix}"] = np.ascontiguousarray(
                _to_torch(np.asarray(w[i], np.float32), layout)
            )
    return out


# -- reading files -------------------------------------------------------------------------------

ONNX_CONV = {
    "onnx::Conv_1519": "encoder.conv1.weight",
    "encoders.conv1.weight": "encoder.conv1.weight",
    "onnx::Conv_2216": "encoder.conv1.weight",
    "onnx::Conv_1520": "encoder.conv1.bias",
    "encoders.conv1.bias": "encoder.conv1.bias",
    "onnx::Conv_2217": "encoder.conv1.bias",
    "onnx::Conv_1521": "encoder.conv2.weight",
    "encoders.conv2.weight": "encoder.conv2.weight",
    "onnx::Conv_2218": "encoder.conv2.weight",
    "onnx::Conv_1522": "encoder.conv2.bias",
    "encoders.conv2.bias": "encoder.conv2.bias",
    "onnx::Conv_2219": "encoder.conv2.bias",
}
ONNX_CODEBOOK_NODE = "/quantizer/rq/model/layers.0/_codebook/Pow_1"


def _block_name(node_name: str) -> str | None:
    """`/blocks.0/attn/query/MatMul` -> `encoder.blocks.0.attn.query.weight` (the package's
    renaming); None for a node that holds no parameter."""
    if not node_name.startswith("/blocks."):
        return None
    k = node_name[1:].replace("/", ".")
    for a, b in (
        ("MatMul", "weight"),
        ("Add_1", "bias"),
        ("Mul", "weight"),
        ("Add", "bias"),
        ("mlp.mlp", "mlp"),
        ("fsmn_block.Conv", "fsmn_block.weight"),
    ):
        k = k.replace(a, b)
    return "encoder." + k


def read_onnx(path: Path, version: str | None = None) -> dict:
    """The state dict (s3tokenizer names and layouts) held by an official ONNX tokenizer file.
    With `version`: refuses a first conv whose stride contradicts it (v1: 1, v1_25hz, v2: 2)."""
    sd, stride = _read_onnx(Path(path))
    if version is not None:
        _check_stride(path, stride, version)
    return sd


def _check_stride(path, stride, version: str) -> None:
    want = VERSIONS[canonical_version(version)].stride
    if stride is not None and stride != want:
        raise SpeechTokenizerError(
            f"{path}: the first conv has stride {stride}, {version} has {want}; wrong --version "
            f"(v1: 50 Hz, stride 1; v1_25hz / v2_25hz: 2)"
        )


def _read_onnx(path: Path) -> tuple[dict, int | None]:
    """(state dict, the first conv's stride if the file says it)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise SpeechTokenizerError(
            "reading ONNX files needs the `onnx` package (pip install -r requirements.txt)"
        ) from None
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise SpeechTokenizerError(f"{path}: not an ONNX model ({type(e).__name__}: {e})") from None
    inits = {t.name: t for t in model.graph.initializer}
    if not inits:
        raise SpeechTokenizerError(f"{path}: an ONNX file without initializers (no weights)")
    sd, stride = {}, None

    def arr(name):
        a = numpy_helper.to_array(inits[name]).copy()
        return a

    for node in model.graph.node:
        for name in node.input:
            if name not in inits:
                continue
            if name in ONNX_CONV:
                sd[ONNX_CONV[name]] = arr(name)
                if name in ("onnx::Conv_1519", "encoders.conv1.weight", "onnx::Conv_2216"):
                    strides = [list(a.ints) for a in node.attribute if a.name == "strides"]
                    if strides and strides[0]:
                        stride = int(strides[0][0])
            elif name == "encoders.positional_embedding":
                sd["encoder.positional_embedding"] = arr(name)
            elif name == "quantizer.project_in.bias":
                sd["quantizer._codebook.project_down.bias"] = arr(name)
            elif name == "onnx::MatMul_2536":
                sd["quantizer._codebook.project_down.weight"] = arr(name).T
            elif node.op_type == "LayerNormalization":
                ln = _block_name(node.name.replace("/LayerNormalization", ""))
                if ln is not None and len(node.input) >= 3:
                    if node.input[1] in inits:
                        sd[ln + ".weight"] = arr(node.input[1])
                    if node.input[2] in inits:
                        sd[ln + ".bias"] = arr(node.input[2])
            elif node.name == ONNX_CODEBOOK_NODE:
                sd["quantizer._codebook.embed"] = arr(name).T
            else:
                k = _block_name(node.name)
                if k is not None:
                    a = arr(name)
                    sd[k] = a.T if a.ndim == 2 else a
    return sd, stride


def read_state_dict(path: Path) -> dict:
    """Tensors of a `.pt`/`.pth` (torch.load, weights only) or `.safetensors` file as numpy."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise SpeechTokenizerError(f"{path}: not a safetensors file ({e})") from None
    if suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            import torch
        except ImportError:
            raise SpeechTokenizerError(
                f"{path}: reading PyTorch files needs torch; convert it "
                f"to .safetensors or install torch"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors of many kinds
            why = (
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if "weights_only" not in str(e)
                # torch's advice would run its code
                else "damaged, not a PyTorch file, or holding objects other than tensors"
            )
            raise SpeechTokenizerError(f"{path}: not a PyTorch state dict ({why})") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
            raise SpeechTokenizerError(
                f"{path}: holds a {type(obj).__name__}, not a state dict of tensors"
            )
        return {k: v.detach().float().numpy() for k, v in obj.items()}
    raise SpeechTokenizerError(
        f"{path}: unknown weights format {suffix or '(no suffix)'}; give an "
        f"official .onnx file, a .pt/.pth state dict or a .safetensors file"
    )


def read_weights(path, version: str, n_head: int | None = None) -> tuple[S3Config, dict]:
    """(config, params) from an ONNX file or a state dict in the s3tokenizer naming."""
    path = Path(path)
    if not path.is_file():
        raise SpeechTokenizerError(f"{path}: no such file")
    version = canonical_version(version)
    stride = None
    if path.suffix.lower() == ".onnx":
        sd, stride = _read_onnx(path)
    else:
        sd = read_state_dict(path)
    if (
        version == "v2_25hz"
        and "encoder.positional_embedding" in sd
        and not any("fsmn_block" in k for k in sd)
    ):
        raise SpeechTokenizerError(
            f"{path}: holds a v1 tokenizer (absolute positions, no FSMN), "
            f"not v2_25hz; pass --version v1 or v1_25hz"
        )
    cfg = infer_config(sd, version, str(path), n_head)
    _check_stride(path, stride, version)
    return cfg, from_state_dict(sd, cfg, str(path))


# -- tokenizer folders ---------------------------------------------------------------------------


def save_tokenizer(out, cfg: S3Config, params: dict, force: bool = False) -> Path:
    """Write a tokenizer folder atomically; refuses a non-empty `out` unless `force`."""
    from safetensors.numpy import save_file

    from cslm_jax.storage.checkpoint import atomic_dir

    out = Path(out)
    sd = to_state_dict(cfg, params)
    spec = VERSIONS[cfg.version]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": cfg.version,
        "name": spec.name,
        "codebook_size": spec.codebook_size,
        "units_per_second": spec.units_per_second,
        "sample_rate": 16000,
        "n_mels": cfg.n_mels,
        "n_state": cfg.n_state,
        "n_head": cfg.n_head,
        "n_layer": cfg.n_layer,
        "n_ctx": cfg.n_ctx,
    }
    with atomic_dir(out, force=force, tool="import-speech-tokenizer") as tmp:
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_tokenizer_files(path) -> tuple[S3Config, dict]:
    """(config, params) of a tokenizer folder, checked: the JSON's format and version, every
    tensor present with its shape."""
    path = Path(path)
    cfile, wfile = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise SpeechTokenizerError(
            f"{path}: no such tokenizer folder (make one with cslm-jax import-speech-tokenizer)"
        )
    for f in (cfile, wfile):
        if not f.is_file():
            raise SpeechTokenizerError(
                f"{path}: missing {f.name}; not a speech tokenizer folder "
                f"(make one with cslm-jax import-speech-tokenizer)"
            )
    try:
        meta = json.loads(cfile.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpeechTokenizerError(f"{cfile}: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SpeechTokenizerError(
            f"{cfile}: field format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
            f"expected {FORMAT!r}"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise SpeechTokenizerError(
            f"{cfile}: format_version {meta.get('format_version')!r}, this "
            f"cslm_jax reads {FORMAT_VERSION}"
        )
    try:
        cfg = S3Config(
            version=meta["version"],
            n_mels=int(meta["n_mels"]),
            n_state=int(meta["n_state"]),
            n_head=int(meta["n_head"]),
            n_layer=int(meta["n_layer"]),
            n_ctx=int(meta.get("n_ctx", 1500)),
        )
    except KeyError as e:
        raise SpeechTokenizerError(f"{cfile}: missing field {e.args[0]}") from None
    except SpeechTokenizerError as e:
        raise SpeechTokenizerError(f"{cfile}: {e}") from None
    for field, want in (
        ("codebook_size", cfg.codebook_size),
        ("units_per_second", cfg.units_per_second),
    ):
        if meta.get(field) != want:
            raise SpeechTokenizerError(
                f"{cfile}: field {field} is {meta.get(field)!r}, {cfg.version} has {want}"
            )
    sd = read_state_dict(wfile)
    return cfg, from_state_dict(sd, cfg, str(wfile))


def import_speech_tokenizer(
    src, version: str, out, force: bool = False, n_head: int | None = None
) -> tuple[S3Config, Path]:
    """Read official weights (ONNX or state dict) and write a tokenizer folder."""
    from cslm_jax.storage.outputs import check_output_dir

    check_output_dir(
        out,
        force,
        inputs=[("--from", src)],  # before reading a 1 GB file
        tool="import-speech-tokenizer",
    )
    cfg, params = read_weights(src, version, n_head)
    return cfg, save_tokenizer(out, cfg, params, force=force)


def save_random_tokenizer(
    out, version: str = "v1", seed: int = 0, force: bool = False, **sizes
) -> Path:
    """A random-weight tokenizer folder (tests, benchmarks); `sizes` as `s3.init_random`."""
    from cslm_jax.speech.s3 import init_random

    cfg, params = init_random(version, seed, **sizes)
    return save_tokenizer(out, cfg, params, force=force)


__all__ = [
    "read_weights",
    "read_onnx",
    "read_state_dict",
    "from_state_dict",
    "to_state_dict",
    "save_tokenizer",
    "load_tokenizer_files",
    "import_speech_tokenizer",
    "save_random_tokenizer",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
]
