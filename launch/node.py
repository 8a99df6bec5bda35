"""``python -m leantrain.launch.node``: one machine's launcher, resolved where it runs.

The SLURM script runs this on every node (inside the container, when there
is one), so the shipped configs are found in the environment that will use
them; it then becomes ``accelerate launch`` with this node's rank.
"""

from __future__ import annotations

import argparse
import os
import sys

from .commands import Plan, accelerate_command


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leantrain.launch.node")
    parser.add_argument("--engine", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--machine-rank", required=True)
    parser.add_argument("--main-address", required=True)
    parser.add_argument("--main-port", type=int, required=True)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    plan = Plan(args.recipe, tuple(args.overrides), "slurm", args.engine, args.nodes, args.gpus_per_node,
                args.main_address, args.main_port, args.machine_rank)
    cmd = accelerate_command(plan)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)  # the launcher takes this process's place: signals reach it directly


if __name__ == "__main__":
    main()
