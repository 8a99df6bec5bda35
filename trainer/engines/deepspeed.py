"""DeepSpeed ZeRO 1/2/3 through accelerate, leantrain's optimizer as ZeRO's client.

What the trainer sets in DeepSpeed's config, whatever the JSON says (printed at
start-up):

- ``gradient_accumulation_steps``: 1 with embedded accumulation (leantrain
  counts micro-steps; DeepSpeed reduces each micro-step's gradients and calls
  the optimizer after every micro-batch), k in ``standard`` mode (DeepSpeed
  accumulates and steps at the boundary, with its own loss scaling turned off:
  the loop already weights each micro-batch);
- ``gradient_clipping``: the recipe's ``optimizer.max_grad_norm`` in standard
  mode, 0 otherwise (DeepSpeed's default of 1.0 would clip every micro-batch);
- ``zero_allow_untested_optimizer: true`` and ``zero_force_ds_cpu_optimizer:
  false`` (optimizer-state offload runs leantrain's optimizer on the CPU
  partitions);
- ``train_micro_batch_size_per_gpu`` / ``train_batch_size`` from the recipe.

The optimizer is wrapped in ``leantrain.optim.ZeroClient`` so that ZeRO's
per-group ``step()`` calls advance the cycle once per micro-batch at every
stage. Refused with one line: fused accumulation (DeepSpeed owns the
gradients' partitioning), Lookahead/EMA (whole-parameter copies of
partitioned weights), ``max_update_rms`` (a partition mixes tensors). AdaFactor
warns that it runs unfactored on flat partitions.

Checkpoints are DeepSpeed's (each rank its partition). A checkpoint resumes
on the number of ranks that wrote it: DeepSpeed's universal-checkpoint
conversion carries Adam's moments, not leantrain's cycle state.
"""

from __future__ import annotations

from ..errors import RecipeError
from .base import Engine, drop_tied_aliases


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, recipe, source) -> None:
        super().__init__(recipe, source)
        if recipe.model.compile:
            raise RecipeError(source, "model.compile", "true under DeepSpeed: compiling a sharded model needs "
                              "per-block compilation, which leantrain does not do yet; use the ddp engine or "
                              "model.compile: false")
        if recipe.accumulation.fused:
            raise RecipeError(source, "accumulation.fused", "true under DeepSpeed ZeRO: DeepSpeed reduces and "
                              "partitions the gradients itself, so hooks cannot fold them; use fused: false (ZeRO-2/3 "
                              "already keep only a gradient partition) or FSDP2 (launch/accelerate/fsdp2.yaml)")
        if recipe.optimizer.lookahead or recipe.optimizer.ema:
            raise RecipeError(source, "optimizer.lookahead" if recipe.optimizer.lookahead else "optimizer.ema",
                              "not supported under DeepSpeed ZeRO: it keeps whole-parameter copies of weights ZeRO "
                              "partitions; use DDP or FSDP2")

    def accelerator_kwargs(self) -> dict:
        import torch
        from accelerate.utils import InitProcessGroupKwargs

        if torch.accelerator.is_available():
            return {}
        # accelerate's DeepSpeed path runs on DeepSpeed's CPU accelerator too, but finds no backend there and
        # would count one process per rank (every rank "main", unsharded data): name gloo explicitly.
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}

    def attach(self, accelerator) -> None:
        super().attach(accelerator)
        plugin = accelerator.state.deepspeed_plugin
        self.stage = int(plugin.zero_stage)
        self.name = f"deepspeed-zero{self.stage}"
        r = self.recipe
        ga = 1 if self.embedded else r.accumulation.steps
        config = plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = r.data.micro_batch_size
        config["gradient_accumulation_steps"] = ga
        config["train_batch_size"] = r.data.micro_batch_size * ga * accelerator.num_processes
        config["gradient_clipping"] = (r.optimizer.max_grad_norm or 0.0) if not self.embedded else 0.0
        config["zero_allow_untested_optimizer"] = True
        config["zero_force_ds_cpu_optimizer"] = False
        config["steps_per_print"] = 10**9  # no DeepSpeed progress lines between leantrain's
        self.settings = {k: config[k] for k in ("gradient_accumulation_steps", "gradient_clipping",
                                                "train_micro_batch_size_per_gpu")}

    def prepare(self, model, make_optimizer):
        from leantrain import optim

        self.optimizer = make_optimizer(model)
        client = self.optimizer
        if isinstance(optim.fused.innermost_optimizer(self.optimizer), optim._accumulating.AccumulatingOptimizer):
            try:
                client = optim.ZeroClient(self.optimizer)
            except ValueError as err:
                raise RecipeError(self.source, "optimizer", str(err)) from None
        model, stepper = self.accelerator.prepare(model, client)
        if client is not self.optimizer:
            client.bind(self.accelerator.deepspeed_engine_wrapped.engine.optimizer)
        return model, stepper

    def micro_step(self, model, *, last_of_cycle: bool):
        # accelerate tells DeepSpeed where the boundary is; in standard mode that is the cycle's end.
        self.accelerator.gradient_state._set_sync_gradients(last_of_cycle or self.embedded)
        return super().micro_step(model, last_of_cycle=last_of_cycle)

    def backward(self, loss, *, last_of_cycle: bool) -> None:
        self.accelerator.backward(loss, scale_wrt_gas=False)  # the loop weights micro-batches itself

    def clip_grad_norm_(self, model, max_norm: float) -> None:
        pass  # DeepSpeed clips inside its step (gradient_clipping above)

    def load(self, directory: str, trainer_state: dict) -> None:
        saved = trainer_state.get("world_size", self.accelerator.num_processes)
        if saved != self.accelerator.num_processes:
            raise RecipeError(self.source, "checkpointing.resume", f"{directory} was written by {saved} DeepSpeed "
                              f"ranks and this run has {self.accelerator.num_processes}: resume it with {saved} ranks "
                              "(DeepSpeed's universal-checkpoint conversion carries Adam's moments, not leantrain's "
                              "cycle state); FSDP2 checkpoints reshard")
        super().load(directory, trainer_state)

    def full_state_dict(self, model) -> dict | None:
        state = self.accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions
        return drop_tied_aliases(self.unwrap(model), state) if self.accelerator.is_main_process else None

    def trained_tensors(self) -> list:
        zero = self.accelerator.deepspeed_engine_wrapped.engine.optimizer
        # ZeRO-3 puts a sub-group's partition into the client's param_groups only during its step().
        return list(getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)

    def info(self) -> dict:
        inner = self.inner_optimizer
        if self.stage == 3 and hasattr(inner, "_state_for"):
            zero = self.accelerator.deepspeed_engine_wrapped.engine.optimizer
            for sub_group, flat in enumerate(zero.fp32_partitioned_groups_flat):
                inner._state_for(inner.param_groups[zero.sub_group_to_group_id[sub_group]], flat)  # as the first step would
        return {**super().info(), "zero_stage": self.stage, "deepspeed": self.settings}
