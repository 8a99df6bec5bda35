"""The ``leantrain`` console script: train, validate, estimate.

Exit codes (README): 0 done; 2 bad input (recipe, data, checkpoint,
environment: one line on stderr naming the file, the key and what is
allowed, never a traceback); 3 diverged (one line with the update and the
last good checkpoint); 143 preempted by SIGTERM/SIGUSR1 after writing a
checkpoint (requeue and run the same command); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import EXIT_PREEMPTED, Diverged, RecipeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantrain", description="Memory-lean training of Hugging Face models.")
    sub = parser.add_subparsers(dest="command")
    for name, text in (("train", "train a recipe (default: the built-in quickstart)"),
                       ("validate", "check a recipe without loading a model"),
                       ("estimate", "bytes of parameters, gradients, optimizer state and buffers, per rank")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("recipe", nargs="?", default=None, help="recipe YAML, or a shipped recipe name (quickstart)")
        cmd.add_argument("overrides", nargs="*", help="section.key=value, e.g. optimizer.lr=3e-4 accumulation.steps=16")
        if name == "estimate":
            from .estimate import ENGINES, LAUNCH_ENGINE_NAMES

            cmd.add_argument("--engine", default="ddp", choices=ENGINES + tuple(LAUNCH_ENGINE_NAMES),
                             help="how the state is laid out (default ddp; leantrain launch's names work too)")
            cmd.add_argument("--ranks", type=_positive, default=1, help="number of processes (default 1)")
    from leantrain.launch.cli import add_arguments

    launch = sub.add_parser("launch", help="run a recipe under accelerate/torchrun or submit it to SLURM",
                            description="run a recipe under accelerate/torchrun or submit it to SLURM")
    add_arguments(launch)
    return parser


def _positive(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def _split_recipe_and_overrides(args) -> tuple[str | None, list[str]]:
    """``leantrain train optimizer.lr=1e-3`` means the default recipe with an override."""
    if args.recipe is not None and "=" in args.recipe:
        return None, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "train"
    if command == "launch":
        from leantrain.launch.cli import main as launch

        return launch(args)
    if args.command is None:
        args.recipe, args.overrides = None, []
    name, overrides = _split_recipe_and_overrides(args)
    from .recipe import load_recipe

    recipe, source = load_recipe(name, overrides)
    if command == "validate":
        from .optimizers import check_combinations
        from .validation import validate_recipe

        check_combinations(recipe, source)
        for note in validate_recipe(recipe, source):
            print(f"leantrain: {note}")
        print(f"{source}: valid")
        return 0
    if command == "estimate":
        from .estimate import estimate_recipe, format_table
        from .optimizers import check_combinations

        from .model import loading_errors
        from .validation import require_config

        check_combinations(recipe, source)
        require_config(recipe, source)
        from .estimate import LAUNCH_ENGINE_NAMES

        engine = LAUNCH_ENGINE_NAMES.get(args.engine, args.engine)
        with loading_errors(source, "model.name_or_path", "the model config"):
            estimates = estimate_recipe(recipe, source, engine=engine, ranks=args.ranks)
        print(format_table(estimates, engine=engine, ranks=args.ranks))
        return 0
    from .loop import train

    result = train(recipe, source)
    if result.get("signal"):
        return EXIT_PREEMPTED  # checkpoint written: a requeue script resumes with the same command
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (RecipeError, Diverged) as err:
        # Under a launcher every rank meets the same error: rank 0 says it at once, the others wait a
        # moment (torchrun ends them when rank 0 exits), so the line appears once; an error met by one
        # rank alone is still printed. The launcher reports the ranks' exit code and returns its own
        # failure code (1 for torchrun).
        if int(os.environ.get("RANK", "0") or 0) > 0:
            time.sleep(3)
        kind = "diverged" if isinstance(err, Diverged) else "error"
        print(f"leantrain: {kind}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("leantrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
