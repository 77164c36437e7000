"""Error rates: Levenshtein over normalised words (WER) or characters (CER), corpus-level."""
import pytest

from cslm_jax.evaluate import edit_distance, error_rate, normalize_tokens


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2 and edit_distance(["a"], []) == 1
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0


def test_wer_and_cer_normalise_case_and_punctuation():
    assert normalize_tokens("The cat, is RED!", "word") == ["the", "cat", "is", "red"]
    assert normalize_tokens("猫是红色的。", "char") == ["猫", "是", "红", "色", "的"]
    assert error_rate(["the cat is red."], ["The cat is red"], "word") == 0.0
    # one substitution and one deletion over 4 + 1 reference words
    assert error_rate(["the cat is red", "dog"], ["the bat is", "dog"], "word") == pytest.approx(2 / 5)
    assert error_rate(["猫是红色的。"], ["狗是红色"], "char") == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="2 references but 1"):
        error_rate(["a", "b"], ["a"], "word")
