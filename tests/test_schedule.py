"""PiecewiseLinearLR: linear between points, constant outside, counted in updates."""

from __future__ import annotations

import pytest
import torch
from helpers import make_params, run_micro_steps

from leantrain import optim


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
def test_piecewise_linear_values():
    opt = optim.SGD(make_params(), lr=2.0)
    sched = optim.PiecewiseLinearLR(opt, {10: 1.0, 0: 0.0, 20: 0.5})
    lrs = []
    for _ in range(26):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(2.0)
    assert lrs[15] == pytest.approx(1.5)
    assert lrs[20:] == pytest.approx([1.0] * 6)


def test_before_first_point_the_first_multiplier_holds():
    opt = optim.SGD(make_params(), lr=1.0)
    sched = optim.PiecewiseLinearLR(opt, {5: 0.5, 10: 1.0})
    assert sched.multiplier(0) == 0.5 and sched.multiplier(7) == pytest.approx(0.7)


def test_counts_updates_not_micro_steps_and_resumes():
    params = make_params()
    opt = optim.AdamW(params, lr=1.0, accum_steps=4)
    sched = optim.PiecewiseLinearLR(opt, {0: 0.0, 4: 1.0})
    stream = [[torch.randn(p.shape) for p in params] for _ in range(8)]
    for grads in stream:
        run_micro_steps(opt, params, [grads])
        if opt.updated:
            sched.step()
    assert sched.last_epoch == 2 and opt.param_groups[0]["lr"] == pytest.approx(0.5)
    fresh = optim.PiecewiseLinearLR(optim.AdamW(make_params(), lr=1.0), {0: 0.0, 4: 1.0})
    fresh.load_state_dict(sched.state_dict())
    fresh.step()
    assert fresh.get_last_lr() == pytest.approx([0.75])
