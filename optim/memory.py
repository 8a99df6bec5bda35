"""Exact byte counts of optimizer state, by component.

Works for any ``torch.optim.Optimizer`` (torch's own included): it walks
``optimizer.state`` and sums ``numel * element_size`` of every tensor. Python
scalars (step counters, cycle positions) hold no tensor memory and are not
counted. Names not listed below fall into ``"other"``. Sharded tensors
(FSDP2's DTensors) count their local shard: the figures are per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._sharding import local

# State key -> component, for leantrain's and torch's optimizers.
STATE_COMPONENTS: dict[str, str] = {
    "exp_avg": "moments",
    "exp_avg_sq": "moments",
    "momentum_buffer": "moments",
    "max_exp_avg_sq": "moments",
    "exp_avg_sq_row": "factored",
    "exp_avg_sq_col": "factored",
    "row_var": "factored",
    "col_var": "factored",
    "variance": "moments",
    "grad_accum": "accumulation",
    "lookahead_slow": "wrappers",
    "ema_weights": "wrappers",
    "rows_touched": "lazy_rows",
}

COMPONENTS = ("moments", "factored", "accumulation", "wrappers", "lazy_rows", "other")


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds for ``tensor`` (a DTensor's local shard)."""
    tensor = local(tensor)
    return tensor.numel() * tensor.element_size()


def state_bytes_by_component(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of every state tensor, summed per component (all components listed)."""
    totals = dict.fromkeys(COMPONENTS, 0)
    for param_state in optimizer.state.values():
        if not isinstance(param_state, dict):
            continue
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                totals[STATE_COMPONENTS.get(key, "other")] += tensor_bytes(value)
    return totals


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of all state tensors held by ``optimizer``."""
    return sum(state_bytes_by_component(optimizer).values())


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of the persistent training state of a model and its optimizer."""

    trainable_params: int  # number of trainable parameter elements (B/param denominator)
    parameters: int
    gradients: int  # live .grad tensors at the time of the report
    optimizer_state: int  # moments, factored statistics, wrapper buffers
    accumulation: int  # explicit accumulation buffers (grad_accum)

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.accumulation

    def per_param(self, value: int) -> float:
        return value / max(1, self.trainable_params)

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer_state),
            ("accumulation buffers", self.accumulation),
            ("total", self.total),
        ]

    def format(self) -> str:
        lines = [f"{'component':<22}{'MiB':>12}{'B/param':>10}"]
        for name, value in self.rows():
            lines.append(f"{name:<22}{value / 2**20:>12.1f}{self.per_param(value):>10.2f}")
        return "\n".join(lines)


def memory_report(model_or_params, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Persistent-state bytes of ``model_or_params`` (+ ``optimizer``), total and per parameter.

    Tied weights are counted once. Gradients are the ``.grad`` tensors alive
    now: call it after ``backward()`` to see the unfused peak, after
    ``step()``/``zero_grad()`` (or any time in fused mode) for what persists.
    """
    if isinstance(model_or_params, torch.nn.Module):
        params = list(model_or_params.parameters())
    else:
        params = list(dict.fromkeys(model_or_params))
    by_component = state_bytes_by_component(optimizer) if optimizer is not None else dict.fromkeys(COMPONENTS, 0)
    accumulation = by_component.pop("accumulation")
    return MemoryReport(
        trainable_params=sum(local(p).numel() for p in params if p.requires_grad),
        parameters=sum(tensor_bytes(p) for p in params),
        gradients=sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
        optimizer_state=sum(by_component.values()),
        accumulation=accumulation,
    )
