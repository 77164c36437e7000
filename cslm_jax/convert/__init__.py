"""Conversion between Hugging Face Llama folders and cslm_jax checkpoints (hf)."""
