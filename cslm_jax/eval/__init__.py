"""Evaluation: metrics (WER/CER, BLEU/chrF, off-target, unit lexicon), the evaluate command's body
(run), and scoring speech as audio (audio: synthesis while decoding and time to first audio; asr:
recognisers and speech WER/CER; judge: an LLM judge; mos: a MOS plug-in)."""
