"""Shared support for the peer tests (cases vendored from other projects' optimizer suites).

Written for leantrain; no code is copied from those projects. Each ``test_peer_*`` module
names the project, file and tests its cases were rewritten from.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import Parameter

from leantrain import optim as lt

# Tolerances for comparing leantrain with the optimizer it replaces (k = 1: same math,
# possibly another order of floating-point operations).
FP32 = dict(rtol=1e-5, atol=1e-6)
FP64 = dict(rtol=1e-10, atol=1e-12)


def tol_for(dtype: torch.dtype) -> dict:
    return FP64 if dtype == torch.float64 else FP32


def fresh(kwargs: dict) -> dict:
    """A private copy of optimizer kwargs: tensor lrs/betas must not be shared (schedulers mutate them)."""
    return copy.deepcopy(kwargs)


def weight_bias_input(*, contiguous: bool = True, dtype=torch.float32, seed: int = 0):
    """The (10, 5) weight, (10,) bias and (5,) input of the torch/timm 'basic cases'.

    ``contiguous=False`` takes every other element of a larger tensor, as those suites
    do, so the parameters are strided views made into Parameters.
    """
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = torch.randn(10, 5, generator=gen, dtype=dtype)
        bias = torch.randn(10, generator=gen, dtype=dtype)
    else:
        weight = torch.randn(10, 5, 2, generator=gen, dtype=dtype)[..., 0]
        bias = torch.randn(10, 2, generator=gen, dtype=dtype)[..., 0]
    inp = torch.randn(5, generator=gen, dtype=dtype)
    return Parameter(weight), Parameter(bias), inp


def clone_param(p: torch.Tensor) -> Parameter:
    """A Parameter with the same values *and strides* (non-contiguous stays non-contiguous)."""
    out = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
    out.copy_(p.detach())
    return Parameter(out)


def quadratic_loss(weight, bias, inp):
    return (weight.mv(inp) + bias).pow(2).sum()


def tiny_mlp(dtype=torch.float64, seed: int = 1) -> torch.nn.Sequential:
    """Linear(2,3) -> Sigmoid -> Linear(3,1) -> Sigmoid, the model of torch's/timm's model tests."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid())
    return model.to(dtype)


def mlp_input(dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def coordinate_rosenbrock_step(optimizer, param: torch.Tensor, w: int) -> float:
    """One closure of the suites' cyclic coordinate descent on Rosenbrock: the gradient of
    only x (w=1) or only y (w=0) is given. Computed in Python floats (the suites' autograd pass
    is overwritten by this gradient anyway), which keeps 2000-step runs fast."""
    optimizer.zero_grad()
    x, y = param.detach().tolist()
    if w:
        grad = [-400.0 * x * (y - x * x) - 2.0 * (1.0 - x), 0.0]
    else:
        grad = [0.0, 200.0 * (y - x * x)]
    param.grad = torch.tensor(grad, dtype=param.dtype)
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


# ----------------------------------------------------------------- optimizer inputs
# torch/testing/_internal/common_optimizers.py: optim_inputs_func_sgd (CPU list).
SGD_INPUTS = {
    "default": {},
    "non-default lr": {"lr": 1e-2},
    "tensor lr": {"lr": torch.tensor(0.001)},
    "non-zero weight_decay": {"weight_decay": 0.5},
    "momentum": {"momentum": 0.9},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "dampening": {"momentum": 0.9, "dampening": 0.5},
    "weight_decay w/ momentum": {"momentum": 0.9, "weight_decay": 0.1},
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
}

# optim_inputs_func_adam(w) (CPU list) plus the tensor-lr / tensor-betas configs that torch
# lists for CUDA with capturable=True, here without capturable (a CUDA-graph flag).
ADAMW_INPUTS = {
    "default": {},
    "non-default lr": {"lr": 0.01},
    "nonzero weight_decay": {"weight_decay": 0.1},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "amsgrad": {"weight_decay": 0.1, "amsgrad": True},
    "tensor lr, amsgrad": {"lr": torch.tensor(0.001), "amsgrad": True},
    "tensor lr, tensor betas": {"lr": torch.tensor(0.001), "betas": (torch.tensor(0.9), torch.tensor(0.99))},
}

# optim_inputs_func_adafactor mapped onto transformers' Adafactor keywords (leantrain follows
# transformers): torch's beta2_decay is transformers' decay_rate, its d is clip_threshold, and
# a manual lr needs relative_step=False.
ADAFACTOR_INPUTS = {
    "default": {},
    "nonzero weight_decay": {"weight_decay": 0.1, "lr": 0.01, "relative_step": False},
    "maximize": {"weight_decay": 0.1, "maximize": True},
    "non-default decay_rate": {"decay_rate": -1.0},
    "non-default clip_threshold": {"clip_threshold": 1.5},
    "beta1": {"beta1": 0.9},
}

ADAX_INPUTS = {
    "default": {},
    "lr, weight_decay": {"lr": 0.01, "weight_decay": 0.1},
    "maximize": {"maximize": True},
}

INPUTS = {lt.SGD: SGD_INPUTS, lt.AdamW: ADAMW_INPUTS, lt.AdaFactor: ADAFACTOR_INPUTS, lt.AdaX: ADAX_INPUTS}
TORCH_EQUIVALENT = {lt.SGD: torch.optim.SGD, lt.AdamW: torch.optim.AdamW}


def leantrain_variants(cls) -> list[dict]:
    """Implementation variants worth running: AdamW with ``fused=False`` forces leantrain's own
    multi-tensor math (the default takes torch's fused kernel for plain fp32 tensors). The other
    flags leantrain accepts (foreach=True, SGD fused=False) select the same code path as the
    default; test_peer_torch_api checks that they give identical results.
    """
    if cls is lt.AdamW:
        return [{}, {"fused": False}]
    return [{}]


def all_inputs(cls) -> list[tuple[str, dict]]:
    """(id, kwargs) for every input of ``cls`` crossed with its accepted implementation flags."""
    out = []
    for desc, kwargs in INPUTS[cls].items():
        for flags in leantrain_variants(cls):
            label = desc + "".join(f" & {k}={v}" for k, v in flags.items())
            out.append((label, {**kwargs, **flags}))
    return out


def case_params(classes) -> list:
    """pytest params (cls, kwargs) with readable ids."""
    import pytest

    return [pytest.param(cls, kwargs, id=f"{cls.__name__}-{label}") for cls in classes for label, kwargs in all_inputs(cls)]


def torch_kwargs(kwargs: dict) -> dict:
    """leantrain kwargs for the torch reference: drop implementation flags, run torch's forloop."""
    out = {k: v for k, v in fresh(kwargs).items() if k not in ("foreach", "fused")}
    out["foreach"] = False
    return out


_TRANSFORMERS_ADAFACTOR_KEYS = {"lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                                "relative_step", "warmup_init"}


def reference(cls, kwargs: dict):
    """(optimizer class, kwargs) of the optimizer ``cls`` replaces, for these kwargs; None if there is none.

    SGD/AdamW -> torch.optim (forloop); AdaFactor -> transformers' Adafactor when only its keywords
    are used (it has no ``maximize``); AdaX has no reference implementation here.
    """
    if cls in TORCH_EQUIVALENT:
        return TORCH_EQUIVALENT[cls], torch_kwargs(kwargs)
    if cls is lt.AdaFactor and set(kwargs) <= _TRANSFORMERS_ADAFACTOR_KEYS:
        from transformers.optimization import Adafactor

        return Adafactor, fresh(kwargs)
    return None


def with_manual_lr(cls, kwargs: dict, lr) -> dict:
    """``kwargs`` with a manual ``lr``; AdaFactor then needs relative_step=False (transformers' rule)."""
    out = {**fresh(kwargs), "lr": lr}
    if cls is lt.AdaFactor:
        out["relative_step"] = False
    return out
