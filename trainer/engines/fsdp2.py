"""FSDP2: torch's ``fully_shard`` on every transformer block and the root, sharded checkpoints.

accelerate turns FSDP on only when it finds an accelerator, so leantrain
applies ``fully_shard`` itself, from the accelerate config's ``fsdp_*`` keys
(``FSDP_*`` in the launched environment), identically on CPU (gloo) and GPU:

- blocks: ``fsdp_transformer_layer_cls_to_wrap`` or the model's own
  ``_no_split_modules`` (GPT2Block, BertLayer, T5Block, ...), then the root;
- ``fsdp_reshard_after_forward``; ``fsdp_offload_params`` (CPUOffloadPolicy);
- ``precision: bf16`` → ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``:
  fp32 sharded parameters and optimizer state, bf16 compute, fp32 gradient
  reduction.

The optimizer is built on the sharded (DTensor) parameters: its state is
sharded like them, hooks fold each micro-step's reduce-scattered shard, and
factored AdaFactor sums its column statistics across ranks once per update.
FSDP2's ``set_requires_gradient_sync(False)`` is not used: it would keep the
whole unsharded gradient (4 B/param, not divided by the ranks) for the cycle
and hand the optimizer one summed gradient, whose square is not the mean of
the micro-batch squares; one reduce-scatter per micro-step costs the same
traffic as FSDP2's default.

Checkpoints: ``torch.distributed.checkpoint`` (each rank writes its shards;
loading reshards, so a run can resume on another number of ranks) plus
accelerate's RNG and scheduler state.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import RecipeError
from .base import Engine, drop_tied_aliases

DCP_DIR = "sharded"


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() == "true"


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, recipe, source) -> None:
        super().__init__(recipe, source)
        if recipe.model.compile:
            raise RecipeError(source, "model.compile", "true under FSDP2: compiling a sharded model needs "
                              "per-block compilation, which leantrain does not do yet; use the ddp engine or "
                              "model.compile: false")
        self.reshard_after_forward = _flag("FSDP_RESHARD_AFTER_FORWARD", "true")
        self.offload_params = _flag("FSDP_OFFLOAD_PARAMS")
        self.wrap_classes = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
        if _flag("FSDP_ACTIVATION_CHECKPOINTING"):
            raise RecipeError("accelerate config", "fsdp_config.fsdp_activation_checkpointing",
                              "true: use the recipe's model.gradient_checkpointing: true instead (non-reentrant, "
                              "which fused accumulation needs)")
        # leantrain shards the model itself; accelerate must not try to (it would on GPUs).
        os.environ.pop("ACCELERATE_USE_FSDP", None)

    def prepare(self, model, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        acc = self.accelerator
        model = model.to(acc.device)
        mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        kwargs = {
            "mesh": mesh,
            "reshard_after_forward": self.reshard_after_forward,
            "offload_policy": CPUOffloadPolicy() if self.offload_params else OffloadPolicy(),
        }
        if self.recipe.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        blocks = self._blocks(model)
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self._model = model
        self.optimizer = make_optimizer(model)
        return model, self.optimizer

    def _blocks(self, model) -> list[torch.nn.Module]:
        names = set(self.wrap_classes or getattr(model, "_no_split_modules", None) or [])
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if self.wrap_classes and not blocks:
            raise RecipeError("accelerate config", "fsdp_config.fsdp_transformer_layer_cls_to_wrap",
                              f"{sorted(names)} match no module of {type(model).__name__}")
        return blocks

    def unwrap(self, model):
        return model

    def save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._sync_optimizer()
        self._init_state()
        model_state, optimizer_state = get_state_dict(self._model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(Path(directory) / DCP_DIR))
        self.accelerator.save_state(directory)  # RNG states and the registered scheduler (no model is registered)

    def load(self, directory: str, trainer_state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        self._init_state()
        model_state, optimizer_state = get_state_dict(self._model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR))  # reshards to this run's ranks
        set_state_dict(self._model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.accelerator.load_state(directory)

    def _init_state(self) -> None:
        # torch's checkpoint helpers would otherwise create the state with a zero-gradient step().
        inner = self.inner_optimizer
        if hasattr(inner, "init_all_state"):
            inner.init_all_state()

    def full_state_dict(self, model) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return drop_tied_aliases(model, state) if self.accelerator.is_main_process else None
