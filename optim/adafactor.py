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
            _fold_second_moment(
                g, state, decay=decay2 if decay else None, weight=weight2,
                eps1=group["eps"][0], factored=_factored(group, p),
                momentum=(state["exp_avg"], decay1 if decay else None, weight1),
            )

    def _apply(self, group, params, states, *, t) -> None:
        bias1 = 1.0 - group["beta1"] ** t
        for p, state in zip(params, states):
            lr_t = _lr_at(group, t, p)
            update = _Preconditioned(state["exp_avg"], state, _factored(group, p), _v_scale(group, t))
            coef = -lr_t / bias1 / (update.rms() / bias1 / group["clip_threshold"]).clamp_(min=1.0)
            if group["weight_decay"]:
                p.mul_(1.0 - group["weight_decay"] * lr_t)
            update.add_to(p, coef)

    def _step_on_grad(self, group, params, grads, states, *, t) -> None:
        beta2_t = _beta2_at(group, t)
        for p, g, state in zip(params, grads, states):
            g = g.float()
            lr_t = _lr_at(group, t, p)  # parameter scale from θ before this update
            factored = _factored(group, p)
            _fold_second_moment(g, state, decay=beta2_t, weight=1.0 - beta2_t, eps1=group["eps"][0], factored=factored)
            update = _Preconditioned(g, state, factored, _v_scale(group, t))
            step = lr_t / (update.rms() / group["clip_threshold"]).clamp_(min=1.0)
            if group["beta1"] is None:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["weight_decay"] * lr_t)
                update.add_to(p, -step)
            else:
                m = state["exp_avg"]
                m.mul_(group["beta1"])
                update.add_to(m, (1.0 - group["beta1"]) * step)
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


# Rows per block in the factored passes: a few MiB of temporaries that stay in
# cache, and contiguous reads (a strided column reduction ran ~10x below memory
# bandwidth on CPU: 216 of 237 ms of a 124M-parameter fold).
_BLOCK_ROWS = 2048


def _row_blocks(x: torch.Tensor):
    """(start, block, scratch) over dim -2 of ``x``, each block up to _BLOCK_ROWS rows.

    ``scratch`` is an fp32 buffer of the block's shape, allocated once per
    tensor and reused: a fresh multi-MiB temporary per block costs page faults
    that took longer than the arithmetic on CPU.
    """
    rows = x.shape[-2]
    buffer = torch.empty(x.shape[:-2] + (min(rows, _BLOCK_ROWS), x.shape[-1]), dtype=torch.float32, device=x.device)
    for start in range(0, rows, _BLOCK_ROWS):
        n = min(_BLOCK_ROWS, rows - start)
        yield start, x.narrow(-2, start, n), buffer.narrow(-2, 0, n)


def _fold_second_moment(g, state, *, decay, weight, eps1, factored, momentum=None) -> None:
    """R, C (or v) ← decay·(…) + weight·stat(g² + ε1); ``decay=None`` skips the decay.

    ``momentum=(m, decay1, weight1)`` also folds ``m ← decay1·m + weight1·g``.
    Factored: one blocked pass over g does all of it (each block of g is read
    once; its square is reduced along rows and columns while in cache).
    """
    if momentum is not None:
        m, decay1, weight1 = momentum
    if not factored:
        v = state["exp_avg_sq"]
        if decay is not None:
            v.mul_(decay)
        v.addcmul_(g, g, value=weight).add_(eps1 * weight)
        if momentum is not None:
            if decay1 is not None:
                m.mul_(decay1)
            m.add_(g, alpha=weight1)
        return
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    if decay is not None:
        row.mul_(decay)
        col.mul_(decay)
    col_sum = torch.zeros_like(col)
    for start, block, sq in _row_blocks(g):
        n = block.shape[-2]
        if momentum is not None:
            m_rows = m.narrow(-2, start, n)
            if decay1 is not None:
                m_rows.mul_(decay1)
            m_rows.add_(block, alpha=weight1)
        if block.dtype == torch.float32:
            torch.mul(block, block, out=sq)
        else:  # math in fp32 for bf16 gradients
            sq.copy_(block).square_()
        row.narrow(-1, start, n).add_(sq.mean(dim=-1).add_(eps1), alpha=weight)
        col_sum.add_(sq.sum(dim=-2))
    col.add_(col_sum.div_(g.shape[-2]).add_(eps1), alpha=weight)


class _Preconditioned:
    """``U = direction / √v̂`` without materialising U.

    Factored: ``U_ij = d_ij · r_i · c_j`` with ``r = (R/mean(R))^-½`` and
    ``c = C^-½`` (vectors). ``rms()`` and ``add_to()`` each make one blocked pass
    over the direction; the only temporaries are one block. Unfactored (1-D and
    small tensors): U itself, ``d · v^-½``.
    """

    def __init__(self, direction: torch.Tensor, state: dict, factored: bool, v_scale: float) -> None:
        self.direction, self.factored = direction, factored
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            self.row_scale = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().mul_(v_scale)
            self.col_scale = col.rsqrt().unsqueeze(-2)
        else:
            self.update = direction * state["exp_avg_sq"].rsqrt()
            if v_scale != 1.0:
                self.update.mul_(v_scale)

    def rms(self) -> torch.Tensor:
        """RMS(U) as a 0-dim device tensor (no host sync)."""
        if not self.factored:
            return torch.linalg.vector_norm(self.update).div_(math.sqrt(self.update.numel()))
        sq_norm = torch.zeros((), dtype=torch.float32, device=self.direction.device)
        for start, block, scaled in _row_blocks(self.direction):
            torch.mul(block, self.col_scale, out=scaled)  # fp32: col_scale promotes a bf16 block
            rows = self.row_scale.narrow(-1, start, block.shape[-2])
            sq_norm.add_((torch.linalg.vector_norm(scaled, dim=-1).square_() * rows.square()).sum())
        return sq_norm.sqrt_().div_(math.sqrt(self.direction.numel()))

    def add_to(self, target: torch.Tensor, coef: torch.Tensor) -> None:
        """target ← target + coef·U (coef a 0-dim tensor)."""
        if not self.factored:
            target.addcmul_(self.update, coef)
            return
        for start, block, scaled in _row_blocks(self.direction):
            n = block.shape[-2]
            rows = (self.row_scale.narrow(-1, start, n) * coef).unsqueeze(-1)
            torch.mul(block, self.col_scale, out=scaled)
            target.narrow(-2, start, n).addcmul_(scaled, rows)
