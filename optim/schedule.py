"""Learning-rate schedules counted in parameter updates (step once per update)."""

from __future__ import annotations

import bisect
import math

from torch.optim.lr_scheduler import LRScheduler


class PiecewiseLinearLR(LRScheduler):
    """Multiply each group's base lr by a piecewise-linear function of the update count.

    ``PiecewiseLinearLR(opt, {0: 0.0, 500: 1.0, 10_000: 0.1})`` warms up
    linearly over 500 updates, decays linearly to 0.1× at 10k and stays there.
    Before the first point the first multiplier holds; after the last, the last.
    With accumulation call ``scheduler.step()`` only when ``optimizer.updated``.
    """

    def __init__(self, optimizer, milestones: dict[int, float], last_epoch: int = -1) -> None:
        if not isinstance(milestones, dict) or not milestones:
            raise ValueError(f"milestones={milestones!r}: expected a non-empty dict {{update: multiplier}}")
        for step, mult in milestones.items():
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"milestones key {step!r}: expected an integer update count >= 0")
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not math.isfinite(mult) or mult < 0:
                raise ValueError(f"milestones[{step}]={mult!r}: expected a finite multiplier >= 0")
        points = sorted(milestones.items())
        self.steps = [s for s, _ in points]
        self.multipliers = [float(m) for _, m in points]
        super().__init__(optimizer, last_epoch)

    def multiplier(self, update: int) -> float:
        """The lr multiplier after ``update`` updates."""
        i = bisect.bisect_right(self.steps, update)
        if i == 0:
            return self.multipliers[0]
        if i == len(self.steps):
            return self.multipliers[-1]
        s0, s1 = self.steps[i - 1], self.steps[i]
        m0, m1 = self.multipliers[i - 1], self.multipliers[i]
        return m0 + (m1 - m0) * (update - s0) / (s1 - s0)

    def get_lr(self) -> list[float]:
        return [base * self.multiplier(self.last_epoch) for base in self.base_lrs]
