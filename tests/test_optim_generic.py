"""Registry-driven tests: every optimizer configuration in optim_registry.CASES."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import assert_close_lists, clone_params, grad_stream, make_params, run_micro_steps, set_grads
from optim_registry import CASES, EMBEDDING_CASES, ids

from leantrain import optim


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_state_dict_mid_cycle_resumes_identical_trajectory(case):
    """Saved at j=2 of k=4 and loaded into a fresh optimizer: bit-identical continuation."""
    stream = grad_stream(22)
    params = make_params()
    opt = case.build(params, accum_steps=4)
    run_micro_steps(opt, params, stream[:10])
    assert opt.micro_step % 4 == 2
    saved = _roundtrip(opt.state_dict())

    resumed_params = clone_params(params)
    resumed = case.build(resumed_params, accum_steps=4)
    resumed.load_state_dict(saved)
    assert resumed.micro_step == 10

    run_micro_steps(opt, params, stream[10:])
    run_micro_steps(resumed, resumed_params, stream[10:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_load_state_dict_keeps_state_dtypes(case):
    params = make_params()
    opt = case.build(params, accum_steps=2)
    run_micro_steps(opt, params, grad_stream(3))
    dtypes = {(i, k): v.dtype for i, p in enumerate(params) for k, v in opt.state[p].items()
              if isinstance(v, torch.Tensor)}
    fresh_params = clone_params(params)
    fresh = case.build(fresh_params, accum_steps=2)
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    loaded = {(i, k): v.dtype for i, p in enumerate(fresh_params) for k, v in fresh.state[p].items()
              if isinstance(v, torch.Tensor)}
    assert loaded == dtypes
    assert all(p.dtype == torch.float32 for p in fresh_params)


def test_bf16_momentum_survives_a_checkpoint():
    params = make_params()
    opt = optim.AdamW(params, momentum_dtype=torch.bfloat16, accum_steps=2)
    run_micro_steps(opt, params, grad_stream(2))
    fresh = optim.AdamW(clone_params(params), momentum_dtype=torch.bfloat16, accum_steps=2)
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in fresh.state.values())
    assert all(s["exp_avg_sq"].dtype == torch.float32 for s in fresh.state.values())


def _least_squares(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen)
    w_true = torch.randn(8, 3, generator=gen)
    return x, x @ w_true


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_converges_on_least_squares(case, k):
    x, y = _least_squares()
    # Random init: AdaFactor's relative step scales by RMS(θ), so zeros would barely move.
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, generator=gen).requires_grad_()
    b = (0.1 * torch.randn(3, generator=gen)).requires_grad_()
    opt = case.build([w, b], accum_steps=k)

    def loss_fn(rows):
        return ((x[rows] @ w + b - y[rows]) ** 2).mean()

    initial = loss_fn(slice(None)).item()
    for s in range(300 * k):
        rows = slice((s % 4) * 16, (s % 4 + 1) * 16)
        loss_fn(rows).backward()
        opt.step()
        opt.zero_grad()
    final = loss_fn(slice(None)).item()
    assert final < 0.2 * initial, f"loss {initial:.3f} -> {final:.3f}"


@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=ids(EMBEDDING_CASES))
def test_ema_mode_runs_and_differs_from_exact(case):
    stream = grad_stream(12)
    a, b = make_params(), make_params()
    run_micro_steps(case.build(a, accum_steps=4, accum_mode="exact"), a, stream)
    run_micro_steps(case.build(b, accum_steps=4, accum_mode="ema"), b, stream)
    assert all(torch.isfinite(p).all() for p in b)
    assert any(not torch.allclose(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=ids(EMBEDDING_CASES))
def test_k1_exact_and_ema_modes_are_identical(case):
    stream = grad_stream(6)
    a, b = make_params(), make_params()
    run_micro_steps(case.build(a, accum_mode="exact"), a, stream)
    run_micro_steps(case.build(b, accum_mode="ema"), b, stream)
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_updated_is_true_exactly_at_boundaries(case):
    params = make_params()
    opt = case.build(params, accum_steps=3)
    before = [p.detach().clone() for p in params]
    flags = []
    for grads in grad_stream(9):
        set_grads(params, grads)
        opt.step()
        flags.append(opt.updated)
        moved = any(not torch.equal(p, q) for p, q in zip(params, before))
        assert moved == opt.updated
        before = [p.detach().clone() for p in params]
    assert flags == [False, False, True] * 3


def test_parameter_without_gradient_for_a_cycle_is_skipped_like_torch():
    """A tensor with grad None for a whole cycle: no decay, no move, no step count (torch semantics)."""
    stream = grad_stream(12)
    ours, ref = make_params(), make_params()
    opt = optim.SGD(ours, lr=0.05, momentum=0.9, weight_decay=0.1, accum_steps=2)
    ref_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=0.1)
    for s, grads in enumerate(stream):
        skip = 2 <= s < 4  # cycle 1: tensor 1 gets no gradient
        for i, (p, q, g) in enumerate(zip(ours, ref, grads)):
            if skip and i == 1:
                continue
            p.grad = g.clone()
            q.grad = g / 2 if q.grad is None else q.grad + g / 2
        opt.step()
        opt.zero_grad()
        if s % 2 == 1:
            ref_opt.step()
            ref_opt.zero_grad()
    assert_close_lists(ours, ref, rtol=1e-6, atol=1e-6)
    assert opt.state[ours[1]]["step"] == 5 and opt.state[ours[0]]["step"] == 6


def test_torch_lr_scheduler_stepped_per_update_matches_torch():
    stream = grad_stream(24)
    ours, ref = make_params(), make_params()
    opt = optim.SGD(ours, lr=0.1, momentum=0.9, accum_steps=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    for s, grads in enumerate(stream):
        set_grads(ours, grads)
        opt.step()
        opt.zero_grad()
        if opt.updated:
            sched.step()
        for q, g in zip(ref, grads):
            q.grad = g / 3 if q.grad is None else q.grad + g / 3
        if (s + 1) % 3 == 0:
            ref_opt.step()
            ref_opt.zero_grad()
            ref_sched.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.1 * 0.5**4
    assert_close_lists(ours, ref, rtol=1e-6, atol=1e-6)


def test_closure_is_evaluated_with_grad_enabled():
    w = torch.ones(3, requires_grad=True)
    opt = optim.AdamW([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    assert opt.updated and not torch.equal(w, torch.ones(3))


def test_new_param_group_joins_the_current_cycle():
    a, b = make_params([(3,)]), make_params([(2,)], seed=5)
    opt = optim.AdamW(a, accum_steps=4)
    run_micro_steps(opt, a, grad_stream(2, [(3,)]))
    opt.add_param_group({"params": b})
    assert opt.param_groups[1]["micro_step"] == 2
    with pytest.raises(ValueError, match="accum_steps=2 differs"):
        opt.add_param_group({"params": make_params([(1,)]), "accum_steps": 2})
