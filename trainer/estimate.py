"""``leantrain estimate``: persistent training-state bytes, before any training.

Built from the model's config on the meta device (shapes only), so it works
for models that would not fit. Per rank with replicated state (single
process, DDP); sharded layouts divide by the number of ranks (FSDP/ZeRO,
reported when those engines are configured).

Gradients count as persistent when they live across micro-steps: always in
``standard`` mode (``.grad`` accumulation), never when fused. Unfused
``exact``/``ema`` free them after every ``step()``, so they appear only as a
transient peak (shown in brackets, not in the total).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leantrain import optim

from .optimizers import build_optimizer, embeds_accumulation
from .schema import Recipe


@dataclass(frozen=True)
class Estimate:
    label: str
    trainable: int
    parameters: int
    gradients: int
    transient_gradients: int
    optimizer_state: int
    accumulation: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.accumulation


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def estimate_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe, label: str) -> Estimate:
    """Exact state bytes: leantrain optimizers create all state eagerly; torch's step once on meta."""
    params = list(dict.fromkeys(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    inner = optim.fused.innermost_optimizer(optimizer)
    if embeds_accumulation(type(inner)):
        inner.init_all_state()
    elif all(p.is_meta for p in trainable):
        _step_on_meta(inner, trainable)
    by_component = optim.state_bytes_by_component(inner)
    accumulation = by_component.pop("accumulation")
    by_component.pop("wrappers")  # counted analytically: they fill in only after the first update
    wrapper_copies = int(recipe.optimizer.lookahead is not None) + int(recipe.optimizer.ema is not None)
    grad_bytes = _bytes(trainable)
    return Estimate(
        label, sum(p.numel() for p in trainable), _bytes(params),
        gradients=grad_bytes if recipe.accumulation.mode == "standard" else 0,
        transient_gradients=0 if recipe.accumulation.fused else grad_bytes,
        optimizer_state=sum(by_component.values()) + wrapper_copies * grad_bytes,
        accumulation=accumulation,
    )


def _step_on_meta(optimizer: torch.optim.Optimizer, params: list) -> None:
    """torch's optimizers create state in their first step; on meta tensors that costs nothing."""
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError):
        pass  # an optimizer whose kernels refuse meta tensors: its state shows as 0
    finally:
        for p in params:
            p.grad = None


def baseline_adamw(model: torch.nn.Module) -> Estimate:
    """AdamW with standard accumulation: fp32 params, fp32 .grad, m and v (16 B/param in fp32)."""
    trainable = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    return Estimate("AdamW, standard accumulation", n, _bytes(dict.fromkeys(model.parameters())),
                    4 * n, 0, 8 * n, 0)


def estimate_recipe(recipe: Recipe, source: str) -> list[Estimate]:
    from .model import build_meta_model

    model = build_meta_model(recipe)
    optimizer = build_optimizer(recipe, source, model)
    mode = recipe.accumulation.mode + (" fused" if recipe.accumulation.fused else "")
    label = f"{type(optim.fused.innermost_optimizer(optimizer)).__name__}, {mode}, k={recipe.accumulation.steps}"
    return [estimate_for(model, optimizer, recipe, label), baseline_adamw(model)]


def format_table(estimates: list[Estimate]) -> str:
    n = estimates[0].trainable
    lines = [f"trainable parameters: {n:,} (per rank, replicated state)"]
    header = f"{'':<24}" + "".join(f"{e.label:>34}" for e in estimates)
    lines.append(header)
    rows = [("parameters", "parameters"), ("gradients (persistent)", "gradients"),
            ("optimizer state", "optimizer_state"), ("accumulation buffers", "accumulation"), ("total", "total")]
    for title, attr in rows:
        cells = []
        for e in estimates:
            value = getattr(e, attr)
            cells.append(f"{value / 2**20:>14.1f} MiB {value / max(1, e.trainable):>7.2f} B/param")
        lines.append(f"{title:<24}" + "".join(f"{c:>34}" for c in cells))
    transient = estimates[0].transient_gradients
    if transient:
        lines.append(f"{'(transient gradients)':<24}{transient / 2**20:>14.1f} MiB between backward and step()")
    return "\n".join(lines)
