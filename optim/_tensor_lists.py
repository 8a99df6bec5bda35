"""Helpers for multi-tensor (``torch._foreach_*``) code over parameter lists."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ._sharding import GlobalSums, Layout

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


def scale_(tensors: list[torch.Tensor], factor: float) -> None:
    """tensors ← factor·tensors, the factor applied in fp32 whatever the tensors' dtype.

    On CPU ``torch._foreach_mul_(tensors, 0.9)`` first rounds the Python scalar
    to a bf16 list's own dtype (0.9 becomes 0.8984375), unlike ``Tensor.mul_``:
    a bf16 momentum with beta1 = 0.9 would then decay with 0.898 and settle
    1.5% too small. A 0-dim fp32 factor is applied in fp32 (measured: equal to
    ``Tensor.mul_`` element for element). Full-precision lists keep the scalar
    overload, which needs no tensor.
    """
    if not tensors:
        return
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        torch._foreach_mul_(tensors, factor)
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:  # one list may span devices (a model placed over several GPUs)
        by_device.setdefault(t.device, []).append(t)
    for device, same in by_device.items():
        torch._foreach_mul_(same, torch.full((), factor, dtype=torch.float32, device=device))


def host_values(values: list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of host numbers on ``device`` without a host synchronisation.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory and
    waits for the stream, stalling the host once per call; from pinned memory
    the copy is asynchronous (the caching host allocator keeps the buffer alive
    until the copy has run).
    """
    vector = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return vector
    if device.type == "cuda":
        vector = vector.pin_memory()
    return vector.to(device, non_blocking=True)


def clip_rms_(directions: list[torch.Tensor], max_rms: float | None, layouts: list[Layout | None] | None = None) -> None:
    """Scale each tensor in place so that its RMS is at most ``max_rms`` (None: no-op).

    Per-tensor update clipping: the fused-backward replacement for global
    gradient-norm clipping, which would need the averaged gradient. The
    factors stay on the device (no host sync). Sharded tensors (``layouts``)
    sum their squares over ranks in one batched all-reduce.
    """
    if max_rms is None or not directions:
        return
    layouts = layouts or [None] * len(directions)
    sums = GlobalSums()
    squares = [sums.add(n.square(), layout) for n, layout in zip(torch._foreach_norm(directions), layouts)]
    sums.finish()
    factors = []
    for d, sq, layout in zip(directions, squares, layouts):
        numel = d.numel() if layout is None else math.prod(layout.global_shape)
        factors.append((max_rms * math.sqrt(numel) / sq.sqrt().clamp(min=1e-30)).clamp_(max=1.0))
    torch._foreach_mul_(directions, factors)


def step_along_ratio_(params, numerators, denominators, *, step: float, max_rms: float | None, layouts=None) -> None:
    """θ ← θ + step·n/d per tensor, the ratio RMS-clipped to ``max_rms`` first (None: no clip).

    Unclipped this is one ``addcdiv``. Clipped, the ratio is formed in the
    denominators' memory (they are temporaries of the caller) so no further
    full-size buffer is allocated; low-precision numerators are read in fp32.
    """
    if max_rms is None:
        torch._foreach_addcdiv_(params, numerators, denominators, value=step)
        return
    numerators = [n if n.dtype == d.dtype else n.to(d.dtype) for n, d in zip(numerators, denominators)]
    torch._foreach_div_(denominators, numerators)
    torch._foreach_reciprocal_(denominators)
    clip_rms_(denominators, max_rms, layouts)
    torch._foreach_add_(params, denominators, alpha=step)


def ema_split(beta: float, k: int, mode: str, j: int) -> tuple[float, float]:
    """(decay once per cycle, weight of micro-step ``j``) of an EMA moment ``beta``.

    exact: every micro-step adds ``(1-beta)/k`` of its gradient.
    ema:   docs/design.md §2.2's per-micro-step recursion ``x ← β'·x + (1-β')·g`` with
           ``β' = beta**(1/k)``, unrolled over the cycle: micro-step ``j`` adds
           ``(1-β')·β'^(k-1-j)`` and the cycle decays by ``β'^k = beta`` once.
           At the boundary this is the recursion exactly; unrolling it lets a
           micro-step without a gradient count as a zero gradient (as ``.grad``
           accumulation does) instead of skipping a decay.
    Both modes add a total weight of ``1-beta`` per cycle.
    """
    if mode == "exact":
        return beta, (1.0 - beta) / k
    micro = beta ** (1.0 / k)
    return beta, (1.0 - micro) * micro ** (k - 1 - j)


def real_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Complex tensors as real views with a trailing dim of 2 (torch's treatment of complex parameters)."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
