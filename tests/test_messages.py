"""One-line messages that name what is wrong and where (issue 29, "Low"): invalid YAML (a file
or an override), a tokenizer with fewer units than the data config says."""

import pytest

from cslm_jax.cli.main import main as cli
from cslm_jax.config import ConfigError, load_yaml, parse_override
from cslm_jax.model.vocab import VocabError, extend_tokenizer, require_cslm_tokens


def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(bad)
    assert "\n" not in str(e.value)
    assert str(e.value) == (
        f"config file {bad}: invalid YAML: expected ',' or ']', but got ':' "
        f"at line 3, column 2 (while parsing a flow sequence)"
    )
    with pytest.raises(
        ConfigError,
        match=r"override 'train.steps=\[1': the value is not valid "
        r"YAML: .* at line 1, column 3",
    ):
        parse_override("train.steps=[1")
    # through the command: one line, exit 2 (was a 7-line message / a traceback for overrides)
    (tmp_path / "x.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    assert cli(["validate-data", str(tmp_path / "x.jsonl"), "--data-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "at line 3, column 2" in err


def test_fewer_units_than_the_data_config_names_both(tiny_tokenizer):
    extend_tokenizer(tiny_tokenizer, 4, len(tiny_tokenizer))
    require_cslm_tokens(tiny_tokenizer, "tok", 4, "format.unit_count of data.yaml")
    with pytest.raises(VocabError) as e:
        require_cslm_tokens(tiny_tokenizer, "tok", 8, "format.unit_count of data.yaml")
    assert str(e.value).startswith(
        "tok: the tokenizer has 4 speech units but format.unit_count "
        "of data.yaml says 8 (it lacks <7>)"
    )
