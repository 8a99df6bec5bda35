"""Helpers for multi-tensor (``torch._foreach_*``) code over parameter lists."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# Boundary updates allocate temporaries (e.g. AdamW's denominator) the size of
# the tensors they process. Processing the list in chunks of about this many
# elements bounds that transient memory to ~64 MiB in fp32 instead of a full
# copy of the optimizer state; a single larger tensor forms its own chunk.
CHUNK_NUMEL = 16 * 1024 * 1024


def chunks(tensors: list[torch.Tensor], max_numel: int = CHUNK_NUMEL) -> Iterator[list[int]]:
    """Yield index lists covering ``tensors`` in order, each chunk <= ``max_numel`` elements."""
    chunk: list[int] = []
    size = 0
    for i, tensor in enumerate(tensors):
        if chunk and size + tensor.numel() > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += tensor.numel()
    if chunk:
        yield chunk


def clip_rms_(directions: list[torch.Tensor], max_rms: float | None) -> None:
    """Scale each tensor in place so that its RMS is at most ``max_rms`` (None: no-op).

    Per-tensor update clipping: the fused-backward replacement for global
    gradient-norm clipping, which would need the averaged gradient. The
    factors stay on the device (no host sync).
    """
    if max_rms is None or not directions:
        return
    norms = torch._foreach_norm(directions)
    factors = [
        (max_rms * math.sqrt(d.numel()) / n.clamp(min=1e-30)).clamp_(max=1.0) for d, n in zip(directions, norms)
    ]
    torch._foreach_mul_(directions, factors)


def step_along_ratio_(params, numerators, denominators, *, step: float, max_rms: float | None) -> None:
    """θ ← θ + step·n/d per tensor, the ratio RMS-clipped to ``max_rms`` first (None: no clip).

    Unclipped this is one ``addcdiv``. Clipped, the ratio is formed in the
    denominators' memory (they are temporaries of the caller) so no further
    full-size buffer is allocated; low-precision numerators are read in fp32.
    """
    if max_rms is None:
        torch._foreach_addcdiv_(params, numerators, denominators, value=step)
        return
    if numerators[0].dtype != torch.float32:
        numerators = [n.float() for n in numerators]
    torch._foreach_div_(denominators, numerators)
    torch._foreach_reciprocal_(denominators)
    clip_rms_(denominators, max_rms)
    torch._foreach_add_(params, denominators, alpha=step)


def ema_split(beta: float, k: int, mode: str) -> tuple[float, float]:
    """(decay, weight) of one micro-step's fold into an EMA moment ``beta``.

    exact: decay ``beta`` once per cycle, every micro-step adds ``(1-beta)/k``.
    ema:   decay ``beta**(1/k)`` and add ``1-beta**(1/k)`` every micro-step, so
           ``k`` micro-steps decay by ``beta`` in all (DESIGN.md 2.2).
    """
    if mode == "exact":
        return beta, (1.0 - beta) / k
    micro = beta ** (1.0 / k)
    return micro, 1.0 - micro
