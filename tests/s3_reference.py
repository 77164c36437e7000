"""The `s3tokenizer` package (0.3.0, installed for tests with --no-deps: requirements-nodeps.txt)
as the reference for cslm_jax.speech, and helpers shared by the speech tests.

`s3tokenizer.utils` imports `torchaudio` at the top, only for `load_audio` (reading files),
which no test uses; torchaudio would pull a second torch build, so a bare module stands in for
it in sys.modules before the package is imported. Nothing of torchaudio is ever called: a call
would fail with AttributeError."""

import sys
import types

import numpy as np

_STUB = "torchaudio" not in sys.modules
if _STUB:
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")

import s3tokenizer  # noqa: E402
import torch  # noqa: E402
from s3tokenizer.model import ModelConfig as ModelConfigV1  # noqa: E402
from s3tokenizer.model import S3Tokenizer
from s3tokenizer.model_v2 import ModelConfig as ModelConfigV2  # noqa: E402
from s3tokenizer.model_v2 import S3TokenizerV2

# The package holds its own reference now; the stand-in leaves sys.modules so that nothing else
# (transformers probes `importlib.util.find_spec("torchaudio")`, which fails on a module without
# a spec) takes torchaudio for installed.
if _STUB:
    del sys.modules["torchaudio"]

TINY = dict(n_state=128, n_head=2, n_layer=2)


def package_model(cfg, state_dict=None):
    """The package's model of `cfg`'s version and sizes, loaded (strictly) with `state_dict`."""
    name = cfg.spec.name
    sizes = dict(
        n_mels=cfg.n_mels,
        n_audio_state=cfg.n_state,
        n_audio_head=cfg.n_head,
        n_audio_layer=cfg.n_layer,
        n_audio_ctx=cfg.n_ctx,
    )
    if cfg.arch == "v2":
        model = S3TokenizerV2(name, ModelConfigV2(**sizes))
    else:
        model = S3Tokenizer(name, ModelConfigV1(**sizes))
    if state_dict is not None:
        model.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True
        )
    return model.eval()


def package_mels(waves):
    """Per-utterance log-mels as the package computes them, and its padded batch."""
    mels = [s3tokenizer.log_mel_spectrogram(torch.from_numpy(np.array(w))) for w in waves]
    mel, mel_len = s3tokenizer.padding(mels)
    return mels, mel, mel_len


def speechlike(lengths, seed=0):
    """Test audio: harmonics with a moving pitch, an amplitude envelope and a noise floor."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n) / 16000.0
        f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
        phase = 2 * np.pi * np.cumsum(f0) / 16000.0
        x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6))
        x *= 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 1.3 * t + rng.uniform(0, 6)))
        x += 0.02 * rng.standard_normal(n)
        out.append(x.astype(np.float32))
    return out


def near_ties(cfg, params, hidden_ref, tol):
    """Per frame: True where the package's choice is within float error of another code (v1: the
    two nearest codewords' distances within `tol`; v2: an FSQ projection within `tol` of a
    rounding boundary), from the package's float32 encoder output `hidden_ref [T, D]`."""
    h = np.asarray(hidden_ref, np.float64)
    if cfg.arch == "v1":
        x = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
        e = np.asarray(params["codebook"], np.float64)
        d = (x * x).sum(-1, keepdims=True) - 2 * x @ e.T + (e * e).sum(-1)[None]
        top2 = np.sort(d, axis=-1)[:, :2]
        return (top2[:, 1] - top2[:, 0]) < tol
    v = np.tanh(h @ np.asarray(params["proj_w"], np.float64) + params["proj_b"]) * 0.999
    return (np.abs(np.abs(v) - 0.5) < tol).any(-1)


def with_data_codebook(tok, seed=0):
    """`tok` (v1 family) with a codebook drawn around its own encoder outputs on other audio,
    as a trained codebook sits on the data: codes vary from frame to frame (a codebook of random
    directions gives nearly one code for all), and nearest codewords come close, as in use."""
    from cslm_jax.speech import SpeechTokenizer

    if tok.config.arch != "v1":
        return tok
    rng = np.random.default_rng(seed)
    mel, mel_len = tok.log_mel(speechlike([48000, 40000], seed=seed + 100))
    h, n = tok.hidden(mel[:, :3000], mel_len)
    frames = np.concatenate([h[i, : n[i]] for i in range(len(n))])
    frames = frames - frames.mean(0) * rng.uniform(0.5, 1.0)  # keep part of the common offset
    rows = frames[rng.integers(0, len(frames), tok.codebook_size)]
    rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    rows = rows + 0.3 * rng.standard_normal(rows.shape) / np.sqrt(rows.shape[1])
    params = dict(tok.params)
    params["codebook"] = (rows + frames.mean(0) / np.linalg.norm(frames.mean(0))).astype(np.float32)
    return SpeechTokenizer(
        tok.config,
        {
            k: np.asarray(v) if k != "blocks" else {b: np.asarray(x) for b, x in v.items()}
            for k, v in params.items()
        },
    )


CONV_NAMES = {  # the official files' conv initializer names (s3tokenizer.utils.onnx2torch)
    "v1": ("onnx::Conv_1519", "onnx::Conv_1520", "onnx::Conv_1521", "onnx::Conv_1522"),
    "v1_25hz": (
        "encoders.conv1.weight",
        "encoders.conv1.bias",
        "encoders.conv2.weight",
        "encoders.conv2.bias",
    ),
    "v2_25hz": ("onnx::Conv_2216", "onnx::Conv_2217", "onnx::Conv_2218", "onnx::Conv_2219"),
}


def write_official_onnx(path, cfg, sd):
    """An ONNX file laid out as the official tokenizer files are, as far as weights go: the same
    initializer names for the convs, positions and quantizer, block weights as anonymous
    initializers consumed by nodes named `/blocks.N/...` (MatMul [in, out], Add with the bias on
    either side, v1's LayerNorm as Mul/Add_1, v2's as LayerNormalization, the FSMN Conv), the v1
    codebook [D, K] feeding `/quantizer/rq/model/layers.0/_codebook/Pow_1` (and a MatMul), the
    first conv's stride in its attribute. The graph is not meant to run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []
    counter = iter(range(3000, 100000))

    def init(arr, name=None):
        name = name or f"onnx::Anon_{next(counter)}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), name))
        return name

    def node(op, name, inputs, **attrs):
        out = f"{name}_output_0"
        nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    c1w, c1b, c2w, c2b = CONV_NAMES[cfg.version]
    x = node(
        "Conv",
        "/conv1/Conv",
        ["mel", init(sd["encoder.conv1.weight"], c1w), init(sd["encoder.conv1.bias"], c1b)],
        strides=[cfg.stride],
        pads=[1, 1],
        kernel_shape=[3],
    )
    x = node(
        "Conv",
        "/conv2/Conv",
        [x, init(sd["encoder.conv2.weight"], c2w), init(sd["encoder.conv2.bias"], c2b)],
        strides=[2],
        pads=[1, 1],
        kernel_shape=[3],
    )
    if cfg.arch == "v1":
        x = node(
            "Add",
            "/Add",
            [x, init(sd["encoder.positional_embedding"], "encoders.positional_embedding")],
        )
    eps = node(
        "Constant",
        "/Constant_eps",
        [],
        value=helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
    )
    for i in range(cfg.n_layer):
        p, b = f"/blocks.{i}", f"encoder.blocks.{i}"

        def layer_norm(ln, x):
            if cfg.arch == "v2":
                return node(
                    "LayerNormalization",
                    f"{p}/{ln}/LayerNormalization",
                    [x, init(sd[f"{b}.{ln}.weight"]), init(sd[f"{b}.{ln}.bias"])],
                )
            y = node("Add", f"{p}/{ln}/Add", [x, eps])
            y = node("Mul", f"{p}/{ln}/Mul", [y, init(sd[f"{b}.{ln}.weight"])])
            return node("Add", f"{p}/{ln}/Add_1", [init(sd[f"{b}.{ln}.bias"]), y])

        def linear(mod, x, bias=True):
            key = f"{b}.{mod.replace('/', '.').replace('mlp.mlp', 'mlp')}"
            y = node("MatMul", f"{p}/{mod}/MatMul", [x, init(sd[f"{key}.weight"].T)])
            if bias:
                y = node("Add", f"{p}/{mod}/Add", [init(sd[f"{key}.bias"]), y])
            return y

        y = layer_norm("attn_ln", x)
        q, k, v = linear("attn/query", y), linear("attn/key", y, False), linear("attn/value", y)
        if cfg.arch == "v2":
            node(
                "Conv",
                f"{p}/attn/fsmn_block/Conv",
                [v, init(sd[f"{b}.attn.fsmn_block.weight"])],
                group=cfg.n_state,
            )
        x = linear("attn/out", node("Mul", f"{p}/attn/Mul_qkv", [q, k]))
        y = layer_norm("mlp_ln", x)
        x = linear("mlp/mlp.2", linear("mlp/mlp.0", y))
    if cfg.arch == "v1":
        e = init(np.asarray(sd["quantizer._codebook.embed"]).T)
        node("MatMul", "/quantizer/rq/model/layers.0/_codebook/MatMul", [x, e])
        two = node(
            "Constant",
            "/quantizer/Constant_2",
            [],
            value=helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        )
        x = node("Pow", "/quantizer/rq/model/layers.0/_codebook/Pow_1", [e, two])
    else:
        x = node(
            "MatMul",
            "/quantizer/project_down/MatMul",
            [
                x,
                init(
                    np.asarray(sd["quantizer._codebook.project_down.weight"]).T, "onnx::MatMul_2536"
                ),
            ],
        )
        x = node(
            "Add",
            "/quantizer/project_down/Add",
            [init(sd["quantizer._codebook.project_down.bias"], "quantizer.project_in.bias"), x],
        )
    graph = helper.make_graph(
        nodes,
        "speech_tokenizer",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, cfg.n_mels, None])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        initializer=inits,
    )
    onnx.save(helper.make_model(graph), str(path))
    return path
