"""Tiny Hugging Face models built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch


def tiny_gpt2(seed: int = 0, vocab: int = 64):
    """A 2-layer GPT-2 with tied wte/lm_head and no dropout (deterministic)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def token_batches(n: int, vocab: int = 64, batch: int = 2, seq: int = 12, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(n)]
