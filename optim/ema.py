"""Exponential moving average of the weights, for evaluation.

After every parameter update (never per micro-step)::

    e ← d·e + (1−d)·θ          (e starts at 0)
    averaged weights = e / (1 − d^n)        after n updates (bias correction)

``with ema.averaged_weights():`` swaps the averaged weights into the model
and restores the trained ones afterwards; it allocates one copy of the
parameters for its duration. The average ``ema_weights`` (in the parameters'
dtype) lives in the wrapped optimizer's state and the update count in its
param groups, so checkpoints carry it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._checks import check_number
from ._wrapper import OptimizerWrapper, _base_has_stepped


class EMA(OptimizerWrapper):
    def __init__(self, base, decay: float = 0.999) -> None:
        self._decay = check_number("decay", decay, low=0.0, high=1.0, high_open=True)
        super().__init__(base)
        for group in self.param_groups:
            self._init_group(group)

    def _init_group(self, group: dict) -> None:
        group.setdefault("ema_decay", self._decay)
        group.setdefault("ema_updates", 0)

    def _after_update(self) -> None:
        for group in self.param_groups:
            group["ema_updates"] += 1
            # Only parameters the base optimizer has stepped: an entry added
            # earlier would hide the empty state that some torch optimizers
            # (Adam) test for their own initialisation.
            params = [p for p in group["params"] if _base_has_stepped(self.state, p)]
            if not params:
                continue
            averages = []
            for p in params:
                state = self.state[p]
                if "ema_weights" not in state:
                    state["ema_weights"] = torch.zeros_like(p)
                averages.append(state["ema_weights"])
            torch._foreach_lerp_(averages, [p.detach() for p in params], 1.0 - group["ema_decay"])

    @torch.no_grad()
    def averaged(self, param: torch.Tensor) -> torch.Tensor:
        """The bias-corrected average of ``param`` (a new tensor)."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        correction = 1.0 - group["ema_decay"] ** group["ema_updates"]
        return self.state[param]["ema_weights"] / correction

    @contextmanager
    def averaged_weights(self):
        """Swap the averaged weights into the parameters for the ``with`` block."""
        trained = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if "ema_weights" in self.state.get(p, {}):
                        trained.append((p, p.data))
                        p.data = self.averaged(p)
        try:
            yield
        finally:
            for p, data in trained:
                p.data = data
