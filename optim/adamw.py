"""AdamW with momentum-embedded gradient accumulation.

Update rule (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
2019; torch.optim.AdamW)::

    m ← β1·m + (1-β1)·g          v ← β2·v + (1-β2)·g²
    θ ← θ·(1 − lr·λ) − lr · m̂ / (√v̂ + ε),   m̂ = m/(1-β1^t),  v̂ = v/(1-β2^t)

With ``amsgrad=True`` the denominator uses the running maximum of v over
updates (torch's AMSGrad; one more state tensor).

Embedded form (docs/design.md §2.1): the moments are decayed once per cycle
and every micro-step adds its share of ``g_s`` to m and of ``g_s²`` to v.
``m`` is exactly the moment of the mean gradient; ``v`` is the mean of the
micro-batch squares (it can only be larger than the square of the mean). With
k = 1 the update is torch's AdamW. Mode ``ema`` weighs recent micro-steps
more (§2.2). Weight decay is applied once per update to every parameter that
had a gradient in the cycle.

With k = 1, fp32 contiguous real parameters and state, and no lazy rows this
dispatches to torch's fused AdamW kernel (one pass over memory instead of ~9
for the multi-tensor path; 5× faster on CPU); a test shows both paths agree.
``max_update_rms`` clips each tensor's ``m̂/(√v̂+ε)`` to that RMS.
``compiled=True`` runs the k > 1 folds and the boundary update through
``torch.compile`` (``_compiled``): one pass per tensor, 0.93-1.17× torch's
fused kernel's time on CPU (benchmarks/results/optim_step.md), after a
compile on first use.

torch's keywords are all accepted: ``maximize`` and ``amsgrad`` are
implemented; ``foreach`` (None/True: leantrain is multi-tensor), ``fused``
(None: the kernel where it applies, True: require it, False: never),
``capturable`` and ``differentiable`` (False only) are honoured or refused
with a ValueError naming the argument.
"""

from __future__ import annotations

import math

import torch

from . import _compiled
from ._accumulating import AccumulatingOptimizer
from ._checks import (check_betas, check_flag, check_lr, check_max_update_rms, check_number, check_only,
                      check_state_dtype, scalar)
from ._tensor_lists import chunks, ema_split, scale_, step_along_ratio_

_FUSED_DEVICES = ("cpu", "cuda")


class AdamW(AccumulatingOptimizer):
    """AdamW with torch's keywords and defaults, plus ``accum_steps``/``accum_mode``.

    ``momentum_dtype`` stores m (bf16 halves its 4 B/param); each in-place
    operation on it computes in fp32 and rounds once. v stays fp32 (float64
    for float64 parameters): its dynamic range is what bf16 handles worst.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        momentum_dtype: torch.dtype | None = None,
        max_update_rms: float | None = None,
        compiled: bool = False,
        **common,
    ) -> None:
        defaults = dict(
            lr=check_lr(lr),
            betas=check_betas(betas),
            eps=check_number("eps", eps, low=0.0),
            weight_decay=check_number("weight_decay", weight_decay, low=0.0),
            amsgrad=check_flag("amsgrad", amsgrad),
            foreach=check_only("foreach", foreach, (None, True), "its updates are always multi-tensor"),
            capturable=check_only("capturable", capturable, (False,),
                                  "the accumulation cycle branches on the host, which CUDA graphs cannot capture"),
            differentiable=check_only("differentiable", differentiable, (False,),
                                      "the embedded accumulation updates state in place under no_grad"),
            fused=check_only("fused", fused, (None, True, False), "expected None, True or False"),
            momentum_dtype=check_state_dtype("momentum_dtype", momentum_dtype),
            max_update_rms=check_max_update_rms(max_update_rms),
            compiled=check_flag("compiled", compiled),
        )
        super().__init__(params, defaults, maximize=maximize, **common)

    def _validate_group(self, group: dict) -> None:
        if group["fused"] and not _fused_kernel_applies(group):
            raise ValueError(
                "fused=True: torch's fused AdamW kernel applies only with accum_steps=1, fp32 (or default) "
                "momentum_dtype, no lazy_rows or max_update_rms, and contiguous real fp32 parameters on CPU "
                "or CUDA; use fused=None to take it where it applies")
        if group["compiled"]:
            _check_compilable(group)
        super()._validate_group(group)

    def _embeds(self, group: dict) -> bool:
        # torch's kernel steps on this rank's own gradient: not with state replicated across ranks.
        return not (self._replica_group is None and _fused_kernel_applies(group))

    def _moment_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _init_state(self, group, param, state) -> None:
        state["exp_avg"] = torch.zeros_like(param, dtype=self._state_dtype(group, param, "momentum_dtype"))
        second = self._state_dtype(group, param)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=second)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, dtype=second)

    def _decay_factors(self, group, t) -> dict[str, float]:
        beta1, beta2 = (scalar(b) for b in group["betas"])
        return {"exp_avg": beta1, "exp_avg_sq": beta2}

    def _fold(self, group, params, grads, states, *, t, j, decay, layouts) -> None:
        beta1, beta2 = (scalar(b) for b in group["betas"])
        k, mode = group["accum_steps"], group["accum_mode"]
        decay1, weight1 = ema_split(beta1, k, mode, j)
        decay2, weight2 = ema_split(beta2, k, mode, j)
        if self._defers_last_fold(group, params, layouts, j=j, decay=decay):
            self._deferred_fold.update((id(p), (g, weight1, weight2)) for p, g in zip(params, grads))
            return
        # The fused-backward hooks fold one tensor at a time: a graph per tensor would cost more than it saves.
        fold = _compiled.adamw_fold if group["compiled"] and len(params) > 1 else _adamw_fold
        fold(
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], grads,
            decay1=decay1 if decay else None, decay2=decay2 if decay else None,
            weight1=weight1, weight2=weight2,
        )

    def _defers_last_fold(self, group, params, layouts, *, j: int, decay: bool) -> bool:
        """Whether this fold, the last of a cycle in an unfused step(), is left to the update (compiled only).

        Only plain tensors (no shard, no complex view: the update finds them again by identity), folded
        without a decay (a parameter whose first gradient of the cycle comes last folds now), without
        replicated state (averaged over ranks between fold and update).
        """
        return (group["compiled"] and len(params) > 1 and not decay and j == group["accum_steps"] - 1
                and self.next_step_updates and self._replica_group is None
                and all(layout is None for layout in layouts) and not any(p.is_complex() for p in group["params"]))

    def _update_cycle(self, groups: list[dict]) -> None:
        super()._update_cycle(groups)
        if self._deferred_fold:  # every parameter folded in the cycle is updated: nothing can be left
            raise RuntimeError(f"AdamW: {len(self._deferred_fold)} deferred folds were not applied")

    @property
    def _deferred_fold(self) -> dict:
        """id(parameter) → (gradient, weight1, weight2) of folds left to this step()'s update; empty between calls."""
        return self.__dict__.setdefault("_deferred", {})

    def _apply(self, group, params, states, *, t, layouts) -> None:
        beta1, beta2 = (scalar(b) for b in group["betas"])
        if group["compiled"]:  # one pass per tensor and no temporaries: no chunks needed
            lr = scalar(group["lr"])
            ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            update = dict(keep=1.0 - lr * scalar(group["weight_decay"]), step=lr / (1.0 - beta1**t),
                          bias2_sqrt=math.sqrt(1.0 - beta2**t), eps=scalar(group["eps"]))
            pending = [self._deferred_fold.pop(id(p), None) for p in params]
            if pending and all(pending) and len({(w1, w2) for _, w1, w2 in pending}) == 1:
                _compiled.adamw_fold_and_apply(params, ms, vs, [g for g, _, _ in pending], weight1=pending[0][1],
                                               weight2=pending[0][2], **update)
                return
            for i, fold in enumerate(pending):  # a partial match: fold those one by one, then update
                if fold is not None:
                    _adamw_fold([ms[i]], [vs[i]], [fold[0]], decay1=None, decay2=None, weight1=fold[1],
                                weight2=fold[2])
            _compiled.adamw_apply(params, ms, vs, **update)
            return
        for idx in chunks(params):
            second = [states[i]["exp_avg_sq"] for i in idx]
            if group["amsgrad"]:
                maxima = [states[i]["max_exp_avg_sq"] for i in idx]
                torch._foreach_maximum_(maxima, second)
                second = maxima
            _adamw_apply(
                [params[i] for i in idx], [states[i]["exp_avg"] for i in idx], second,
                lr=scalar(group["lr"]), beta1=beta1, beta2=beta2, eps=scalar(group["eps"]),
                weight_decay=scalar(group["weight_decay"]), t=t, max_update_rms=group["max_update_rms"],
                layouts=[layouts[i] for i in idx],
            )

    def _step_on_grad(self, group, params, grads, states, *, t, layouts) -> None:
        # Only reached where _fused_kernel_applies: k = 1, fp32, contiguous, no lazy rows.
        beta1, beta2 = (scalar(b) for b in group["betas"])
        amsgrad = group["amsgrad"]
        for device, idx in _by_device(params).items():
            # One shared step tensor per call (the raw kernel only reads it): one small
            # allocation instead of one per tensor, which dominated on CUDA.
            step = torch.full((), float(t), dtype=torch.float32, device=device)
            torch._fused_adamw_(
                [params[i] for i in idx], [grads[i].contiguous() for i in idx],
                [states[i]["exp_avg"] for i in idx], [states[i]["exp_avg_sq"] for i in idx],
                [states[i]["max_exp_avg_sq"] for i in idx] if amsgrad else [], [step] * len(idx),
                amsgrad=amsgrad, lr=scalar(group["lr"]), beta1=beta1, beta2=beta2,
                weight_decay=scalar(group["weight_decay"]), eps=scalar(group["eps"]), maximize=False,
                grad_scale=None, found_inf=None,
            )


def _by_device(params) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.device, []).append(i)
    return groups


def _fused_kernel_applies(group: dict) -> bool:
    """torch's fused kernel: k = 1 and plain contiguous fp32 tensors only.

    It writes through raw pointers, so a strided parameter (a transposed view
    made a Parameter) would be updated in the wrong places; complex, DTensor
    and low-precision parameters take the multi-tensor path too.
    """
    return (
        group["fused"] is not False
        and not group.get("layer_adaptation")  # the kernel steps in one go: no step to measure and rescale
        and group["accum_steps"] == 1
        and not group["lazy_rows"]
        and group["max_update_rms"] is None
        and group["momentum_dtype"] in (None, torch.float32)
        and not group["maximize"]
        and all(
            p.dtype == torch.float32
            and p.is_contiguous()
            and p.device.type in _FUSED_DEVICES
            and type(p) in (torch.Tensor, torch.nn.Parameter)  # not DTensor shards
            for p in group["params"]
        )
    )


def _check_compilable(group: dict) -> None:
    """``compiled=True`` covers plain AdamW on fp32/float64 parameters; anything else is refused, not ignored."""
    unsupported = [name for name, on in (("amsgrad", group["amsgrad"]), ("max_update_rms", group["max_update_rms"]),
                                         ("lazy_rows", group["lazy_rows"]),
                                         ("layer_adaptation", group.get("layer_adaptation"))) if on]
    if unsupported:
        raise ValueError(f"compiled=True: not with {', '.join(unsupported)} (the compiled update is plain AdamW); "
                         "use compiled=False for this group")
    low = [p.dtype for p in group["params"] if p.dtype not in (torch.float32, torch.float64) and not p.is_complex()]
    if low:
        raise ValueError(f"compiled=True: a {low[0]} parameter is updated through fp32 working copies chunk by "
                         "chunk, which the compiled update does not do; use compiled=False or fp32 parameters")
    kinds = {(p.device, p.dtype.to_real()) for p in group["params"]}
    if len(kinds) > 1:  # one compiled call takes the whole list, its scalars in the list's dtype
        raise ValueError("compiled=True: a group's parameters must share one device and one precision (found "
                         + ", ".join(sorted(f"{d} {t}" for d, t in kinds)) + "); put them in separate param groups")


def _adamw_fold(exp_avgs, exp_avg_sqs, grads, *, decay1, decay2, weight1, weight2) -> None:
    """m ← decay1·m + weight1·g ;  v ← decay2·v + weight2·g²  (decay None: skip)."""
    if decay1 is not None:
        scale_(exp_avgs, decay1)
        scale_(exp_avg_sqs, decay2)
    torch._foreach_add_(exp_avgs, grads, alpha=weight1)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=weight2)


def _adamw_apply(params, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, t, max_update_rms,
                 layouts=None) -> None:
    """θ ← θ·(1 − lr·λ) − lr·U,  U = m̂/(√v̂ + ε) (RMS-clipped to ``max_update_rms`` if set)."""
    if weight_decay:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    bias1 = 1.0 - beta1**t
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1.0 - beta2**t))
    torch._foreach_add_(denom, eps)
    # m̂ = m/bias1, so clipping m/(√v̂+ε) at max·bias1 clips U at max.
    step_along_ratio_(params, exp_avgs, denom, step=-lr / bias1,
                      max_rms=None if max_update_rms is None else max_update_rms * bias1, layouts=layouts)

