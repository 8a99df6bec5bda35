"""Shared test helpers: deterministic parameters and gradient streams."""

from __future__ import annotations

import torch

# 1-D, 2-D and 3-D tensors: covers unfactored, factored and batched-factored paths.
SHAPES = [(6, 5), (5,), (2, 3, 4)]


def make_params(shapes=SHAPES, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def grad_stream(n: int, shapes=SHAPES, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(n)]


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.dtype)


def run_micro_steps(optimizer, params, stream) -> None:
    """Our protocol: step() after every micro-batch backward, then zero_grad()."""
    for grads in stream:
        set_grads(params, grads)
        optimizer.step()
        optimizer.zero_grad()


def run_reference_accumulation(optimizer, params, stream, k: int) -> None:
    """torch's protocol: accumulate mean gradients in .grad, step once per cycle."""
    for s, grads in enumerate(stream):
        for p, g in zip(params, grads):
            p.grad = g / k if p.grad is None else p.grad + g / k
        if (s + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()


def assert_close_lists(actual, expected, rtol=1e-6, atol=1e-7) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=rtol, atol=atol, msg=lambda m: f"tensor {i}: {m}")


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]
