"""Lazy row updates for embedding-like weights (param-group option ``lazy_rows``).

A row (index along dim 0) whose gradient is exactly zero for a whole
accumulation cycle keeps its value and its optimizer state: its moments are not
decayed and the boundary update leaves it alone. This is what a sparse
optimizer (TF's LazyAdam) does for embeddings, here on dense gradients.

Costs: a bool per row of state (``rows_touched``), one reduction over the
gradient per micro-step to find the rows it touches, and at the boundary one
transient copy of the weight so that untouched rows can be restored after a
dense multi-tensor update. Bias corrections keep using the tensor's update
count, as LazyAdam does.
"""

from __future__ import annotations

import torch


def rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Bool vector over dim 0: True where the row's gradient has any non-zero."""
    return grad.ne(0).flatten(1).any(dim=1)


def decay_rows(buffer: torch.Tensor, rows: torch.Tensor, factor: float) -> None:
    """Multiply the selected rows of ``buffer`` by ``factor``; others are untouched."""
    if factor == 1.0:
        return
    scale = torch.where(rows, factor, 1.0).to(buffer.dtype)
    buffer.mul_(scale.view(-1, *([1] * (buffer.dim() - 1))))


def keep_untouched_rows(param: torch.Tensor, before: torch.Tensor, touched: torch.Tensor) -> None:
    """Write ``before`` back into the rows of ``param`` that had no gradient."""
    mask = touched.view(-1, *([1] * (param.dim() - 1)))
    param.copy_(torch.where(mask, param, before))
