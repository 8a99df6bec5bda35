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


def train_micro_steps(model, opt, batches, *, fused: bool, autocast: str | None = None):
    """Our protocol, fused or not: backward and step() every micro-batch (bf16 autocast if asked)."""
    from contextlib import nullcontext

    from leantrain import optim

    handle = optim.fuse_into_backward(model, opt) if fused else None
    for ids in batches:
        with torch.autocast(autocast, dtype=torch.bfloat16) if autocast else nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if fused:
            assert all(p.grad is None for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
    if handle:
        handle.remove()
    return model
