"""``python -m leantrain.trainer RECIPE.yaml [key=value ...]`` (the same as ``leantrain train``)."""

import sys

from .cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in ("train", "validate", "estimate", "launch"):
        args = ["train", *args]
    sys.exit(main(args))
