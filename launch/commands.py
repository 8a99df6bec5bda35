"""The commands that start a recipe under a launcher: accelerate, torchrun, or this process.

Every command runs ``python -m leantrain.trainer RECIPE overrides`` on each
process; what differs is who starts the processes and how they find each
other (``--main_process_ip/port`` for accelerate, a c10d rendezvous for
torchrun). Config paths are absolute (the installed package's copies), so the
command works from any directory.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from . import config_path, deepspeed_config_path

TRAINER = ["-m", "leantrain.trainer"]


@dataclass(frozen=True)
class Plan:
    """What to launch: where, on which engine, how many processes."""

    recipe: str
    overrides: tuple[str, ...]
    target: str  # local | torchrun | accelerate | slurm
    engine: str
    nodes: int
    gpus_per_node: int
    main_address: str = "127.0.0.1"
    main_port: int = 29500
    machine_rank: int | str = 0

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def trainer_args(self) -> list[str]:
        return [self.recipe, *self.overrides]


def accelerate_command(plan: Plan, *, python: str = sys.executable) -> list[str]:
    """``accelerate launch`` with the engine's shipped config and the plan's process counts."""
    cmd = [python, "-m", "accelerate.commands.launch", "--config_file", str(config_path(plan.engine)),
           "--num_machines", str(plan.nodes), "--num_processes", str(plan.processes),
           "--machine_rank", str(plan.machine_rank), "--main_process_ip", plan.main_address,
           "--main_process_port", str(plan.main_port)]
    if plan.engine.startswith("zero"):
        cmd += ["--deepspeed_config_file", str(deepspeed_config_path(plan.engine))]
    return cmd + TRAINER + plan.trainer_args


def torchrun_command(plan: Plan, *, python: str = sys.executable) -> list[str]:
    """``torchrun`` with a c10d rendezvous; the engine reaches the trainer as accelerate's environment."""
    return [python, "-m", "torch.distributed.run", "--nnodes", str(plan.nodes),
            "--nproc_per_node", str(plan.gpus_per_node), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{plan.main_address}:{plan.main_port}", "--rdzv_id", "leantrain",
            *TRAINER, *plan.trainer_args]


def torchrun_environment(engine: str) -> dict[str, str]:
    """The variables ``accelerate launch`` would set from the engine's config (torchrun sets none)."""
    if engine == "fsdp2":
        import yaml

        fsdp = yaml.safe_load(config_path(engine).read_text())["fsdp_config"]
        return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp["fsdp_version"]),
                "FSDP_RESHARD_AFTER_FORWARD": str(fsdp["fsdp_reshard_after_forward"]).lower(),
                "FSDP_OFFLOAD_PARAMS": str(fsdp["fsdp_offload_params"]).lower()}
    if engine.startswith("zero"):
        return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(deepspeed_config_path(engine)),
                "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}
    return {}


def local_command(plan: Plan, *, python: str = sys.executable) -> list[str]:
    """One process of ddp runs in place; anything else goes through accelerate on this machine."""
    if plan.processes == 1 and plan.engine == "ddp":
        return [python, *TRAINER, *plan.trainer_args]
    return accelerate_command(plan, python=python)


def shell(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """A command as one line a user can paste."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(part) for part in cmd)


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run the launcher in the foreground and return its exit code (signals reach it directly)."""
    import subprocess

    return subprocess.call(cmd, env={**os.environ, **(env or {})})
