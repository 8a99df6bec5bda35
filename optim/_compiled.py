"""AdamW's fold and boundary update through ``torch.compile``: one pass over each tensor.

The multi-tensor path runs one ``torch._foreach_*`` operation after another:
the boundary update reads and writes every tensor about six times (decay,
√v, two scalings, the ratio) where torch's fused AdamW kernel, which cannot
express a step on already accumulated moments, does it once. Inductor fuses
the same arithmetic into one loop per tensor with no temporaries: measured on
GPT-2-small-shaped fp32 parameters on CPU (benchmarks/optim_step.py), the
boundary went from 4.7-5.5× torch's fused AdamW step to 0.93-1.17× (two
runs on a noisy 2-core machine).

Cost: the first call compiles (about a minute on 2 CPU cores for GPT-2-small's
148 tensors; inductor's on-disk cache makes later processes take seconds) and
needs a C++ compiler on CPU (Triton on GPU). Each distinct list of tensor
shapes is its own graph; the fused-backward hooks fold one tensor at a time,
so they keep the eager fold (two operations) rather than compile 148 graphs.
Scalars travel as one tensor, so a changing learning rate never recompiles.
At the boundary of an unfused step() AdamW hands over the last micro-batch's
fold with the update (``adamw_fold_and_apply``), so m, v and θ are read and
written once, as in torch's kernel; fold and update compiled apart cost 1.46×
that kernel's time, together 0.93-1.17× (measured as above). Each distinct
list of shapes (a param group; the subset of tensors with a gradient when
some have none) compiles its own graph; past dynamo's recompile limit (8 per
function) the call runs eagerly, with dynamo's warning. Results equal
the eager path to float rounding (the compiled loop may contract a multiply
and an add into one FMA).
"""

from __future__ import annotations

import torch

from ._tensor_lists import host_values

_COMPILED: dict[str, object] = {}


def _compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[name]


def _fold(exp_avgs, exp_avg_sqs, grads, scalars):
    decay1, decay2, weight1, weight2 = scalars[0], scalars[1], scalars[2], scalars[3]
    for m, v, g in zip(exp_avgs, exp_avg_sqs, grads):
        g = g.to(v.dtype)
        m.copy_(m * decay1 + g * weight1)
        v.copy_(v * decay2 + g * g * weight2)


def _apply(params, exp_avgs, exp_avg_sqs, scalars):
    keep, step, bias2_sqrt, eps = scalars[0], scalars[1], scalars[2], scalars[3]
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        p.copy_(p * keep - step * m.to(p.dtype) / (v.sqrt() / bias2_sqrt + eps))


def _fold_and_apply(params, exp_avgs, exp_avg_sqs, grads, fold_scalars, apply_scalars):
    _fold(exp_avgs, exp_avg_sqs, grads, fold_scalars)
    _apply(params, exp_avgs, exp_avg_sqs, apply_scalars)


def adamw_fold(exp_avgs, exp_avg_sqs, grads, *, decay1, decay2, weight1, weight2) -> None:
    """m ← decay1·m + weight1·g ;  v ← decay2·v + weight2·g²  (decay None: 1)."""
    scalars = _scalars(exp_avg_sqs[0], [1.0 if decay1 is None else decay1, 1.0 if decay2 is None else decay2,
                                        weight1, weight2])
    _compiled("fold", _fold)(exp_avgs, exp_avg_sqs, grads, scalars)


def adamw_apply(params, exp_avgs, exp_avg_sqs, *, keep: float, step: float, bias2_sqrt: float, eps: float) -> None:
    """θ ← keep·θ − step·m / (√v / bias2_sqrt + ε)."""
    _compiled("apply", _apply)(params, exp_avgs, exp_avg_sqs, _scalars(params[0], [keep, step, bias2_sqrt, eps]))


def adamw_fold_and_apply(params, exp_avgs, exp_avg_sqs, grads, *, weight1, weight2, keep: float, step: float,
                         bias2_sqrt: float, eps: float) -> None:
    """The boundary micro-batch's fold and the update in one pass: m, v and θ are each read and written once."""
    _compiled("fold_and_apply", _fold_and_apply)(
        params, exp_avgs, exp_avg_sqs, grads, _scalars(exp_avg_sqs[0], [1.0, 1.0, weight1, weight2]),
        _scalars(params[0], [keep, step, bias2_sqrt, eps]))


def _scalars(like: torch.Tensor, values: list[float]) -> torch.Tensor:
    return host_values(values, like.dtype, like.device)
