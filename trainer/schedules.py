"""Learning-rate schedules counted in updates (stepped once per update by the loop)."""

from __future__ import annotations

import math

import torch

from leantrain.optim import PiecewiseLinearLR

from .schema import Recipe


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_updates: int):
    cfg = recipe.schedule
    if cfg.name == "none" or recipe.optimizer.lr is None:
        return None
    if cfg.name == "piecewise":
        return PiecewiseLinearLR(optimizer, dict(cfg.points or {0: 1.0}))
    warmup, floor = cfg.warmup_updates, cfg.min_lr_ratio
    decay_span = max(1, total_updates - warmup)

    def multiplier(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        progress = min(1.0, (update - warmup) / decay_span)
        if cfg.name == "linear":
            return 1.0 - (1.0 - floor) * progress
        if cfg.name == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
