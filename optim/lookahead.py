"""Lookahead: slow weights that follow the fast optimizer every k updates.

Paper: Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1
step back", NeurIPS 2019::

    every k parameter updates:  φ ← φ + α·(θ − φ);  θ ← φ

Counts parameter *updates* (the wrapped optimizer's ``updated``), not
micro-steps, so it composes with embedded accumulation. The slow weights
``lookahead_slow`` (one copy of the parameters, in their dtype) live in the
wrapped optimizer's state and the update count in its param groups, so a
checkpoint of either object resumes Lookahead too. The fast optimizer's
moments are kept across synchronisations, as in the paper.
"""

from __future__ import annotations

import torch

from ._checks import check_number
from ._wrapper import OptimizerWrapper, _base_has_stepped


class Lookahead(OptimizerWrapper):
    def __init__(self, base, k: int = 5, alpha: float = 0.5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: expected an integer >= 1 (updates between synchronisations)")
        self._k = k
        self._alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_open=True)
        super().__init__(base)
        # φ_0 = θ_0 must be taken before the first update, but torch's
        # optimizers create their state only on their first step (they test
        # ``len(state) == 0``), so the initial copy waits here until then.
        self._pending: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            self._init_group(group)

    def _init_group(self, group: dict) -> None:
        group.setdefault("lookahead_k", self._k)
        group.setdefault("lookahead_alpha", self._alpha)
        group.setdefault("lookahead_updates", 0)

    def _before_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self._pending and "lookahead_slow" not in self.state.get(p, {}):
                    self._pending[p] = p.detach().clone()

    def _after_update(self) -> None:
        # Adopt a pending copy only once the base optimizer has had its chance
        # to create the parameter's state (it has state, or it just stepped on
        # a gradient): an entry added earlier would hide the empty state that
        # some torch optimizers (Adam) test for their own initialisation.
        for p in [p for p in self._pending if _base_has_stepped(self.state, p)]:
            self.state[p]["lookahead_slow"] = self._pending.pop(p)
        for group in self.param_groups:
            group["lookahead_updates"] += 1
            if group["lookahead_updates"] % group["lookahead_k"]:
                continue
            fast = [p for p in group["params"] if "lookahead_slow" in self.state[p]]
            if not fast:
                continue
            slow = [self.state[p]["lookahead_slow"] for p in fast]
            torch._foreach_lerp_(slow, fast, group["lookahead_alpha"])
            torch._foreach_copy_(fast, slow)
