"""Random-weight Hugging Face Llama checkpoints: real `transformers` folders for tests, the demo
and benchmarks (model hubs are not needed to exercise the conversion and training paths)."""

from __future__ import annotations

from pathlib import Path


def llama3_rope_scaling(original_max_positions: int, factor: float = 8.0) -> dict:
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_positions,
    }


def placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids (w0 .. w{n-2}, then
    <|begin_of_text|> as BOS/EOS): the right size for a random model that is fed random ids."""
    from tokenizers import Tokenizer, models  # heavy: tokenizers
    from transformers import PreTrainedTokenizerFast  # heavy: transformers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|begin_of_text|>": vocab_size - 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
        bos_token="<|begin_of_text|>",
        eos_token="<|begin_of_text|>",
    )


def write_random_hf_llama(
    out: str | Path,
    tokenizer,
    *,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=None,
    tie_word_embeddings=False,
    rope_theta=500000.0,
    rope_scaling=None,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    weight_std=0.08,
    seed=0,
    dtype="float32",
):
    """Save a random `LlamaForCausalLM` sized to `tokenizer` (plus the tokenizer) into `out`.

    Every weight, norms included, is drawn at random (norms around 1) so that a transposed,
    swapped or misplaced tensor changes the logits. Returns the torch model (eval mode).
    """
    import torch  # heavy: torch
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: transformers

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, weight_std)
    model = model.to(getattr(torch, dtype)).eval()
    out = Path(out)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model
