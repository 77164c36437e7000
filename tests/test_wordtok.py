"""`WordTokens` (token ids word by word from a cache) equals the Rust tokenizer it stands in for,
on the true Llama-3.1 tokenizer and the demo tokenizer, for texts in many scripts, texts holding
added tokens (whole, partial, adjacent, overlapping), and strings made of the characters a regex
engine is most likely to classify differently; texts it cannot vouch for are handed back (None),
and tokenizers of another shape get no WordTokens."""

import random

import pytest

from cslm_jax.data.wordtok import WordTokens, _probes
from cslm_jax.model.vocab import load_tokenizer

TEXTS = [
    "Hello world 12345, it's 3.14159 o'clock!",
    "THEY'RE here; we'VE gone. I'M sure, you'LL see, 'D'",
    "  leading and trailing   ",
    "tabs\tand\nnewlines\r\nand\r\rmore\n\n\n",
    "a  \n  b",
    "猪喜欢跳舞，它住在公园附近。",
    "把下面的中文文本读出来: 你好 世界",
    "日本語のテキスト、カタカナ。",
    "Ünïcödé àccents, naïve café — “quotes” ‘single’",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم ١٢٣٤",
    "नमस्ते दुनिया",
    "emoji 🙂👍🏽 and ZWJ 👩‍💻",
    "combining e\u0301 a\u0308",
    "nbsp\u00a0here, thin\u2009space, ideographic\u3000space",
    "line\u2028sep para\u2029sep nel\x85",
    "x² y³ ½ ⅔ Ⅻ ⑤",
    "ſ 'ſ 'ſt ß ẞ ﬁ ﬅ K",
    "snake_case __init__ a_b_c 1_000",
    "$$$ ... !!! ??? ---",
    "12345678901 0.000001 -42 +7",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'Ve",
    "end with space ",
    "\u200b\u200c\u200d zero widths \ufeff",
    "fullwidth ＡＢＣ１２３！",
    "",
    " ",
    "\n",
    "'",
]

# characters from every class the split pattern tells apart, and the usual suspects
POOL = list("aZsStTrReEvVmMlLdD1 9'\"!?.,;:-_()[]{}@#$%^&*+=/\\|~`\t\n\r") + [
    "中",
    "文",
    "。",
    "，",
    "é",
    "ß",
    "ſ",
    "K",
    "²",
    "½",
    "١",
    "٣",
    "\u00a0",
    "\u2009",
    "\u3000",
    "\u2028",
    "\x85",
    "\x0b",
    "\x0c",
    "\x1c",
    "\u0301",
    "🙂",
    "\u200d",
    "Ⅻ",
    "ǅ",
    "ﬅ",
    "İ",
    "ı",
    # added tokens, whole and cut, and what could be mistaken for them
    "<|eot_id|>",
    "<|start_header_id|>",
    "<sosp>",
    "<eosp>",
    "<eoa>",
    "[question]",
    "[answer]",
    "<12>",
    "<1",
    "<63>",
    "<64>",
    "<0>",
    "<|eot_id|",
    "[question",
    "<sosp",
    "<<",
    "[[",
]


@pytest.fixture(scope="module")
def llama31():
    from cslm_jax.model.vocab import extend_tokenizer, llama3_tokenizer

    tok = llama3_tokenizer()
    extend_tokenizer(tok, 64, base_size=128256)
    return tok


def _check(tok, texts, min_taken):
    bt = tok.backend_tokenizer
    words = WordTokens.for_tokenizer(bt)
    assert words is not None
    taken = 0
    for text in texts:
        got = words.ids(text)
        if got is not None:
            taken += 1
            assert got == bt.encode(text, add_special_tokens=False).ids, repr(text)
        else:  # handed back only for a character that failed its probes
            assert set(text) & words.bad, repr(text)
    assert taken >= min_taken * len(texts)
    return words


def test_equal_to_the_true_llama31_tokenizer(llama31):
    rng = random.Random(0)
    texts = TEXTS + [
        "".join(rng.choice(POOL) for _ in range(rng.randrange(1, 40))) for _ in range(3000)
    ]
    words = _check(llama31, texts, 0.3)
    # the classes the two engines see differently for these: "²" (\p{N}, not \d), \x1c (\s in
    # Python only)
    assert {"²", "\x1c"} <= words.bad
    assert {"a", " ", "中", "é", "ſ", "\u00a0", "<", "["} <= words.good
    assert _check(llama31, TEXTS, 0.8)


def test_equal_to_the_demo_tokenizer(demo):
    rng = random.Random(1)
    texts = TEXTS + [
        "".join(rng.choice(POOL) for _ in range(rng.randrange(1, 40))) for _ in range(2000)
    ]
    _check(load_tokenizer(demo[1]), texts, 0.3)


def test_texts_with_added_tokens_are_cut_where_the_tokenizer_cuts(llama31):
    bt = llama31.backend_tokenizer
    words = WordTokens.for_tokenizer(bt)
    assert words.added is not None
    for text in (
        "a <|eot_id|> b",
        "<sosp><12><eosp>",
        "x<|begin_of_text|>",
        "a < b",
        "<6",
        "[question] what? [answer] <sosp><1><63><eosp> then<eoa>",
        "<<12>>",
        "<123>",
        "<|eot_id|><|eot_id|>",
        "[question][answer]",
        "<|eot_id",
    ):
        assert words.ids(text) == bt.encode(text, add_special_tokens=False).ids, text


def test_tokens_matched_otherwise_send_texts_that_could_hold_them_to_the_tokenizer(demo):
    from tokenizers import AddedToken

    tok = load_tokenizer(demo[1])
    tok.add_tokens([AddedToken("<lone>", lstrip=True)])
    bt = tok.backend_tokenizer
    words = WordTokens.for_tokenizer(bt)
    assert words.added is None
    assert words.ids("a <lone> b") is None and words.ids("a < b") is None
    assert words.ids("plain text") == bt.encode("plain text", add_special_tokens=False).ids


def test_a_word_cached_once_is_reused(llama31):
    words = WordTokens.for_tokenizer(llama31.backend_tokenizer)
    first = words.ids("repeat repeat repeat")
    assert (
        first
        == llama31.backend_tokenizer.encode("repeat repeat repeat", add_special_tokens=False).ids
    )
    assert set(words.words) == {"repeat", " repeat"}


def test_probes_cover_each_contraction_position():
    probes = set(_probes("Q"))
    for word in ("s", "t", "re", "ve", "m", "ll", "d"):
        for k in range(len(word)):
            assert "'" + word[:k] + "Q" + word[k + 1 :] + "x" in probes
    assert {"aQ", "Q1", " Q\n", "'Q!", "中Q中"} <= probes


def test_other_tokenizer_shapes_get_none():
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers

    bpe = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    assert WordTokens.for_tokenizer(bpe) is None
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert WordTokens.for_tokenizer(bpe) is None  # GPT-2's own split: not handled
    from cslm_jax.data.wordtok import LLAMA3_PATTERN

    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert WordTokens.for_tokenizer(bpe) is not None
    bpe.normalizer = normalizers.NFKC()
    assert WordTokens.for_tokenizer(bpe) is None
