"""S3 tokenizer weights: import from ONNX files laid out as the official ones and from
s3tokenizer state dicts, tokenizer folders, and the errors for a wrong file, version or tensor."""

import json

import numpy as np
import pytest
import torch

from cslm_jax.cli.main import main as cli
from cslm_jax.errors import CslmError, OutputExistsError
from cslm_jax.speech import (
    SpeechTokenizerError,
    init_random,
    load_speech_tokenizer,
    save_random_tokenizer,
)
from cslm_jax.speech.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    read_onnx,
    read_weights,
    to_state_dict,
)
from s3_reference import (
    TINY,
    package_mels,
    package_model,
    s3tokenizer,
    speechlike,
    write_official_onnx,
)

VERSIONS = ("v1", "v1_25hz", "v2_25hz")


def _same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "blocks":
            _same_params(a[k], b[k])
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("version", VERSIONS)
def test_onnx_import_reads_what_the_package_reads(version, tmp_path, capsys):
    """A synthetic ONNX file with the official initializer and node names: our reader gives the
    package's `onnx2torch` state dict exactly; `cslm-jax import-speech-tokenizer` writes a folder
    whose tokenizer gives the package's codes (model loaded from the same file)."""
    cfg, params = init_random(version, seed=4, **TINY)
    sd = to_state_dict(cfg, params)
    onnx_file = write_official_onnx(tmp_path / "speech_tokenizer.onnx", cfg, sd)
    ref = s3tokenizer.onnx2torch(str(onnx_file), None, False)
    ours = read_onnx(onnx_file, version)
    assert sorted(ours) == sorted(ref) == sorted(sd)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k].numpy(), err_msg=k)
    out = tmp_path / "tok"
    assert (
        cli(
            [
                "import-speech-tokenizer",
                "--from",
                str(onnx_file),
                "--version",
                version,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    tok = load_speech_tokenizer(out)
    _same_params(tok.params, params)
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert (meta["version"], meta["codebook_size"], meta["units_per_second"]) == (
        version,
        tok.codebook_size,
        tok.units_per_second,
    )
    model = package_model(cfg)
    model.load_state_dict(ref, strict=True)
    waves = speechlike([9000, 5000], seed=1)
    _, mel, mel_len = package_mels(waves)
    with torch.inference_mode():
        codes, code_len = model.quantize(mel, mel_len)
    for i, c in enumerate(tok.encode(waves)):
        assert (c != codes[i, : int(code_len[i])].numpy()).mean() <= 0.005


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_import(suffix, tmp_path):
    """A package model's own state dict (torch.save) and a safetensors copy import to the same
    parameters; the folder's model.safetensors loads into the package strictly."""
    from safetensors.numpy import load_file, save_file

    cfg, params = init_random("v2_25hz", seed=6, **TINY)
    model = package_model(cfg, to_state_dict(cfg, params))
    src = tmp_path / f"s3{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), src)
    else:
        save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(src))
    assert (
        cli(
            [
                "import-speech-tokenizer",
                "--from",
                str(src),
                "--version",
                "v2_25hz",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    _same_params(load_speech_tokenizer(tmp_path / "tok").params, params)
    back = package_model(cfg)
    back.load_state_dict(
        {
            k: torch.from_numpy(v)
            for k, v in load_file(str(tmp_path / "tok" / WEIGHTS_FILE)).items()
        },
        strict=True,
    )


def test_random_tokenizer_folder_round_trip(tmp_path):
    out = save_random_tokenizer(tmp_path / "r", "v1", seed=9, **TINY)
    cfg, params = init_random("v1", seed=9, **TINY)
    tok = load_speech_tokenizer(out)
    _same_params(tok.params, params)
    assert (tok.version, tok.codebook_size, tok.units_per_second, tok.sample_rate) == (
        "v1",
        4096,
        50,
        16000,
    )
    cb = np.asarray(tok.params["codebook"])
    assert np.abs(cb).min(axis=1).max() > 0 and len(np.unique(cb.round(4), axis=0)) == 4096
    with pytest.raises(OutputExistsError, match="not empty"):
        save_random_tokenizer(out, "v1", seed=1, **TINY)
    save_random_tokenizer(out, "v2_25hz", seed=1, force=True, **TINY)
    assert load_speech_tokenizer(out).codebook_size == 6561
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders


def _error(argv, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cslm-jax import-speech-tokenizer: error: ")
    return err


def test_wrong_files_and_versions_are_named(tmp_path, capsys):
    cfg1, p1 = init_random("v1", seed=2, **TINY)
    cfg2, p2 = init_random("v2_25hz", seed=2, **TINY)
    onnx1 = write_official_onnx(tmp_path / "v1.onnx", cfg1, to_state_dict(cfg1, p1))
    onnx2 = write_official_onnx(tmp_path / "v2.onnx", cfg2, to_state_dict(cfg2, p2))
    run = ["import-speech-tokenizer", "--out", str(tmp_path / "out"), "--version"]
    # not a model at all
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf" * 50)
    assert "junk.onnx: not an ONNX model" in _error(run + ["v1", "--from", str(junk)], capsys)
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    assert "unknown weights format .txt" in _error(run + ["v1", "--from", str(txt)], capsys)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_text("not a pickle")
    assert "bad.pt: not a PyTorch state dict" in _error(run + ["v1", "--from", str(bad_pt)], capsys)
    assert "no such file" in _error(run + ["v1", "--from", str(tmp_path / "nope.onnx")], capsys)
    # wrong version: the architecture, or v1's stride
    assert "holds a v2 tokenizer" in _error(run + ["v1", "--from", str(onnx2)], capsys)
    assert "holds a v1 tokenizer" in _error(run + ["v2_25hz", "--from", str(onnx1)], capsys)
    assert "stride 1, v1_25hz has 2" in _error(run + ["v1_25hz", "--from", str(onnx1)], capsys)
    assert not (tmp_path / "out").exists()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.numpy import save_file

    cfg, params = init_random("v1", seed=2, **TINY)
    sd = to_state_dict(cfg, params)
    missing = dict(sd)
    del missing["encoder.blocks.1.attn.value.bias"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        SpeechTokenizerError,
        match=r"missing\.safetensors: missing tensor "
        r"encoder\.blocks\.1\.attn\.value\.bias",
    ):
        read_weights(tmp_path / "missing.safetensors", "v1")
    shaped = dict(sd)
    shaped["quantizer._codebook.embed"] = sd["quantizer._codebook.embed"][:100]
    save_file(shaped, str(tmp_path / "shaped.safetensors"))
    with pytest.raises(
        SpeechTokenizerError,
        match=r"tensor quantizer\._codebook\.embed has "
        r"shape \(100, 128\), expected \(4096, 128\)",
    ):
        read_weights(tmp_path / "shaped.safetensors", "v1")
    extra = dict(sd, **{"encoder.blocks.0.attn.key.bias": sd["encoder.conv1.bias"]})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(
        SpeechTokenizerError,
        match=r"unexpected tensor encoder\.blocks\.0\.attn\."
        r"key\.bias",
    ):
        read_weights(tmp_path / "extra.safetensors", "v1")


def test_tokenizer_folder_errors(tmp_path):
    out = save_random_tokenizer(tmp_path / "t", "v1_25hz", seed=0, **TINY)
    meta = json.loads((out / CONFIG_FILE).read_text())
    with pytest.raises(SpeechTokenizerError, match="no such tokenizer folder"):
        load_speech_tokenizer(tmp_path / "nope")
    (out / CONFIG_FILE).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(SpeechTokenizerError, match="format_version 99"):
        load_speech_tokenizer(out)
    (out / CONFIG_FILE).write_text(json.dumps(dict(meta, version="v3")))
    with pytest.raises(SpeechTokenizerError, match="unknown speech tokenizer version 'v3'"):
        load_speech_tokenizer(out)
    (out / CONFIG_FILE).write_text(json.dumps(dict(meta, version="v2_25hz")))
    with pytest.raises(CslmError, match="codebook_size is 4096, v2_25hz has 6561"):
        load_speech_tokenizer(out)
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    (out / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(SpeechTokenizerError, match="not a safetensors file"):
        load_speech_tokenizer(out)
