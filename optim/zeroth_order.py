"""Zeroth-order optimisation (SPSA / MeZO): training at inference memory, no gradients at all.

Papers: Spall, "Multivariate stochastic approximation using a simultaneous
perturbation gradient approximation", 1992 (SPSA); Malladi et al.,
"Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023 (MeZO)::

    z ~ N(0, I)                      (regenerated from a seed, never stored)
    p = (L(θ + ε·z) − L(θ − ε·z)) / (2ε)            projected gradient
    θ ← θ·(1 − lr·λ) − lr · p · z                  (mean over ``perturbations`` z)

``p·z`` estimates the gradient of the Gaussian-smoothed loss
``E_z[L(θ + ε·z)]``, which is also the policy gradient of a Gaussian "policy"
over parameters, ``E[L(θ+εz)·z]/ε``, with an antithetic baseline (docs/design.md
§7 measures the two side by side). The loss can be any number: a
non-differentiable metric (1 − accuracy) optimises directly.

``step(closure)``: ``closure()`` evaluates the loss of the current micro-batch
at the current parameters (forward only; no backward). It is called twice per
perturbation. Memory: the parameters and nothing else, 0 B/param of state
(``momentum > 0`` adds one buffer). z is drawn per tensor from a generator
seeded by (seed, update, perturbation, tensor position), so a checkpoint
resumes exactly and DDP ranks perturb identically. ``accum_steps=k`` uses the
same z for the k micro-batches of an update and averages their projected
gradients (which is the projected gradient of the cycle's mean loss);
``replicated_over()`` averages them across ranks (one scalar all-reduce per
perturbation and update). Perturbing and restoring in place leaves a rounding
drift of a few ulps per step, as in MeZO.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_accum_steps, check_lr, check_number, scalar


class ZerothOrder(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, seed: int = 0, perturbations: int = 1,
                 momentum: float = 0.0, weight_decay: float = 0.0, accum_steps: int = 1) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r}: expected an integer")
        if isinstance(perturbations, bool) or not isinstance(perturbations, int) or perturbations < 1:
            raise ValueError(f"perturbations={perturbations!r}: expected an integer >= 1")
        defaults = dict(lr=check_lr(lr), eps=check_number("eps", eps, low=0.0, low_open=True), seed=seed,
                        perturbations=perturbations,
                        momentum=check_number("momentum", momentum, low=0.0, high=1.0, high_open=True),
                        weight_decay=check_number("weight_decay", weight_decay, low=0.0),
                        accum_steps=check_accum_steps(accum_steps), micro_step=0, update=0)
        super().__init__(params, defaults)
        if len({(g["seed"], g["perturbations"], g["accum_steps"]) for g in self.param_groups}) > 1:
            raise ValueError("seed, perturbations and accum_steps must be the same in every param group")
        self._replica_group = None
        self._projections: list[float] = [0.0] * perturbations  # this cycle's sums (state: saved below)

    # ------------------------------------------------------------------ cycle
    @property
    def accum_steps(self) -> int:
        return self.param_groups[0]["accum_steps"]

    @property
    def micro_step(self) -> int:
        return self.param_groups[0]["micro_step"]

    @property
    def updated(self) -> bool:
        return self.micro_step > 0 and self.micro_step % self.accum_steps == 0

    def replicated_over(self, group=None) -> ZerothOrder:
        """Average the projected gradients across the ranks of ``group`` (DDP) before each update."""
        import torch.distributed as dist

        self._replica_group = group if group is not None else dist.group.WORLD
        return self

    # ------------------------------------------------------------------ steps
    def _params(self):
        return [(p, g) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _noise(self, perturbation: int, index: int, p: torch.Tensor) -> torch.Tensor:
        g = self.param_groups[0]
        generator = torch.Generator(device=p.device)
        generator.manual_seed(hash((g["seed"], g["update"], perturbation, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        return torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def _shift(self, perturbation: int, scale: float) -> None:
        """θ ← θ + scale·ε·z for every trained tensor (z regenerated, one tensor at a time)."""
        for index, (p, group) in enumerate(self._params()):
            p.add_(self._noise(perturbation, index, p), alpha=scale * scalar(group["eps"]))

    @torch.no_grad()
    def step(self, closure):
        """Evaluate the micro-batch at θ ± ε·z; update at the cycle's boundary. Returns the mean of L±."""
        if closure is None:
            raise ValueError("ZerothOrder.step(closure): the closure evaluates the loss (forward only)")
        first = self.param_groups[0]
        losses = []
        for q in range(first["perturbations"]):
            self._shift(q, +1.0)
            plus = float(closure())
            self._shift(q, -2.0)
            minus = float(closure())
            self._shift(q, +1.0)
            if math.isfinite(plus) and math.isfinite(minus):  # a non-finite pair adds nothing (returned as NaN)
                self._projections[q] += (plus - minus) / (2.0 * scalar(first["eps"])) / self.accum_steps
            losses.append((plus + minus) / 2.0)
        for group in self.param_groups:
            group["micro_step"] += 1
        if self.updated:
            self._update()
        return sum(losses) / len(losses)

    @torch.no_grad()
    def _update(self) -> None:
        projections = torch.tensor(self._projections, dtype=torch.float64)
        if self._replica_group is not None:
            import torch.distributed as dist

            device = next(p for p, _ in self._params()).device
            projections = projections.to(device)
            dist.all_reduce(projections, group=self._replica_group)
            projections = projections.cpu() / dist.get_world_size(self._replica_group)
        n = len(self._projections)
        for index, (p, group) in enumerate(self._params()):
            lr, decay, beta = scalar(group["lr"]), scalar(group["weight_decay"]), group["momentum"]
            direction = self._noise(0, index, p).mul_(projections[0].item() / n)
            for q, projection in enumerate(projections.tolist()[1:], 1):
                direction.add_(self._noise(q, index, p), alpha=projection / n)
            if decay:
                p.mul_(1.0 - lr * decay)
            if beta:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                direction = buf.mul_(beta).add_(direction)
            p.add_(direction, alpha=-lr)
        self._projections = [0.0] * n
        for group in self.param_groups:
            group["update"] += 1

    # ------------------------------------------------------------- state I/O
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_replica_group", None)
        self.__dict__.setdefault("_projections", [0.0] * self.param_groups[0]["perturbations"])

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["zeroth_order_projections"] = list(self._projections)  # a stop mid-cycle resumes exactly
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        projections = state_dict.get("zeroth_order_projections")
        super().load_state_dict(state_dict)
        if projections is not None:
            self._projections = list(projections)

    def state_bytes(self) -> int:
        from .memory import state_bytes

        return state_bytes(self)
