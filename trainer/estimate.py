"""``leantrain estimate``: persistent training-state bytes per rank, before any training.

Built from the model's config on the meta device (shapes only), so it works
for models that would not fit. The optimizer's state is created for real on
the meta device (exact shapes and dtypes), then laid out as each engine
would hold it on one rank (the largest shard, rank 0):

- ``ddp`` (and one process): everything replicated;
- ``fsdp2``: parameters, gradients and every state tensor shaped like its
  parameter split along dim 0 (``ceil(rows / ranks)`` rows); AdaFactor's row
  statistics split with the rows, its column statistics whole on every rank;
- ``deepspeed-zero1|2|3``: the optimizer state on flat partitions (1/ranks; an
  AdaFactor second moment is unfactored there), an fp32 master partition,
  gradients partitioned from stage 2, parameters from stage 3. DeepSpeed's
  communication buckets are not counted.

Gradients count as persistent when they live across micro-steps: always in
``standard`` mode (``.grad`` accumulation), never when fused. Unfused
``exact``/``ema`` free them after every ``step()``, so they appear only as a
transient peak (shown in brackets, not in the total).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from leantrain import optim

from .optimizers import build_optimizer, embeds_accumulation
from .schema import Recipe

ENGINES = ("ddp", "fsdp2", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3")
# ``leantrain launch --engine`` names the shipped accelerate configs (zero2, zero3_offload); the estimate
# accepts those too. Offload moves the optimizer state to host memory but not its size per rank.
LAUNCH_ENGINE_NAMES = {"zero1": "deepspeed-zero1", "zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3",
                       "zero2_offload": "deepspeed-zero2", "zero3_offload": "deepspeed-zero3"}
_PER_TENSOR_KEYS = ("exp_avg_sq_row", "exp_avg_sq_col", "RMS")  # AdaFactor's non-elementwise state


@dataclass(frozen=True)
class Estimate:
    label: str
    trainable: int  # parameters trained (whole model): the B/param denominator
    parameters: int
    gradients: int
    transient_gradients: int
    optimizer_state: int
    accumulation: int
    master_weights: int = 0  # DeepSpeed's fp32 partition copy

    @property
    def total(self) -> int:
        return self.parameters + self.master_weights + self.gradients + self.optimizer_state + self.accumulation


class _Layout:
    """Bytes one rank holds of a tensor under an engine with ``ranks`` ranks."""

    def __init__(self, engine: str, ranks: int) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: allowed: {', '.join(ENGINES)}")
        self.engine, self.ranks = engine, ranks
        self.stage = int(engine[-1]) if engine.startswith("deepspeed") else 0

    def rows(self, shape) -> float:
        """Fraction of a tensor FSDP2's dim-0 shard keeps on rank 0."""
        if not shape or shape[0] == 0:
            return 1.0
        return math.ceil(shape[0] / self.ranks) / shape[0]

    def share(self, p, component: str) -> float:
        """Fraction of ``p``-shaped tensors one rank holds, for parameters, gradients or optimizer state."""
        if self.engine == "fsdp2":
            return self.rows(p.shape)
        stage_needed = {"parameters": 3, "gradients": 2, "state": 1}[component]
        return 1 / self.ranks if self.stage >= stage_needed else 1.0

    def parameters(self, p) -> float:
        return p.numel() * p.element_size() * self.share(p, "parameters")

    def gradients(self, p) -> float:
        return p.numel() * p.element_size() * self.share(p, "gradients")

    def state(self, p, key: str, tensor) -> float:
        nbytes = tensor.numel() * tensor.element_size()
        if self.engine == "fsdp2":
            if key == "exp_avg_sq_col" and p.dim() == 2 or tensor.dim() == 0:
                return nbytes  # whole on every rank (the split rows are reduced away)
            return nbytes * self.rows(tensor.shape)
        if self.stage:
            if key in ("exp_avg_sq_row", "exp_avg_sq_col"):  # a flat partition: one unfactored v instead
                return (p.numel() * 4 / self.ranks) if key == "exp_avg_sq_row" else 0
            return 0 if tensor.dim() == 0 else nbytes / self.ranks
        return nbytes


def estimate_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe, label: str,
                 *, engine: str = "ddp", ranks: int = 1) -> Estimate:
    """State bytes one rank holds: leantrain optimizers create all state eagerly; torch's step once on meta."""
    layout = _Layout(engine, ranks)
    params = list(dict.fromkeys(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    inner = optim.fused.innermost_optimizer(optimizer)
    if embeds_accumulation(type(inner)):
        inner.init_all_state()
    elif all(p.is_meta for p in trainable):
        _step_on_meta(inner, trainable)
    state_bytes = accumulation = 0.0
    for p in trainable:
        for key, value in inner.state.get(p, {}).items():
            if not isinstance(value, torch.Tensor) or key in ("lookahead_slow", "ema_weights"):
                continue
            nbytes = layout.state(p, key, value)
            if key == "grad_accum":
                accumulation += nbytes
            else:
                state_bytes += nbytes
    # Wrapper copies fill in only after the first update: counted from the recipe.
    wrapper_copies = int(recipe.optimizer.lookahead is not None) + int(recipe.optimizer.ema is not None)
    grads = sum(layout.gradients(p) for p in trainable)
    return Estimate(
        label, sum(p.numel() for p in trainable), int(sum(layout.parameters(p) for p in params)),
        gradients=int(grads) if recipe.accumulation.mode == "standard" else 0,
        transient_gradients=0 if recipe.accumulation.fused else int(grads),
        optimizer_state=int(state_bytes + wrapper_copies * sum(layout.parameters(p) for p in trainable)),
        accumulation=int(accumulation),
        master_weights=int(sum(4 * p.numel() / ranks for p in trainable)) if layout.stage else 0,
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


def baseline_adamw(model: torch.nn.Module, *, engine: str = "ddp", ranks: int = 1) -> Estimate:
    """AdamW with standard accumulation: fp32 params, fp32 .grad, m and v (16 B/param in fp32), laid out
    as ``engine`` would hold it on one rank."""
    layout = _Layout(engine, ranks)
    params = list(dict.fromkeys(model.parameters()))
    trainable = [p for p in params if p.requires_grad]
    moments = sum(8 * p.numel() * layout.share(p, "state") for p in trainable)
    grads = sum(4 * p.numel() * layout.share(p, "gradients") for p in trainable)
    return Estimate("AdamW, standard accumulation", sum(p.numel() for p in trainable),
                    int(sum(layout.parameters(p) for p in params)), int(grads), 0, int(moments), 0,
                    master_weights=int(sum(4 * p.numel() / ranks for p in trainable)) if layout.stage else 0)


def estimate_recipe(recipe: Recipe, source: str, *, engine: str = "ddp", ranks: int = 1,
                    vocab_size: int | None = None) -> list[Estimate]:
    from .model import build_meta_model

    model = build_meta_model(recipe, vocab_size=vocab_size)
    optimizer = build_optimizer(recipe, source, model)
    mode = recipe.accumulation.mode + (" fused" if recipe.accumulation.fused else "")
    label = f"{type(optim.fused.innermost_optimizer(optimizer)).__name__}, {mode}, k={recipe.accumulation.steps}"
    return [estimate_for(model, optimizer, recipe, label, engine=engine, ranks=ranks),
            baseline_adamw(model, engine=engine, ranks=ranks)]


def format_table(estimates: list[Estimate], *, engine: str = "ddp", ranks: int = 1) -> str:
    n = estimates[0].trainable
    where = "replicated state" if engine == "ddp" else f"{engine}, the largest shard"
    lines = [f"trainable parameters: {n:,}; bytes per rank, {ranks} rank(s), {where}"]
    header = f"{'':<24}" + "".join(f"{e.label:>34}" for e in estimates)
    lines.append(header)
    rows = [("parameters", "parameters"), ("master weights (fp32)", "master_weights"),
            ("gradients (persistent)", "gradients"), ("optimizer state", "optimizer_state"),
            ("accumulation buffers", "accumulation"), ("total", "total")]
    for title, attr in rows:
        if attr == "master_weights" and not any(e.master_weights for e in estimates):
            continue
        cells = []
        for e in estimates:
            value = getattr(e, attr)
            cells.append(f"{value / 2**20:>14.1f} MiB {value / max(1, e.trainable):>7.2f} B/param")
        lines.append(f"{title:<24}" + "".join(f"{c:>34}" for c in cells))
    transient = estimates[0].transient_gradients
    if transient:
        lines.append(f"{'(transient gradients)':<24}{transient / 2**20:>14.1f} MiB between backward and step()")
    return "\n".join(lines)
