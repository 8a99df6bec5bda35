"""Rewritten from pytorch test/test_optim.py (TestOptimRenewed): test_forloop_goes_right_direction,
test_param_group_with_lrscheduler_goes_right_direction, test_tensor_lr, test_rosenbrock_sparse,
test_foreach_matches_forloop (_compare_between), test_param_groups_weight_decay, test_param_groups_lr,
test_step_is_noop_when_params_have_no_grad, test_step_is_noop_for_zero_grads; with the inputs of
torch/testing/_internal/common_optimizers.py (optim_inputs_func_sgd, optim_inputs_func_adam/adamw,
the SGD OptimizerInfo's scheduler_inputs and metadata_for_sparse) and the SGD/AdamW flag sets of the
older test/test_optim.py::TestOptim::test_multi_tensor_optimizers.

Where torch compares its foreach/fused implementations with its forloop one, these tests compare
leantrain (k = 1) with the real torch optimizer run as a forloop, and keep torch's own assertions
(loss direction, untouched parameters) on top.
"""

from __future__ import annotations

import pytest
import torch
from peer_support import (
    FP64,
    TORCH_EQUIVALENT,
    case_params,
    clone_param,
    coordinate_rosenbrock_step,
    fresh,
    mlp_input,
    quadratic_loss,
    reference,
    tiny_mlp,
    tol_for,
    torch_kwargs,
    weight_bias_input,
    with_manual_lr,
)
from torch.optim.lr_scheduler import (
    ConstantLR,
    ExponentialLR,
    LinearLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)

from leantrain import optim as lt

# The SGD OptimizerInfo's scheduler_inputs; every other optimizer uses the default pair.
SGD_SCHEDULERS = [
    [lambda o: StepLR(o, gamma=0.9, step_size=10)],
    [lambda o: LinearLR(o, start_factor=0.4, end_factor=0.8, total_iters=4)],
    [lambda o: StepLR(o, gamma=0.9, step_size=10), lambda o: LinearLR(o, start_factor=0.4, end_factor=0.6, total_iters=4)],
    [lambda o: StepLR(o, gamma=0.99, step_size=10), lambda o: ExponentialLR(o, gamma=0.99), lambda o: ReduceLROnPlateau(o)],
    [lambda o: ConstantLR(o, factor=0.4, total_iters=4)],
    [lambda o: PolynomialLR(o, power=0.9, total_iters=4)],
    [lambda o: StepLR(o, gamma=0.9, step_size=10), lambda o: ReduceLROnPlateau(o)],
]
DEFAULT_SCHEDULERS = [[lambda o: StepLR(o, gamma=0.9, step_size=10), lambda o: ReduceLROnPlateau(o)]]

COMPARABLE = case_params([lt.SGD, lt.AdamW])
ALL_CASES = case_params([lt.SGD, lt.AdamW, lt.AdaFactor, lt.AdaX])


def _has_manual_lr(cls, kwargs):
    return cls is not lt.AdaFactor or kwargs.get("lr") is not None


def _step_schedulers(schedulers, loss):
    for s in schedulers:
        if isinstance(s, ReduceLROnPlateau):
            s.step(loss.item())
        else:
            s.step()


def _train_quadratic(cls, kwargs, weight, bias, inp, schedulers=(), steps=20):
    opt = cls([weight, bias], **kwargs)
    scheds = [make(opt) for make in schedulers]

    def closure():
        opt.zero_grad()
        loss = quadratic_loss(weight, bias, inp)
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(steps):
        loss = closure()
        opt.step()
        _step_schedulers(scheds, loss)
    with torch.no_grad():
        final = quadratic_loss(weight, bias, inp).item()
    return opt, initial, final


# ----------------------------------------------------- test_forloop_goes_right_direction
def _direction_params():
    """Every input contiguous and strided, and contiguous with the LR schedulers where the group
    has an lr to schedule (relative-step AdaFactor has lr=None; transformers pairs it with
    AdafactorSchedule instead, see test_peer_transformers_optimization)."""
    out = []
    for case in ALL_CASES:
        cls, kwargs = case.values
        layouts = [(True, False, "contiguous"), (False, False, "strided")]
        if _has_manual_lr(cls, kwargs):
            layouts.append((True, True, "contiguous-lrsched"))
        out += [pytest.param(cls, kwargs, c, s, id=f"{case.id}-{label}") for c, s, label in layouts]
    return out


@pytest.mark.parametrize("cls, kwargs, contiguous, with_lrsched", _direction_params())
def test_goes_right_direction_and_matches_reference(cls, kwargs, contiguous, with_lrsched):
    sched_lists = ((SGD_SCHEDULERS if cls is lt.SGD else DEFAULT_SCHEDULERS) if with_lrsched else [[]])
    ref = reference(cls, kwargs)
    # AdaFactor's normalised update amplifies float32 rounding differences (leantrain scales θ by
    # (1 - λ·lr), transformers subtracts λ·lr·θ) by ~1e-4 within 40 steps, while in float64 both agree
    # to 1e-15: it is compared with transformers in float64, SGD/AdamW with torch in float32.
    ref_dtype = torch.float64 if cls is lt.AdaFactor else torch.float32
    for schedulers in sched_lists:
        weight, bias, inp = weight_bias_input(contiguous=contiguous)
        opt, initial, final = _train_quadratic(cls, fresh(kwargs), weight, bias, inp, schedulers)
        if kwargs.get("maximize", False):
            assert final > initial
        else:
            assert final < initial
        if ref is None:
            continue
        if ref_dtype != weight.dtype:
            weight, bias, inp = weight_bias_input(contiguous=contiguous, dtype=ref_dtype)
            opt, _, _ = _train_quadratic(cls, fresh(kwargs), weight, bias, inp, schedulers)
        ref_w, ref_b, _ = weight_bias_input(contiguous=contiguous, dtype=ref_dtype)
        ref_opt, _, _ = _train_quadratic(ref[0], fresh(ref[1]), ref_w, ref_b, inp, schedulers)
        torch.testing.assert_close(weight.detach(), ref_w.detach(), **tol_for(ref_dtype))
        torch.testing.assert_close(bias.detach(), ref_b.detach(), **tol_for(ref_dtype))
        if opt.param_groups[0]["lr"] is not None:
            assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(ref_opt.param_groups[0]["lr"]), rel=1e-6)


# ------------------------------------- test_param_group_with_lrscheduler_goes_right_direction
@pytest.mark.parametrize("cls", [lt.SGD, lt.AdamW], ids=lambda c: c.__name__)
def test_param_group_with_lrscheduler_goes_right_direction(cls):
    for schedulers in SGD_SCHEDULERS if cls is lt.SGD else DEFAULT_SCHEDULERS:
        results = []
        for impl in (cls, TORCH_EQUIVALENT[cls]):
            weight, bias, inp = weight_bias_input(seed=3)
            opt = impl([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
            scheds = [make(opt) for make in schedulers]

            def closure(opt=opt, weight=weight, bias=bias, inp=inp):
                opt.zero_grad()
                loss = quadratic_loss(weight, bias, inp)
                loss.backward()
                return loss

            initial = closure().item()
            for _ in range(20):
                loss = opt.step(closure)
                _step_schedulers(scheds, loss)
            assert closure().item() < initial
            results.append((weight.detach().clone(), bias.detach().clone()))
        (w, b), (rw, rb) = results
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, rb, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- test_tensor_lr
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_tensor_lr_matches_float_lr(cls, kwargs):
    kwargs = {k: v for k, v in fresh(kwargs).items() if k != "lr"}
    weight, bias, inp = weight_bias_input(seed=5)
    weight_c, bias_c = clone_param(weight), clone_param(bias)
    weight_t, bias_t = clone_param(weight), clone_param(bias)
    opt_float = cls([weight, bias], **with_manual_lr(cls, kwargs, 1e-3))
    opt_tensor = cls([weight_c, bias_c], **with_manual_lr(cls, kwargs, torch.tensor(1e-3)))
    runs = [(opt_float, weight, bias), (opt_tensor, weight_c, bias_c)]
    if cls in TORCH_EQUIVALENT:  # torch's optimizers take a tensor lr too: compare with them
        ref = TORCH_EQUIVALENT[cls]([weight_t, bias_t], **{**torch_kwargs(kwargs), "lr": torch.tensor(1e-3)})
        runs.append((ref, weight_t, bias_t))
    start = weight.detach().clone()
    for _ in range(5):
        for opt, w, b in runs:
            opt.zero_grad()
            quadratic_loss(w, b, inp).backward()
            opt.step()
        # torch's own assertion: the tensor lr run equals the float lr run
        torch.testing.assert_close(weight_c.detach(), weight.detach())
        torch.testing.assert_close(bias_c.detach(), bias.detach())
        if len(runs) == 3:
            torch.testing.assert_close(weight_c.detach(), weight_t.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(bias_c.detach(), bias_t.detach(), rtol=1e-5, atol=1e-6)
    assert isinstance(opt_tensor.param_groups[0]["lr"], torch.Tensor)
    assert not torch.equal(weight.detach(), start)


# --------------------------------------------------------------- test_rosenbrock_sparse (dense half)
@pytest.mark.parametrize("with_lrsched", [False, True], ids=["no_sched", "lrsched"])
def test_sgd_rosenbrock_cyclic_coordinates_matches_torch(with_lrsched):
    """SGD's metadata_for_sparse (lr=4.8e-3, no momentum), 1800 steps of cyclic coordinate descent
    on Rosenbrock. torch checks its sparse-gradient run against this dense-gradient run; leantrain
    takes dense gradients only (sparse ones are refused, see test_peer_torch_api), so its dense run
    is compared with torch.optim.SGD's dense run, and torch's final assertion is kept."""
    schedulers = [lambda o: StepLR(o, gamma=0.99999, step_size=300)] if with_lrsched else []
    start = torch.tensor([1.5, 1.5])
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = lt.SGD([ours], lr=4.8e-3)
    ref_opt = torch.optim.SGD([ref], lr=4.8e-3, foreach=False)
    scheds = [make(opt) for make in schedulers]
    ref_scheds = [make(ref_opt) for make in schedulers]

    initial_dist = start.dist(torch.tensor([1.0, 1.0]))
    for i in range(1800):
        w = i % 2
        opt.step(lambda: coordinate_rosenbrock_step(opt, ours, w))
        ref_opt.step(lambda: coordinate_rosenbrock_step(ref_opt, ref, w))
        for s, r in zip(scheds, ref_scheds):
            s.step()
            r.step()
        if i % 100 == 0:
            torch.testing.assert_close(ours.detach(), ref.detach(), rtol=5e-6, atol=5e-6)
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=5e-6, atol=5e-6)
    assert ours.detach().dist(torch.tensor([1.0, 1.0])) <= initial_dist


# ------------------------------------------- test_foreach_matches_forloop / _compare_between
OLD_MULTI_TENSOR_FLAGS = [
    pytest.param(lt.SGD, dict(lr=0.2, momentum=1, dampening=0, weight_decay=1, nesterov=True), id="SGD-nesterov-m1-wd1"),
    pytest.param(lt.SGD, dict(lr=0.2, momentum=1, dampening=0.5, weight_decay=1, nesterov=False), id="SGD-m1-damp-wd1"),
    pytest.param(lt.AdamW, dict(weight_decay=1.0, amsgrad=True), id="AdamW-wd1-amsgrad"),
    pytest.param(lt.AdamW, dict(weight_decay=1.0, amsgrad=False), id="AdamW-wd1"),
    pytest.param(lt.AdamW, dict(weight_decay=0.0, amsgrad=True), id="AdamW-wd0-amsgrad"),
    pytest.param(lt.AdamW, dict(weight_decay=0.0, amsgrad=False), id="AdamW-wd0"),
]


def _model_run(cls, kwargs, dtype):
    """7 iterations on the tiny MLP plus a scalar parameter; iteration 2 has no gradients at all,
    iterations 3-4 freeze the second Linear (its grads stay None). Returns per-iteration snapshots."""
    model = tiny_mlp(dtype)
    extra = torch.full((), 0.5, dtype=dtype, requires_grad=True)
    extra.grad = torch.rand_like(extra)
    params = list(model.parameters()) + [extra]
    opt = cls(params, **kwargs)
    inp = mlp_input(dtype)
    snapshots = []
    for i in range(7):
        opt.zero_grad()
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        if i != 2:
            model(inp).sum().backward()
        opt.step()
        snapshots.append([(p.detach().clone(), {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                 for k, v in opt.state[p].items()}) for p in params])
    return snapshots


@pytest.mark.parametrize("cls, kwargs", COMPARABLE + OLD_MULTI_TENSOR_FLAGS)
def test_model_trajectory_and_state_match_torch_float64(cls, kwargs):
    ours = _model_run(cls, fresh(kwargs), torch.float64)
    ref = _model_run(TORCH_EQUIVALENT[cls], torch_kwargs(kwargs), torch.float64)
    # A float32 tensor lr: torch forms lr/bias_correction as a float32 tensor, leantrain reads the
    # lr as a Python float; the two agree to float32 rounding only.
    tol = dict(rtol=1e-6, atol=1e-9) if isinstance(kwargs.get("lr"), torch.Tensor) else FP64
    moved = False
    for it, (mine, theirs) in enumerate(zip(ours, ref)):
        for n, ((p, state), (q, ref_state)) in enumerate(zip(mine, theirs)):
            torch.testing.assert_close(p, q, **tol, msg=lambda m: f"iteration {it}, param {n}: {m}")
            for key, value in ref_state.items():
                if key == "step":  # torch keeps a tensor, leantrain an int: same count
                    assert state["step"] == int(value), f"iteration {it}, param {n}: step"
                    continue
                torch.testing.assert_close(state[key], value, **tol,
                                           msg=lambda m: f"iteration {it}, param {n}, {key}: {m}")
        if it > 0:
            moved |= any(not torch.equal(p, q) for (p, _), (q, _) in zip(mine, ours[it - 1]))
    assert moved
    # iteration 2 had no gradients: nothing moved
    for (p, _), (q, _) in zip(ours[2], ours[1]):
        assert torch.equal(p, q)


# ------------------------------------------------------------- test_param_groups_weight_decay
def _implementations(cls, kwargs):
    """(class, kwargs, dtype) runs: leantrain in float32 (the suite's dtype), plus leantrain and its
    reference in the comparison dtype (float64 for AdaFactor, see the direction test above)."""
    runs = [(cls, fresh(kwargs), torch.float32)]
    ref = reference(cls, kwargs)
    if ref is not None:
        if cls is lt.AdaFactor:
            runs.append((cls, fresh(kwargs), torch.float64))
            runs.append((*ref, torch.float64))
        else:
            runs.append((*ref, torch.float32))
    return runs


def _assert_same_finals(finals):
    """The last two runs (leantrain, reference) agree."""
    if len(finals) < 2:
        return
    (w, b), (rw, rb) = finals[-2:]
    tol = tol_for(w.dtype)
    torch.testing.assert_close(w, rw, **tol)
    torch.testing.assert_close(b, rb, **tol)


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_param_groups_weight_decay(cls, kwargs):
    finals = []
    for impl, kw, dtype in _implementations(cls, kwargs):
        weight, bias, inp = weight_bias_input(seed=7, dtype=dtype)
        bias_kw = fresh(kw)
        bias_kw["weight_decay"] = 0.0
        opt = impl([dict(params=[weight], **kw), dict(params=[bias], **bias_kw)])
        initial = quadratic_loss(weight, bias, inp).item()
        for _ in range(20):
            opt.zero_grad()
            loss = quadratic_loss(weight, bias, inp)
            loss.backward()
            opt.step()
        if kwargs.get("maximize", False):
            assert loss.item() > initial
        else:
            assert loss.item() < initial
        finals.append((weight.detach().clone(), bias.detach().clone()))
    _assert_same_finals(finals)


# ------------------------------------------------------------------------ test_param_groups_lr
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_param_groups_lr(cls, kwargs):
    kwargs = fresh(kwargs)
    if kwargs.get("lr") is None or (not isinstance(kwargs["lr"], torch.Tensor) and kwargs["lr"] == 0):
        kwargs = with_manual_lr(cls, kwargs, 1e-3)
    outer = with_manual_lr(cls, {}, 1e-28)
    finals = []
    for impl, kw, dtype in _implementations(cls, kwargs):
        torch.manual_seed(11)
        weight, bias, inp = weight_bias_input(seed=9, dtype=dtype)
        irrelevant = torch.nn.Parameter(torch.randn(2, dtype=dtype))
        irrelevant_before = irrelevant.detach().clone()
        opt = impl([dict(params=[weight, bias], **fresh(kw)), dict(params=[irrelevant])], **outer)
        initial = quadratic_loss(weight, bias, inp).item()
        for _ in range(20):
            opt.zero_grad()
            loss = quadratic_loss(weight, bias, inp)
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            opt.step()
        if kwargs.get("maximize", False):
            assert loss.item() > initial
        else:
            assert loss.item() < initial
        assert torch.equal(irrelevant.detach(), irrelevant_before)  # lr 1e-28: no visible change
        finals.append((weight.detach().clone(), bias.detach().clone()))
    _assert_same_finals(finals)


# ------------------------------------------------------- test_step_is_noop_when_params_have_no_grad
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_step_is_noop_when_params_have_no_grad(cls, kwargs):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    before = [p.clone() for p in params]
    opt = cls(params, **fresh(kwargs))
    out = opt.step(lambda: torch.tensor([1.0]))
    assert torch.equal(out, torch.tensor([1.0]))  # the closure's value is returned
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert all(len(opt.state[p]) == 0 for p in params)


# ----------------------------------------------------------------- test_step_is_noop_for_zero_grads
# weight decay moves parameters without gradients: torch leaves those inputs out, so does this test
@pytest.mark.parametrize("cls, kwargs", [c for c in ALL_CASES if c.values[1].get("weight_decay", 0) == 0])
def test_step_is_noop_for_zero_grads(cls, kwargs):
    kwargs = fresh(kwargs)
    if cls is lt.AdamW:  # AdamW's default decoupled decay still moves θ: make it invisible, as torch does
        kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr"), torch.Tensor) else 1e-5
    torch.manual_seed(13)
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    opt = cls([param], **kwargs)
    param.grad = torch.zeros_like(param)
    opt.step(lambda: torch.tensor([1.0]))
    torch.testing.assert_close(param.detach(), before)
    assert torch.isfinite(param).all()



# ------------------------------------------------------------ test_mixed_device_dtype (CPU part)
@pytest.mark.parametrize("cls, kwargs", COMPARABLE)
def test_mixed_dtype_params_match_torch(cls, kwargs):
    """torch's test_mixed_device_dtype needs two GPUs; its point on one CPU: float64 and float32
    parameters (and an integer tensor without gradient) in one group, 7 steps on fixed gradients,
    parameters and state compared with torch's forloop."""
    torch.manual_seed(59)
    base = [
        torch.rand(2, 3, dtype=torch.float64),
        torch.rand(2, 3, dtype=torch.float32),
        torch.rand(3, dtype=torch.float64),
        torch.randint(1024, (2, 3), dtype=torch.int64),
    ]
    grads = [torch.rand_like(t) if t.is_floating_point() else None for t in base]
    runs = []
    for impl, kw in ((cls, fresh(kwargs)), (TORCH_EQUIVALENT[cls], torch_kwargs(kwargs))):
        params = [t.clone().requires_grad_(t.is_floating_point()) for t in base]
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt = impl(params, **kw)
        for _ in range(7):
            opt.step()
        runs.append((params, opt))
    (ours, opt), (theirs, ref) = runs
    for p, q in zip(ours, theirs):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        for key, value in ref.state[q].items():
            if key != "step":
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[3], base[3])  # the integer tensor had no gradient: untouched
    assert not torch.equal(ours[0].detach(), base[0])
