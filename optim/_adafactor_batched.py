"""AdaFactor over many small tensors at once: same-shaped tensors stacked, 1-D ones as foreach lists.

A transformer repeats the same few shapes in every layer. Run one tensor at a
time, AdaFactor dispatches about 33 kernels per tensor per update (measured:
916 for a 2-layer GPT-2's 28 tensors, 4756 for 12 layers' 148). Here the
factored tensors of one shape are stacked into a bucket and the statistics,
the preconditioned direction and the per-tensor scalars of the whole bucket
are computed by one kernel each; unfactored tensors (biases, norms) go
through ``torch._foreach_*`` lists. While each shape's tensors fit one bucket,
the kernel count depends on the number of distinct shapes, not on depth
(tests/test_host_syncs.py counts it against torch's foreach Adafactor on a
small GPT-2); a shape whose tensors fill several buckets adds kernels per
bucket.

Cost: stacking copies, and a stacked bucket is reduced in one unblocked
pass where the per-tensor path reads each tensor in 2048-row blocks (so the
two paths agree to float rounding; bit for bit where a tensor has at most
2048 rows, as tested). That trade pays where a kernel launch costs as much as
the kernel: on a GPU, tensors up to a few million elements; on a CPU only
small ones (measured on GPT-2-small-shaped parameters, 2 cores: buckets of up
to 4 Mi elements made the step 484 ms against 291-335 ms per tensor; with
64 Ki, 324-361 ms, the same within this machine's noise). ``BATCH_ELEMENTS``
holds the budget per device type. A tensor larger than the budget stays on
``adafactor.py``'s blocked per-tensor path, as do sharded tensors (their sums
cross ranks) and empty ones; buckets are split so that none exceeds it, and
buckets are applied one at a time, which bounds the full-size temporaries to
one bucket's (the stacked direction and its scaled copy).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ._tensor_lists import host_values, scale_

# Elements per bucket by device type (see the module docstring): 64 Ki on CPU, measured; 4 Mi elsewhere
# (16 MiB per fp32 temporary, two alive at a time), chosen as the size below which a GPU kernel is
# usually launch-bound, not tuned on a GPU.
BATCH_ELEMENTS = {"cpu": 1 << 16, "other": 1 << 22}
_FULL_PRECISION = (torch.float32, torch.float64)


@dataclass
class _Family:
    """Batched tensors of one (device, dtype): unfactored ones and buckets of one shape each."""

    unfactored: list[int] = field(default_factory=list)
    buckets: list[list[int]] = field(default_factory=list)

    @property
    def order(self) -> list[int]:
        """The order of the family's per-tensor scalar vectors: unfactored first, then bucket by bucket."""
        return self.unfactored + [i for bucket in self.buckets for i in bucket]


@dataclass
class Plan:
    families: list[_Family]
    per_tensor: list[int]  # indices left to the per-tensor path


def plan(params: list, layouts: list, factored) -> Plan:
    """Split tensor indices into batched families and the per-tensor rest.

    ``factored(param)`` says whether a tensor keeps row and column statistics.
    """
    families: dict = defaultdict(_Family)
    shapes: dict = defaultdict(lambda: defaultdict(list))
    per_tensor = []
    for i, (p, layout) in enumerate(zip(params, layouts)):
        key = (p.device, p.dtype)
        if layout is not None or p.numel() == 0 or p.numel() > _budget(p.device):
            per_tensor.append(i)
        elif not factored(p):
            families[key].unfactored.append(i)
        else:
            shapes[key][tuple(p.shape)].append(i)
    for key, by_shape in shapes.items():
        for shape, indices in by_shape.items():
            per_bucket = max(1, _budget(key[0]) // math.prod(shape))
            families[key].buckets += [indices[s:s + per_bucket] for s in range(0, len(indices), per_bucket)]
    return Plan(list(families.values()), per_tensor)


def _budget(device: torch.device) -> int:
    return BATCH_ELEMENTS.get(device.type, BATCH_ELEMENTS["other"])


def _full(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in _FULL_PRECISION else x.float()


def _pick(items: list, idx: list[int]) -> list:
    return [items[i] for i in idx]


def fold_second_moments(plan: Plan, grads: list, states: list, *, decay, weight: float, eps1: float,
                        momentum=None) -> None:
    """R, C (or v) ← decay·(…) + weight·stat(g² + ε1) for every batched tensor; ``decay=None`` skips
    the decay. ``momentum=(decay1, weight1)`` also folds ``m ← decay1·m + weight1·g``."""
    batched = [i for family in plan.families for i in family.order]
    if not batched:
        return
    if momentum is not None:
        decay1, weight1 = momentum
        moments = [states[i]["exp_avg"] for i in batched]
        if decay1 is not None:
            scale_(moments, decay1)
        torch._foreach_add_(moments, _pick(grads, batched), alpha=weight1)
    unfactored = [i for family in plan.families for i in family.unfactored]
    stats, increments = [], []
    for family in plan.families:
        for bucket in family.buckets:
            sq = _full(torch.stack(_pick(grads, bucket))).square_()  # the stack is a copy: square it in place
            rows = sq.shape[-2]
            stats += [states[i]["exp_avg_sq_row"] for i in bucket] + [states[i]["exp_avg_sq_col"] for i in bucket]
            increments += list(sq.mean(dim=-1).add_(eps1).unbind(0)) + list(sq.sum(dim=-2).div_(rows).add_(eps1).unbind(0))
    second = stats + [states[i]["exp_avg_sq"] for i in unfactored]
    if decay is not None:
        torch._foreach_mul_(second, decay)
    if stats:
        torch._foreach_add_(stats, increments, alpha=weight)
    if unfactored:
        v, g = [states[i]["exp_avg_sq"] for i in unfactored], _pick(grads, unfactored)
        torch._foreach_addcmul_(v, g, g, value=weight)
        torch._foreach_add_(v, eps1 * weight)


def precondition_and_step(plan: Plan, group: dict, params: list, directions: list, states: list, *, t: int,
                          v_scale: float, direction_scale: float, momentum_on_update: bool, lr_at) -> None:
    """The update of every batched tensor; see ``adafactor._precondition_and_step`` for the maths.

    ``lr_at(theta_rms, like)`` is the relative step times the parameter scale, elementwise.
    """
    for family in plan.families:
        if family.order:
            _family_step(family, group, params, directions, states, t=t, v_scale=v_scale,
                         direction_scale=direction_scale, momentum_on_update=momentum_on_update, lr_at=lr_at)


class _Bucket:
    """U = d · r · c of a stack of same-shaped factored tensors (``adafactor._Preconditioned``, stacked).

    The stacked direction is a copy; it is made once to measure ‖U‖ and again, one bucket at a time, to
    apply U, so that at most one bucket's full-size temporaries exist at once (not one copy of every
    batched tensor). Cost: a second stacking copy of the batched tensors per update.
    """

    def __init__(self, directions: list, states: list, v_scale: float) -> None:
        self.v_scale = v_scale
        self.directions = directions
        self.row = torch.stack([s["exp_avg_sq_row"] for s in states])
        self.col = torch.stack([s["exp_avg_sq_col"] for s in states])
        self.rows = directions[0].shape[-2]
        self.row_sum = self.row.sum(dim=-1, keepdim=True)
        q = self._stacked().square_().div_(self.row.unsqueeze(-1)).sum(dim=-2)  # Σ_i d_ij² / R_i
        mean_row = self.row_sum / self.rows
        self.u_sq = (mean_row * (q / self.col).sum(dim=-1, keepdim=True)).flatten(1).sum(dim=1) * self.v_scale**2

    def _stacked(self) -> torch.Tensor:
        """A fresh full-precision copy of the bucket's directions (safe to change in place)."""
        stacked = torch.stack(self.directions)
        return stacked if stacked.dtype in _FULL_PRECISION else stacked.float()

    def scaled_rows(self, coef: torch.Tensor) -> tuple[list, list]:
        """(d·c, r·coef) per tensor: ``p.addcmul_(d·c, r·coef)`` adds coef·U."""
        row_scale = (self.row_sum / self.rows / self.row).sqrt_().mul_(self.v_scale)
        scaled = self._stacked().mul_(self.col.rsqrt().unsqueeze(-2))
        coef = coef.view((-1,) + (1,) * (row_scale.dim() - 1))
        return list(scaled.unbind(0)), list((row_scale * coef).unsqueeze(-1).unbind(0))


def _family_step(family: _Family, group, params, directions, states, *, t, v_scale, direction_scale,
                 momentum_on_update, lr_at) -> None:
    order = family.order
    ps, ss = _pick(params, order), _pick(states, order)
    acc = torch.float64 if ps[0].dtype == torch.float64 else torch.float32
    numel = host_values([p.numel() for p in ps], acc, ps[0].device)

    u_sq, update = [], []  # update: unfactored U tensors; buckets hold their own factors
    if family.unfactored:
        v = [states[i]["exp_avg_sq"] for i in family.unfactored]
        update = torch._foreach_mul(_pick(directions, family.unfactored), torch._foreach_rsqrt(v))
        if v_scale != 1.0:
            torch._foreach_mul_(update, v_scale)
        u_sq.append(torch.stack(torch._foreach_norm(update, 2, dtype=acc)).square_())
    buckets = [_Bucket(_pick(directions, b), _pick(states, b), v_scale) for b in family.buckets]
    u_sq += [bucket.u_sq.to(acc) for bucket in buckets]
    rms = torch.cat(u_sq).div_(numel).sqrt_()

    theta_rms = None
    if group["scale_parameter"]:
        theta_rms = torch.stack(torch._foreach_norm(ps, 2, dtype=acc)).square_().div_(numel).sqrt_()
        torch._foreach_copy_([s["RMS"] for s in ss], list(theta_rms.unbind(0)))
    lr_t = lr_at(theta_rms, ps[0])  # a vector with the parameter scale, else 0-dim
    step = lr_t * direction_scale / (rms * direction_scale / group["clip_threshold"]).clamp_(min=1.0)
    lr_each = list(lr_t.unbind(0)) if lr_t.dim() else [lr_t] * len(ps)
    beta1, weight_decay = group["beta1"], group["weight_decay"]

    if momentum_on_update:
        targets, coef = [s["exp_avg"] for s in ss], step * (1.0 - beta1)
        scale_(targets, beta1)  # a bf16 momentum decays by beta1 itself
    else:
        targets, coef = ps, -step
        if weight_decay:
            torch._foreach_addcmul_(ps, ps, lr_each, value=-weight_decay)
    n = len(family.unfactored)
    if n:
        torch._foreach_addcmul_(targets[:n], update, list(coef[:n].unbind(0)))
    start = n
    for bucket, indices in zip(buckets, family.buckets):
        end = start + len(indices)
        scaled, rows = bucket.scaled_rows(coef[start:end])
        torch._foreach_addcmul_(targets[start:end], scaled, rows)
        start = end
    if momentum_on_update:
        if weight_decay:
            torch._foreach_addcmul_(ps, ps, lr_each, value=-weight_decay)  # θ − λ·lr_t·θ, as transformers
        torch._foreach_sub_(ps, targets)

