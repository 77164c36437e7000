"""cslm_jax: train cross-lingual speech language models (the CSLM recipe) in JAX on TPU pods,
and take them back to GPUs as Hugging Face Llama checkpoints."""

__version__ = "0.1.0"
