"""Parameter layouts and dtypes a drop-in must handle: bf16 resumes, float64, complex,
strided parameters, deepcopy — each against torch or the contiguous/float64 run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import assert_close_lists, grad_stream
from optim_registry import CASES, ids

from leantrain import optim

SHAPES = [(6, 5), (5,), (2, 3, 4)]


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def _steps(opt, params, stream):
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_bf16_parameters_resume_mid_cycle_bit_identical(case):
    """fp32 state of bf16 parameters survives a checkpoint exactly, and stochastic rounding
    continues identically although the global RNG moved (its noise is a function of the state)."""
    stream = grad_stream(14, SHAPES)
    params = _params(torch.bfloat16)
    opt = case.build(params, accum_steps=4)
    _steps(opt, params, stream[:6])  # mid-cycle: j = 2
    saved = _roundtrip(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = case.build(resumed_params, accum_steps=4)
    resumed.load_state_dict(saved)
    for p, q in zip(params, resumed_params):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert resumed.state[q][key].dtype == value.dtype and torch.equal(resumed.state[q][key], value), key
    torch.rand(1000)  # the resumed process's global generator is elsewhere
    _steps(opt, params, stream[6:])
    torch.manual_seed(1234)
    _steps(resumed, resumed_params, stream[6:])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_stochastic_rounding_is_unbiased_with_seeded_noise():
    p = torch.full((20000,), 1.0, dtype=torch.bfloat16, requires_grad=True)
    opt = optim.SGD([p], lr=1.0)
    p.grad = torch.full((20000,), -1e-3, dtype=torch.bfloat16)  # 1.001 lies between bf16 1.0 and 1.0078
    opt.step()
    assert abs(p.float().mean().item() - 1.001) < 2e-4
    assert set(p.float().unique().tolist()) == {1.0, 1.0078125}


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_float64_parameters_keep_float64_state(case):
    params = _params(torch.float64)
    opt = case.build(params, accum_steps=2)
    _steps(opt, params, grad_stream(2, SHAPES))
    for p in params:
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "exp_avg" or (
                    key == "exp_avg" and case.kwargs.get("momentum_dtype") is None):
                assert value.dtype == torch.float64, key


@pytest.mark.parametrize("name, ours, theirs", [
    ("sgd", lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)),
    ("adamw", lambda p: optim.AdamW(p, lr=0.1), lambda p: torch.optim.AdamW(p, lr=0.1)),
    ("adamw_amsgrad", lambda p: optim.AdamW(p, lr=0.1, amsgrad=True), lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True)),
])
def test_float64_matches_torch_to_float64_precision(name, ours, theirs):
    a, b = _params(torch.float64), _params(torch.float64)
    stream = [[g.double() for g in gs] for gs in grad_stream(6, SHAPES)]
    _steps(ours(a), a, stream)
    _steps(theirs(b), b, stream)
    assert_close_lists(a, b, rtol=1e-13, atol=1e-15)


def test_float64_adafactor_matches_transformers_to_float64_precision():
    from transformers.optimization import Adafactor

    a, b = _params(torch.float64), _params(torch.float64)
    stream = [[g.double() for g in gs] for gs in grad_stream(6, SHAPES)]
    _steps(optim.AdaFactor(a, beta1=0.9), a, stream)
    _steps(Adafactor(b, beta1=0.9), b, stream)
    assert_close_lists(a, b, rtol=1e-12, atol=1e-14)


_COMPLEX_VS_TORCH = [
    ("sgd", lambda p, k: optim.SGD(p, lr=0.1, momentum=0.9, accum_steps=k),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (1, 4)),
    ("sgd_nesterov_wd", lambda p, k: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, accum_steps=k),
     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1), (1, 4)),
    # AdamW's embedded v is the mean of micro-batch squares, not torch's, at k > 1: see the real-view test.
    ("adamw", lambda p, k: optim.AdamW(p, lr=0.1, accum_steps=k), lambda p: torch.optim.AdamW(p, lr=0.1), (1,)),
    ("adamw_amsgrad_max", lambda p, k: optim.AdamW(p, lr=0.1, amsgrad=True, maximize=True, accum_steps=k),
     lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True, maximize=True), (1,)),
]


@pytest.mark.parametrize("name, ours, theirs, k", [(n, o, t, k) for n, o, t, ks in _COMPLEX_VS_TORCH for k in ks],
                         ids=[f"{n}-k{k}" for n, _, _, ks in _COMPLEX_VS_TORCH for k in ks])
def test_complex_parameters_equal_torch(name, ours, theirs, k):
    """Complex parameters optimised as real views, as torch does (at k = 1; at k = 4 for SGD, whose
    embedded accumulation is exact, with one gradient per cycle)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,)]
    start = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in shapes]
    a = [s.clone().requires_grad_() for s in start]
    b = [s.clone().requires_grad_() for s in start]
    opt_a, opt_b = ours(a, k), theirs(b)
    for step in range(5 * k):
        grads = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in shapes]
        if step % k == 0:  # one micro-step of each cycle carries the gradient, scaled by k
            for p, q, g in zip(a, b, grads):
                p.grad, q.grad = g * k, g.clone()
            opt_b.step()
            opt_b.zero_grad()
        opt_a.step()
        opt_a.zero_grad()
    assert_close_lists(a, b, rtol=1e-5, atol=1e-6)
    assert all(opt_a.state[p]["momentum_buffer" if "sgd" in name else "exp_avg"].is_complex() for p in a)


@pytest.mark.parametrize("make", [
    lambda p: optim.AdaX(p, lr=0.05, accum_steps=2),
    lambda p: optim.AdamW(p, lr=0.05, amsgrad=True, maximize=True, accum_steps=4),
    lambda p: optim.AdamW(p, lr=0.05, accum_steps=4, accum_mode="ema", max_update_rms=0.5),
], ids=["adax", "adamw_amsgrad_maximize", "adamw_ema_clipped"])
def test_complex_parameter_equals_its_real_view(make):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
    a = start.clone().requires_grad_()
    b = torch.view_as_real(start.clone()).requires_grad_()
    opt_a, opt_b = make([a]), make([b])
    for _ in range(8):
        g = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
        a.grad, b.grad = g, torch.view_as_real(g).clone()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(torch.view_as_real(a.detach()), b.detach(), rtol=0, atol=0)


def test_complex_adafactor_is_refused_in_one_line():
    p = torch.zeros(3, 2, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match=r"^AdaFactor: complex parameter of shape \(3, 2\).*use AdamW or SGD"):
        optim.AdaFactor([p])
    with pytest.raises(ValueError, match=r"momentum_dtype=torch\.bfloat16 with a complex parameter"):
        optim.AdamW([p], momentum_dtype=torch.bfloat16)


def _strided(seed=0):
    """A transposed view made a Parameter (non-contiguous), and the same values contiguous."""
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(5, 6, generator=gen), torch.randn(4, 7, generator=gen)]
    return [torch.nn.Parameter(b.clone().t()) for b in base], [torch.nn.Parameter(b.clone().t().contiguous()) for b in base]


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_non_contiguous_parameters_equal_the_contiguous_run(case, k, fused):
    strided, contiguous = _strided()
    assert not strided[0].is_contiguous()
    runs = []
    for params in (strided, contiguous):
        opt = case.build(params, accum_steps=k)
        handle = optim.fuse_into_backward(params, opt) if fused else None
        gen = torch.Generator().manual_seed(7)
        for _ in range(3 * k):
            loss = sum((p * torch.randn(p.shape, generator=gen)).sum() + p.square().sum() for p in params)
            loss.backward()  # autograd gives a strided parameter a gradient with its strides
            opt.step()
            opt.zero_grad()
        if handle:
            handle.remove()
        runs.append(params)
    assert_close_lists(runs[0], runs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_a_contiguous_gradient_on_a_strided_parameter_equals_the_contiguous_run(case, k):
    """``.grad`` set by hand (or by DDP's buckets) is contiguous whatever the parameter's strides; torch's fused
    AdamW kernel reads both as flat memory, so dispatching it here stepped each element with another's gradient."""
    strided, contiguous = _strided()
    runs = []
    for params in (strided, contiguous):
        opt = case.build(params, accum_steps=k)
        gen = torch.Generator().manual_seed(7)
        for _ in range(3 * k):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)  # contiguous
            opt.step()
            opt.zero_grad()
        runs.append(params)
    assert_close_lists(runs[0], runs[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_deepcopy_keeps_the_cycle_position(case):
    params = _params(torch.float32)
    opt = case.build(params, accum_steps=4)
    stream = grad_stream(12, SHAPES)
    _steps(opt, params, stream[:4])
    assert opt.updated
    twin = copy.deepcopy(opt)
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert twin.updated and twin.micro_step == 4
    _steps(opt, params, stream[4:6])
    _steps(twin, twin_params, stream[4:6])
    assert not twin.updated and twin.micro_step == 6
    _steps(opt, params, stream[6:])
    _steps(twin, twin_params, stream[6:])
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


def test_deepcopy_of_wrappers_keeps_their_settings():
    params = _params(torch.float32)
    opt = optim.EMA(optim.Lookahead(optim.AdamW(params, accum_steps=2), k=3, alpha=0.4), decay=0.9)
    _steps(opt, params, grad_stream(4, SHAPES))
    twin = copy.deepcopy(opt)
    assert twin.updated and twin.base._k == 3 and twin.base.base.micro_step == 4
    assert twin.param_groups is twin.base.base.param_groups and twin.state is twin.base.base.state


@pytest.mark.parametrize("make,key", [
    (lambda p: optim.AdamW(p, lr=1e-3, momentum_dtype=torch.bfloat16, accum_steps=2), "exp_avg"),
    (lambda p: optim.AdaX(p, lr=1e-3, momentum_dtype=torch.bfloat16, accum_steps=2), "exp_avg"),
    (lambda p: optim.SGD(p, lr=1e-3, momentum=0.9, momentum_dtype=torch.bfloat16, accum_steps=2), "momentum_buffer"),
    (lambda p: optim.AdaFactor(p, beta1=0.9, momentum_on="grad", momentum_dtype=torch.bfloat16, accum_steps=2),
     "exp_avg"),
    # transformers' form (momentum on the update): zero gradients make U = 0, so m ← β1·m at the boundary
    (lambda p: optim.AdaFactor(p, beta1=0.9, momentum_dtype=torch.bfloat16, accum_steps=2), "exp_avg"),
], ids=["adamw", "adax", "sgd", "adafactor", "adafactor_update_form"])
def test_bf16_momentum_decays_by_beta1_itself(make, key):
    """A cycle of zero gradients leaves m = bf16(0.9·m): the factor is applied in fp32, not first rounded to
    bf16 (0.8984375, which torch's foreach scalar ops on CPU would use: 1.5% too little momentum)."""
    params = _params(torch.float32)
    opt = make(params)
    _steps(opt, params, grad_stream(2))
    before = [opt.state[p][key].clone() for p in params]
    _steps(opt, params, [[torch.zeros(s) for s in SHAPES]] * 2)
    for p, m in zip(params, before):
        assert opt.state[p][key].dtype == torch.bfloat16
        assert torch.equal(opt.state[p][key], (m.float() * 0.9).bfloat16())
