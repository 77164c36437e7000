"""Inference: KV-cache decoding and streaming events (decode), the decode command's answers and files (responses)."""
