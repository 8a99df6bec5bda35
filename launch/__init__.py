"""leantrain.launch: a recipe plus a cluster description into the command that runs it.

``leantrain launch RECIPE [overrides] --target local|torchrun|accelerate|slurm
--engine ddp|fsdp2|zero1|zero2|zero3 --nodes N --gpus-per-node G [--dry-run]``
builds the exact ``accelerate launch`` / ``torchrun`` command (or a SLURM batch
script) from the shipped engine configs (``launch/accelerate/*.yaml``) and runs
it, submits it or prints it.
"""

from importlib.resources import files
from pathlib import Path

ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def config_path(engine: str) -> Path:
    """The shipped accelerate config of ``engine`` (inside the installed package)."""
    return Path(str(files("leantrain.launch") / "accelerate" / f"{engine}.yaml"))


def deepspeed_config_path(engine: str) -> Path:
    """The DeepSpeed JSON a ZeRO config points to (absolute: accelerate resolves it from the cwd)."""
    return Path(str(files("leantrain.launch") / "accelerate" / "deepspeed" / f"{engine}.json"))
