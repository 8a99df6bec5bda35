"""Packaging: import names under leantrain., optim depends on torch only."""

from __future__ import annotations

import subprocess
import sys


def test_optim_imports_without_the_training_stack():
    code = (
        "import sys, leantrain.optim\n"
        "heavy = {'accelerate', 'transformers', 'datasets', 'deepspeed', 'wandb'}\n"
        "loaded = sorted(heavy & {m.split('.')[0] for m in sys.modules})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    from leantrain import optim

    for name in ("SGD", "AdamW", "AdaFactor", "AdaX", "Lookahead", "EMA", "PiecewiseLinearLR", "state_bytes"):
        assert hasattr(optim, name)
    assert issubclass(optim.Lookahead, __import__("torch").optim.Optimizer)
