"""Parameters with gradients in only some micro-steps of a cycle (a skipped branch, an unused
head): weight decay once per update, a missing micro-step counts as a zero gradient, a
parameter without any gradient in a cycle is untouched — against torch and transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_lists
from optim_registry import CASES, EMBEDDING_CASES, ids

from leantrain import optim

K = 4
SHAPES = [(5, 4), (4,), (3, 2, 5)]
# Which micro-steps of each cycle give each tensor a gradient: cycle 2 gives tensor 0 none at all.
PATTERN = {0: [(0, 1, 2, 3), (2,), (), (1, 3)], 1: [(0, 1, 2, 3)] * 4, 2: [(3,), (0, 2), (1,), (0, 1, 2, 3)]}


def _stream(dtype=torch.float32):
    gen = torch.Generator().manual_seed(3)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(K * 4)]


def _has_grad(tensor: int, step: int) -> bool:
    return step % K in PATTERN[tensor][step // K]


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _run_ours(opt, params, stream, *, zeros_for_missing: bool, fused: bool = False, start: int = 0):
    """step() per micro-step; a missing gradient is None (or an explicit zero when asked)."""
    handle = optim.fuse_into_backward(params, opt) if fused else None
    for s, grads in enumerate(stream, start):
        live = [i for i in range(len(params)) if _has_grad(i, s)]
        cycle_has = [any(_has_grad(i, c) for c in range(s - s % K, s - s % K + K)) for i in range(len(params))]
        loss = 0.0
        for i, (p, g) in enumerate(zip(params, grads)):
            if i in live:
                loss = loss + (p * g).sum()
            elif zeros_for_missing and cycle_has[i]:
                loss = loss + (p * torch.zeros_like(g)).sum()
        if isinstance(loss, torch.Tensor):
            loss.backward()
        opt.step()
        opt.zero_grad()
    if handle:
        handle.remove()


def _run_torch(opt, params, stream):
    """torch's protocol: .grad accumulates g/k of the micro-steps that have one; step once per cycle."""
    for s, grads in enumerate(stream):
        for i, (p, g) in enumerate(zip(params, grads)):
            if _has_grad(i, s):
                p.grad = g / K if p.grad is None else p.grad + g / K
        if (s + 1) % K == 0:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("kwargs", [
    dict(lr=0.05, momentum=0.9, weight_decay=0.1),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.05),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
    dict(lr=0.05, weight_decay=0.1),
    dict(lr=0.05, momentum=1.0, weight_decay=0.01),
], ids=["momentum", "dampening", "nesterov", "plain", "momentum_one"])
def test_sgd_equals_torch_sgd_on_accumulated_grad(kwargs, fused):
    ours, ref = _params(), _params()
    stream = _stream()
    _run_ours(optim.SGD(ours, accum_steps=K, **kwargs), ours, stream, zeros_for_missing=False, fused=fused)
    _run_torch(torch.optim.SGD(ref, **kwargs), ref, stream)
    assert_close_lists(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_adamw_weight_decay_once_per_update_equals_the_equations(fused):
    """AdamW k=4 in float64 against docs/design.md §2.1 written out, missing micro-steps as zeros."""
    lr, (b1, b2), eps, wd = 0.05, (0.9, 0.99), 1e-8, 0.2
    ours = _params(torch.float64)
    expected = [p.detach().clone() for p in ours]
    stream = _stream(torch.float64)
    _run_ours(optim.AdamW(ours, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, accum_steps=K), ours, stream,
              zeros_for_missing=False, fused=fused)
    m = [torch.zeros_like(e) for e in expected]
    v = [torch.zeros_like(e) for e in expected]
    t = [0] * len(expected)
    for cycle in range(len(stream) // K):
        for i in range(len(expected)):
            steps = [s for s in range(cycle * K, cycle * K + K) if _has_grad(i, s)]
            if not steps:
                continue  # untouched, as torch skips grad None
            m[i] = b1 * m[i] + (1 - b1) / K * sum(stream[s][i] for s in steps)
            v[i] = b2 * v[i] + (1 - b2) / K * sum(stream[s][i] ** 2 for s in steps)
            t[i] += 1
            m_hat, v_hat = m[i] / (1 - b1 ** t[i]), v[i] / (1 - b2 ** t[i])
            expected[i] = expected[i] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    assert_close_lists(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_adafactor_buffered_equals_transformers_on_accumulated_grad(fused):
    from transformers.optimization import Adafactor

    kwargs = dict(beta1=0.9, weight_decay=0.1)
    ours, ref = _params(), _params()
    stream = _stream()
    _run_ours(optim.AdaFactor(ours, accum_steps=K, **kwargs), ours, stream, zeros_for_missing=False, fused=fused)
    _run_torch(Adafactor(ref, **kwargs), ref, stream)
    assert_close_lists(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("mode", ["exact", "ema"])
@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=ids(EMBEDDING_CASES))
def test_missing_micro_step_equals_a_zero_gradient(case, mode, fused):
    """The definition for every embedded optimizer and both modes: within a cycle in which a
    parameter has any gradient, a micro-step without one is a zero gradient."""
    a, b = _params(), _params()
    stream = _stream()
    _run_ours(case.build(a, accum_steps=K, accum_mode=mode), a, stream, zeros_for_missing=False, fused=fused)
    _run_ours(case.build(b, accum_steps=K, accum_mode=mode), b, stream, zeros_for_missing=True, fused=fused)
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_parameter_without_gradient_in_a_cycle_is_untouched(case, fused):
    params = _params()
    opt = case.build(params, accum_steps=K)
    stream = _stream()
    _run_ours(opt, params, stream[:2 * K], zeros_for_missing=False, fused=fused)  # cycles 0 and 1
    before = params[0].detach().clone()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[params[0]].items()}
    for s in range(2 * K, 3 * K):  # cycle 2: tensor 0 has no gradient
        assert not _has_grad(0, s)
    _run_ours(opt, params, stream[2 * K:3 * K], zeros_for_missing=False, fused=fused, start=2 * K)
    assert torch.equal(params[0], before)
    for key, value in opt.state[params[0]].items():
        if key != "cycle":
            assert torch.equal(value, state[key]) if isinstance(value, torch.Tensor) else value == state[key]
