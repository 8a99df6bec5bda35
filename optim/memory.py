"""Exact byte counts of optimizer state, by component.

Works for any ``torch.optim.Optimizer`` (torch's own included): it walks
``optimizer.state`` and sums ``numel * element_size`` of every tensor. Python
scalars (step counters, cycle positions) hold no tensor memory and are not
counted. Names not listed below fall into ``"other"``.
"""

from __future__ import annotations

import torch

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
