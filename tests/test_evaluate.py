"""Error rates: Levenshtein over normalised words (WER) or characters (CER), corpus-level."""

import pytest

from cslm_jax.eval.metrics import edit_distance, error_rate, normalize_tokens


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2 and edit_distance(["a"], []) == 1
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0


def test_wer_and_cer_normalise_case_and_punctuation():
    assert normalize_tokens("The cat, is RED!", "word") == ["the", "cat", "is", "red"]
    assert normalize_tokens("猫是红色的。", "char") == ["猫", "是", "红", "色", "的"]
    assert error_rate(["the cat is red."], ["The cat is red"], "word") == 0.0
    # one substitution and one deletion over 4 + 1 reference words
    assert error_rate(["the cat is red", "dog"], ["the bat is", "dog"], "word") == pytest.approx(
        2 / 5
    )
    assert error_rate(["猫是红色的。"], ["狗是红色"], "char") == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="2 references but 1"):
        error_rate(["a", "b"], ["a"], "word")


# -- mixed units, MT, language id, unit lexicon ----------------------------------------------------

import json  # noqa: E402

import sacrebleu  # noqa: E402

from cslm_jax.eval.metrics import (  # noqa: E402
    LANGUAGE_IDS,
    UnitLexicon,
    bleu,
    bleu_tokenize,
    chrf,
    language_id,
    mixed_error_rate,
    off_target,
    register_language_id,
    script_language,
)


def test_mixed_error_rate_pools_words_and_characters():
    # en: 1 substitution + 1 deletion over 4 words; zh: 1 substitution + 1 deletion over 5 chars
    rate = mixed_error_rate(
        ["the cat is red", "猫是红色的"], ["the bat is", "狗是红色"], ["word", "char"]
    )
    assert rate == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="2 references, 2 hypotheses, 1 units"):
        mixed_error_rate(["a", "b"], ["a", "b"], ["word"])


def test_bleu_and_chrf_match_sacrebleus_own_api():
    refs = ["the cat sat on the mat .", "a dog runs in the big park .", "it is red ."]
    hyps = ["the cat sat on a mat .", "a dog runs in the park .", "it was red ."]
    assert bleu(refs, hyps) == pytest.approx(
        sacrebleu.metrics.BLEU(tokenize="13a").corpus_score(hyps, [refs]).score
    )
    assert chrf(refs, hyps) == pytest.approx(
        sacrebleu.metrics.CHRF().corpus_score(hyps, [refs]).score
    )
    assert 0 < bleu(refs, hyps) < 100 and 0 < chrf(refs, hyps) < 100
    assert bleu(refs, refs) == pytest.approx(100) and chrf(refs, refs) == pytest.approx(100)
    # Chinese targets: "zh" tokenization splits characters; 13a sees one "word" per sentence
    zr, zh = ["我看见一只黑色的狗。", "羊是黄色的。"], ["我看见一只白色的狗。", "羊是黄色的。"]
    assert bleu(zr, zh, "zh") == pytest.approx(
        sacrebleu.metrics.BLEU(tokenize="zh").corpus_score(zh, [zr]).score
    )
    assert bleu(zr, zh, "zh") > bleu(zr, zh, "13a")
    assert bleu_tokenize(["zh"]) == "zh" and bleu_tokenize(["en", "en"]) == "13a"
    assert bleu_tokenize(["en", "zh"]) == "zh" and bleu_tokenize(["fr"]) == "13a"


def test_script_language_and_off_target_ratio():
    assert script_language("the cat is red.") == "en"
    assert script_language("猫是红色的。") == "zh"
    assert script_language("ｃａｔ") == "en"  # full-width Latin (NFKC)
    assert script_language("猫 cat dog") == "en"  # 6 Latin letters > 1 Han
    assert script_language("12 。!") is None and script_language("") is None
    got = off_target(
        ["the cat", "猫是", "", "chat", "狗"], ["en", "en", "zh", "fr", "zh"], language_id("script")
    )
    # scored: 4 (fr is not covered); off target: "猫是" asked in en; "" undetermined
    assert (got["off_target"], got["scored"], got["undetermined"]) == (1, 4, 1)
    assert got["ratio"] == pytest.approx(1 / 4)
    assert got["detected"] == ["en", "zh", None, None, "zh"]


def test_language_id_registry_is_pluggable():
    try:
        register_language_id(
            "uppercase", ("de", "en"), lambda t: "de" if t[:1].isupper() else "en" if t else None
        )
        got = off_target(["Hund", "dog", "Katze"], ["de", "de", "en"], language_id("uppercase"))
        assert (got["off_target"], got["scored"]) == (2, 3)
    finally:
        LANGUAGE_IDS.pop("uppercase", None)
    with pytest.raises(ValueError, match="unknown language identifier 'uppercase'"):
        language_id("uppercase")


def test_unit_lexicon_reads_units_back_as_text(tmp_path):
    lex = UnitLexicon({"the": [3], "cat": [7, 8], "c": [7], "猫": [200], "是": [201]}, silence=[0])
    # repeats merged, silence dropped, longest match (7 8 -> cat, not c + ?), Han joined, unknown 99
    assert lex.tokens([0, 3, 3, 0, 7, 7, 8, 0, 7, 200, 201, 201, 99]) == [
        "the",
        "cat",
        "c",
        "猫",
        "是",
        "u99",
    ]
    assert lex.to_text([0, 3, 3, 0, 7, 7, 8, 0, 200, 201, 99]) == "the cat 猫是 u99"
    assert error_rate(["the cat"], [lex.to_text([3, 7, 8, 5])], "word") == pytest.approx(1 / 2)
    path = tmp_path / "lex.json"
    path.write_text(json.dumps({"silence": [0], "table": {"fox": [4], "狐": [9]}}))
    assert UnitLexicon.from_file(path).to_text([0, 4, 0, 9, 9]) == "fox 狐"
    path.write_text(json.dumps({"table": {"fox": "4"}}))
    with pytest.raises(ValueError, match="expected"):
        UnitLexicon.from_file(path)
    with pytest.raises(ValueError, match="not found"):
        UnitLexicon.from_file(tmp_path / "missing.json")


def test_demo_lexicon_reads_the_demo_corpus_back_exactly():
    from cslm_jax.demo.corpus import build_corpus

    corpus = build_corpus(seed=0)
    lex = UnitLexicon.demo()
    for lang, unit in (("en", "word"), ("zh", "char")):
        rows = corpus[f"paired_{lang}.validation"]
        assert (
            error_rate([r["text"] for r in rows], [lex.to_text(r["units"]) for r in rows], unit)
            == 0.0
        )
    rows = corpus["s2s_en2zh.validation"]
    assert (
        error_rate(
            [r["answer_text"] for r in rows], [lex.to_text(r["answer_units"]) for r in rows], "char"
        )
        == 0.0
    )
    # and it is not a table that reads anything: other units give other text
    assert (
        error_rate([rows[0]["answer_text"]], [lex.to_text(rows[1]["question_units"])], "char") > 0
    )
