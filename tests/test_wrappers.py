"""Lookahead and EMA: against their equations, with torch's and our optimizers."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import assert_close_lists, clone_params, grad_stream, make_params, run_micro_steps

from leantrain import optim


def _lookahead_reference(params, stream, *, lr, k, alpha, accum):
    """Plain SGD fast weights on mean gradients; every k updates φ ← φ + α(θ − φ), θ ← φ."""
    fast = [p.detach().clone() for p in params]
    slow = [p.detach().clone() for p in params]
    mean = [torch.zeros_like(p) for p in fast]
    updates = 0
    for s, grads in enumerate(stream):
        mean = [m + g / accum for m, g in zip(mean, grads)]
        if (s + 1) % accum:
            continue
        fast = [f - lr * m for f, m in zip(fast, mean)]
        mean = [torch.zeros_like(p) for p in fast]
        updates += 1
        if updates % k == 0:
            slow = [sl + alpha * (f - sl) for sl, f in zip(slow, fast)]
            fast = [sl.clone() for sl in slow]
    return fast


@pytest.mark.parametrize("base_kind", ["torch", "leantrain"])
def test_lookahead_follows_its_equations_counting_updates(base_kind):
    accum = 1 if base_kind == "torch" else 4
    stream = grad_stream(14 * accum)
    params = make_params()
    expected = _lookahead_reference(params, stream, lr=0.1, k=3, alpha=0.5, accum=accum)
    base = torch.optim.SGD(params, lr=0.1) if base_kind == "torch" else optim.SGD(params, lr=0.1, accum_steps=accum)
    opt = optim.Lookahead(base, k=3, alpha=0.5)
    run_micro_steps(opt, params, stream)
    assert opt.param_groups[0]["lookahead_updates"] == 14
    assert_close_lists(params, expected, rtol=1e-6, atol=1e-6)


def test_lookahead_checkpoint_through_the_wrapped_optimizer_resumes_exactly():
    stream = grad_stream(30)
    params = make_params()
    opt = optim.Lookahead(optim.AdamW(params, lr=0.05, accum_steps=2), k=3)
    run_micro_steps(opt, params, stream[:13])  # mid-cycle, between synchronisations
    buffer = io.BytesIO()
    torch.save(opt.base.state_dict(), buffer)  # the base alone carries Lookahead's state
    buffer.seek(0)

    resumed_params = clone_params(params)
    resumed = optim.Lookahead(optim.AdamW(resumed_params, lr=0.05, accum_steps=2), k=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run_micro_steps(opt, params, stream[13:])
    run_micro_steps(resumed, resumed_params, stream[13:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_ema_is_the_bias_corrected_average_of_updated_weights():
    stream = grad_stream(12)
    params = make_params()
    decay = 0.8
    opt = optim.EMA(optim.AdamW(params, lr=0.05, accum_steps=3), decay=decay)
    history = []
    for s, grads in enumerate(stream):
        run_micro_steps(opt, params, [grads])
        if (s + 1) % 3 == 0:
            history.append([p.detach().clone() for p in params])
    n = len(history)
    for i, p in enumerate(params):
        weighted = sum((1 - decay) * decay ** (n - 1 - u) * h[i] for u, h in enumerate(history))
        torch.testing.assert_close(opt.averaged(p), weighted / (1 - decay**n), rtol=1e-6, atol=1e-6)


def test_ema_context_manager_swaps_in_averages_and_restores_exactly():
    model = torch.nn.Linear(4, 2)
    opt = optim.EMA(torch.optim.AdamW(model.parameters(), lr=0.1), decay=0.5)
    x = torch.randn(8, 4)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    trained = [p.detach().clone() for p in model.parameters()]
    with opt.averaged_weights():
        for p in model.parameters():
            torch.testing.assert_close(p.detach(), opt.averaged(p))
            assert not torch.equal(p.detach(), trained[0]) or p.shape != trained[0].shape
    for p, t in zip(model.parameters(), trained):
        assert torch.equal(p.detach(), t)


def test_wrappers_compose_and_keep_torch_optimizers_working():
    model = torch.nn.Linear(4, 2)
    opt = optim.EMA(optim.Lookahead(torch.optim.AdamW(model.parameters(), lr=0.1), k=2), decay=0.9)
    x = torch.randn(8, 4)
    for _ in range(5):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[model.weight]
    assert {"step", "exp_avg", "exp_avg_sq", "lookahead_slow", "ema_weights"} <= set(state)
    assert opt.updated and opt.accum_steps == 1


def test_wrapper_shares_groups_with_the_scheduler_and_new_groups():
    params = make_params()
    base = optim.AdamW(params[:2], lr=0.1)
    opt = optim.Lookahead(base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 0.5)
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.add_param_group({"params": params[2:]})
    assert len(base.param_groups) == 2 and base.param_groups[1]["lookahead_updates"] == 0
    del sched
