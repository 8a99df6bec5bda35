"""SGD with momentum and momentum-embedded gradient accumulation.

Update rule (torch.optim.SGD, stepped once per cycle on the mean gradient
``ḡ = (1/k)·Σ g_s`` plus coupled weight decay ``λθ``)::

    b ← β·b + (1-δ)·(ḡ + λθ)        (first update: b ← ḡ + λθ)
    θ ← θ − lr·b

Embedded form (docs/design.md §2.1), mode ``exact``: ``b ← β·b + (1-δ)·λθ`` at
the first micro-step of a cycle in which the parameter has a gradient, then
every micro-step adds ``(1-δ)/k·g_s`` (factor 1 instead of ``1-δ`` in the first
cycle); the boundary only moves θ. θ is fixed within a cycle, so the decay
term is added once per update whatever the number of micro-steps with a
gradient, as torch adds it once to the accumulated ``.grad``. Mode ``ema``
weighs micro-step ``j`` by ``(1-δ)·(1-β')·β'^(k-1-j)/(1-β)`` with
``β' = β^(1/k)`` (the same total, recent micro-steps weigh more).

Departures: Nesterov needs ``ḡ`` itself (``ḡ + β·b``), so with k > 1 it keeps an
explicit ``grad_accum`` buffer (``accum_dtype``); so does ``momentum=0`` (plain
SGD has no buffer to embed into). ``max_update_rms`` clips each tensor's
update direction (b, or the Nesterov direction) to that RMS before the lr is
applied. torch's keywords are accepted: ``maximize`` is implemented,
``foreach`` (None/True), ``fused`` (None/False) and ``differentiable``
(False) are honoured or refused with a ValueError naming the argument.
"""

from __future__ import annotations

import torch

from ._accumulating import AccumulatingOptimizer
from ._checks import check_lr, check_max_update_rms, check_number, check_only, check_state_dtype, scalar
from ._tensor_lists import clip_rms_, scale_


class SGD(AccumulatingOptimizer):
    """SGD with torch's keywords and defaults, plus ``accum_steps``/``accum_mode``."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | torch.Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        momentum_dtype: torch.dtype | None = None,
        max_update_rms: float | None = None,
        **common,
    ) -> None:
        defaults = dict(
            lr=check_lr(lr),
            momentum=check_number("momentum", momentum, low=0.0, high=1.0),
            dampening=check_number("dampening", dampening, low=0.0, high=1.0),
            weight_decay=check_number("weight_decay", weight_decay, low=0.0),
            nesterov=bool(nesterov),
            foreach=check_only("foreach", foreach, (None, True), "its updates are always multi-tensor"),
            differentiable=check_only("differentiable", differentiable, (False,),
                                      "the embedded accumulation updates state in place under no_grad"),
            fused=check_only("fused", fused, (None, False), "it has no fused SGD kernel; its foreach path is used"),
            momentum_dtype=check_state_dtype("momentum_dtype", momentum_dtype),
            max_update_rms=check_max_update_rms(max_update_rms),
        )
        super().__init__(params, defaults, maximize=maximize, **common)

    def _validate_group(self, group: dict) -> None:
        momentum = scalar(group["momentum"])
        if group["nesterov"] and (momentum <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"nesterov=True needs momentum > 0 and dampening=0 "
                f"(got momentum={momentum}, dampening={group['dampening']})"
            )
        if group["lazy_rows"] and scalar(group["weight_decay"]) != 0:
            raise ValueError(
                f"lazy_rows=True with weight_decay={scalar(group['weight_decay'])}: coupled decay would "
                "move rows that had no gradient; use weight_decay=0 for lazy groups"
            )
        if group["accum_mode"] == "ema" and momentum == 1.0:
            raise ValueError("accum_mode='ema' with momentum=1: the per-micro-step weights (1-β')/(1-β) "
                             "are undefined without decay; use accum_mode='exact'")
        super()._validate_group(group)

    def _embeds(self, group: dict) -> bool:
        return scalar(group["momentum"]) > 0 and not group["nesterov"]

    def _why_not_embedded(self, group: dict) -> str:
        return "nesterov=True uses the mean gradient" if group["nesterov"] else "momentum=0"

    def _moment_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _init_state(self, group, param, state) -> None:
        if scalar(group["momentum"]) > 0:
            state["momentum_buffer"] = torch.zeros_like(param, dtype=self._state_dtype(group, param, "momentum_dtype"))

    def _decay_factors(self, group, t) -> dict[str, float]:
        return {"momentum_buffer": scalar(group["momentum"])}

    def _fold(self, group, params, grads, states, *, t, j, decay, layouts) -> None:
        beta, k = scalar(group["momentum"]), group["accum_steps"]
        share = 1.0 if t == 1 else 1.0 - scalar(group["dampening"])  # torch seeds b with the first gradient
        if group["accum_mode"] == "exact":
            weight = share / k
        else:
            micro = beta ** (1.0 / k)
            weight = share * (1.0 - micro) * micro ** (k - 1 - j) / (1.0 - beta)
        _sgd_fold(
            [s["momentum_buffer"] for s in states], grads, params,
            decay=beta if decay else None, weight=weight, decay_share=share,
            weight_decay=scalar(group["weight_decay"]),
        )

    def _apply(self, group, params, states, *, t, layouts) -> None:
        bufs = [s["momentum_buffer"] for s in states]
        if group["max_update_rms"] is not None:
            bufs = torch._foreach_mul(bufs, 1.0)  # clip a copy: b itself must stay unclipped
            clip_rms_(bufs, group["max_update_rms"], layouts)
        torch._foreach_add_(params, bufs, alpha=-scalar(group["lr"]))

    def _step_on_grad(self, group, params, grads, states, *, t, layouts) -> None:
        momentum = scalar(group["momentum"])
        bufs = [s["momentum_buffer"] for s in states] if momentum > 0 else None
        _sgd_step(
            params, grads, bufs, lr=scalar(group["lr"]), momentum=momentum,
            dampening=scalar(group["dampening"]), weight_decay=scalar(group["weight_decay"]),
            nesterov=group["nesterov"], first=t == 1, max_update_rms=group["max_update_rms"], layouts=layouts,
        )


def _sgd_fold(bufs, grads, params, *, decay, weight, decay_share, weight_decay) -> None:
    """b ← decay·b + decay_share·λθ (first fold of a cycle, ``decay`` not None); then b ← b + weight·g."""
    if decay is not None:
        if decay != 1.0:
            scale_(bufs, decay)
        if weight_decay:
            torch._foreach_add_(bufs, params, alpha=decay_share * weight_decay)
    torch._foreach_add_(bufs, grads, alpha=weight)


def _sgd_step(params, grads, bufs, *, lr, momentum, dampening, weight_decay, nesterov, first, max_update_rms,
              layouts=None) -> None:
    """One torch.optim.SGD step on ``grads`` (the mean gradient), update RMS clipped if asked."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if bufs is not None:
        if first:
            torch._foreach_copy_(bufs, grads)
        else:
            scale_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1.0 - dampening)
        grads = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    if max_update_rms is not None:
        grads = torch._foreach_mul(grads, 1.0)  # never clip the momentum or the caller's gradient
        clip_rms_(grads, max_update_rms, layouts)
    torch._foreach_add_(params, grads, alpha=-lr)
