"""Rewritten from pytorch test/test_optim.py (TestOptimRenewed::test_complex, ::test_complex_2d) and
the older test/test_optim.py (TestOptim::test_sgd_complex, ::_test_complex_optimizer), with the inputs
of torch/testing/_internal/common_optimizers.py (optim_inputs_func_sgd, optim_inputs_func_adamw) and,
for the refusal, optim_error_inputs_func_adafactor ("does not support complex parameters").

A complex parameter must be optimised exactly as its real view (torch's rule): SGD, AdamW and AdaX
are checked against the same optimizer on view_as_real copies; AdaFactor refuses complex parameters.
"""

from __future__ import annotations

import pytest
import torch
from peer_support import case_params, fresh, rosenbrock

from leantrain import optim as lt

COMPLEX_CASES = case_params([lt.SGD, lt.AdamW, lt.AdaX])
# torch's default tolerances for float32 (the complex and real runs may take different kernels:
# AdamW's fused kernel applies to the all-real group only).
FP32_DEFAULT = dict(rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("cls, kwargs", COMPLEX_CASES)
def test_complex_matches_real_view(cls, kwargs):
    torch.manual_seed(17)
    # the last parameter is real on purpose: real and complex mixed in one group
    complex_params = [
        torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, dtype=torch.complex64, requires_grad=True),
        torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
    ]
    real_params = [
        (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_() for p in complex_params
    ]
    complex_opt = cls(complex_params, **fresh(kwargs))
    real_opt = cls(real_params, **fresh(kwargs))
    before = [p.detach().clone() for p in real_params]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in real_params]
        for p, g in zip(real_params, grads):
            p.grad = g
        for p, g in zip(complex_params, grads):
            p.grad = torch.view_as_complex(g) if p.is_complex() else g.clone()
        real_opt.step()
        complex_opt.step()
        for c, r in zip(complex_params, real_params):
            as_real = torch.view_as_real(c) if c.is_complex() else c
            torch.testing.assert_close(as_real.detach(), r.detach(), **FP32_DEFAULT)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(real_params, before))
    for c in complex_params[:2]:  # state of a complex parameter stays complex
        assert all(v.is_complex() for v in complex_opt.state[c].values() if isinstance(v, torch.Tensor) and v.dim() > 0)


@pytest.mark.parametrize("cls, kwargs", COMPLEX_CASES)
def test_complex_2d_matches_split_real_and_imag(cls, kwargs):
    torch.manual_seed(19)
    a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
    a1_real = a1.real.detach().clone().requires_grad_()
    a1_imag = a1.imag.detach().clone().requires_grad_()
    opt1 = cls([a1], **fresh(kwargs))
    opt2 = cls([a1_real, a1_imag], **fresh(kwargs))
    start = a1.detach().clone()
    for _ in range(3):
        opt1.zero_grad()
        opt2.zero_grad()
        loss1 = rosenbrock(a1).abs()
        loss1.backward()
        # keep the split copy exactly on the complex one before forming its loss
        with torch.no_grad():
            a1_real.copy_(a1.real)
            a1_imag.copy_(a1.imag)
        loss2 = rosenbrock(torch.complex(a1_real, a1_imag)).abs()
        loss2.backward()
        torch.testing.assert_close(loss1, loss2)
        torch.testing.assert_close(a1.grad.real, a1_real.grad)
        torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
        opt1.step()
        opt2.step()
        torch.testing.assert_close(a1.real.detach(), a1_real.detach(), **FP32_DEFAULT)
        torch.testing.assert_close(a1.imag.detach(), a1_imag.detach(), **FP32_DEFAULT)
    assert not torch.equal(a1.detach(), start)


OLD_SGD_COMPLEX = [
    dict(lr=0.001),
    dict(lr=0.001, momentum=1),
    dict(lr=0.001, momentum=1, weight_decay=1),
    dict(lr=0.001, nesterov=True, momentum=1, weight_decay=1),
    dict(lr=0.001, momentum=1, dampening=0.5, weight_decay=1),
]


@pytest.mark.parametrize("kwargs", OLD_SGD_COMPLEX, ids=str)
def test_sgd_complex_5x5_matches_real_view_and_torch(kwargs):
    torch.manual_seed(23)
    complex_param = torch.randn(5, 5, dtype=torch.complex64, requires_grad=True)
    real_param = torch.view_as_real(complex_param).detach().clone().requires_grad_()
    torch_param = complex_param.detach().clone().requires_grad_()
    complex_opt = lt.SGD([complex_param], **kwargs)
    real_opt = lt.SGD([real_param], **kwargs)
    torch_opt = torch.optim.SGD([torch_param], foreach=False, **kwargs)
    for _ in range(3):
        complex_param.grad = torch.randn_like(complex_param)
        real_param.grad = torch.view_as_real(complex_param.grad).clone()
        torch_param.grad = complex_param.grad.clone()
        complex_opt.step()
        real_opt.step()
        torch_opt.step()
        torch.testing.assert_close(torch.view_as_real(complex_param).detach(), real_param.detach())
        torch.testing.assert_close(complex_param.detach(), torch_param.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, kwargs", case_params([lt.AdamW]))
def test_adamw_complex_matches_torch(cls, kwargs):
    """torch's AdamW on the complex parameter itself is the reference leantrain replaces."""
    torch.manual_seed(29)
    ours = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    ref = ours.detach().clone().requires_grad_()
    opt = cls([ours], **fresh(kwargs))
    ref_kwargs = {k: v for k, v in fresh(kwargs).items() if k not in ("fused", "foreach")}
    ref_opt = torch.optim.AdamW([ref], foreach=False, **ref_kwargs)
    for _ in range(5):
        ours.grad = torch.randn_like(ours)
        ref.grad = ours.grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{}, {"beta1": 0.9}, {"lr": 0.01, "relative_step": False}], ids=str)
def test_adafactor_refuses_complex_parameters(kwargs):
    param = torch.rand(2, 3, dtype=torch.complex64, requires_grad=True)
    param.grad = torch.rand_like(param)
    with pytest.raises(ValueError, match="complex"):
        opt = lt.AdaFactor([param], **kwargs)
        opt.step()  # refusing at the step, as torch's Adafactor does, would be acceptable too
    real = torch.rand(2, 3, requires_grad=True)
    opt = lt.AdaFactor([real], **kwargs)
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [param]})
