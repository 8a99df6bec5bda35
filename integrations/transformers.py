"""leantrain's accumulation inside ``transformers.Trainer``, fused or not, with the savings kept.

``transformers.Trainer`` accumulates gradients itself: it divides each
micro-batch's loss by its accumulation count, keeps ``.grad`` for k
micro-batches, clips, then calls ``optimizer.step()`` and the scheduler once.
A leantrain optimizer with ``accum_steps=k`` wants ``step()`` after *every*
micro-batch instead, and in fused mode frees each gradient inside backward.
``LeantrainCallback`` bridges the two without changing the Trainer::

    opt = leantrain.optim.AdamW(model.parameters(), lr=3e-4, accum_steps=8)
    fuse_into_backward(model, opt)                          # optional: no persistent gradients
    args = TrainingArguments(..., gradient_accumulation_steps=8, max_grad_norm=0)
    trainer = Trainer(model, args, optimizers=(opt, scheduler), callbacks=[LeantrainCallback()])

What it does per micro-batch: scales the micro-batch's gradient by k (the
Trainer divided the loss by its window, leantrain applies 1/k itself), folds
it with ``optimizer.step()`` and frees ``.grad``; at the window's end the
Trainer's own ``optimizer.step()`` folds the last one and updates, and the
scheduler steps once per update as the Trainer intends. A shorter last
window of an epoch closes the cycle early (``end_cycle``). In fused mode the
hooks apply the scale and fold during backward. The Trainer's logged
``grad_norm`` is meaningless here (it sees at most one micro-batch's gradient,
none when fused).

Refused at ``on_train_begin`` with one line saying what to set: a
non-leantrain optimizer, ``accum_steps`` different from
``gradient_accumulation_steps``, global clipping (``max_grad_norm > 0``) with
embedded accumulation, and several processes (the moment synchronisation
across ranks runs in ``leantrain train``, not inside the Trainer's DDP).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from leantrain.optim._accumulating import AccumulatingOptimizer
from leantrain.optim.fused import _LIVE, innermost_optimizer


def _unwrap_accelerate(optimizer):
    return optimizer.optimizer if type(optimizer).__name__ == "AcceleratedOptimizer" else optimizer


class LeantrainCallback(TrainerCallback):
    """Makes ``transformers.Trainer`` drive a leantrain optimizer's embedded accumulation."""

    def __init__(self) -> None:
        self._optimizer = None  # the leantrain optimizer (wrappers included) the Trainer holds
        self._inner = None
        self._scale = 1.0

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        outer = _unwrap_accelerate(optimizer)
        inner = innermost_optimizer(outer) if outer is not None else None
        if not isinstance(inner, AccumulatingOptimizer):
            raise ValueError(f"LeantrainCallback: the Trainer's optimizer is {type(inner).__name__}, not a leantrain "
                             "optimizer; pass optimizers=(leantrain.optim.AdamW(...), scheduler) to the Trainer")
        k = args.gradient_accumulation_steps
        if inner.accum_steps != k:
            raise ValueError(f"LeantrainCallback: {type(inner).__name__}(accum_steps={inner.accum_steps}) with "
                             f"gradient_accumulation_steps={k}: set accum_steps={k} on the optimizer (the Trainer's "
                             "accumulation count is the cycle length)")
        fused = [h for h in list(_LIVE) if h.optimizer is inner]
        if args.max_grad_norm and args.max_grad_norm > 0 and (k > 1 or fused):
            raise ValueError(f"LeantrainCallback: max_grad_norm={args.max_grad_norm} clips the accumulated .grad, "
                             "which embedded accumulation never forms: set max_grad_norm=0 and clip per tensor "
                             "(max_update_rms on SGD/AdamW/AdaX, clip_threshold on AdaFactor)")
        if args.world_size > 1:
            raise ValueError(f"LeantrainCallback: {args.world_size} processes: the Trainer's DDP all-reduces "
                             "gradients, which embedded accumulation replaces by a moment all-reduce; run several "
                             "processes with `leantrain train` (accelerate/torchrun), or one process here")
        self._optimizer, self._inner, self._scale = outer, inner, float(k)
        for handle in fused:
            handle.grad_scale = self._scale

    def _scale_grads(self) -> None:
        grads = [p.grad for g in self._inner.param_groups for p in g["params"] if p.grad is not None]
        if grads and self._scale != 1.0:
            torch._foreach_mul_(grads, self._scale)  # in place: .grad is freed right after the fold

    def on_substep_end(self, args, state, control, **kwargs):
        """A micro-batch inside the Trainer's window: fold it now and free its gradient."""
        self._scale_grads()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """The window's last micro-batch: the Trainer's own step() folds it next."""
        self._scale_grads()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """A window shorter than k (the epoch's last) still ends the cycle: update now."""
        if not self._inner.updated:
            self._optimizer.end_cycle()

    def on_train_end(self, args, state, control, **kwargs):
        for handle in [h for h in list(_LIVE) if h.optimizer is self._inner]:
            handle.grad_scale = 1.0
