"""Fused accumulation in backward: zero persistent gradients (DESIGN.md 3).

``fuse_into_backward(model, optimizer)`` registers a post-accumulate-grad hook
on every trainable parameter the optimizer holds. When autograd has finished
a parameter's gradient, the hook folds it into the optimizer state
(DESIGN.md 2) and frees it at once (``p.grad = None``), so at most the
gradients autograd is currently finishing exist at any time. The loop stays
the same: ``loss.backward(); optimizer.step()`` after every micro-batch;
``step()`` only advances the cycle and, at the boundary, applies the update
from the state (multi-tensor). Configurations that step on the gradient
itself at k = 1 (torch's fused AdamW kernel, AdaFactor without momentum) run
their whole update inside the hook; at k > 1 they fold into their explicit
``grad_accum`` buffer.

Refused, because they need the averaged gradient or a step that can be
undone after the fact:

- global gradient-norm clipping (``clip_grad_norm_``): use per-tensor update
  clipping (``max_update_rms`` on SGD/AdamW/AdaX, ``clip_threshold`` on
  AdaFactor);
- fp16 with a dynamic loss scaler: an overflow is detected only after the
  gradients were folded; use bf16.

Non-finite values: ``finite_loss(loss)`` tells the loop to skip a micro-batch
before backward (it then does not count toward k); a non-finite gradient
reaching a hook is not folded (the parameter keeps its state), counted per
parameter in ``handle.nonfinite_grads`` and reported. Checking costs one
min/max pass over each gradient and one device-to-host sync per parameter
per micro-step. On CPU that is cheap; on a GPU the syncs stall the backward
pipeline (GPT-2 small on an H100, k=8: 64 ms per fused micro-step with the
check, 35 ms without, 32 ms unfused — benchmarks/results/memory_cuda_h100.md),
so on GPUs prefer ``check_finite=False`` with the loss-level ``finite_loss``.
"""

from __future__ import annotations

from collections import Counter

import torch

from ._accumulating import AccumulatingOptimizer

CLIPPING_REFUSAL = (
    "global gradient-norm clipping needs the averaged gradient, which fused accumulation never "
    "materialises; clip each tensor's update instead: max_update_rms=... on SGD/AdamW/AdaX, "
    "clip_threshold on AdaFactor"
)
FP16_REFUSAL = (
    "fp16 with a dynamic loss scaler cannot be fused: an overflow is found only after the "
    "gradients were folded into the optimizer state, so the step cannot be skipped; use bf16 "
    "(no scaler) or accumulation without fusion"
)


def _all_finite(grad: torch.Tensor) -> bool:
    """One reduction pass, no full-size temporary: min and max propagate NaN and show ±inf.

    ``isfinite(g).all()`` allocated a bool mask of g (plus fp32 temporaries on CPU):
    ~260 MiB at GPT-2's tied embedding and ~0.3 s per 124M-parameter micro-step.
    """
    low, high = torch.aminmax(grad)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Unwrap Lookahead/EMA (``.base`` chains) down to the optimizer that holds the math."""
    while hasattr(optimizer, "base") and isinstance(optimizer.base, torch.optim.Optimizer):
        optimizer = optimizer.base
    return optimizer


class FusedBackward:
    """Handle of the hooks registered by ``fuse_into_backward``; ``remove()`` undoes it."""

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], optimizer, *, check_finite: bool) -> None:
        inner = innermost_optimizer(optimizer)
        if not isinstance(inner, AccumulatingOptimizer):
            raise TypeError(
                f"fuse_into_backward: optimizer={type(inner).__name__!r} cannot fold gradients; "
                "use one of leantrain.optim's optimizers (optionally wrapped in Lookahead/EMA)"
            )
        self.optimizer = inner
        self.check_finite = check_finite
        self.nonfinite_grads: Counter[str] = Counter()
        # Group *positions*, not the dicts: load_state_dict replaces the group dicts
        # (and their micro_step), so the hook looks its group up at call time.
        group_index = {p: i for i, group in enumerate(inner.param_groups) for p in group["params"]}
        self._names = {p: name for name, p in named_params}
        self._group_of = {p: group_index[p] for _, p in named_params if p.requires_grad and p in group_index}
        self._folded_at: dict[torch.Tensor, int] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]

    def _hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        param.grad = None  # the memory goes back to the allocator as soon as the fold is done
        if grad.dtype == torch.float16:
            raise RuntimeError(FP16_REFUSAL)
        micro_step = self.optimizer.micro_step
        if self._folded_at.get(param) == micro_step:
            raise RuntimeError(
                f"fused accumulation: parameter {self._names[param]!r} received a second gradient in "
                f"micro-step {micro_step} (two backward passes, or reentrant checkpointing around a "
                "parameter also used outside it); second moments need the whole gradient at once: "
                "call step() after each backward, or use use_reentrant=False"
            )
        if self.check_finite and not _all_finite(grad):
            self.nonfinite_grads[self._names[param]] += 1
            return
        self._folded_at[param] = micro_step
        self.optimizer._fold_group(self.optimizer.param_groups[self._group_of[param]], [param], [grad])

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self._group_of)

    def report(self) -> str:
        """One line per parameter whose gradient was dropped as non-finite."""
        if not self.nonfinite_grads:
            return "no non-finite gradients"
        return "\n".join(f"{name}: {n} non-finite gradient(s) not folded" for name, n in self.nonfinite_grads.items())

    def clip_grad_norm_(self, *args, **kwargs):
        """Refuses: see CLIPPING_REFUSAL."""
        raise RuntimeError(CLIPPING_REFUSAL)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FusedBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def fuse_into_backward(model_or_params, optimizer, *, grad_scaler=None, check_finite: bool = True) -> FusedBackward:
    """Fold gradients into ``optimizer``'s state inside backward and free them at once.

    ``model_or_params``: an ``nn.Module`` (parameter names appear in reports) or
    an iterable of parameters. ``grad_scaler``: pass the run's
    ``torch.amp.GradScaler`` if there is one; an enabled scaler is refused.
    """
    if grad_scaler is not None and getattr(grad_scaler, "is_enabled", lambda: True)():
        raise ValueError(FP16_REFUSAL)
    if isinstance(model_or_params, torch.nn.Module):
        named = list(model_or_params.named_parameters())  # deduplicates tied weights
    else:
        named = [(f"param{i}", p) for i, p in enumerate(dict.fromkeys(model_or_params))]
    return FusedBackward(named, optimizer, check_finite=check_finite)


def finite_loss(loss: torch.Tensor) -> bool:
    """True if ``loss`` is finite. Skip backward and step() for a micro-batch when False.

    A skipped micro-batch does not count toward k: the cycle takes the next
    one instead. One host sync, which logging the loss costs anyway.
    """
    return bool(torch.isfinite(loss.detach()).all())
