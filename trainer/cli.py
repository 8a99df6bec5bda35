"""The ``leantrain`` console script: train, validate, estimate.

Bad input ends with one line on stderr naming the file, the key and what is
allowed, and exit code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import RecipeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leantrain", description="Memory-lean training of Hugging Face models.")
    sub = parser.add_subparsers(dest="command")
    for name, text in (("train", "train a recipe (default: the built-in quickstart)"),
                       ("validate", "check a recipe without loading a model"),
                       ("estimate", "bytes of parameters, gradients, optimizer state and buffers, per rank")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("recipe", nargs="?", default=None, help="recipe YAML, or a shipped recipe name (quickstart)")
        cmd.add_argument("overrides", nargs="*", help="section.key=value, e.g. optimizer.lr=3e-4 accumulation.steps=16")
    return parser


def _split_recipe_and_overrides(args) -> tuple[str | None, list[str]]:
    """``leantrain train optimizer.lr=1e-3`` means the default recipe with an override."""
    if args.recipe is not None and "=" in args.recipe:
        return None, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "train"
    if args.command is None:
        args.recipe, args.overrides = None, []
    name, overrides = _split_recipe_and_overrides(args)
    from .recipe import load_recipe

    recipe, source = load_recipe(name, overrides)
    if command == "validate":
        from .optimizers import check_combinations

        check_combinations(recipe, source)
        print(f"{source}: valid")
        return 0
    if command == "estimate":
        from .estimate import estimate_recipe, format_table
        from .optimizers import check_combinations

        check_combinations(recipe, source)
        print(format_table(estimate_recipe(recipe, source)))
        return 0
    from .loop import train

    result = train(recipe, source)
    return 0 if result else 1


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except RecipeError as err:
        print(f"leantrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leantrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
