"""The CSLM vocabulary on the true Llama-3.1 tokenizer (built offline from `llama-models`)."""

import pytest

from cslm_jax.model.vocab import (
    CONTROL_TOKENS,
    VocabError,
    existing_layout,
    extend_tokenizer,
    llama3_tokenizer,
)

TEXTS = [
    "Hello world!",
    "Please directly answer the questions in the user's speech. This is input: ",
    "直接回答用户语音中的问题。 这是输入: ",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "numbers 1234567 and <tags> like <12> or [answer] in plain text",
    "Ünïcödé — emoji 🎉 and mixed 中文English",
]


@pytest.fixture(scope="module")
def llama3():
    return llama3_tokenizer()


def test_true_llama3_ids(llama3):
    assert len(llama3) == 128256
    assert llama3("Hello world!")["input_ids"] == [128000, 9906, 1917, 0]
    assert llama3.encode("assistant", add_special_tokens=False) == [78191]
    assert llama3.encode("user", add_special_tokens=False) == [882]
    ids = {
        t: llama3.convert_tokens_to_ids(t)
        for t in (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|finetune_right_pad_id|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|reserved_special_token_247|>",
        )
    }
    assert ids == {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002,
        "<|finetune_right_pad_id|>": 128004,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
        "<|reserved_special_token_247|>": 128255,
    }


def test_extension_is_contiguous_and_keeps_text_tokenization():
    tok = llama3_tokenizer()
    before = [tok.encode(t, add_special_tokens=False) for t in TEXTS[:3] + TEXTS[3:4] + TEXTS[5:]]
    info = extend_tokenizer(tok, 4096, base_size=128256)
    assert (info.unit_offset, info.unit_count, info.size) == (128256, 4096, 128256 + 4096 + 5)
    assert [tok.convert_tokens_to_ids(f"<{i}>") for i in range(4096)] == list(range(128256, 132352))
    assert [tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS] == list(range(132352, 132357))
    after = [tok.encode(t, add_special_tokens=False) for t in TEXTS[:3] + TEXTS[3:4] + TEXTS[5:]]
    assert after == before
    speech = tok.encode("<sosp><12><907><33><eosp>", add_special_tokens=False)
    assert speech == [132352, 128256 + 12, 128256 + 907, 128256 + 33, 132353]
    assert tok.decode(speech) == "<sosp><12><907><33><eosp>"
    # units and control tokens are not "special": decoding with skip_special_tokens keeps them
    assert "<12>" in tok.decode(speech, skip_special_tokens=True)
    # a text that spells a unit number in angle brackets now reads as that unit: documented layout
    assert tok.encode("<12>", add_special_tokens=False) == [128268]
    assert existing_layout(tok, "test") == info


def test_chat_template_renders_llama31_headers():
    tok = llama3_tokenizer()
    extend_tokenizer(tok, 16, base_size=128256)
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "hi <sosp><1><2><eosp>"},
            {"role": "assistant", "content": "[question] hi [answer] yo <eoa>"},
        ],
        tokenize=False,
    )
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "<|start_header_id|>user<|end_header_id|>\n\nhi <sosp><1><2><eosp><|eot_id|>" in text
    assert text.endswith(
        "<|start_header_id|>assistant<|end_header_id|>\n\n[question] hi [answer] yo <eoa><|eot_id|>"
    )


def test_extension_refuses_mismatched_base():
    tok = llama3_tokenizer()
    with pytest.raises(VocabError, match="vocab_size"):
        extend_tokenizer(tok, 8, base_size=128000)


@pytest.mark.parametrize("class_name", ["TokenizersBackend", "PreTrainedTokenizerFast"])
def test_load_tokenizer_equals_autotokenizer_and_leaves_torch_unimported(tmp_path, class_name):
    """load_tokenizer loads the generic fast class directly (AutoTokenizer's model registry
    imports torch where it is installed); the result is AutoTokenizer's, token for token."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from cslm_jax.model.vocab import load_tokenizer

    tok = llama3_tokenizer()
    extend_tokenizer(tok, 16, base_size=128256)
    tok.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = class_name  # Llama-3's own folders say PreTrainedTokenizerFast
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab() and len(ours) == len(auto)
    assert ours.special_tokens_map == auto.special_tokens_map
    chat = [
        {"role": "user", "content": "hi <sosp><3><eosp>"},
        {"role": "assistant", "content": "ok"},
    ]
    assert ours.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(
        chat, tokenize=False
    )
    for text in TEXTS:
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
    code = (
        "import sys; from cslm_jax.model.vocab import load_tokenizer; "
        f"load_tokenizer({str(tmp_path)!r}); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
