"""DDP (and a single process): accelerate's DistributedDataParallel, replicated optimizer state.

- ``standard`` mode: gradients accumulate in ``.grad`` under ``no_sync`` and DDP
  all-reduces them once, in the cycle's last backward.
- ``exact`` / ``ema``: every backward runs under ``no_sync`` (no gradient
  all-reduce at all); each rank folds its own micro-batches and the
  optimizer averages its accumulated buffers once per update
  (``replicated_over``, docs/design.md §4). Fused accumulation works with any
  number of processes.

``model.compile: true`` compiles the prepared model in place (``Module.compile``:
the module and its state-dict keys stay as they are, so checkpoints do not change).
"""

from __future__ import annotations

from contextlib import nullcontext

from .base import Engine


class DDPEngine(Engine):
    name = "ddp"

    def prepare(self, model, make_optimizer):
        self.optimizer = make_optimizer(model)
        model, stepper = self.accelerator.prepare(model, self.optimizer)
        if self.recipe.model.compile:
            model.compile()
        inner = self.inner_optimizer
        if self.accelerator.num_processes > 1 and self.embedded and hasattr(inner, "replicated_over"):
            inner.replicated_over()
        return model, stepper

    def micro_step(self, model, *, last_of_cycle: bool):
        if self.accelerator.num_processes == 1:
            return nullcontext()
        if self.embedded or not last_of_cycle:
            return self.accelerator.no_sync(model)
        return nullcontext()
