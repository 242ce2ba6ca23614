"""Llama-architecture models of a chosen size, randomly initialised (trained elsewhere when needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class LlamaSize:
    hidden: int = 128
    layers: int = 2
    heads: int = 2  # head dimension hidden / heads: 64 suits vLLM's CPU attention kernels
    intermediate: int = 256
    max_positions: int = 1024
    tie_embeddings: bool = False


def new_llama(size: LlamaSize, vocab_size: int, tokenizer=None, seed: int = 0, out: Path | None = None):
    """A float32 Llama with `vocab_size` rows, saved with its tokenizer to `out` when given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=size.max_positions, tie_word_embeddings=size.tie_embeddings,
        bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    if out is not None:
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
    return model
