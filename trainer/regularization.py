"""Explicit regularisers of the implicit kind a finite learning rate applies: flooding and gradient penalty.

- Flooding (Ishida et al., ICML 2020): train on ``|L − b| + b``. Above the
  flood level b it is the loss; below it, the gradient flips and the loss
  floats around b instead of reaching zero.
- Gradient penalty (Barrett & Dherin, "Implicit Gradient Regularization",
  ICLR 2021; Smith et al. 2021): gradient descent with step h follows, to
  first order, the flow of ``L + (h/4)·‖∇L‖²``. ``λ·‖∇L‖²`` makes that term
  explicit. Its gradient ``∇L + 2λ·H·∇L`` needs a Hessian-vector product,
  taken here without double backward by a finite difference along the
  gradient: with ``g = ∇L(θ)`` and ``ε = r/‖g‖`` (a step of length r)::

      ∇(L + λ‖∇L‖²) ≈ g + (2λ/ε)·(∇L(θ + ε·g) − g)

  Cost per micro-batch: one more forward and backward (about twice the
  compute), and two transient copies the size of the trained parameters (g,
  and θ to restore it exactly, so DDP ranks never drift apart). Fused
  accumulation cannot compose with it (g must exist whole before θ moves)
  and is refused; so are FSDP2 and DeepSpeed (their gradients live in the
  engine's shards) and standard-mode accumulation on several processes
  (DDP would all-reduce the first gradient and not the second).
"""

from __future__ import annotations

import torch


def flood(loss: torch.Tensor, level: float | None) -> torch.Tensor:
    """``|L − b| + b`` (the loss itself when ``level`` is None)."""
    return loss if level is None else (loss - level).abs() + level


class GradientPenalty:
    """Adds ``λ·‖∇L‖²``'s gradient by one finite-difference step along the gradient."""

    def __init__(self, weight: float, radius: float) -> None:
        self.weight, self.radius = weight, radius

    @torch.no_grad()
    def apply(self, params: list[torch.Tensor], scale: float, second_backward) -> float:
        """After a backward of ``scale·L``: rewrite ``.grad`` to ``scale·∇(L + λ‖∇L‖²)``; returns ``‖∇L‖²``.

        ``second_backward()`` runs forward and backward again (same micro-batch, same scale).
        """
        params = [p for p in params if p.grad is not None]
        first = [p.grad.detach().clone() for p in params]
        norm_sq = sum(float(g.double().square().sum()) for g in first) / scale**2  # ‖∇L‖² of the unscaled loss
        if norm_sq == 0.0:
            return 0.0
        eps = self.radius / norm_sq**0.5
        saved = [p.detach().clone() for p in params]
        torch._foreach_add_(params, first, alpha=eps / scale)  # θ + ε·g
        for p in params:
            p.grad = None
        with torch.enable_grad():
            second_backward()
        torch._foreach_copy_(params, saved)  # exact restore
        coef = 2.0 * self.weight / eps
        for p, g in zip(params, first):
            if p.grad is None:
                p.grad = g.mul_(1.0 - coef)
            else:  # g + coef·(g(θ+εg) − g)
                p.grad.mul_(coef).add_(g, alpha=1.0 - coef)
        return norm_sq
