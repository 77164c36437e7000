"""Evaluation: metrics (WER/CER, BLEU/chrF, off-target, unit lexicon) and the evaluate command's body (run)."""
