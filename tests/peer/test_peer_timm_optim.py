"""Rewritten from huggingface/pytorch-image-models (timm) tests/test_optim.py: test_optim_factory,
test_sgd, test_adam, test_adafactor, test_lookahead_sgd, test_lookahead_adam, with their helpers
_test_basic_cases (_test_state_dict, _test_basic_cases_template incl. non-contiguous parameters),
_test_rosenbrock and _test_model.

timm builds its optimizers with create_optimizer_v2; each is replaced by the leantrain optimizer
with the same mathematics at k = 1:
  'sgd'      -> torch.optim.SGD(momentum=0.9, nesterov=True)  -> lt.SGD(momentum=0.9, nesterov=True)
  'momentum' -> torch.optim.SGD(momentum=0.9)                 -> lt.SGD(momentum=0.9)
  'adamw'    -> torch.optim.AdamW(weight_decay=0)             -> lt.AdamW(weight_decay=0)
  'adafactor'-> timm.optim.Adafactor: relative step only when lr is None, and then scaled by the
                parameter RMS; a manual lr is used as is; factored only when both of the last two
                dims exceed 16                                -> lt.AdaFactor(lr=..., relative_step=False,
                scale_parameter=False, min_dim_size_to_factor=17), or lt.AdaFactor() for lr=None
  'lookahead_X' -> timm Lookahead(k=6, alpha=0.5)              -> lt.Lookahead(X, k=6, alpha=0.5)
Where the timm optimizer is a torch one, the leantrain run is also compared with it numerically.
"""

from __future__ import annotations

import functools
from copy import deepcopy

import pytest
import torch
from peer_support import clone_param, coordinate_rosenbrock_step
from torch.nn import Parameter

from leantrain import optim as lt


# ---------------------------------------------------------- create_optimizer_v2 equivalents
def make(name: str, params, lr=None, **kwargs):
    """leantrain's counterpart of ``create_optimizer_v2(params, name, lr=lr, **kwargs)``."""
    lookahead = name.startswith("lookahead_")
    name = name.removeprefix("lookahead_")
    wd = kwargs.pop("weight_decay", 0.0)
    if name in ("sgd", "momentum"):
        opt = lt.SGD(params, lr=1e-3 if lr is None else lr, momentum=kwargs.pop("momentum", 0.9),
                     nesterov=name == "sgd", weight_decay=wd, **kwargs)
    elif name == "adamw":
        opt = lt.AdamW(params, **({} if lr is None else {"lr": lr}), weight_decay=wd, **kwargs)
    elif name == "adafactor":
        if lr:  # timm: relative_step = not lr; a manual lr is not scaled by the parameter RMS
            opt = lt.AdaFactor(params, lr=lr, relative_step=False, scale_parameter=False,
                               weight_decay=wd, min_dim_size_to_factor=17, **kwargs)
        else:
            opt = lt.AdaFactor(params, weight_decay=wd, min_dim_size_to_factor=17, **kwargs)
    else:
        raise KeyError(name)
    return lt.Lookahead(opt, k=6, alpha=0.5) if lookahead else opt


def make_torch(name: str, params, lr=None, **kwargs):
    """What timm's create_optimizer_v2 builds for the torch-backed names (the numeric reference)."""
    wd = kwargs.pop("weight_decay", 0.0)
    if name in ("sgd", "momentum"):
        return torch.optim.SGD(params, lr=1e-3 if lr is None else lr, momentum=kwargs.pop("momentum", 0.9),
                               nesterov=name == "sgd", weight_decay=wd, foreach=False, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **({} if lr is None else {"lr": lr}), weight_decay=wd, foreach=False,
                                 **kwargs)
    return None


def build_params_dict(weight, bias, **kwargs):
    return [{"params": [weight]}, dict(params=[bias], **kwargs)]


def build_params_dict_single(weight, bias, **kwargs):
    return [dict(params=bias, **kwargs)]


# --------------------------------------------------------------------------------- helpers
def _fn(optimizer, weight, bias, inp):
    optimizer.zero_grad()
    loss = (weight.mv(inp) + bias).pow(2).sum()
    loss.backward()
    return loss


def _state_dict_case(constructor, gen):
    weight = Parameter(torch.randn(10, 5, generator=gen))
    bias = Parameter(torch.randn(10, generator=gen))
    inp = torch.randn(5, generator=gen)
    opt = constructor(weight, bias)
    fn = functools.partial(_fn, opt, weight, bias, inp)
    for _ in range(20):
        opt.step(fn)
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = constructor(weight_c, bias_c)
    fn_c = functools.partial(_fn, opt_c, weight_c, bias_c, inp)
    opt_c.load_state_dict(deepcopy(opt.state_dict()))
    for _ in range(20):
        opt.step(fn)
        opt_c.step(fn_c)
        assert torch.equal(weight, weight_c)
        assert torch.equal(bias, bias_c)
    a, b = opt.state_dict(), opt_c.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entry in a["state"].items():
        for key, value in entry.items():
            other = b["state"][index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    # repeated parameter groups have identical representations
    opt_c.param_groups.extend(opt_c.param_groups)
    assert opt.state_dict()["param_groups"][-1] == opt_c.state_dict()["param_groups"][-1]


def _template_case(constructor, weight, bias, inp, reference=None):
    weight, bias = Parameter(weight), Parameter(bias)
    opt = constructor(weight, bias)
    assert repr(opt)
    initial = _fn(opt, weight, bias, inp).item()
    runs = [(opt, weight, bias)]
    if reference is not None:
        ref_w, ref_b = clone_param(weight), clone_param(bias)
        runs.append((reference(ref_w, ref_b), ref_w, ref_b))
    for _ in range(200):
        for o, w, b in runs:
            o.step(functools.partial(_fn, o, w, b, inp))
    assert _fn(opt, weight, bias, inp).item() < initial
    if reference is not None:
        (_, w, b), (_, rw, rb) = runs
        torch.testing.assert_close(w.detach(), rw.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-5, atol=1e-6)


def basic_cases(constructor, reference=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    _state_dict_case(constructor, gen)
    _template_case(constructor, torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen),
                   torch.randn(5, generator=gen), reference)
    # non-contiguous parameters
    _template_case(constructor, torch.randn(10, 5, 2, generator=gen)[..., 0], torch.randn(10, 2, generator=gen)[..., 0],
                   torch.randn(5, generator=gen), reference)


def rosenbrock_case(constructor, reference=None):
    start = torch.tensor([1.5, 1.5])
    params = Parameter(start.clone())
    opt = constructor([params])
    runs = [(opt, params)]
    if reference is not None:
        ref_params = Parameter(start.clone())
        runs.append((reference([ref_params]), ref_params))
    solution = torch.tensor([1.0, 1.0])
    initial_dist = start.dist(solution)

    for i in range(2000):
        for o, p in runs:
            o.step(functools.partial(coordinate_rosenbrock_step, o, p, i % 2))
    assert params.detach().dist(solution) <= initial_dist
    if reference is not None:
        torch.testing.assert_close(params.detach(), runs[1][1].detach(), rtol=1e-4, atol=1e-5)


def model_case(name, lr, reference=True):
    def build():
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[-0.2109, -0.4976], [-0.1413, -0.3420], [-0.2524, 0.6976]]))
            model[0].bias.copy_(torch.tensor([-0.1085, -0.2979, 0.6892]))
            model[2].weight.copy_(torch.tensor([[-0.0508, -0.3941, -0.2843]]))
            model[2].bias.copy_(torch.tensor([-0.0711]))
        return model

    inp = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
    model = build()
    # create_optimizer_v2(model, ...) with weight_decay=0 puts every parameter in one group with wd 0
    opt = make(name, [{"params": list(model.parameters()), "weight_decay": 0.0}], lr=lr)
    ref_model = build()
    ref = make_torch(name, [{"params": list(ref_model.parameters()), "weight_decay": 0.0}], lr=lr) if reference else None
    prev = float("inf")
    for _ in range(20):
        opt.zero_grad()
        loss = model(inp).sum()
        loss.backward()
        assert loss.item() < prev
        prev = loss.item()
        opt.step()
        if ref is not None:
            ref.zero_grad()
            ref_model(inp).sum().backward()
            ref.step()
    if ref is not None:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- test_optim_factory
@pytest.mark.parametrize("name", ["sgd", "momentum", "adamw", "adafactor"])
@pytest.mark.parametrize("variant", ["flat", "two_groups", "single_group", "single_group_default_lr"])
def test_optim_factory_basic_cases(name, variant):
    lr = 1e-2
    torch_backed = name != "adafactor"
    if variant == "flat":
        constructor = lambda w, b: make(name, [w, b], lr=lr)  # noqa: E731
        reference = (lambda w, b: make_torch(name, [w, b], lr=lr)) if torch_backed else None
    elif variant == "two_groups":
        constructor = lambda w, b: make(name, build_params_dict(w, b, lr=lr), lr=lr / 10)  # noqa: E731
        reference = (lambda w, b: make_torch(name, build_params_dict(w, b, lr=lr), lr=lr / 10)) if torch_backed else None
    elif variant == "single_group":
        constructor = lambda w, b: make(name, build_params_dict_single(w, b, lr=lr), lr=lr / 10)  # noqa: E731
        reference = (lambda w, b: make_torch(name, build_params_dict_single(w, b, lr=lr), lr=lr / 10)) if torch_backed else None
    else:
        constructor = lambda w, b: make(name, build_params_dict_single(w, b, lr=lr))  # noqa: E731
        reference = (lambda w, b: make_torch(name, build_params_dict_single(w, b, lr=lr))) if torch_backed else None
    basic_cases(constructor, reference)


# ------------------------------------------------------------------------------------ test_sgd
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_wd", "wd"])
def test_sgd_momentum_one_basic_cases(weight_decay):
    basic_cases(lambda w, b: make("sgd", [w, b], lr=3e-3, momentum=1, weight_decay=weight_decay),
                lambda w, b: make_torch("sgd", [w, b], lr=3e-3, momentum=1, weight_decay=weight_decay))


@pytest.mark.parametrize("name, lr", [("sgd", 1e-3), ("adamw", 5e-2), ("adafactor", 5e-2)])
def test_rosenbrock(name, lr):
    reference = (lambda params: make_torch(name, params, lr=lr)) if name != "adafactor" else None
    rosenbrock_case(lambda params: make(name, params, lr=lr), reference)


@pytest.mark.parametrize("name, lr", [("sgd", 1e-3), ("adamw", 5e-2), ("adafactor", 5e-2)])
def test_model(name, lr):
    model_case(name, lr, reference=name != "adafactor")


# ------------------------------------------------------------------------------- test_adafactor
def test_adafactor_weight_decay_basic_cases():
    basic_cases(lambda w, b: make("adafactor", [w, b], lr=1e-3, weight_decay=1))


# ---------------------------------------------------------------------- test_lookahead_sgd / _adam
@pytest.mark.parametrize("name, lr", [("lookahead_sgd", 1e-3), ("lookahead_momentum", 1e-3), ("lookahead_adamw", 5e-2)])
def test_lookahead_rosenbrock(name, lr):
    rosenbrock_case(lambda params: make(name, params, lr=lr))
