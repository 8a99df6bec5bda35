"""Rewritten from pytorch test/test_optim.py (TestOptimRenewed): test_errors (with
torch/testing/_internal/common_optimizers.py get_error_inputs_for_all_optims,
optim_error_inputs_func_sgd, optim_error_inputs_func_adam/adamw), test_optimizer_can_be_printed,
test_step_pre_hook, test_step_post_hook, test_step_all_hooks, test_state_dict_pre_hook,
test_state_dict_post_hook, test_state_dict_pre_post_hook, test_load_state_dict_pre_hook_and_prepend,
test_load_state_dict_post_hook, test_load_state_dict_pre_post_hook; test_optim_infos_do_not_specify_
global_cliquey_kwargs's point (implementation flags change nothing but the implementation) is checked
as "the flags leantrain accepts give identical results"; and SGD's supports_sparse / test_rosenbrock_sparse
as leantrain's documented refusal of sparse gradients.

Error *types* follow torch; messages are leantrain's own (they name the argument), so they are
matched on the argument name, not on torch's wording.
"""

from __future__ import annotations

import warnings
from copy import deepcopy

import pytest
import torch
from peer_support import case_params, fresh, quadratic_loss, weight_bias_input
from torch.nn import Parameter
from torch.optim import SGD as TorchSGD
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from leantrain import optim as lt

CLASSES = [lt.SGD, lt.AdamW, lt.AdaFactor, lt.AdaX]
ALL_CASES = case_params(CLASSES)


# ---------------------------------------------------------------------------------- test_errors
def _sample_params():
    return Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_errors_common_to_all_optimizers(cls):
    p1, p2 = _sample_params()
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        cls(p1)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        cls([p1, p1])
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": p1}, {"params": p1}])
    with pytest.raises(ValueError, match="with/without names"):
        cls([("weight", p1), p2])
    with pytest.raises(ValueError, match="with/without names"):
        cls([{"params": [p1], "lr": 1e-2}, {"params": [("weight", p2)]}])


@pytest.mark.parametrize("cls", [lt.SGD, lt.AdamW, lt.AdaX], ids=lambda c: c.__name__)
def test_error_tensor_lr_must_be_one_element(cls):
    p1, _ = _sample_params()
    with pytest.raises(ValueError, match="lr"):
        cls([p1], lr=torch.tensor([0.001, 0.001]))


def test_sgd_errors():
    p1, _ = _sample_params()
    with pytest.raises(ValueError, match="momentum"):
        lt.SGD([p1], lr=1e-2, momentum=-0.5)
    with pytest.raises(ValueError, match="lr"):
        lt.SGD([p1], lr=-1e-2)
    with pytest.raises(ValueError, match="weight_decay"):
        lt.SGD([p1], lr=1e-2, weight_decay=-1)
    with pytest.raises(ValueError, match="[Nn]esterov"):  # torch: "Nesterov momentum requires a momentum and zero dampening"
        lt.SGD([p1], lr=1e-2, nesterov=True, momentum=0.0)


@pytest.mark.parametrize("cls", [lt.AdamW, lt.AdaX], ids=lambda c: c.__name__)
def test_adam_family_errors(cls):
    p1, _ = _sample_params()
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        cls([p1], lr=1e-2, betas=(1.0, 0.0) if cls is lt.AdamW else (1.0, 1e-4))
    with pytest.raises(ValueError, match="weight_decay"):
        cls([p1], lr=1e-2, weight_decay=-1)
    with pytest.raises(ValueError, match="eps"):
        cls([p1], lr=1e-2, eps=-1e-8)


def test_adamw_beta2_error():
    p1, _ = _sample_params()
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        lt.AdamW([p1], lr=1e-2, betas=(0.9, 1.0))


def test_adafactor_errors():
    """transformers' Adafactor raises ValueError for a manual lr with relative_step and for
    warmup_init without relative_step; torch's eps1 >= 0 check (optim_error_inputs_func_adafactor)."""
    p1, _ = _sample_params()
    with pytest.raises(ValueError, match="relative_step"):
        lt.AdaFactor([p1], lr=1e-3)
    with pytest.raises(ValueError, match="warmup_init"):
        lt.AdaFactor([p1], lr=1e-3, relative_step=False, warmup_init=True)
    with pytest.raises(ValueError, match=r"eps\[0\]"):
        lt.AdaFactor([p1], eps=(-1e-30, 1e-3))


@pytest.mark.parametrize("cls, flag, value", [
    (lt.SGD, "foreach", False), (lt.SGD, "differentiable", True), (lt.SGD, "fused", True),
    (lt.AdamW, "foreach", False), (lt.AdamW, "differentiable", True), (lt.AdamW, "capturable", True),
])
def test_unhonourable_torch_flags_are_refused_by_name(cls, flag, value):
    """Intended leantrain behaviour (not a torch case): values torch accepts but leantrain cannot
    honour raise a ValueError naming the argument instead of being ignored."""
    p1, _ = _sample_params()
    with pytest.raises(ValueError, match=flag):
        cls([p1], **{flag: value})


def test_sgd_sparse_gradients_are_refused():
    """torch's SGD supports sparse gradients (supports_sparse, test_rosenbrock_sparse); leantrain
    refuses them with a ValueError naming the alternative (dense embeddings + lazy_rows)."""
    param = Parameter(torch.tensor([1.5, 1.5]))
    opt = lt.SGD([param], lr=4.8e-3)
    param.grad = torch.sparse_coo_tensor(torch.tensor([[0, 0]]), torch.tensor([0.25, 0.75]), (2,), check_invariants=True)
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert torch.equal(param.detach(), torch.tensor([1.5, 1.5]))


# -------------------------------------------- implementation flags leave the mathematics unchanged
@pytest.mark.parametrize("cls, flags", [
    (lt.SGD, {"foreach": True}), (lt.SGD, {"fused": False}), (lt.SGD, {"foreach": None, "fused": None}),
    (lt.AdamW, {"foreach": True}), (lt.AdamW, {"fused": True}), (lt.AdamW, {"foreach": None}),
], ids=str)
def test_accepted_implementation_flags_give_identical_results(cls, flags):
    base = {"momentum": 0.9, "weight_decay": 0.1} if cls is lt.SGD else {"weight_decay": 0.1}
    results = []
    for extra in ({}, flags):
        weight, bias, inp = weight_bias_input(seed=47)
        opt = cls([weight, bias], **base, **extra)
        for _ in range(10):
            opt.zero_grad()
            quadratic_loss(weight, bias, inp).backward()
            opt.step()
        results.append((weight.detach().clone(), bias.detach().clone()))
    (w, b), (w2, b2) = results
    assert torch.equal(w, w2) and torch.equal(b, b2)


# --------------------------------------------------------------------- test_optimizer_can_be_printed
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_optimizer_can_be_printed(cls, kwargs):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = cls(params, **fresh(kwargs))
    text = repr(opt)
    assert text.startswith(cls.__name__ + " (")
    assert "Parameter Group 0" in text and "lr:" in text


# --------------------------------------------------------------------------------- step hooks
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_step_post_hook(cls, kwargs):
    data = 2

    def post_hook(opt, args, kw):
        nonlocal data
        data += 2

    opt = cls([torch.tensor([1.0, 1.0])], **fresh(kwargs))
    handle = opt.register_step_post_hook(post_hook)
    opt.step()
    opt.step()
    assert data == 6
    handle.remove()
    opt.step()
    assert data == 6


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_step_pre_hook(cls, kwargs):
    data = 5

    def pre_hook(opt, args, kw):
        nonlocal data
        data += 2

    opt = cls([torch.tensor([1.0, 1.0])], **fresh(kwargs))
    handle = opt.register_step_pre_hook(pre_hook)
    opt.step()
    opt.step()
    assert data == 9
    handle.remove()
    opt.step()
    assert data == 9


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_step_all_hooks(cls, kwargs):
    data = []
    params = [torch.tensor([1.0, 1.0])]
    opt = cls(params, **fresh(kwargs))
    other = TorchSGD(params)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt.register_step_post_hook(lambda o, a, k: data.append(2)),
        other.register_step_pre_hook(lambda o, a, k: data.append(1)),
        other.register_step_post_hook(lambda o, a, k: data.append(2)),
    ]
    try:
        opt.step()
        assert data == [0, 1, 2, 5]
        other.step()
        assert data == [0, 1, 2, 5, 0, 1, 2, 5]
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for h in handles:
            h.remove()
    opt.step()
    other.step()
    assert data == [0, 1, 2, 5] * 3


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_hooks_see_the_update(cls):
    """The post hook runs after the parameters moved (k = 1: every step() updates)."""
    param = Parameter(torch.tensor([1.0, -2.0]))
    opt = cls([param], **({"lr": 0.1} if cls is not lt.AdaFactor else {}))
    seen = {}

    def pre_hook(o, a, k):
        seen["pre"] = param.detach().clone()

    def post_hook(o, a, k):
        seen["post"] = param.detach().clone()

    opt.register_step_pre_hook(pre_hook)
    opt.register_step_post_hook(post_hook)
    param.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert torch.equal(seen["pre"], torch.tensor([1.0, -2.0]))
    assert torch.equal(seen["post"], param.detach())
    assert not torch.equal(seen["post"], seen["pre"])


# ------------------------------------------------------------------------- state_dict hooks
def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_state_dict_pre_hook(cls, kwargs):
    opt = cls([torch.rand(2, 3, requires_grad=True)], **fresh(kwargs))
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_state_dict_post_hook(cls, kwargs):
    opt = cls([torch.rand(2, 3, requires_grad=True)], **fresh(kwargs))
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_state_dict_pre_post_hook(cls, kwargs):
    opt = cls([torch.rand(2, 3, requires_grad=True)], **fresh(kwargs))
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"]
    assert state_dict["ran_state_dict_pre_hook"] is True


# -------------------------------------------------------------------- load_state_dict hooks
def _load_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(optimizer, state_dict):
    mine = deepcopy(state_dict)  # a hook may return a modified copy; that copy must be loaded
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_load_state_dict_pre_hook_and_prepend(cls, kwargs):
    opt = cls([torch.rand(2, 3, requires_grad=True)], **fresh(kwargs))
    state_dict = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_pre_hook1)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002  # prepended: hook1 runs last and wins


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_load_state_dict_post_hook(cls, kwargs):
    opt = cls([torch.rand(2, 3, requires_grad=True)], **fresh(kwargs))
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert not opt.state["ran_load_state_dict_pre_hook2"]  # (a 0-dim bool tensor for a tensor lr)
    assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_load_state_dict_pre_post_hook(cls, kwargs):
    opt = cls([torch.rand(2, 3, requires_grad=True)], **fresh(kwargs))
    opt.register_load_state_dict_pre_hook(_load_pre_hook2)
    opt.register_load_state_dict_post_hook(_load_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"]
    assert opt.state["ran_load_state_dict_post_hook"] is True


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_load_state_dict_post_hook_sees_loaded_state(cls):
    """Extends test_load_state_dict_post_hook: torch documents the post hook as called *after*
    ``load_state_dict`` loaded ``self``; with torch's optimizers the hook sees the loaded
    per-parameter state (step, moments), so a hook that inspects or moves state works."""
    param = Parameter(torch.randn(2, 3))
    opt = cls([param], **({"momentum": 0.9} if cls is lt.SGD else {}))
    param.grad = torch.rand_like(param)
    opt.step()
    saved = deepcopy(opt.state_dict())
    seen = {}

    def post_hook(optimizer):
        state = optimizer.state.get(param, {})
        seen["keys"] = set(state)
        seen["step"] = state.get("step")

    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(saved)
    assert seen["keys"] == set(saved["state"][0])
    assert seen["step"] == 1


def test_no_warnings_from_plain_use():
    """A plain k = 1 loop emits no warnings (e.g. no schedule-inside-cycle warning)."""
    weight, bias, inp = weight_bias_input(seed=53)
    opt = lt.AdamW([weight, bias], lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            opt.zero_grad()
            quadratic_loss(weight, bias, inp).backward()
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)
