"""The engine interface the training loop calls; ``ddp.py``, ``fsdp2.py``, ``deepspeed.py`` implement it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from leantrain import optim

from ..schema import Recipe


class Engine:
    """One distributed engine: prepare, backward, step, checkpoint, final save, per-rank facts."""

    name = "ddp"

    def __init__(self, recipe: Recipe, source: str) -> None:
        self.recipe, self.source = recipe, source
        self.accelerator = None
        self.optimizer = None  # the leantrain (or torch) optimizer object, wrappers included

    # ------------------------------------------------------------------ setup
    def accelerator_kwargs(self) -> dict:
        """Keyword arguments for ``accelerate.Accelerator`` (before it exists)."""
        # cpu=True on machines without an accelerator: only then does accelerate form a
        # gloo group from a torchrun environment instead of N independent runs.
        return {"cpu": not torch.accelerator.is_available()}

    def attach(self, accelerator) -> None:
        self.accelerator = accelerator

    def prepare(self, model: torch.nn.Module, make_optimizer):
        """(model, stepper): the model to run and the object whose ``step()``/``zero_grad()`` the loop calls.

        ``make_optimizer(model)`` builds the recipe's optimizer on the parameters the engine trains.
        """
        raise NotImplementedError

    @property
    def inner_optimizer(self):
        return optim.fused.innermost_optimizer(self.optimizer)

    @property
    def embedded(self) -> bool:
        return self.recipe.accumulation.mode != "standard"

    # ------------------------------------------------------------------- step
    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def micro_step(self, model, *, last_of_cycle: bool):
        """Context for one micro-step's backward (gradient synchronisation policy)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, *, last_of_cycle: bool) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, model, max_norm: float) -> None:
        self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    # ------------------------------------------------------------- checkpoint
    def save(self, directory: str) -> None:
        """Write this rank's part of a checkpoint into ``directory`` (collective)."""
        self._sync_optimizer()
        self.accelerator.save_state(directory, safe_serialization=False)  # tied weights: torch.save keeps sharing

    def load(self, directory: str, trainer_state: dict) -> None:
        self.accelerator.load_state(directory)

    def _sync_optimizer(self) -> None:
        inner = self.inner_optimizer
        if hasattr(inner, "sync_state"):
            inner.sync_state()  # mid-cycle state made rank-independent before it is written

    def full_state_dict(self, model) -> dict | None:
        """The whole model's state dict on the main process (None elsewhere) for ``save_pretrained``."""
        return None

    # ------------------------------------------------------------------ facts
    def info(self) -> dict:
        """Per-rank facts for run_info.json and the start-up table."""
        inner = self.inner_optimizer
        if hasattr(inner, "init_all_state"):
            inner.init_all_state()  # the per-rank state as it will be, before the first update
        return {
            "engine": self.name,
            "world_size": self.accelerator.num_processes,
            "optimizer_state_bytes_per_rank": optim.state_bytes(inner),
            "parameters_per_rank": sum(optim._sharding.local(p).numel() for p in self.trained_tensors()),
        }

    def trained_tensors(self) -> list:
        """The tensors this rank's optimizer updates (local shards, flat partitions)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def drop_tied_aliases(model: torch.nn.Module, state: dict) -> dict:
    """A gathered state dict names tied weights (GPT-2's lm_head is wte) twice; save_pretrained wants one."""
    kept = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {name: value for name, value in state.items() if name not in aliases}
