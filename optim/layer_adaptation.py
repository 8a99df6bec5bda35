"""Layer-wise adaptation: every tensor's update scaled by its trust ratio ‖θ‖/‖u‖ (LARS/LAMB).

Paper: You et al., "Large Batch Optimization for Deep Learning: Training BERT
in 76 minutes" (LAMB), ICLR 2020::

    u = the wrapped optimizer's update direction, decoupled weight decay included
        (AdamW: m̂/(√v̂+ε) + λθ), so that θ_new = θ − lr·u
    r = ‖θ‖ / ‖u‖        (1 where either norm is 0; at most ``max_trust_ratio``)
    θ ← θ − lr · r · u   ⇒   ‖Δθ‖ = lr·‖θ‖ per tensor (unclamped)

With AdamW inside this is LAMB; with SGD it is LARS-like. Large effective
batches (which embedded accumulation makes cheap) are where it keeps
training stable.

How: at each update the wrapped optimizer computes its update as usual; for
every tensor the step it took, Δ = −lr·u, is measured against the tensor as
it was and rescaled by r. It runs a chunk of ~64 MiB of tensors at a time
(one transient copy of the chunk), so it composes with embedded
accumulation (exact, ema), fused mode, Lookahead, EMA and bf16 parameters.
Both norms go through ``_sharding.GlobalSums``: under FSDP2 they are the
whole tensor's, summed across ranks in one batched all-reduce per chunk.
Settings live in the param groups (``layer_adaptation``,
``max_trust_ratio``, ``trust_exclude_1d``), so checkpoints carry them.
Departures: 1-D tensors (biases, norm scales) are excluded by default, as
LAMB implementations do; AdaFactor's relative step is refused (the ratio
needs the lr the step is scaled to).
"""

from __future__ import annotations

import torch

from ._accumulating import AccumulatingOptimizer
from ._checks import check_flag, check_number, scalar
from ._sharding import GlobalSums
from ._tensor_lists import chunks
from ._wrapper import OptimizerWrapper
from .fused import innermost_optimizer


class LayerAdaptation(OptimizerWrapper):
    def __init__(self, base, max_trust_ratio: float | None = None, exclude_1d: bool = True) -> None:
        inner = innermost_optimizer(base)
        if not isinstance(inner, AccumulatingOptimizer):
            raise TypeError(f"LayerAdaptation: base={type(inner).__name__!r} is not a leantrain optimizer "
                            "(it scales the update leantrain's optimizers compute)")
        for group in inner.param_groups:
            if group.get("lr") is None:
                raise ValueError("LayerAdaptation: lr=None (AdaFactor's relative step): the trust ratio scales "
                                 "updates to lr·‖θ‖; give an lr with relative_step=False")
            if group.get("compiled"):
                raise ValueError("LayerAdaptation: base has compiled=True, whose update is plain AdamW with no "
                                 "per-tensor step to rescale; use compiled=False")
        self._max = None if max_trust_ratio is None else check_number("max_trust_ratio", max_trust_ratio,
                                                                      low=0.0, low_open=True)
        self._exclude_1d = check_flag("exclude_1d", exclude_1d)
        super().__init__(base)
        for group in self.param_groups:
            self._init_group(group)

    def _init_group(self, group: dict) -> None:
        group["layer_adaptation"] = True
        group.setdefault("max_trust_ratio", self._max)
        group.setdefault("trust_exclude_1d", self._exclude_1d)

    def _after_update(self) -> None:
        pass  # the scaling happens inside the wrapped optimizer's update (adapted_update)


def adapted_update(update, group: dict, params: list, layouts: list) -> None:
    """Run ``update(indices)`` chunk by chunk and rescale each tensor's step by its trust ratio."""
    lr = scalar(group["lr"])
    exclude_1d = group["trust_exclude_1d"]
    for idx in chunks(params):
        chosen = [i for i in idx if params[i].dim() >= 2 or not exclude_1d]
        before = [params[i].clone() for i in chosen]
        update(idx)
        if not chosen:
            continue
        steps = torch._foreach_sub([params[i] for i in chosen], before)  # Δ = −lr·u
        sums = GlobalSums()
        weight_sq = [sums.add(n.square(), layouts[i]) for n, i in zip(torch._foreach_norm(before), chosen)]
        step_sq = [sums.add(n.square(), layouts[i]) for n, i in zip(torch._foreach_norm(steps), chosen)]
        sums.finish()
        ratios = []
        for w_sq, s_sq in zip(weight_sq, step_sq):
            update_norm = s_sq.sqrt() / lr  # ‖u‖
            ratio = torch.where((w_sq > 0) & (update_norm > 0), w_sq.sqrt() / update_norm.clamp(min=1e-30),
                                torch.ones_like(w_sq))
            if group["max_trust_ratio"] is not None:
                ratio = ratio.clamp(max=group["max_trust_ratio"])
            ratios.append(ratio)
        torch._foreach_mul_(steps, ratios)
        torch._foreach_add_(before, steps)
        torch._foreach_copy_([params[i] for i in chosen], before)

