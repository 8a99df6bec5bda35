"""Distributed engines: how the loop prepares, steps and checkpoints under each one.

The engine comes from the accelerate config the run was launched with
(``accelerate launch --config_file launch/accelerate/<engine>.yaml``; a plain
``torchrun`` or a single process means DDP). One module per engine keeps the
loop free of ``if fsdp / if deepspeed``:

- ``ddp``: accelerate's DDP; with embedded accumulation every micro-step runs
  under ``no_sync`` and the optimizer's replicated state is averaged once per
  update (``replicated_over``).
- ``fsdp2``: torch's ``fully_shard`` per transformer block and root, applied by
  leantrain from the config's ``fsdp_*`` keys (accelerate enables FSDP only on
  accelerators; this path is the same on CPU and GPU), checkpoints through
  ``torch.distributed.checkpoint`` (sharded, reshardable to another rank count).
- ``deepspeed``: accelerate's DeepSpeed integration with leantrain's optimizer
  as ZeRO client (``ZeroClient``), DeepSpeed's accumulation 1 and clipping off
  unless standard mode asks for them, DeepSpeed's checkpoints.

A requested engine that cannot run ends the run with one line and exit 2.
"""

from __future__ import annotations

import os

from ..errors import RecipeError
from ..schema import Recipe
from .base import Engine

ACCELERATE_CONFIG = "accelerate config"


def requested_engine() -> str:
    """``ddp``, ``fsdp2`` or ``deepspeed``, from the environment ``accelerate launch`` sets."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp2"
    return "ddp"


def build_engine(recipe: Recipe, source: str) -> Engine:
    name = requested_engine()
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError(ACCELERATE_CONFIG, "distributed_type", "DEEPSPEED is requested but the deepspeed "
                              "package is not installed: pip install -e '.[deepspeed]'") from None
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(recipe, source)
    if name == "fsdp2":
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise RecipeError(ACCELERATE_CONFIG, "fsdp_config.fsdp_version", f"{version}: leantrain runs FSDP2 "
                              "(fully_shard) only; set fsdp_version: 2 (launch/accelerate/fsdp2.yaml)")
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(recipe, source)
    from .ddp import DDPEngine

    return DDPEngine(recipe, source)


__all__ = ["Engine", "build_engine", "requested_engine"]
