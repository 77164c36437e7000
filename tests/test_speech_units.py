"""The speech tokenizer's codebook size and unit rate flow into the CSLM vocabulary
(`import-hf --speech-tokenizer`) and the data config (`format.speech_tokenizer`), from a version
name, a tokenizer folder or the folder extract-units wrote."""

import json

import numpy as np
import pytest
import soundfile as sf
import yaml

from conftest import REPO
from cslm_jax.cli.main import main as cli
from cslm_jax.config import ConfigError
from cslm_jax.data.formats import load_data_config
from cslm_jax.speech.units import ALIASES, UNITS, SpeechUnitsError, speech_units_info

SMALL = dict(n_state=128, n_head=2, n_layer=1)  # v2 needs head dim 64


def test_the_table_is_the_tokenizers_own():
    from cslm_jax.speech import s3

    assert {
        k: (v.codebook_size, float(v.units_per_second)) for k, v in s3.VERSIONS.items()
    } == UNITS
    assert ALIASES == s3.ALIASES
    assert speech_units_info("speech_tokenizer_v2_25hz").codebook_size == 6561
    assert speech_units_info("v1").units_per_second == 50.0


@pytest.fixture(scope="module")
def v2_extraction(tmp_path_factory):
    """A v2_25hz tokenizer folder (random weights) and a finished extraction with it."""
    import jax

    from cslm_jax.speech import save_random_tokenizer
    from cslm_jax.speech.extract import Options, extract, open_tokenizer

    root = tmp_path_factory.mktemp("units")
    tokdir = save_random_tokenizer(root / "tok", "v2_25hz", seed=1, **SMALL)
    rng = np.random.default_rng(0)
    lines = []
    for i, seconds in enumerate((0.8, 1.7)):
        sf.write(root / f"u{i}.wav", 0.1 * rng.standard_normal(int(seconds * 16000)), 16000)
        lines.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": f"word {i}", "lang": "en"})
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    enc = open_tokenizer(tokdir, devices=jax.local_devices()[:1])
    extract(
        root / "m.jsonl",
        root / "data" / "units",
        enc,
        tokenizer_dir=tokdir,
        opts=Options(progress=False),
    )
    return root, tokdir, root / "data" / "units"


def test_tokenizer_and_extraction_folders(v2_extraction):
    _, tokdir, units = v2_extraction
    for folder in (tokdir, units):
        info = speech_units_info(folder)
        assert (info.version, info.codebook_size, info.units_per_second) == ("v2_25hz", 6561, 25.0)


def data_config(root, fmt: dict) -> str:
    cfg = yaml.safe_load((REPO / "configs" / "data" / "demo.yaml").read_text())
    cfg["data_dir"] = str(root / "data")
    cfg["format"] = {k: v for k, v in cfg["format"].items() if k not in ("unit_count", "unit_rate")}
    cfg["format"].update(fmt)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def test_a_data_config_takes_units_from_the_extraction(v2_extraction, capsys):
    root, tokdir, units = v2_extraction
    # relative to data_dir, like the corpus files
    cfg = load_data_config(data_config(root, {"speech_tokenizer": "units"}), check_files=False)
    assert (cfg.format.unit_count, cfg.format.unit_rate) == (6561, 25.0)
    cfg = load_data_config(data_config(root, {"speech_tokenizer": "v1_25hz"}), check_files=False)
    assert (cfg.format.unit_count, cfg.format.unit_rate) == (4096, 25.0)
    # the extracted records validate against the config that read the units' own folder
    shards = json.loads((units / "COMPLETE.json").read_text())["shards"]
    path = data_config(root, {"speech_tokenizer": str(tokdir), "unit_count": 6561})
    assert cli(["validate-data", *[str(units / s) for s in shards], "--data-config", path]) == 0
    # a stated count or rate must agree with the tokenizer
    with pytest.raises(
        ConfigError,
        match=r"'format.unit_count' is 4096 but 'format.speech_tokenizer'"
        r" \(.*speech_tokenizer.json\) gives 6561",
    ):
        load_data_config(
            data_config(root, {"speech_tokenizer": str(tokdir), "unit_count": 4096}),
            check_files=False,
        )
    with pytest.raises(ConfigError, match=r"'format.unit_rate' is 50.0 but .* gives 25"):
        load_data_config(
            data_config(root, {"speech_tokenizer": "units", "unit_rate": 50.0}), check_files=False
        )
    with pytest.raises(
        ConfigError,
        match=r"cfg.yaml: field 'format.speech_tokenizer' "
        r"'.*/data/v3': neither a version",
    ):
        load_data_config(data_config(root, {"speech_tokenizer": "v3"}), check_files=False)
    with pytest.raises(ConfigError, match="unit_count' is required"):
        load_data_config(data_config(root, {}), check_files=False)


def test_import_hf_sizes_the_vocabulary_from_the_tokenizer(
    v2_extraction, make_hf_llama, tmp_path, capsys
):
    _, tokdir, units = v2_extraction
    hf_dir, _ = make_hf_llama()
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "ck"),
                "--speech-tokenizer",
                str(units),
            ]
        )
        == 0
    )
    vocab = json.loads((tmp_path / "ck" / "cslm_checkpoint.json").read_text())["vocab"]
    assert vocab["unit_count"] == 6561
    from cslm_jax.model.vocab import load_tokenizer, unit_token

    tok = load_tokenizer(tmp_path / "ck" / "tokenizer")
    assert tok.convert_tokens_to_ids(unit_token(6560)) == vocab["base_size"] + 6560
    assert unit_token(6561) not in tok.get_vocab()
    capsys.readouterr()
    # disagreeing flags, and folders that are not a tokenizer, are named
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "x"),
                "--speech-tokenizer",
                "v2",
                "--speech-units",
                "4096",
            ]
        )
        == 2
    )
    assert "--speech-units 4096 disagrees with --speech-tokenizer v2" in capsys.readouterr().err
    assert (
        cli(
            [
                "import-hf",
                "--hf-dir",
                str(hf_dir),
                "--out",
                str(tmp_path / "x"),
                "--speech-tokenizer",
                str(hf_dir),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "holds neither speech_tokenizer.json" in err and str(hf_dir) in err
    assert not (tmp_path / "x").exists()


def test_broken_folders_are_named(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "speech_tokenizer.json").write_text("{not json")
    with pytest.raises(SpeechUnitsError, match=r"t/speech_tokenizer.json: cannot read"):
        speech_units_info(tmp_path / "t")
    (tmp_path / "t" / "speech_tokenizer.json").write_text(
        json.dumps({"version": "v1", "codebook_size": 1024, "units_per_second": 50})
    )
    with pytest.raises(
        SpeechUnitsError, match="version v1 has 4096 codes at 50/s, the file says 1024 at 50/s"
    ):
        speech_units_info(tmp_path / "t")
    with pytest.raises(SpeechUnitsError, match="neither a version"):
        speech_units_info(tmp_path / "missing")
