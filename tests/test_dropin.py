"""Drop-in fidelity: torch's keywords, state dicts from the optimizer being replaced, transformers'
AdafactorSchedule, and misuse that would otherwise train wrong in silence."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from helpers import assert_close_lists, grad_stream, make_params, run_reference_accumulation

from leantrain import optim


def _steps(opt, params, stream):
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = g.clone().to(p.dtype)
        opt.step()
        opt.zero_grad()


def _torch_defaults(cls) -> dict:
    skip = {"self", "params"}
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in skip and p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("ours, theirs", [(optim.AdamW, torch.optim.AdamW), (optim.SGD, torch.optim.SGD)])
def test_every_torch_keyword_is_accepted_at_torch_default(ours, theirs):
    defaults = _torch_defaults(theirs)
    assert {"foreach", "maximize", "differentiable", "fused"} <= set(defaults)
    a, b = make_params(), make_params()
    opt_a, opt_b = ours(a, **defaults), theirs(b, **defaults)
    stream = grad_stream(5)
    _steps(opt_a, a, stream)
    _steps(opt_b, b, stream)
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make, pattern", [
    (lambda p: optim.AdamW(p, foreach=False), r"^foreach=False: leantrain accepts only None or True"),
    (lambda p: optim.AdamW(p, capturable=True), r"^capturable=True: leantrain accepts only False.*CUDA graphs"),
    (lambda p: optim.AdamW(p, differentiable=True), r"^differentiable=True: leantrain accepts only False"),
    (lambda p: optim.AdamW(p, fused=True, accum_steps=4), r"^fused=True: torch's fused AdamW kernel applies only"),
    (lambda p: optim.AdamW(p, amsgrad="yes"), r"^amsgrad='yes': expected True or False"),
    (lambda p: optim.AdamW(p, lr=torch.tensor([1e-3, 1e-3])), r"^lr: a tensor value must be one real"),
    (lambda p: optim.SGD(p, fused=True), r"^fused=True: leantrain accepts only None or False"),
    (lambda p: optim.SGD(p, foreach=False), r"^foreach=False"),
    (lambda p: optim.SGD(p, differentiable=True), r"^differentiable=True"),
    (lambda p: optim.SGD(p, momentum=1.5), r"^momentum=1\.5: allowed range is \[0\.0, 1\.0\]"),
    (lambda p: optim.SGD(p, momentum=1.0, accum_steps=2, accum_mode="ema"), r"^accum_mode='ema' with momentum=1"),
    (lambda p: optim.AdamW(p, maximize=1), r"^maximize=1: expected True or False"),
], ids=["foreach", "capturable", "differentiable", "fused_k4", "amsgrad_type", "lr_shape", "sgd_fused",
        "sgd_foreach", "sgd_differentiable", "sgd_momentum", "sgd_ema_momentum_one", "maximize_type"])
def test_keywords_that_cannot_be_honoured_are_refused_by_name(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(make_params())


@pytest.mark.parametrize("fused", [None, False], ids=["fused_kernel", "foreach"])
@pytest.mark.parametrize("kwargs", [dict(amsgrad=True), dict(maximize=True), dict(amsgrad=True, maximize=True),
                                    dict(lr=torch.tensor(0.02))], ids=["amsgrad", "maximize", "both", "tensor_lr"])
def test_adamw_options_equal_torch(kwargs, fused):
    a, b = make_params(), make_params()
    opt_a = optim.AdamW(a, **{"lr": 0.05, **kwargs}, fused=fused)
    opt_b = torch.optim.AdamW(b, **{"lr": 0.05, **kwargs})
    stream = grad_stream(8)
    _steps(opt_a, a, stream)
    _steps(opt_b, b, stream)
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kwargs", [dict(momentum=0.9, nesterov=True), dict(momentum=0.9, maximize=True, weight_decay=0.1),
                                    dict(momentum=1.0), dict(lr=torch.tensor(0.03), momentum=0.5),
                                    dict(maximize=True)], ids=["nesterov", "maximize", "momentum_one", "tensor_lr", "plain_max"])
def test_sgd_options_equal_torch_on_the_accumulated_gradient(kwargs, k):
    a, b = make_params(), make_params()
    opt_a = optim.SGD(a, **{"lr": 0.05, **kwargs}, accum_steps=k)
    opt_b = torch.optim.SGD(b, **{"lr": 0.05, **kwargs})
    stream = grad_stream(4 * k)
    _steps(opt_a, a, stream)
    run_reference_accumulation(opt_b, b, stream, k)
    assert_close_lists(a, b, rtol=1e-5, atol=1e-6)


def test_tensor_lr_is_read_at_every_update():
    lr = torch.tensor(0.1)
    a, b = make_params(), make_params()
    opt_a, opt_b = optim.SGD(a, lr=lr, momentum=0.9), torch.optim.SGD(b, lr=lr.clone(), momentum=0.9)
    stream = grad_stream(6)
    _steps(opt_a, a, stream[:3])
    _steps(opt_b, b, stream[:3])
    lr.fill_(0.01)
    opt_b.param_groups[0]["lr"].fill_(0.01)
    _steps(opt_a, a, stream[3:])
    _steps(opt_b, b, stream[3:])
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ foreign state dicts
def _continue_equal(ours, theirs, a, b, stream):
    _steps(ours, a, stream)
    _steps(theirs, b, stream)
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("theirs_cls, ours_cls, kwargs", [
    (torch.optim.AdamW, optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    (torch.optim.AdamW, optim.AdamW, dict(lr=0.05, amsgrad=True)),
    (torch.optim.SGD, optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (torch.optim.SGD, optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
], ids=["adamw", "adamw_amsgrad", "sgd", "sgd_nesterov"])
def test_a_torch_run_continues_here_and_back(theirs_cls, ours_cls, kwargs):
    """torch -> leantrain: load_state_dict maps the state, the run continues as torch's would;
    leantrain -> torch: export_state_dict, and torch continues as leantrain would."""
    stream = grad_stream(12)
    b = make_params()
    theirs = theirs_cls(b, **kwargs)
    _steps(theirs, b, stream[:4])
    a = [p.detach().clone().requires_grad_() for p in b]
    ours = ours_cls(a, **{k: v for k, v in kwargs.items()})
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _continue_equal(ours, theirs, a, b, stream[4:8])
    back = [p.detach().clone().requires_grad_() for p in a]
    again = theirs_cls(back, **kwargs)
    again.load_state_dict(copy.deepcopy(optim.export_state_dict(ours)))
    _continue_equal(ours, again, a, back, stream[8:])


def test_a_transformers_adafactor_run_continues_here_and_back():
    from transformers.optimization import Adafactor

    stream = grad_stream(12)
    b = make_params()
    theirs = Adafactor(b, beta1=0.9, weight_decay=0.01)
    _steps(theirs, b, stream[:4])
    a = [p.detach().clone().requires_grad_() for p in b]
    ours = optim.AdaFactor(a, beta1=0.9, weight_decay=0.01)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    _steps(ours, a, stream[4:8])
    _steps(theirs, b, stream[4:8])
    assert_close_lists(a, b, rtol=1e-5, atol=1e-6)
    back = [p.detach().clone().requires_grad_() for p in a]
    again = Adafactor(back, beta1=0.9, weight_decay=0.01)
    again.load_state_dict(copy.deepcopy(optim.export_state_dict(ours)))
    _steps(ours, a, stream[8:])
    _steps(again, back, stream[8:])
    assert_close_lists(a, back, rtol=1e-5, atol=1e-6)


def test_a_foreign_run_continues_with_embedded_accumulation():
    """torch AdamW at k=1 -> leantrain AdamW at k=4: the cycle starts at the boundary."""
    b = make_params()
    theirs = torch.optim.AdamW(b, lr=0.05)
    _steps(theirs, b, grad_stream(3))
    ours = optim.AdamW([p.detach().clone().requires_grad_() for p in b], lr=0.05, accum_steps=4)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    assert ours.micro_step == 0 and ours.accum_steps == 4
    assert all(s["step"] == 3 for s in ours.state.values())


def _without(key):
    def edit(state_dict):
        del state_dict["state"][0][key]
        return state_dict
    return edit


@pytest.mark.parametrize("source, target, edit, pattern", [
    (lambda p: torch.optim.AdamW(p), lambda p: optim.SGD(p, lr=0.1, momentum=0.9), None,
     r"^SGD\.load_state_dict: cannot map the state of torch\.optim\.AdamW \(foreign states SGD accepts: torch\.optim\.SGD\)$"),
    (lambda p: torch.optim.Adagrad(p), lambda p: optim.AdamW(p), None,
     r"^AdamW\.load_state_dict: cannot map the state of an unknown optimizer"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9), lambda p: optim.AdamW(p), None,
     r"^AdamW\.load_state_dict: parameter 0 \(shape \(6, 5\)\) lacks state 'exp_avg', 'exp_avg_sq'"),
    (lambda p: optim.AdaFactor(p), lambda p: optim.AdaFactor(p), _without("exp_avg_sq_col"),
     r"^AdaFactor\.load_state_dict: parameter 0 \(shape \(6, 5\)\) lacks state 'exp_avg_sq_col'"),
    (lambda p: optim.AdamW(p), lambda p: optim.AdamW(p + make_params([(2,)], seed=5)), None,
     r"^AdamW\.load_state_dict: the state dict holds 3 parameters, this optimizer 4"),
    (lambda p: optim.AdamW(p), lambda p: optim.AdamW(p), lambda sd: sd["param_groups"],
     r"^AdamW\.load_state_dict: expected a dict with 'state' and 'param_groups'"),
], ids=["other_torch", "unknown", "sgd_into_adamw", "missing_key", "count", "not_a_state_dict"])
def test_state_that_cannot_be_mapped_is_one_line_not_a_keyerror(source, target, edit, pattern):
    params = make_params()
    src = source(params)
    _steps(src, params, grad_stream(1))
    state_dict = copy.deepcopy(src.state_dict())
    if edit is not None:
        state_dict = edit(state_dict)
    with pytest.raises(ValueError, match=pattern):
        target(make_params()).load_state_dict(state_dict)


def test_export_mid_cycle_is_refused():
    params = make_params()
    opt = optim.AdamW(params, accum_steps=4)
    _steps(opt, params, grad_stream(2))
    with pytest.raises(ValueError, match=r"inside an accumulation cycle \(micro-step 2, k=4\)"):
        optim.export_state_dict(opt)


# --------------------------------------------------------------- AdafactorSchedule
def test_adafactor_schedule_reads_the_applied_lr_like_transformers():
    from transformers.optimization import Adafactor, AdafactorSchedule

    a, b = make_params(), make_params()
    ours, theirs = optim.AdaFactor(a, warmup_init=True), Adafactor(b, warmup_init=True)
    sched_a, sched_b = AdafactorSchedule(ours), AdafactorSchedule(theirs)
    for grads in grad_stream(5):
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        sched_a.step()
        sched_b.step()
        torch.testing.assert_close(torch.tensor(sched_a.get_last_lr()), torch.tensor([float(x) for x in sched_b.get_last_lr()]),
                                   rtol=1e-5, atol=0)
    assert_close_lists(a, b, rtol=1e-5, atol=1e-6)
    assert sched_a.get_last_lr()[0] > 0


# ------------------------------------------------------------------ silent misuse
def test_clip_grad_norm_after_fused_backward_raises():
    model = torch.nn.Linear(4, 3)
    opt = optim.AdamW(model.parameters(), accum_steps=2)
    handle = optim.fuse_into_backward(model, opt)
    model(torch.randn(2, 4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_ after fused backward: global gradient-norm clipping"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    with pytest.raises(RuntimeError, match=r"max_update_rms"):
        torch.nn.utils.clip_grad.clip_grad_norm_(list(model.parameters()), max_norm=0.5)
    # a norm-only query (max_norm=inf, as transformers logs it) still answers
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))) == 0.0
    handle.remove()
    other = torch.nn.Linear(2, 2)
    other(torch.randn(1, 2)).sum().backward()
    assert float(torch.nn.utils.clip_grad_norm_(other.parameters(), 1.0)) > 0  # unfused parameters: torch's behaviour
    model(torch.randn(2, 4)).sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # hooks removed: no longer refused


def test_a_schedule_stepped_per_micro_batch_is_reported():
    params = make_params()
    opt = optim.AdamW(params, lr=0.1, accum_steps=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (n + 1))
    with pytest.warns(UserWarning, match=r"learning rate changed inside an accumulation cycle.*runs 4x too fast"):
        for grads in grad_stream(4):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            sched.step()  # wrong: should only step when opt.updated
    params = make_params()
    opt = optim.AdamW(params, lr=0.1, accum_steps=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (n + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for grads in grad_stream(12):
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            if opt.updated:
                sched.step()
