"""Rewritten from pytorch test/test_optim.py (TestOptimRenewed): test_state_dict_deterministic,
test_can_load_older_state_dict, test_can_load_from_to_named_state_dict,
test_save_load_equality_with_weights_only, test_load_nontensor_step,
test_deepcopy_copies_all_public_attrs, test_non_empty_state; and the older test/test_optim.py
TestOptim::_test_state_dict ("state dict wasn't modified" by loading). Inputs from
torch/testing/_internal/common_optimizers.py (optim_inputs_func_sgd/adamw/adafactor; the latter
mapped onto transformers' Adafactor keywords, see peer_support). leantrain states are compared
with themselves (round trips); loading torch.optim.SGD/AdamW state (test_load_nontensor_step's
python-number steps included) is compared with torch continuing its own run.
"""

from __future__ import annotations

import io
from copy import deepcopy

import pytest
import torch
from peer_support import TORCH_EQUIVALENT, case_params, fresh, quadratic_loss, torch_kwargs
from torch.nn import Parameter

from leantrain import optim as lt

ALL_CASES = case_params([lt.SGD, lt.AdamW, lt.AdaFactor, lt.AdaX])
# The flags torch added after the optimizers' first release (OptimizerInfo.not_og_supported_flags).
NOT_OG_FLAGS = ("foreach", "differentiable", "fused", "maximize", "capturable")


def _assert_state_dicts_equal(a, b):
    """Exact equality of two state dicts (tensors compared by value, everything else by ==)."""
    assert a.keys() == b.keys()
    assert a["param_groups"] == b["param_groups"] or _groups_equal(a["param_groups"], b["param_groups"])
    assert a["state"].keys() == b["state"].keys()
    for index, entry in a["state"].items():
        other = b["state"][index]
        assert entry.keys() == other.keys(), index
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other[key]), (index, key)
            else:
                assert value == other[key], (index, key)


def _groups_equal(ga, gb):
    if len(ga) != len(gb):
        return False
    for x, y in zip(ga, gb):
        if x.keys() != y.keys():
            return False
        for k in x:
            vx, vy = x[k], y[k]
            if isinstance(vx, torch.Tensor) or isinstance(vy, torch.Tensor):
                if not torch.equal(torch.as_tensor(vx), torch.as_tensor(vy)):
                    return False
            elif isinstance(vx, tuple) and any(isinstance(v, torch.Tensor) for v in vx):
                if not all(torch.equal(torch.as_tensor(p), torch.as_tensor(q)) for p, q in zip(vx, vy)):
                    return False
            elif vx != vy:
                return False
    return True


def _without_param_names(state_dict):
    out = deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("param_names", None)
    return out


# --------------------------------------------------------------- test_state_dict_deterministic
@pytest.mark.parametrize("named0, named1", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain-plain", "named-plain", "plain-named", "named-named"])
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_state_dict_deterministic(cls, kwargs, named0, named1):
    torch.manual_seed(31)
    weight = Parameter(torch.randn(2, 3))
    bias = Parameter(torch.randn(2))
    inp = torch.randn(3)

    def as_named(params, named):
        return [(f"name{i}", p) for i, p in enumerate(params)] if named else params

    def fwd_bwd(opt, w, b):
        opt.zero_grad()
        loss = quadratic_loss(w, b, inp)
        loss.backward()
        return loss

    opt = cls(as_named([weight, bias], named0), **fresh(kwargs))
    for _ in range(10):
        fwd_bwd(opt, weight, bias)
        opt.step()
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = cls(as_named([weight_c, bias_c], named1), **fresh(kwargs))
    saved = deepcopy(opt.state_dict())
    untouched = deepcopy(saved)
    opt_c.load_state_dict(saved)
    _assert_state_dicts_equal(saved, untouched)  # loading must not modify the dict it is given
    for _ in range(10):
        fwd_bwd(opt, weight, bias)
        fwd_bwd(opt_c, weight_c, bias_c)
        opt.step()
        opt_c.step()
        assert torch.equal(weight, weight_c)
        assert torch.equal(bias, bias_c)
    _assert_state_dicts_equal(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
    # repeated parameter groups have identical representations (pytorch issue #36831)
    opt_c.param_groups.extend(opt_c.param_groups)
    last = _without_param_names(opt_c.state_dict())["param_groups"][-1]
    assert _groups_equal([_without_param_names(opt.state_dict())["param_groups"][-1]], [last])


# -------------------------------------------------------------- test_can_load_older_state_dict
def _conv_bn_model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_can_load_older_state_dict(cls, kwargs):
    model = _conv_bn_model()
    inp = torch.rand(1, 4, 16, 16)
    opt = cls(model.parameters(), **fresh(kwargs))

    def fwd_bwd(o, m):
        o.zero_grad()
        m(inp).sum().backward()

    for _ in range(3):
        fwd_bwd(opt, model)
        opt.step()
    twin_model = deepcopy(model)
    twin = cls(twin_model.parameters(), **fresh(kwargs))
    twin.load_state_dict(deepcopy(opt.state_dict()))

    old = deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for flag in NOT_OG_FLAGS:
            group.pop(flag, None)
    opt.load_state_dict(old)
    for group, twin_group in zip(opt.param_groups, twin.param_groups):
        for flag in NOT_OG_FLAGS:  # absent flags are taken from this optimizer, as torch's defaults
            if flag in twin_group:
                assert group[flag] == twin_group[flag]
    for _ in range(2):  # it can still step, and exactly as the unmodified state would
        fwd_bwd(opt, model)
        fwd_bwd(twin, twin_model)
        opt.step()
        twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------ test_can_load_from_to_named_state_dict
@pytest.mark.parametrize("named0, named1", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["plain-plain", "named-plain", "plain-named", "named-named"])
@pytest.mark.parametrize("cls", [lt.SGD, lt.AdamW, lt.AdaFactor, lt.AdaX], ids=lambda c: c.__name__)
def test_can_load_from_to_named_state_dict(cls, named0, named1):
    model = _conv_bn_model()
    inp = torch.rand(1, 4, 16, 16)
    kwargs = {"momentum": 0.9} if cls is lt.SGD else {}

    def fwd_bwd(o):
        o.zero_grad()
        model(inp).sum().backward()

    opt = cls(model.named_parameters() if named0 else model.parameters(), **kwargs)
    for _ in range(3):
        fwd_bwd(opt)
        opt.step()
    saved = deepcopy(opt.state_dict())
    opt2 = cls(model.named_parameters() if named1 else model.parameters(), **kwargs)
    opt2.load_state_dict(saved)
    before = [p.detach().clone() for p in model.parameters()]
    fwd_bwd(opt2)
    opt2.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if named0 or named1:
        assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    else:
        assert "param_names" not in opt2.state_dict()["param_groups"][0]


# ----------------------------------------------------- test_save_load_equality_with_weights_only
@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_save_load_equality_with_weights_only(cls, kwargs, named):
    torch.manual_seed(37)
    weight, bias, inp = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2)), torch.randn(3)
    params = [("name0", weight), ("name1", bias)] if named else [weight, bias]
    opt = cls(params, **fresh(kwargs))

    def closure():
        opt.zero_grad()
        loss = quadratic_loss(weight, bias, inp)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    for weights_only in (False, True):
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=weights_only)
        _assert_state_dicts_equal(loaded, sd)


# ------------------------------------------------------------------ test_load_nontensor_step
@pytest.mark.parametrize("step_as_number", [False, True], ids=["tensor_step", "number_step"])
@pytest.mark.parametrize("cls, kwargs", case_params([lt.SGD, lt.AdamW]))
def test_load_torch_state_dict_and_continue_like_torch(cls, kwargs, step_as_number):
    """A torch.optim.SGD/AdamW state (steps as tensors, or python numbers as in
    test_load_nontensor_step) loaded into leantrain continues torch's trajectory."""
    torch.manual_seed(41)
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    ref = TORCH_EQUIVALENT[cls](params, **torch_kwargs(kwargs))
    grads = [[torch.rand_like(p) for p in params] for _ in range(6)]
    for step in range(3):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        ref.step()
    state_dict = deepcopy(ref.state_dict())
    if step_as_number:
        for entry in state_dict["state"].values():
            if torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].item()
    ours_params = [Parameter(p.detach().clone()) for p in params]
    ours = cls(ours_params, **fresh(kwargs))
    ours.load_state_dict(state_dict)
    for step in range(3, 6):
        for p, q, g in zip(params, ours_params, grads[step]):
            p.grad = g.clone()
            q.grad = g.clone()
        ref.step()
        ours.step()
        for p, q in zip(params, ours_params):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_load_own_state_dict_with_number_steps(cls, kwargs):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = cls(params, **fresh(kwargs))
    for _ in range(3):
        opt.step()
    state_dict = deepcopy(opt.state_dict())
    for entry in state_dict["state"].values():
        if torch.is_tensor(entry.get("step")):
            entry["step"] = entry["step"].item()
    twin_params = [Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twin_params):
        q.grad = p.grad.clone()
    twin = cls(twin_params, **fresh(kwargs))
    twin.load_state_dict(state_dict)
    opt.step()
    twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


# --------------------------------------------------------- test_deepcopy_copies_all_public_attrs
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_deepcopy_copies_all_public_attrs(cls, kwargs):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = cls(params, **fresh(kwargs))
    for _ in range(3):
        opt.step()

    def public(obj):
        return {k for k in obj.__dict__ if not k.startswith("_")}

    copied = deepcopy(opt)
    assert public(opt) == public(copied)
    assert public(opt)  # state, param_groups, defaults at least
    # the copy carries the same state values
    for p, q in zip(params, copied.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            other = copied.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# ------------------------------------------------------------------------- test_non_empty_state
@pytest.mark.parametrize("cls, kwargs", ALL_CASES)
def test_non_empty_state(cls, kwargs):
    torch.manual_seed(43)
    model = torch.nn.Linear(5, 5)
    opt = cls(model.parameters(), **fresh(kwargs))
    opt.zero_grad()
    model(torch.rand(2, 5)).sum().backward()
    opt.step()
    assert len(opt.state) == 2
    for state in opt.state.values():
        assert len(state) > 0
        assert state["step"] == 1


# ------------------------------------------------------------- test_state_dict_with_cuda_params
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls, kwargs", [
    pytest.param(lt.SGD, {"momentum": 0.9, "weight_decay": 0.1}, id="SGD"),
    pytest.param(lt.AdamW, {"amsgrad": True}, id="AdamW"),
    pytest.param(lt.AdaFactor, {"beta1": 0.9}, id="AdaFactor"),
    pytest.param(lt.AdaX, {}, id="AdaX"),
])
def test_state_dict_with_cuda_params(cls, kwargs):
    """A CPU optimizer's state loaded into the same optimizer over CUDA copies of the parameters:
    the state dict passed in is not modified, and both continue identically."""
    torch.manual_seed(47)
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    grads = [[torch.randn(2, 3) for _ in params] for _ in range(8)]
    opt = cls(params, **fresh(kwargs))
    for step in range(3):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
    with torch.no_grad():
        params_cuda = [Parameter(p.detach().to("cuda")) for p in params]
    opt_cuda = cls(params_cuda, **fresh(kwargs))
    saved = deepcopy(opt.state_dict())
    untouched = deepcopy(saved)
    opt_cuda.load_state_dict(saved)
    _assert_state_dicts_equal(saved, untouched)
    for entry in opt_cuda.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.device.type == "cuda"
    for step in range(3, 8):
        for p, q, g in zip(params, params_cuda, grads[step]):
            p.grad = g.clone()
            q.grad = g.to("cuda")
        opt.step()
        opt_cuda.step()
        for p, q in zip(params, params_cuda):
            torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-5, atol=1e-6)
