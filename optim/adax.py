"""AdaX: adaptive moments with exponential long-term memory.

Paper: Li, Zhang, Huang & Liu, "AdaX: Adaptive Gradient Descent with
Exponential Long Term Memory", 2020::

    m ← β1·m + (1−β1)·g
    v ← (1+β2)·v + β2·g²,       v̂ = v / ((1+β2)^t − 1)
    θ ← θ·(1 − lr·λ) − lr · m / (√v̂ + ε)          (defaults β = (0.9, 1e-4))

Storage: v grows like (1+β2)^t and overflows fp32 after ~887k updates at
β2 = 1e-4, so the state holds v̂ itself. Dividing the recursion by
``D_t = (1+β2)^t − 1`` gives ``v̂ ← (1−a_t)·v̂ + a_t·g²`` with
``a_t = β2/D_t``, computed as ``β2·e^{−x}/(1−e^{−x})``, ``x = t·log1p(β2)``:
no term overflows for any t (a_1 = 1, a_t → 0 as memory lengthens).

Embedded accumulation (mode ``exact``): the first micro-step of a cycle
decays ``m`` by β1 and ``v̂`` by ``1−a_t``; every micro-step adds ``(1−β1)/k·g``
and ``a_t/k·g²``. Mode ``ema`` is the same recursion run per micro-step with
``β1' = β1^(1/k)`` and ``1+β2' = (1+β2)^(1/k)`` over micro-step counts
``n = (t−1)·k + j + 1``, unrolled over the cycle (docs/design.md §2.2): the
cycle decays v̂ once by ``(1−e^{−n0·x})/(1−e^{−(n0+k)·x})`` and micro-step j
adds ``β2'·e^{−(n0+1+j)·x}/(1−e^{−(n0+k)·x})·g²``, with ``x = log1p(β2')``,
``n0 = (t−1)·k`` — again no term that can overflow.

Departures from the authors' code: ε is added to √v̂ (as the issue and the
paper's equations state), not to √v before the bias correction; weight decay
is decoupled (AdaX-W) and off by default.
"""

from __future__ import annotations

import math

import torch

from ._accumulating import AccumulatingOptimizer
from ._checks import check_lr, check_max_update_rms, check_number, check_state_dtype, scalar
from ._tensor_lists import chunks, ema_split, scale_, step_along_ratio_


class AdaX(AccumulatingOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 1e-4),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        momentum_dtype: torch.dtype | None = None,
        max_update_rms: float | None = None,
        **common,
    ) -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r}: expected a pair (beta1 in [0, 1), beta2 in (0, 1))")
        defaults = dict(
            lr=check_lr(lr),
            betas=(
                check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
                check_number("betas[1]", betas[1], low=0.0, high=1.0, low_open=True, high_open=True),
            ),
            eps=check_number("eps", eps, low=0.0),
            weight_decay=check_number("weight_decay", weight_decay, low=0.0),
            momentum_dtype=check_state_dtype("momentum_dtype", momentum_dtype),
            max_update_rms=check_max_update_rms(max_update_rms),
        )
        super().__init__(params, defaults, **common)

    def _embeds(self, group: dict) -> bool:
        return True

    def _moment_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, group, param, state) -> None:
        state["exp_avg"] = torch.zeros_like(param, dtype=self._state_dtype(group, param, "momentum_dtype"))
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=self._state_dtype(group, param))  # holds v̂, not v

    def _second_moment_split(self, group, t: int, j: int) -> tuple[float, float]:
        """(decay once per cycle, weight of micro-step j) of the folds into v̂ for update t."""
        beta2, k = group["betas"][1], group["accum_steps"]
        if group["accum_mode"] == "exact":
            a = _newest_weight(beta2, t)
            return 1.0 - a, a / k
        x = math.log1p(beta2) / k  # log(1+β2') per micro-step
        n0 = (t - 1) * k
        end = -math.expm1(-(n0 + k) * x)
        return -math.expm1(-n0 * x) / end, math.expm1(x) * math.exp(-(n0 + 1 + j) * x) / end

    def _decay_factors(self, group, t) -> dict[str, float]:
        return {"exp_avg": group["betas"][0], "exp_avg_sq": self._second_moment_split(group, t, 0)[0]}

    def _fold(self, group, params, grads, states, *, t, j, decay, layouts) -> None:
        decay1, weight1 = ema_split(group["betas"][0], group["accum_steps"], group["accum_mode"], j)
        decay2, weight2 = self._second_moment_split(group, t, j)
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if decay:
            scale_(m, decay1)
            scale_(v, decay2)
        torch._foreach_add_(m, grads, alpha=weight1)
        torch._foreach_addcmul_(v, grads, grads, value=weight2)

    def _apply(self, group, params, states, *, t, layouts) -> None:
        lr, eps, weight_decay = scalar(group["lr"]), group["eps"], group["weight_decay"]
        for idx in chunks(params):
            ps = [params[i] for i in idx]
            if weight_decay:
                torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
            denom = torch._foreach_sqrt([states[i]["exp_avg_sq"] for i in idx])
            torch._foreach_add_(denom, eps)
            step_along_ratio_(ps, [states[i]["exp_avg"] for i in idx], denom, step=-lr,
                              max_rms=group["max_update_rms"], layouts=[layouts[i] for i in idx])


def _newest_weight(beta2: float, n: int) -> float:
    """a_n = β2 / ((1+β2)^n − 1), without forming (1+β2)^n (which overflows)."""
    x = n * math.log1p(beta2)
    return beta2 * math.exp(-x) / -math.expm1(-x)
