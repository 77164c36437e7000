"""The model: the parameter table (schema), the Flax NNX Llama-3 decoder (llama) and the CSLM vocabulary (vocab)."""
