"""AdaFactor: factored second moments (sublinear memory), optional momentum.

Paper: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost", ICML 2018. Drop-in for ``transformers.optimization.Adafactor``:
same keywords, defaults and meaning, at k = 1 the same parameters step for
step, its state dicts load (``_interop``) and ``AdafactorSchedule`` reads the
learning rate actually applied (``_get_lr``, ``state["RMS"]``). For a weight
with ≥2 dims (factored over its last two)::

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
* ``momentum_on="grad"`` (AdaFactorW, docs/design.md §2.1): ``m`` is an EMA of
  gradients and R, C accumulate micro-batch squares, both embedded in the
  accumulation; the boundary uses ``U = m̂ / √(R·C/mean(R))`` with
  ``m̂ = m/(1−β1^t)``, clipped and scaled as above. No buffer at any k.

Sharded parameters (FSDP2, dim-0 shards, uneven ones included): R and the
momentum are local; each rank folds its column sums scaled so that their
average over ranks is the global column mean, and the update averages C and
sums ΣR, the column terms of RMS(U) and RMS(θ) across ranks in one batched
all-reduce (``GlobalSums``), so the result equals the unsharded one up to
summation order. RMS(U) is formed from factored sums,
``RMS(U)² = mean(R)/n · Σ_j (Σ_i d_ij²/R_i)/C_j``, which needs no second round.

Departures from transformers: the update RMS is computed from those sums
without materialising U, and lr_t stays a device tensor (no host sync per
tensor); results agree to float rounding. ``state["RMS"]`` is kept as a
0-dim tensor, written only when ``scale_parameter`` uses it. ``lazy_rows`` is
refused for factored tensors, whose column statistics mix every row, and
complex parameters are refused (their factored statistics are undefined).
"""

from __future__ import annotations

import math

import torch

from . import _adafactor_batched as batched
from ._accumulating import AccumulatingOptimizer
from ._checks import check_lr, check_number, check_state_dtype, scalar
from ._sharding import GlobalSums, Layout, factored_stat_like, layout_of, local
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
        momentum_dtype: torch.dtype | None = None,
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

    def _check_complex(self, group: dict, param: torch.Tensor) -> None:
        raise ValueError(f"AdaFactor: complex parameter of shape {tuple(param.shape)} ({param.dtype}): its factored "
                         "second moments are not defined for complex values; use AdamW or SGD for it")

    def _embeds(self, group: dict) -> bool:
        return group["beta1"] is not None and group["momentum_on"] == "grad"

    def _why_not_embedded(self, group: dict) -> str:
        if group["beta1"] is None:
            return "beta1=None divides the mean gradient itself"
        return "momentum_on='update' keeps momentum of the normalised update"

    def _moment_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")

    def _init_state(self, group, param, state) -> None:
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(param, dtype=self._state_dtype(group, param, "momentum_dtype"))
        dtype = self._state_dtype(group, param)
        if _factored(group, param):
            state["exp_avg_sq_row"] = factored_stat_like(param, -1, dtype)
            state["exp_avg_sq_col"] = factored_stat_like(param, -2, dtype)
        else:
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
        state["RMS"] = torch.zeros((), dtype=dtype, device=param.device)

    def _decay_factors(self, group, t) -> dict[str, float]:
        second = _beta2_at(group, t)
        factors = {"exp_avg_sq_row": second, "exp_avg_sq_col": second, "exp_avg_sq": second}
        if group["beta1"] is not None:
            factors["exp_avg"] = group["beta1"]
        return factors

    def _sync_partial_sums(self) -> None:
        """Mid-cycle: average C of row-sharded tensors now, so every rank holds the global C (a
        checkpoint then saves one consistent copy); the boundary's own averaging keeps the result."""
        sums = GlobalSums()
        for group in self.param_groups:
            for p in group["params"]:
                state, layout = self.state.get(p, {}), layout_of(p)
                if "exp_avg_sq_col" in state and _rows_split(layout, local(p)):
                    col = local(state["exp_avg_sq_col"])
                    sums.add(col.div_(layout.world), layout)
        sums.finish()

    @staticmethod
    def _get_lr(param_group: dict, param_state: dict) -> float:
        """The learning rate applied at the last update, as transformers' ``Adafactor._get_lr``.

        ``transformers.optimization.AdafactorSchedule`` calls it to report lr_t
        (one host read of ``state["RMS"]``).
        """
        step = max(1, int(param_state.get("step", 1)))
        rel = param_group["lr"]
        if param_group["relative_step"]:
            min_step = 1e-6 * step if param_group["warmup_init"] else 1e-2
            rel = min(min_step, 1.0 / math.sqrt(step))
        scale = 1.0
        if param_group["scale_parameter"] and "RMS" in param_state:
            scale = max(param_group["eps"][1], float(param_state["RMS"]))
        return scale * scalar(rel)

    # --------------------------------------------------------------- the math
    def _fold(self, group, params, grads, states, *, t, j, decay, layouts) -> None:
        k, mode = group["accum_steps"], group["accum_mode"]
        decay1, weight1 = ema_split(group["beta1"], k, mode, j)
        decay2, weight2 = ema_split(_beta2_at(group, t), k, mode, j)
        plan = _plan(group, params, layouts)
        batched.fold_second_moments(plan, grads, states, decay=decay2 if decay else None, weight=weight2,
                                    eps1=group["eps"][0], momentum=(decay1 if decay else None, weight1))
        for i in plan.per_tensor:
            _fold_second_moment(
                grads[i], states[i], decay=decay2 if decay else None, weight=weight2, eps1=group["eps"][0],
                factored=_factored(group, params[i]), layout=layouts[i],
                momentum=(states[i]["exp_avg"], decay1 if decay else None, weight1),
            )

    def _apply(self, group, params, states, *, t, layouts) -> None:
        bias1 = 1.0 - group["beta1"] ** t
        _precondition_and_step(group, params, [s["exp_avg"] for s in states], states, layouts, t=t,
                               direction_scale=1.0 / bias1, momentum_on_update=False)

    def _step_on_grad(self, group, params, grads, states, *, t, layouts) -> None:
        beta2_t = _beta2_at(group, t)
        grads = [g.float() if g.dtype not in (torch.float32, torch.float64) else g for g in grads]
        plan = _plan(group, params, layouts)
        batched.fold_second_moments(plan, grads, states, decay=beta2_t, weight=1.0 - beta2_t, eps1=group["eps"][0])
        for i in plan.per_tensor:
            _fold_second_moment(grads[i], states[i], decay=beta2_t, weight=1.0 - beta2_t, eps1=group["eps"][0],
                                factored=_factored(group, params[i]), layout=layouts[i])
        _precondition_and_step(group, params, grads, states, layouts, t=t, direction_scale=1.0,
                               momentum_on_update=group["beta1"] is not None)


def _plan(group: dict, params: list, layouts: list) -> batched.Plan:
    return batched.plan(params, layouts, lambda p: _factored(group, p))


def _factored(group: dict, param: torch.Tensor) -> bool:
    return param.dim() >= 2 and min(param.shape[-2:]) >= group["min_dim_size_to_factor"]


def _beta2_at(group: dict, t: int) -> float:
    return group["beta2"] if group["beta2"] is not None else 1.0 - t ** group["decay_rate"]


def _v_scale(group: dict, t: int) -> float:
    """√(1−β2^t): bias correction of v̂ for a fixed beta2 (the decay_rate schedule needs none)."""
    return 1.0 if group["beta2"] is None else math.sqrt(1.0 - group["beta2"] ** t)


def _rows_split(layout: Layout | None, tensor: torch.Tensor) -> bool:
    """Whether a factored tensor's rows (dim -2) are split across ranks.

    Leading-dim shards keep every matrix whole (local factored statistics);
    a split of the columns (dim -1) would need row statistics summed per
    micro-step and is refused.
    """
    if layout is None:
        return False
    if layout.splits(-1, tensor.dim()):
        raise ValueError(
            f"AdaFactor: a factored parameter of global shape {tuple(layout.global_shape)} is sharded along its "
            "last dimension; shard dim 0 (FSDP2's default) or raise min_dim_size_to_factor for it")
    return layout.splits(-2, tensor.dim())


# Rows per block in the factored passes: a few MiB of temporaries that stay in
# cache, and contiguous reads (a strided column reduction ran ~10x below memory
# bandwidth on CPU: 216 of 237 ms of a 124M-parameter fold).
_BLOCK_ROWS = 2048


def _row_blocks(x: torch.Tensor):
    """(start, block, scratch) over dim -2 of ``x``, each block up to _BLOCK_ROWS rows.

    ``scratch`` is a buffer of the block's shape (fp32, or float64 for float64
    tensors), allocated once per tensor and reused: a fresh multi-MiB temporary
    per block costs page faults that took longer than the arithmetic on CPU.
    """
    rows = x.shape[-2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    buffer = torch.empty(x.shape[:-2] + (min(rows, _BLOCK_ROWS), x.shape[-1]), dtype=dtype, device=x.device)
    for start in range(0, rows, _BLOCK_ROWS):
        n = min(_BLOCK_ROWS, rows - start)
        yield start, x.narrow(-2, start, n), buffer.narrow(-2, 0, n)


def _fold_second_moment(g, state, *, decay, weight, eps1, factored, layout=None, momentum=None) -> None:
    """R, C (or v) ← decay·(…) + weight·stat(g² + ε1); ``decay=None`` skips the decay.

    ``momentum=(m, decay1, weight1)`` also folds ``m ← decay1·m + weight1·g``.
    Factored: one blocked pass over g does all of it (each block of g is read
    once; its square is reduced along rows and columns while in cache). With
    rows split across ranks the column sums are scaled by ranks/global rows,
    so that the average of C over ranks (taken at the update) is the global
    column mean.
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
        if block.dtype == sq.dtype:
            torch.mul(block, block, out=sq)
        else:  # math in fp32 for bf16 gradients
            sq.copy_(block).square_()
        row.narrow(-1, start, n).add_(sq.mean(dim=-1).add_(eps1), alpha=weight)
        col_sum.add_(sq.sum(dim=-2))
    local_rows = g.shape[-2]
    if _rows_split(layout, g):
        rows, ranks = layout.global_shape[-2], layout.world
        col.add_(col_sum.add_(eps1 * local_rows).mul_(ranks / rows), alpha=weight)
    else:
        col.add_(col_sum.div_(local_rows).add_(eps1), alpha=weight)


class _Preconditioned:
    """``U = direction / √v̂`` of one tensor, with its global sums registered for one all-reduce.

    Factored: ``U_ij = d_ij · r_i · c_j`` with ``r = (mean(R)/R)^½`` and
    ``c = C^-½`` (vectors, times the bias scale of a fixed beta2). Sums that
    cross ranks (C's average over split rows, ΣR, the column terms
    ``q_j = Σ_i d_ij²/R_i``, ΣU² of unfactored tensors and Σθ²) are registered
    with ``sums``; ``rms()`` and ``add_to()`` are valid after ``sums.finish()``.
    Unfactored (1-D and small tensors): U itself, ``d · v^-½``.
    """

    def __init__(self, param, direction, state, factored: bool, v_scale: float, layout, sums: GlobalSums,
                 *, param_scale: bool) -> None:
        self.direction, self.factored, self.v_scale = direction, factored, v_scale
        self.numel = direction.numel() if layout is None else math.prod(layout.global_shape)
        acc = torch.float64 if direction.dtype == torch.float64 else torch.float32
        self.theta_sq = sums.add(_sum_squares(param, acc), layout) if param_scale else None
        if not factored:
            self.update = direction * state["exp_avg_sq"].rsqrt()
            if v_scale != 1.0:
                self.update.mul_(v_scale)
            self.u_sq = sums.add(_sum_squares(self.update, acc), layout)
            return
        self.row, self.col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        if _rows_split(layout, direction):
            self.rows = layout.global_shape[-2]
            self.col.div_(layout.world)  # average over ranks after the SUM: every rank then holds global C
            sums.add(self.col, layout)
            self.row_sum = sums.add(self.row.sum(dim=-1, keepdim=True), layout)
            self.q = sums.add(self._column_terms(), layout)
            self.u_sq = None  # formed after the reduction from the global C, ΣR and q
        else:
            self.rows = direction.shape[-2]
            self.row_sum = self.row.sum(dim=-1, keepdim=True)
            self.q = self._column_terms()
            self.u_sq = sums.add(self._factored_u_sq(), layout)

    def _column_terms(self) -> torch.Tensor:
        """q_j = Σ_i d_ij² / R_i over this rank's rows (one blocked pass)."""
        q = torch.zeros_like(self.col)
        for start, block, sq in _row_blocks(self.direction):
            torch.mul(block, block, out=sq) if block.dtype == sq.dtype else sq.copy_(block).square_()
            sq.div_(self.row.narrow(-1, start, block.shape[-2]).unsqueeze(-1))
            q.add_(sq.sum(dim=-2))
        return q

    def _factored_u_sq(self) -> torch.Tensor:
        mean_row = self.row_sum / self.rows  # lead + (1,)
        return (mean_row * (self.q / self.col).sum(dim=-1, keepdim=True)).sum() * self.v_scale**2

    def rms(self) -> torch.Tensor:
        """RMS(U) over the whole (global) tensor, a 0-dim device tensor (no host sync)."""
        u_sq = self.u_sq if self.u_sq is not None else self._factored_u_sq()
        return u_sq.div(self.numel).sqrt_()

    def param_rms(self) -> torch.Tensor:
        return self.theta_sq.div(self.numel).sqrt_()

    def add_to(self, target: torch.Tensor, coef: torch.Tensor) -> None:
        """target ← target + coef·U (coef a 0-dim tensor)."""
        if not self.factored:
            target.addcmul_(self.update, coef)
            return
        row_scale = (self.row_sum / self.rows / self.row).sqrt_().mul_(self.v_scale)  # (mean(R)/R)^½
        col_scale = self.col.rsqrt().unsqueeze(-2)
        for start, block, scaled in _row_blocks(self.direction):
            n = block.shape[-2]
            rows = (row_scale.narrow(-1, start, n) * coef).unsqueeze(-1)
            torch.mul(block, col_scale, out=scaled)
            target.narrow(-2, start, n).addcmul_(scaled, rows)


def _sum_squares(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σx² as a 0-dim tensor, one reduction pass and no full-size temporary."""
    return torch.linalg.vector_norm(x, dtype=dtype).square_()


def _lr_at(group: dict, t: int, theta_rms: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Relative step times parameter scale, as a 0-dim device tensor (no host sync)."""
    rel = group["lr"]
    if group["relative_step"]:
        min_step = 1e-6 * t if group["warmup_init"] else 1e-2
        rel = min(min_step, 1.0 / math.sqrt(t))
    rel = scalar(rel)
    if group["scale_parameter"]:
        return theta_rms.clamp(min=group["eps"][1]).mul_(rel)
    return torch.full((), rel, dtype=theta_rms.dtype if theta_rms is not None else torch.float32, device=like.device)


def _precondition_and_step(group, params, directions, states, layouts, *, t, direction_scale, momentum_on_update):
    """The update of every tensor, with all cross-rank sums in one batched all-reduce.

    ``direction_scale`` multiplies U (1/bias1 for the gradient momentum);
    ``momentum_on_update``: transformers' form, m ← β1·m + (1−β1)·lr_t·U, θ ← θ − m.
    """
    v_scale = _v_scale(group, t)
    plan = _plan(group, params, layouts)
    batched.precondition_and_step(plan, group, params, directions, states, t=t, v_scale=v_scale,
                                  direction_scale=direction_scale, momentum_on_update=momentum_on_update,
                                  lr_at=lambda theta_rms, like: _lr_at(group, t, theta_rms, like))
    if not plan.per_tensor:
        return
    params, directions, states, layouts = ([items[i] for i in plan.per_tensor]
                                           for items in (params, directions, states, layouts))
    sums = GlobalSums()
    pre = [_Preconditioned(p, d, s, _factored(group, p), v_scale, layout, sums, param_scale=group["scale_parameter"])
           for p, d, s, layout in zip(params, directions, states, layouts)]
    sums.finish()
    beta1, weight_decay, clip = group["beta1"], group["weight_decay"], group["clip_threshold"]
    for p, state, update in zip(params, states, pre):
        theta_rms = update.param_rms() if group["scale_parameter"] else None
        if theta_rms is not None:
            state["RMS"].copy_(theta_rms)
        lr_t = _lr_at(group, t, theta_rms, p)  # parameter scale from θ before this update
        step = lr_t * direction_scale / (update.rms() * direction_scale / clip).clamp_(min=1.0)
        if momentum_on_update:
            m = state["exp_avg"]
            m.mul_(beta1)
            update.add_to(m, step * (1.0 - beta1))
            if weight_decay:
                p.addcmul_(p, lr_t, value=-weight_decay)  # θ − λ·lr_t·θ, rounded as transformers does
            p.sub_(m)
            continue
        if weight_decay:
            p.addcmul_(p, lr_t, value=-weight_decay)
        update.add_to(p, -step)
