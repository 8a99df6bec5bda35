"""AdaFactor: factored second moments (sublinear memory), optional momentum.

Paper: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost", ICML 2018. Drop-in for ``transformers.optimization.Adafactor``:
same keywords, defaults and meaning, and at k = 1 the same parameters step for
step. For a weight with ≥2 dims (factored over its last two)::

    β2_t = 1 − t^decay_rate                       (or a fixed ``beta2``)
    R ← β2_t·R + (1−β2_t)·mean_cols(g² + ε1)      C ← β2_t·C + (1−β2_t)·mean_rows(g² + ε1)
    U = g / √(R·C / mean(R)),   U ← U / max(1, RMS(U)/d)
    lr_t = min(1e-2, 1/√t) · max(ε2, RMS(θ))      (relative step, parameter scale)
    θ ← θ − lr_t·λ·θ − lr_t·U

1-D tensors (and any tensor whose last two dims are below
``min_dim_size_to_factor``) keep an unfactored ``v`` instead of R and C.

Momentum, two forms:

* ``momentum_on="update"`` (default, the paper's and transformers' form with
  ``beta1``): ``m ← β1·m + (1−β1)·lr_t·U``, ``θ ← θ − m``. It needs the mean
  gradient, so with k > 1 it keeps an explicit ``grad_accum`` buffer
  (``accum_dtype``); so does ``beta1=None``.
* ``momentum_on="grad"`` (AdaFactorW, DESIGN.md 2.1): ``m`` is an EMA of
  gradients and R, C accumulate micro-batch squares, both embedded in the
  accumulation; the boundary uses ``U = m̂ / √(R·C/mean(R))`` with
  ``m̂ = m/(1−β1^t)``, clipped and scaled as above. No buffer at any k.

Departures from transformers: the update RMS is computed from the factored
form without materialising U twice, and lr_t stays a device tensor (no host
sync per tensor); results agree to float rounding. No ``state["RMS"]`` is
stored: it is recomputed where needed. ``lazy_rows`` is refused for factored
tensors, whose column statistics mix every row.
"""

from __future__ import annotations

import math

import torch

from ._accumulating import AccumulatingOptimizer
from ._checks import check_lr, check_number, check_state_dtype
from ._tensor_lists import ema_split

MOMENTUM_ON = ("update", "grad")


class AdaFactor(AccumulatingOptimizer):
    """AdaFactor with transformers' keywords, plus embedded accumulation."""

    def __init__(
        self,
        params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        momentum_on: str = "update",
        momentum_dtype: torch.dtype = torch.float32,
        beta2: float | None = None,
        min_dim_size_to_factor: int = 0,
        **common,
    ) -> None:
        if lr is not None and relative_step:
            raise ValueError(f"lr={lr!r} with relative_step=True: a manual lr needs relative_step=False")
        if lr is None and not relative_step:
            raise ValueError("lr=None with relative_step=False: give an lr, or use relative_step=True")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True needs relative_step=True")
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps={eps!r}: expected a pair (eps1 for g², eps2 for the parameter scale)")
        if momentum_on not in MOMENTUM_ON:
            raise ValueError(f"momentum_on={momentum_on!r}: allowed values are 'update', 'grad'")
        if momentum_on == "grad" and beta1 is None:
            raise ValueError("momentum_on='grad' needs beta1 (a momentum), got beta1=None")
        if isinstance(min_dim_size_to_factor, bool) or not isinstance(min_dim_size_to_factor, int) \
                or min_dim_size_to_factor < 0:
            raise ValueError(f"min_dim_size_to_factor={min_dim_size_to_factor!r}: expected an integer >= 0")
        defaults = dict(
            lr=None if lr is None else check_lr(lr),
            eps=(check_number("eps[0]", eps[0], low=0.0), check_number("eps[1]", eps[1], low=0.0)),
            clip_threshold=check_number("clip_threshold", clip_threshold, low=0.0, low_open=True),
            decay_rate=check_number("decay_rate", decay_rate, low=-1.0, high=0.0, high_open=True),
            beta1=None if beta1 is None else check_number("beta1", beta1, low=0.0, high=1.0, high_open=True),
            weight_decay=check_number("weight_decay", weight_decay, low=0.0),
            scale_parameter=bool(scale_parameter),
            relative_step=bool(relative_step),
            warmup_init=bool(warmup_init),
            momentum_on=momentum_on,
            momentum_dtype=check_state_dtype("momentum_dtype", momentum_dtype),
            beta2=None if beta2 is None else check_number("beta2", beta2, low=0.0, high=1.0, high_open=True),
            min_dim_size_to_factor=min_dim_size_to_factor,
        )
        super().__init__(params, defaults, **common)

    def _validate_group(self, group: dict) -> None:
        if group["lazy_rows"] and any(_factored(group, p) for p in group["params"]):
            raise ValueError(
                "lazy_rows=True with AdaFactor: factored tensors share column statistics across "
                "rows; put embeddings in a group with min_dim_size_to_factor above their size "
                "or use AdamW/SGD/AdaX for that group"
            )
        super()._validate_group(group)

    def _embeds(self, group: dict) -> bool:
        return group["beta1"] is not None and group["momentum_on"] == "grad"

    def _why_not_embedded(self, group: dict) -> str:
        if group["beta1"] is None:
            return "beta1=None divides the mean gradient itself"
        return "momentum_on='update' keeps momentum of the normalised update"

    def _init_state(self, group, param, state) -> None:
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(param, dtype=group["momentum_dtype"])
        if _factored(group, param):
            shape = param.shape
            state["exp_avg_sq_row"] = param.new_zeros(shape[:-1], dtype=torch.float32)
            state["exp_avg_sq_col"] = param.new_zeros(shape[:-2] + shape[-1:], dtype=torch.float32)
        else:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)

    def _decay_factors(self, group, t, j) -> dict[str, float]:
        k, mode = group["accum_steps"], group["accum_mode"]
        second = ema_split(_beta2_at(group, t), k, mode)[0]
        factors = {"exp_avg_sq_row": second, "exp_avg_sq_col": second, "exp_avg_sq": second}
        if group["beta1"] is not None:
            factors["exp_avg"] = ema_split(group["beta1"], k, mode)[0]
        return factors

    def _fold(self, group, params, grads, states, *, t, j, decay) -> None:
        k, mode = group["accum_steps"], group["accum_mode"]
        decay1, weight1 = ema_split(group["beta1"], k, mode)
        decay2, weight2 = ema_split(_beta2_at(group, t), k, mode)
        for p, g, state in zip(params, grads, states):
            m = state["exp_avg"]
            if decay:
                m.mul_(decay1)
            m.add_(g, alpha=weight1)
            _fold_second_moment(
                g, state, decay=decay2 if decay else None, weight=weight2,
                eps1=group["eps"][0], factored=_factored(group, p),
            )

    def _apply(self, group, params, states, *, t) -> None:
        bias1 = 1.0 - group["beta1"] ** t
        for p, state in zip(params, states):
            lr_t = _lr_at(group, t, p)
            w, row_scale, rms = _preconditioned(state["exp_avg"], state, _factored(group, p), _v_scale(group, t))
            coef = -lr_t / bias1 / (rms / bias1 / group["clip_threshold"]).clamp_(min=1.0)
            if group["weight_decay"]:
                p.mul_(1.0 - group["weight_decay"] * lr_t)
            _add_update(p, w, row_scale, coef)

    def _step_on_grad(self, group, params, grads, states, *, t) -> None:
        beta2_t = _beta2_at(group, t)
        for p, g, state in zip(params, grads, states):
            g = g.float()
            lr_t = _lr_at(group, t, p)  # parameter scale from θ before this update
            factored = _factored(group, p)
            _fold_second_moment(g, state, decay=beta2_t, weight=1.0 - beta2_t, eps1=group["eps"][0], factored=factored)
            w, row_scale, rms = _preconditioned(g, state, factored, _v_scale(group, t))
            step = lr_t / (rms / group["clip_threshold"]).clamp_(min=1.0)
            if group["beta1"] is None:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["weight_decay"] * lr_t)
                _add_update(p, w, row_scale, -step)
            else:
                m = state["exp_avg"]
                m.mul_(group["beta1"])
                _add_update(m, w, row_scale, (1.0 - group["beta1"]) * step)
                if group["weight_decay"]:
                    p.mul_(1.0 - group["weight_decay"] * lr_t)
                p.sub_(m)


def _factored(group: dict, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and min(param.shape[-2:]) >= group["min_dim_size_to_factor"]


def _beta2_at(group: dict, t: int) -> float:
    return group["beta2"] if group["beta2"] is not None else 1.0 - t ** group["decay_rate"]


def _v_scale(group: dict, t: int) -> float:
    """√(1−β2^t): bias correction of v̂ for a fixed beta2 (the decay_rate schedule needs none)."""
    return 1.0 if group["beta2"] is None else math.sqrt(1.0 - group["beta2"] ** t)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dtype=torch.float32) / math.sqrt(x.numel())


def _lr_at(group: dict, t: int, param: torch.Tensor) -> torch.Tensor:
    """Relative step times parameter scale, as a 0-dim device tensor (no host sync)."""
    rel = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * t if group["warmup_init"] else 1e-2
        rel = min(min_step, 1.0 / math.sqrt(t))
    if group["scale_parameter"]:
        return _rms(param).clamp_(min=group["eps"][1]).mul_(rel)
    return param.new_full((), rel, dtype=torch.float32)


def _mean_sq(x: torch.Tensor, dim: int) -> torch.Tensor:
    """mean(x², dim) in one pass without a full-size temporary."""
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float32).square_().div_(x.shape[dim])


def _fold_second_moment(g, state, *, decay, weight, eps1, factored) -> None:
    """R, C (or v) ← decay·(…) + weight·stat(g² + ε1); ``decay=None`` skips the decay."""
    if factored:
        for key, dim in (("exp_avg_sq_row", -1), ("exp_avg_sq_col", -2)):
            stat = state[key]
            if decay is not None:
                stat.mul_(decay)
            stat.add_(_mean_sq(g, dim).add_(eps1), alpha=weight)
    else:
        v = state["exp_avg_sq"]
        if decay is not None:
            v.mul_(decay)
        v.addcmul_(g, g, value=weight).add_(eps1 * weight)


def _preconditioned(direction, state, factored: bool, v_scale: float):
    """Split ``U = direction / √v̂`` as ``W ⊙ row_scale`` and return ``(W, row_scale, RMS(U))``.

    Factored: ``row_scale = (R/mean(R))^-½`` is a vector and ``W = direction·C^-½``
    the only full-size temporary; ``‖U‖² = Σ_i row_scale_i²·‖W_i‖²`` needs no second
    one. Unfactored: ``row_scale`` is None and ``W`` is U itself.
    """
    if factored:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row_scale = (row / row.mean(dim=-1, keepdim=True)).rsqrt_()
        if v_scale != 1.0:
            row_scale.mul_(v_scale)
        w = direction * col.rsqrt().unsqueeze(-2)
        sq_norm = (row_scale.square() * torch.linalg.vector_norm(w, dim=-1).square()).sum()
    else:
        row_scale = None
        w = direction * state["exp_avg_sq"].rsqrt()
        if v_scale != 1.0:
            w.mul_(v_scale)
        sq_norm = torch.linalg.vector_norm(w).square()
    return w, row_scale, sq_norm.sqrt_().div_(math.sqrt(direction.numel()))


def _add_update(target, w, row_scale, coef) -> None:
    """target ← target + coef·W⊙row_scale (coef a 0-dim tensor)."""
    if row_scale is None:
        target.addcmul_(w, coef)
    else:
        target.addcmul_(w, (row_scale * coef).unsqueeze(-1))
