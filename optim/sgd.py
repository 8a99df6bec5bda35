"""SGD with momentum and momentum-embedded gradient accumulation.

Update rule (torch.optim.SGD, stepped once per cycle on the mean gradient
``ḡ = (1/k)·Σ g_s`` plus coupled weight decay ``λθ``)::

    b ← β·b + (1-δ)·(ḡ + λθ)        (first update: b ← ḡ + λθ)
    θ ← θ − lr·b

Embedded form (DESIGN.md 2.1), mode ``exact``: ``b ← β·b`` at the first
micro-step of a cycle, every micro-step adds ``(1-δ)/k·(g_s + λθ)`` (factor 1
instead of ``1-δ`` in the first cycle), the boundary only moves θ. θ is fixed
within a cycle, so adding its decay term per micro-step sums to ``(1-δ)·λθ``.
Mode ``ema``: ``b ← β'·b + (1-δ)(1-β')/(1-β)·(g_s + λθ)`` every micro-step with
``β' = β^(1/k)``, which keeps the steady-state scale of ``b``.

Departures: Nesterov needs ``ḡ`` itself (``ḡ + β·b``), so with k > 1 it keeps an
explicit ``grad_accum`` buffer (``accum_dtype``); so does ``momentum=0`` (plain
SGD has no buffer to embed into). ``maximize``, ``foreach`` and ``fused`` are
not offered. ``max_update_rms`` clips each tensor's update direction (b, or
the Nesterov direction) to that RMS before the lr is applied.
"""

from __future__ import annotations

import torch

from ._accumulating import AccumulatingOptimizer
from ._checks import check_lr, check_max_update_rms, check_number, check_state_dtype
from ._tensor_lists import clip_rms_


class SGD(AccumulatingOptimizer):
    """SGD with torch's keywords and defaults, plus ``accum_steps``/``accum_mode``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        momentum_dtype: torch.dtype = torch.float32,
        max_update_rms: float | None = None,
        **common,
    ) -> None:
        defaults = dict(
            lr=check_lr(lr),
            momentum=check_number("momentum", momentum, low=0.0, high=1.0, high_open=True),
            dampening=check_number("dampening", dampening, low=0.0, high=1.0),
            weight_decay=check_number("weight_decay", weight_decay, low=0.0),
            nesterov=bool(nesterov),
            momentum_dtype=check_state_dtype("momentum_dtype", momentum_dtype),
            max_update_rms=check_max_update_rms(max_update_rms),
        )
        super().__init__(params, defaults, **common)

    def _validate_group(self, group: dict) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov=True needs momentum > 0 and dampening=0 "
                f"(got momentum={group['momentum']}, dampening={group['dampening']})"
            )
        if group["lazy_rows"] and group["weight_decay"] != 0:
            raise ValueError(
                f"lazy_rows=True with weight_decay={group['weight_decay']}: coupled decay would "
                "move rows that had no gradient; use weight_decay=0 for lazy groups"
            )
        super()._validate_group(group)

    def _embeds(self, group: dict) -> bool:
        return group["momentum"] > 0 and not group["nesterov"]

    def _why_not_embedded(self, group: dict) -> str:
        return "nesterov=True uses the mean gradient" if group["nesterov"] else "momentum=0"

    def _init_state(self, group, param, state) -> None:
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(param, dtype=group["momentum_dtype"])

    def _decay_factors(self, group, t, j) -> dict[str, float]:
        beta, k = group["momentum"], group["accum_steps"]
        return {"momentum_buffer": beta if group["accum_mode"] == "exact" else beta ** (1.0 / k)}

    def _fold(self, group, params, grads, states, *, t, j, decay) -> None:
        beta, k = group["momentum"], group["accum_steps"]
        share = 1.0 if t == 1 else 1.0 - group["dampening"]  # torch seeds b with the first gradient
        if group["accum_mode"] == "exact":
            weight = share / k
        else:
            micro = beta ** (1.0 / k)
            weight = share * (1.0 - micro) / (1.0 - beta)
        _sgd_fold(
            [s["momentum_buffer"] for s in states], grads, params,
            decay=self._decay_factors(group, t, j)["momentum_buffer"] if decay else None,
            weight=weight, weight_decay=group["weight_decay"],
        )

    def _apply(self, group, params, states, *, t) -> None:
        bufs = [s["momentum_buffer"] for s in states]
        if group["max_update_rms"] is not None:
            bufs = torch._foreach_mul(bufs, 1.0)  # clip a copy: b itself must stay unclipped
            clip_rms_(bufs, group["max_update_rms"])
        torch._foreach_add_(params, bufs, alpha=-group["lr"])

    def _step_on_grad(self, group, params, grads, states, *, t) -> None:
        bufs = [s["momentum_buffer"] for s in states] if group["momentum"] > 0 else None
        _sgd_step(
            params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], weight_decay=group["weight_decay"],
            nesterov=group["nesterov"], first=t == 1, max_update_rms=group["max_update_rms"],
        )


def _sgd_fold(bufs, grads, params, *, decay, weight, weight_decay) -> None:
    """b ← decay·b + weight·(g + λθ); ``decay=None`` skips the decay."""
    if decay is not None:
        torch._foreach_mul_(bufs, decay)
    torch._foreach_add_(bufs, grads, alpha=weight)
    if weight_decay:
        torch._foreach_add_(bufs, params, alpha=weight * weight_decay)


def _sgd_step(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, first, max_update_rms) -> None:
    """One torch.optim.SGD step on ``grads`` (the mean gradient), update RMS clipped if asked."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if bufs is not None:
        if first:
            torch._foreach_copy_(bufs, grads)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1.0 - dampening)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    if max_update_rms is not None:
        grads = torch._foreach_mul(grads, 1.0)  # never clip the momentum or the caller's gradient
        clip_rms_(grads, max_update_rms)
    torch._foreach_add_(params, grads, alpha=-lr)
