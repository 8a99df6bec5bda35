"""Fused accumulation in backward: zero persistent gradients (docs/design.md §3).

``fuse_into_backward(model, optimizer)`` registers a post-accumulate-grad hook
on every trainable parameter the optimizer holds. When autograd has finished
a parameter's gradient, the hook folds it into the optimizer state
(docs/design.md §2) and frees it at once (``p.grad = None``), so at most the
gradients autograd is currently finishing exist at any time. The loop stays
the same: ``loss.backward(); optimizer.step()`` after every micro-batch;
``step()`` only advances the cycle and, at the boundary, applies the update
from the state (multi-tensor). Configurations that step on the gradient
itself at k = 1 (torch's fused AdamW kernel, AdaFactor without momentum) run
their whole update inside the hook; at k > 1 they fold into their explicit
``grad_accum`` buffer. Under FSDP2 the hooks receive this rank's
reduce-scattered gradient shard and fold it into the sharded state.

Refused, because they need the averaged gradient or a step that can be
undone after the fact:

- global gradient-norm clipping: ``torch.nn.utils.clip_grad_norm_`` with a
  finite ``max_norm`` on fused parameters raises (there is no gradient left to
  clip; torch would return 0 and clip nothing). Clip each tensor's update
  instead: ``max_update_rms`` on SGD/AdamW/AdaX, ``clip_threshold`` on
  AdaFactor. (``max_norm=inf``, a norm-only query such as transformers'
  logging, passes through and sees no gradients.)
- fp16 with a dynamic loss scaler: an overflow is detected only after the
  gradients were folded; use bf16.
- a second gradient for one parameter in one micro-step: two backward passes
  before ``step()``, or a loop that steps once per several backward passes
  (``transformers.Trainer`` with ``gradient_accumulation_steps > 1``: use
  ``leantrain.integrations.transformers.LeantrainCallback``).

Non-finite values: ``finite_loss(loss)`` tells the loop to skip a micro-batch
before backward (it then does not count toward k). A non-finite gradient
reaching a hook is folded as zero (the micro-step counts as one without a
gradient for that parameter) and counted, with no host synchronisation: the
check is one min/max reduction whose flag stays on the device. The counts are
read with ``handle.nonfinite_grads``: one sync, and one all-reduce of the
counts across ranks, so a NaN on one rank is seen by every rank.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import Counter

import torch

from ._accumulating import AccumulatingOptimizer
from ._sharding import global_count, local

CLIPPING_REFUSAL = (
    "global gradient-norm clipping needs the averaged gradient, which fused accumulation never "
    "materialises; clip each tensor's update instead: max_update_rms=... on SGD/AdamW/AdaX, "
    "clip_threshold on AdaFactor (docs/design.md §3)"
)
FP16_REFUSAL = (
    "fp16 with a dynamic loss scaler cannot be fused: an overflow is found only after the "
    "gradients were folded into the optimizer state, so the step cannot be skipped; use bf16 "
    "(no scaler) or accumulation without fusion (docs/design.md §3)"
)

_LIVE: weakref.WeakSet = weakref.WeakSet()  # handles whose hooks are registered


def _nonfinite(grad: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on the gradient's device: True if any element is NaN or ±inf. No host sync.

    One reduction pass, no full-size temporary: min and max propagate NaN and
    show ±inf (``isfinite(g).all()`` allocated a bool mask of g: ~260 MiB at
    GPT-2's tied embedding on CPU).
    """
    low, high = torch.aminmax(grad)
    return ~(torch.isfinite(low) & torch.isfinite(high))


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Unwrap Lookahead/EMA (``.base`` chains) and accelerate's wrapper down to the optimizer that holds the math."""
    while True:
        if hasattr(optimizer, "base") and isinstance(optimizer.base, torch.optim.Optimizer):
            optimizer = optimizer.base
        elif type(optimizer).__name__ == "AcceleratedOptimizer":
            optimizer = optimizer.optimizer
        else:
            return optimizer


class FusedBackward:
    """Handle of the hooks registered by ``fuse_into_backward``; ``remove()`` undoes it.

    ``grad_scale``: every gradient is multiplied by it (in place, before the
    fold). leantrain's optimizers apply 1/k themselves; a loop that already
    divides its loss by its own accumulation count (transformers.Trainer) sets
    it to k.
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], optimizer, *, check_finite: bool) -> None:
        inner = innermost_optimizer(optimizer)
        if not isinstance(inner, AccumulatingOptimizer):
            raise TypeError(
                f"fuse_into_backward: optimizer={type(inner).__name__!r} cannot fold gradients; "
                "use one of leantrain.optim's optimizers (optionally wrapped in Lookahead/EMA)"
            )
        self.optimizer = inner
        self.check_finite = check_finite
        self.grad_scale = 1.0
        # Group *positions*, not the dicts: load_state_dict replaces the group dicts
        # (and their micro_step), so the hook looks its group up at call time.
        group_index = {p: i for i, group in enumerate(inner.param_groups) for p in group["params"]}
        self._names = {p: name for name, p in named_params}
        self._group_of = {p: group_index[p] for _, p in named_params if p.requires_grad and p in group_index}
        self._position = {p: i for i, p in enumerate(self._group_of)}
        # The params lists as they are now: an engine that replaces them (DeepSpeed ZeRO puts flat
        # partitions there) leaves these hooks folding into tensors it never updates.
        self._params_lists = [group["params"] for group in inner.param_groups]
        self._nonfinite_counts: torch.Tensor | None = None  # one int32 per parameter, on the device
        self._folded_at: dict[torch.Tensor, int] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]
        _LIVE.add(self)
        _guard_gradient_clipping()

    def _hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        param.grad = None  # the memory goes back to the allocator as soon as the fold is done
        if grad.dtype == torch.float16:
            raise RuntimeError(FP16_REFUSAL)
        micro_step = self.optimizer.micro_step
        if self._folded_at.get(param) == micro_step:
            raise RuntimeError(
                f"fused accumulation: parameter {self._names[param]!r} received a second gradient in "
                f"micro-step {micro_step}: two backward passes before step(), reentrant checkpointing around a "
                "parameter also used outside it (use use_reentrant=False), or a loop that steps once per "
                "several backward passes (transformers.Trainer with gradient_accumulation_steps > 1: add "
                "leantrain.integrations.transformers.LeantrainCallback); second moments need each "
                "micro-batch's gradient whole"
            )
        self._folded_at[param] = micro_step
        group = self.optimizer.param_groups[self._group_of[param]]
        if group["params"] is not self._params_lists[self._group_of[param]] and param not in group["params"]:
            raise RuntimeError(
                f"fused accumulation: parameter {self._names[param]!r} is no longer in its optimizer group (an "
                "engine such as DeepSpeed ZeRO replaced the group's parameters with its own partitions); fused "
                "hooks cannot fold into them: use accumulation without fusion there (docs/design.md §4)")
        values = local(grad)
        if self.grad_scale != 1.0:
            values.mul_(self.grad_scale)
        if self.check_finite and values.numel():
            bad = _nonfinite(values)
            self._count_nonfinite(param, bad)
            values.masked_fill_(bad, 0.0)  # folded as a zero gradient: no NaN ever enters the state
        self.optimizer._fold_group(group, [param], [grad])

    def _count_nonfinite(self, param: torch.Tensor, bad: torch.Tensor) -> None:
        if self._nonfinite_counts is None:
            self._nonfinite_counts = torch.zeros(len(self._position), dtype=torch.int32, device=bad.device)
        self._nonfinite_counts[self._position[param]] += bad.to(self._nonfinite_counts.device)

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self._group_of)

    def manages(self, param: torch.Tensor) -> bool:
        return param in self._group_of

    @property
    def local_nonfinite_grads(self) -> Counter[str]:
        """Non-finite gradients folded as zero on this rank, per parameter name (one host sync)."""
        if self._nonfinite_counts is None:
            return Counter()
        return self._counter(self._nonfinite_counts.tolist())

    @property
    def nonfinite_grads(self) -> Counter[str]:
        """Non-finite gradients per parameter name, summed over every rank.

        Under torch.distributed this is a collective (an all-reduce of the
        counts): read it on every rank at the same point, as the trainer does
        once per update. One host sync.
        """
        counts = self._nonfinite_counts
        if counts is None:
            device = next((local(p).device for p in self._group_of), torch.device("cpu"))
            counts = torch.zeros(len(self._position), dtype=torch.int32, device=device)
        return self._counter(global_count(counts).tolist())

    def _counter(self, counts: list[int]) -> Counter[str]:
        return Counter({self._names[p]: n for p, n in zip(self._position, counts) if n})

    @staticmethod
    def report(counts: Counter[str]) -> str:
        """One line per parameter whose gradient was non-finite (``counts``: ``nonfinite_grads``)."""
        if not counts:
            return "no non-finite gradients"
        return "\n".join(f"{name}: {n} non-finite gradient(s) folded as zero" for name, n in counts.items())

    def clip_grad_norm_(self, *args, **kwargs):
        """Refuses: see CLIPPING_REFUSAL."""
        raise RuntimeError(CLIPPING_REFUSAL)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _LIVE.discard(self)

    def __enter__(self) -> FusedBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _guard_gradient_clipping() -> None:
    """Make ``torch.nn.utils.clip_grad_norm_`` refuse fused parameters (installed once).

    After fused backward no gradient is left: torch's function would return a
    norm of 0 and clip nothing, silently. accelerate, transformers.Trainer and
    Lightning all call it through the module attribute, so they are guarded
    too. Cost: one set lookup per parameter per call, only while hooks live.
    """
    utils = torch.nn.utils
    if getattr(utils.clip_grad_norm_, "_leantrain_guard", False):
        return
    original = utils.clip_grad_norm_

    @functools.wraps(original)
    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if math.isfinite(float(max_norm)) and any(h.manages(p) for h in list(_LIVE) for p in params):
            raise RuntimeError(f"clip_grad_norm_ after fused backward: {CLIPPING_REFUSAL}")
        return original(params, max_norm, *args, **kwargs)

    clip_grad_norm_._leantrain_guard = True
    utils.clip_grad_norm_ = clip_grad_norm_
    utils.clip_grad.clip_grad_norm_ = clip_grad_norm_


def fuse_into_backward(model_or_params, optimizer, *, grad_scaler=None, check_finite: bool = True) -> FusedBackward:
    """Fold gradients into ``optimizer``'s state inside backward and free them at once.

    ``model_or_params``: an ``nn.Module`` (parameter names appear in reports) or
    an iterable of parameters. ``grad_scaler``: pass the run's
    ``torch.amp.GradScaler`` if there is one; an enabled scaler is refused.
    ``check_finite``: fold a non-finite gradient as zero and count it (no host
    sync; one reduction pass per gradient).
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
