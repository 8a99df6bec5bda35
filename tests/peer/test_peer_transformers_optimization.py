"""Rewritten from huggingface/transformers tests/optimization/test_optimization.py
(OptimizationTest::test_adafactor, OptimizationTest::test_adam_w, ScheduleInitTest::test_schedulers)
and tests/trainer/test_trainer.py::TrainerIntegrationTest::test_adafactor_lr_none (Adafactor with
lr=None driven through transformers.optimization.AdafactorSchedule).

leantrain.optim.AdaFactor/AdamW take the place of transformers' Adafactor / the AdamW those tests
use; besides the tests' own assertions, each run is compared step by step with the optimizer it
replaces. test_adafactor_lr_none's Trainer is replaced by the loop it runs (clip grad norm 1.0,
optimizer.step, lr_scheduler.step, zero_grad): importing Trainer alone costs several seconds.
"""

from __future__ import annotations

import io

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor
from transformers.optimization import (
    AdafactorSchedule,
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_cosine_with_hard_restarts_schedule_with_warmup,
    get_inverse_sqrt_schedule,
    get_linear_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
)

from leantrain import optim as lt

TARGET = [0.4, 0.2, -0.5]


def _fit(opt_cls, steps, **kwargs):
    w = torch.tensor([0.1, -0.2, -0.1], requires_grad=True)
    target = torch.tensor(TARGET)
    criterion = torch.nn.MSELoss()
    opt = opt_cls(params=[w], **kwargs)
    trajectory = []
    for _ in range(steps):
        loss = criterion(w, target)
        loss.backward()
        opt.step()
        w.grad.detach_()  # no zero_grad() on a plain tensor: done by hand, as the original does
        w.grad.zero_()
        trajectory.append(w.detach().clone())
    return w, trajectory


def test_adafactor():
    kwargs = dict(lr=1e-2, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                  relative_step=False, scale_parameter=False, warmup_init=False)
    w, ours = _fit(lt.AdaFactor, 1000, **kwargs)
    for got, want in zip(w.tolist(), TARGET):
        assert got == pytest.approx(want, abs=1e-2)
    _, theirs = _fit(HFAdafactor, 1000, **kwargs)
    for step in (0, 9, 99, 999):
        torch.testing.assert_close(ours[step], theirs[step], rtol=1e-5, atol=1e-6)


def test_adam_w():
    w, ours = _fit(lt.AdamW, 100, lr=2e-1, weight_decay=0.0)
    for got, want in zip(w.tolist(), TARGET):
        assert got == pytest.approx(want, abs=1e-2)
    _, theirs = _fit(torch.optim.AdamW, 100, lr=2e-1, weight_decay=0.0)
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ ScheduleInitTest
NUM_STEPS = 10
COMMON = {"num_warmup_steps": 2, "num_training_steps": 10}
SCHEDULES = [
    (get_constant_schedule, {}, [10.0] * NUM_STEPS),
    (get_constant_schedule_with_warmup, {"num_warmup_steps": 4}, [0.0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0]),
    (get_linear_schedule_with_warmup, COMMON, [0.0, 5.0, 10.0, 8.75, 7.5, 6.25, 5.0, 3.75, 2.5, 1.25]),
    (get_cosine_schedule_with_warmup, COMMON, [0.0, 5.0, 10.0, 9.61, 8.53, 6.91, 5.0, 3.08, 1.46, 0.38]),
    (get_cosine_with_hard_restarts_schedule_with_warmup, {**COMMON, "num_cycles": 2},
     [0.0, 5.0, 10.0, 8.53, 5.0, 1.46, 10.0, 8.53, 5.0, 1.46]),
    (get_polynomial_decay_schedule_with_warmup, {**COMMON, "power": 2.0, "lr_end": 1e-7},
     [0.0, 5.0, 10.0, 7.656, 5.625, 3.906, 2.5, 1.406, 0.625, 0.156]),
    (get_inverse_sqrt_schedule, {"num_warmup_steps": 2}, [0.0, 5.0, 10.0, 8.165, 7.071, 6.325, 5.774, 5.345, 5.0, 4.714]),
]


def _unwrap(scheduler, reload_at=None):
    lrs = []
    for step in range(NUM_STEPS):
        lrs.append(scheduler.get_last_lr()[0])
        scheduler.step()
        if step == reload_at:
            buffer = io.BytesIO()
            torch.save(scheduler.state_dict(), buffer)
            buffer.seek(0)
            scheduler.load_state_dict(torch.load(buffer, weights_only=False))
    return lrs


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
@pytest.mark.parametrize("cls", [lt.AdamW, lt.SGD, lt.AdaX], ids=lambda c: c.__name__)
@pytest.mark.parametrize("schedule, kwargs, expected", SCHEDULES, ids=[s[0].__name__ for s in SCHEDULES])
def test_schedulers(cls, schedule, kwargs, expected):
    model = torch.nn.Linear(50, 50)
    optimizer = cls(model.parameters(), lr=10.0)
    scheduler = schedule(optimizer, **kwargs)
    assert len(scheduler.get_last_lr()) == 1
    lrs = _unwrap(scheduler)
    assert lrs == pytest.approx(expected, abs=1e-2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduler.get_last_lr()[0])
    optimizer = cls(model.parameters(), lr=10.0)
    assert _unwrap(schedule(optimizer, **kwargs), reload_at=NUM_STEPS // 2) == lrs


# ------------------------------------------------------------------ test_adafactor_lr_none
def _regression_data(n=64, seed=42):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    y = 2.0 * x + 3.0 + 0.1 * torch.randn(n, generator=gen)
    return x, y


def _train_regression(opt_cls, epochs=3, batch_size=8):
    a = torch.nn.Parameter(torch.tensor(0.0))
    b = torch.nn.Parameter(torch.tensor(0.0))
    optimizer = opt_cls([a, b], scale_parameter=True, relative_step=True, warmup_init=True, lr=None)
    scheduler = AdafactorSchedule(optimizer)
    x, y = _regression_data()
    order = torch.Generator().manual_seed(0)
    history = []
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=order).split(batch_size):
            loss = torch.nn.functional.mse_loss(a * x[idx] + b, y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_([a, b], 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            history.append((a.item(), b.item(), scheduler.get_last_lr()[0]))
    return optimizer, history


def test_adafactor_lr_none_with_adafactor_schedule():
    optimizer, ours = _train_regression(lt.AdaFactor)
    _, theirs = _train_regression(HFAdafactor)
    assert len(ours) == 24
    a, b, _ = ours[-1]
    assert a != 0.0 and b != 0.0  # the parameters moved
    assert optimizer.state_dict()["param_groups"][0]["lr"] > 0  # the schedule wrote the applied lr back
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        assert mine == pytest.approx(ref, rel=1e-5, abs=1e-12), f"step {step}: (a, b, lr) {mine} vs {ref}"
