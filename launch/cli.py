"""``leantrain launch``: checks, then runs, submits or prints the launch of a recipe.

Every refusal is one line and exit 2, before anything starts: an unknown
target or engine, a missing recipe or config, more processes than this
machine has devices, an engine whose package is not installed, SLURM
without ``sbatch`` (unless ``--dry-run``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from leantrain.trainer.errors import RecipeError

from . import ENGINES, config_path
from .commands import Plan, accelerate_command, local_command, run, shell, torchrun_command, torchrun_environment
from .slurm import SlurmJob, render

TARGETS = ("local", "torchrun", "accelerate", "slurm")
WHERE = "leantrain launch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, or a shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for train")
    parser.add_argument("--target", default="local", help=f"where to run: {', '.join(TARGETS)} (default local)")
    parser.add_argument("--engine", default="ddp", help=f"{', '.join(ENGINES)} (default ddp)")
    parser.add_argument("--nodes", type=int, default=1, help="machines (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="processes per machine (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the command or script instead of running it")
    parser.add_argument("--main-address", default="127.0.0.1", help="rendezvous host (accelerate, torchrun)")
    parser.add_argument("--main-port", type=int, default=29500)
    parser.add_argument("--machine-rank", default="0", help="this machine's rank (accelerate, torchrun; N > 1)")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--time", default="04:00:00", help="time limit, HH:MM:SS (default 04:00:00)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--job-name")
    slurm.add_argument("--signal-lead", type=int, default=300,
                       help="seconds before the time limit to checkpoint and requeue (default 300)")
    slurm.add_argument("--container", help="image to run in (pyxis/enroot image, or an apptainer .sif)")
    slurm.add_argument("--container-runtime", default="pyxis", help="pyxis or apptainer (default pyxis)")
    slurm.add_argument("--script", help="where to write the batch script (default OUTPUT_DIR/launch.sbatch)")


def main(args: argparse.Namespace) -> int:
    _check_choice("--target", args.target, TARGETS)
    _check_choice("--engine", args.engine, ENGINES)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise RecipeError(WHERE, flag, f"{value}: expected an integer >= 1")
    if not config_path(args.engine).is_file():
        raise RecipeError(WHERE, "--engine", f"{args.engine}: its config {config_path(args.engine)} is missing")
    from leantrain.trainer.recipe import load_recipe

    recipe, _ = load_recipe(args.recipe, list(args.overrides))  # a bad recipe stops here, not on the nodes
    # The recipe as the user named it: a path relative to where the job starts, or a shipped recipe's name.
    plan = Plan(args.recipe, tuple(args.overrides), args.target, args.engine, args.nodes, args.gpus_per_node,
                args.main_address, args.main_port, args.machine_rank)
    if args.target == "slurm":
        return _slurm(args, plan, recipe)
    if args.target != "local" and args.nodes > 1 and not args.dry_run and args.machine_rank == "0":
        print(f"leantrain: run this on every machine with --machine-rank 0..{args.nodes - 1} "
              f"(this one: 0), all pointing to --main-address {args.main_address}")
    if args.target == "local" and args.nodes > 1:
        raise RecipeError(WHERE, "--nodes", f"{args.nodes}: target local is this machine; use --target slurm, or "
                          "--target accelerate/torchrun on every machine")
    if args.nodes == 1:
        _check_devices(args.gpus_per_node)
    if args.engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(WHERE, "--engine", f"{args.engine} needs DeepSpeed, which is not installed: "
                          "pip install -e '.[deepspeed]'")
    env = {}
    if args.target == "torchrun":
        cmd, env = torchrun_command(plan), torchrun_environment(args.engine)
    elif args.target == "accelerate":
        cmd = accelerate_command(plan)
    else:
        cmd = local_command(plan)
    if args.dry_run:
        print(shell(cmd, env))
        return 0
    return run(cmd, env)


def _check_choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RecipeError(WHERE, flag, f"unknown {value!r}; allowed: {', '.join(allowed)}")


def _check_devices(processes: int) -> None:
    """One machine cannot run more ranks than it has GPUs (or, without GPUs, CPU cores)."""
    import torch

    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPU(s)"
    else:
        have, what = os.cpu_count() or 1, "CPU core(s) and no GPU"
    if processes > have:
        raise RecipeError(WHERE, "--gpus-per-node", f"{processes} processes, but this machine has {have} {what}")


def _slurm(args: argparse.Namespace, plan: Plan, recipe) -> int:
    if args.container_runtime not in ("pyxis", "apptainer"):
        raise RecipeError(WHERE, "--container-runtime", f"unknown {args.container_runtime!r}; allowed: pyxis, apptainer")
    if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", args.time):
        raise RecipeError(WHERE, "--time", f"{args.time!r}: expected HH:MM:SS or D-HH:MM:SS")
    name = args.job_name or f"leantrain-{Path(plan.recipe).stem}"
    job = SlurmJob(plan.recipe, plan.overrides, args.engine, args.nodes, args.gpus_per_node, args.time, name,
                   args.partition, args.account, args.signal_lead, recipe.output_dir, args.container,
                   args.container_runtime, args.main_port)
    script = render(job)
    if args.dry_run:
        print(script, end="")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RecipeError(WHERE, "--target", "slurm: sbatch is not on PATH (run on a login node, or add --dry-run "
                          "to print the script)")
    path = Path(args.script or Path(recipe.output_dir) / "launch.sbatch")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    Path(recipe.output_dir).mkdir(parents=True, exist_ok=True)
    print(f"leantrain: wrote {path}")
    return subprocess.call([sbatch, str(path)])
