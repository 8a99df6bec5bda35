"""The ``leantrain`` console script."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("leantrain: the trainer is not built yet; leantrain.optim is usable today.", file=sys.stderr)
    return 2
