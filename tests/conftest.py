"""Test set-up: CPU only, 8 fake devices for mesh tests, small real tokenizers and HF models."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please directly answer the questions in the user's speech.",
    "Speech units are written without spaces, like <sosp><12><907><eosp>.",
    "直接回答用户语音中的问题。 这是输入。",
    "用中文回答用户语音中的问题。",
    "def f(x):\n    return x * 2  # code, numbers 12345 and symbols !?",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from cslm_jax.model.vocab import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe_tokenizer(SAMPLE_TEXTS * 20, vocab_size=400).save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir):
    """A fresh copy each time: extending a tokenizer mutates it."""
    from cslm_jax.model.vocab import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture
def make_hf_llama(tmp_path, tiny_tokenizer_dir):
    """Factory: a random HF Llama folder under tmp_path; returns (folder, torch model)."""
    from cslm_jax.demo.random_hf import write_random_hf_llama
    from cslm_jax.model.vocab import load_tokenizer

    counter = iter(range(1000))

    def make(**kwargs):
        out = tmp_path / f"hf{next(counter)}"
        model = write_random_hf_llama(out, load_tokenizer(tiny_tokenizer_dir), **kwargs)
        return out, model

    return make


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo corpus and an extended (CSLM) tokenizer: (data dir, tokenizer dir)."""
    from cslm_jax.demo.corpus import UNIT_COUNT, make_demo_data
    from cslm_jax.model.vocab import extend_tokenizer, load_tokenizer

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "data", REPO / "configs" / "data" / "demo.yaml", log=lambda *_: None)
    tok = load_tokenizer(root / "data" / "tokenizer")
    extend_tokenizer(tok, UNIT_COUNT, len(tok))
    tok.save_pretrained(str(root / "tokenizer"))
    return root / "data", root / "tokenizer"


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory, demo):
    """A tiny random HF Llama imported with the demo's 256 speech units."""
    from cslm_jax.convert.hf import import_hf
    from cslm_jax.demo.corpus import UNIT_COUNT
    from cslm_jax.demo.random_hf import write_random_hf_llama
    from cslm_jax.model.vocab import load_tokenizer

    data_dir, _ = demo
    root = tmp_path_factory.mktemp("train_base")
    write_random_hf_llama(
        root / "hf",
        load_tokenizer(data_dir / "tokenizer"),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        weight_std=0.05,
    )
    return import_hf(root / "hf", root / "ckpt", speech_units=UNIT_COUNT, log=lambda *_: None)


@pytest.fixture(scope="session")
def tokdir(tmp_path_factory):
    """A random-weight speech_tokenizer_v1 folder (random codebook), narrow and shallow."""
    from cslm_jax.speech import save_random_tokenizer

    path = tmp_path_factory.mktemp("speech_tokenizer") / "v1"
    save_random_tokenizer(path, "v1", seed=0, n_state=64, n_head=2, n_layer=1)
    return path


# -- a real GCS server (fake-gcs-server) for the modules that use gs:// paths ----------------


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    from cslm_jax.storage import fs
    from fake_gcs import FakeGcs

    server = FakeGcs(tmp_path_factory.mktemp("fake_gcs"))
    saved = {
        k: os.environ.get(k)
        for k in (
            "STORAGE_EMULATOR_HOST",
            "TENSORSTORE_GCS_HTTP_URL",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
            "EPATH_USE_TF",
        )
    }
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(server.env())
    fs._ENV_DONE = False  # derive the emulator defaults from this server
    fs.configure_gcs()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fs._ENV_DONE = False


_buckets = iter(range(10_000))


@pytest.fixture
def bucket(gcs):
    """A new, empty bucket of the module's fake-gcs-server: (its gs:// URL, its name)."""
    name = f"bucket-{next(_buckets)}"
    return gcs.create_bucket(name), name
