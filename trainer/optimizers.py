"""Optimizer registry and construction from the recipe's ``optimizer`` section."""

from __future__ import annotations

import importlib
import re

import torch

from leantrain import optim

from .errors import RecipeError
from .schema import ComponentRef, Recipe

LEANTRAIN_OPTIMIZERS = {"SGD": optim.SGD, "AdamW": optim.AdamW, "AdaFactor": optim.AdaFactor, "AdaX": optim.AdaX,
                        "ZerothOrder": optim.ZerothOrder}
TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD",
                    "Adafactor")


def registry() -> dict[str, type]:
    """Name -> class. leantrain's under their names; torch's under ``torch.<Name>`` and,
    where no leantrain optimizer is spelt alike, under the bare name too."""
    names = dict(LEANTRAIN_OPTIMIZERS)
    ours = {n.lower() for n in LEANTRAIN_OPTIMIZERS}
    for name in TORCH_OPTIMIZERS:
        cls = getattr(torch.optim, name, None)
        if cls is None:
            continue
        names[f"torch.{name}"] = cls
        if name.lower() not in ours:
            names[name] = cls
    return names


def resolve_class(recipe: Recipe, source: str) -> type:
    cfg = recipe.optimizer
    if cfg.component:
        module, _, attr = cfg.component.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError):
            raise RecipeError(source, "optimizer._component_", f"cannot import {cfg.component!r}") from None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise RecipeError(source, "optimizer._component_", f"{cfg.component!r} is not a torch.optim.Optimizer")
        return cls
    names = registry()
    if cfg.name not in names:
        raise RecipeError(source, "optimizer.name", f"unknown optimizer {cfg.name!r}; allowed: {', '.join(sorted(names))}")
    return names[cfg.name]


def embeds_accumulation(cls: type) -> bool:
    return issubclass(cls, optim._accumulating.AccumulatingOptimizer)


def is_zeroth_order(cls: type) -> bool:
    """Forward passes only: the loop gives step() a closure instead of running backward."""
    return issubclass(cls, optim.ZerothOrder)


def param_groups(recipe: Recipe, model: torch.nn.Module) -> list[dict]:
    """Groups by name pattern (first match wins), then no weight decay on 1-D tensors."""
    cfg = recipe.optimizer
    rules = [(re.compile(rule.pattern), rule) for rule in cfg.param_groups]
    buckets: dict[tuple, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((r for pattern, r in rules if pattern.search(name)), None)
        lr = rule.lr if rule and rule.lr is not None else cfg.lr
        decay = rule.weight_decay if rule and rule.weight_decay is not None else cfg.weight_decay
        # ds_shape: a model built under DeepSpeed's zero.Init holds empty 1-D placeholders.
        if cfg.no_decay_1d and len(getattr(param, "ds_shape", param.shape)) < 2:
            decay = 0.0  # also when weight_decay is unset: the optimizer's default must not reach biases
        buckets.setdefault((lr, decay), []).append(param)
    groups = []
    for (lr, decay), params in buckets.items():
        group = {"params": params}
        if lr is not None:
            group["lr"] = lr
        if decay is not None:
            group["weight_decay"] = decay
        groups.append(group)
    return groups


# Optimizer arguments that the recipe spells elsewhere.
_RECIPE_KEYS = {"accum_steps": "accumulation.steps", "accum_mode": "accumulation.mode"}


def _recipe_key(message: str, cls: type) -> tuple[str, str]:
    """Map an optimizer's argument error to the recipe key the user wrote."""
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message)
    if unexpected:
        return f"optimizer.{unexpected[1]}", f"{cls.__name__} takes no argument {unexpected[1]!r}"
    named = re.match(r"^(\w+)(\[\d\])?(=| with | needs )", message)
    if named:
        key = _RECIPE_KEYS.get(named[1], f"optimizer.{named[1]}")
        for arg, recipe_key in _RECIPE_KEYS.items():
            message = message.replace(arg, recipe_key)
        return key, message
    return "optimizer", message


def _dtype_or_value(key: str, value):
    """YAML spells dtypes as strings: ``momentum_dtype: bfloat16`` -> torch.bfloat16."""
    if key.endswith("_dtype") and isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return value


def build_optimizer(recipe: Recipe, source: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer for ``model`` with accumulation, wrappers and groups from the recipe."""
    cls = resolve_class(recipe, source)
    acc = recipe.accumulation
    kwargs = {key: _dtype_or_value(key, value) for key, value in recipe.optimizer.kwargs().items()}
    if is_zeroth_order(cls):
        kwargs.update(accum_steps=acc.steps)
    elif embeds_accumulation(cls):
        if acc.mode == "standard":
            kwargs.update(accum_steps=1)  # the loop accumulates in .grad
        else:
            kwargs.update(accum_steps=acc.steps, accum_mode=acc.mode)
    if cls is optim.AdaFactor or recipe.optimizer.lr is None:
        kwargs.setdefault("lr", recipe.optimizer.lr)
    groups = param_groups(recipe, model)
    try:
        optimizer = cls(groups, **kwargs)
    except (TypeError, ValueError) as err:
        key, message = _recipe_key(str(err).splitlines()[0], cls)
        raise RecipeError(source, key, message) from None
    if recipe.optimizer.layer_adaptation:
        if not embeds_accumulation(cls):
            raise RecipeError(source, "optimizer.layer_adaptation", f"needs a leantrain optimizer, not {cls.__name__}")
        settings = recipe.optimizer.layer_adaptation
        try:
            optimizer = optim.LayerAdaptation(optimizer, max_trust_ratio=settings.max_trust_ratio,
                                              exclude_1d=settings.exclude_1d)
        except ValueError as err:
            raise RecipeError(source, "optimizer.layer_adaptation", str(err)) from None
    if recipe.optimizer.lookahead:
        optimizer = optim.Lookahead(optimizer, k=recipe.optimizer.lookahead.k, alpha=recipe.optimizer.lookahead.alpha)
    if recipe.optimizer.ema:
        optimizer = optim.EMA(optimizer, decay=recipe.optimizer.ema.decay)
    return optimizer


def check_combinations(recipe: Recipe, source: str) -> None:
    """Refuse impossible combinations before any model is loaded.

    The optimizer is built on a tiny stand-in parameter, so its own argument
    checks (ema without momentum, bad betas, unknown keywords) run here too.
    """
    cls = resolve_class(recipe, source)
    acc = recipe.accumulation
    reg = recipe.regularization
    if is_zeroth_order(cls):
        _check_zeroth_order(recipe, source)
    elif recipe.optimizer.objective != "loss":
        raise RecipeError(source, "optimizer.objective", f"{_objective_name(recipe)!r} has no gradient; only "
                          "optimizer.name: ZerothOrder optimises an objective other than the loss")
    if reg.gradient_penalty is not None and acc.fused:
        raise RecipeError(source, "regularization.gradient_penalty", "cannot compose with fused accumulation: the "
                          "finite-difference step needs the whole gradient before the parameters move; "
                          "use accumulation.fused: false")
    if acc.mode != "standard" and not embeds_accumulation(cls) and not is_zeroth_order(cls):
        raise RecipeError(source, "accumulation.mode", f"{acc.mode!r} folds gradients into the optimizer's momentum, "
                          f"which {cls.__name__} cannot do; use mode: standard or a leantrain optimizer "
                          f"({', '.join(LEANTRAIN_OPTIMIZERS)})")
    if acc.fused and acc.mode == "standard":
        raise RecipeError(source, "accumulation.fused", "fused accumulation needs mode exact or ema "
                          "(standard keeps gradients in .grad)")
    if acc.fused and recipe.optimizer.max_grad_norm is not None:
        raise RecipeError(source, "optimizer.max_grad_norm", optim.fused.CLIPPING_REFUSAL)
    if recipe.optimizer.max_grad_norm is not None and acc.mode != "standard":
        raise RecipeError(source, "optimizer.max_grad_norm", "global clipping needs the averaged gradient, which "
                          f"mode {acc.mode!r} never forms; use mode: standard, or max_update_rms per tensor")
    if recipe.optimizer.lr is None and cls is not optim.AdaFactor:
        raise RecipeError(source, "optimizer.lr", f"null is only meaningful for AdaFactor's relative step; "
                          f"{cls.__name__} needs a number")
    if recipe.optimizer.lr is None and recipe.schedule.name not in ("none", "constant"):
        raise RecipeError(source, "schedule.name", "AdaFactor's relative step (lr: null) is its own schedule; "
                          "use schedule.name: none, or give optimizer.lr with relative_step: false")
    stand_in = torch.nn.Linear(2, 2)
    build_optimizer(recipe, source, stand_in)


def _check_zeroth_order(recipe: Recipe, source: str) -> None:
    acc, cfg = recipe.accumulation, recipe.optimizer
    if acc.fused or acc.mode == "standard":
        raise RecipeError(source, "accumulation.fused" if acc.fused else "accumulation.mode",
                          "ZerothOrder computes no gradient: use mode exact, fused false (k micro-batches share "
                          "one perturbation)")
    for key in ("lookahead", "ema", "layer_adaptation", "max_grad_norm"):
        if getattr(cfg, key) is not None:
            raise RecipeError(source, f"optimizer.{key}", "not available with ZerothOrder")
    if recipe.regularization.gradient_penalty is not None:
        raise RecipeError(source, "regularization.gradient_penalty", "ZerothOrder computes no gradient to penalise")
    if cfg.objective == "accuracy" and recipe.model.task != "sequence-classification":
        raise RecipeError(source, "optimizer.objective", "accuracy needs model.task: sequence-classification")
    if isinstance(cfg.objective, ComponentRef) or cfg.objective not in ("loss", "accuracy"):
        resolve_objective(recipe, source)


def _objective_name(recipe: Recipe) -> str:
    objective = recipe.optimizer.objective
    return objective.component if isinstance(objective, ComponentRef) else objective


def resolve_objective(recipe: Recipe, source: str):
    """``optimizer.objective`` as a function (outputs, batch) -> float to minimise."""
    name = _objective_name(recipe)
    if name == "loss":
        return lambda outputs, batch: outputs.loss
    if name == "accuracy":
        return lambda outputs, batch: 1.0 - (outputs.logits.argmax(-1) == batch["labels"]).float().mean()
    module, _, attr = name.rpartition(".")
    try:
        function = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise RecipeError(source, "optimizer.objective", f"cannot import {name!r} (allowed: loss, accuracy, or a "
                          "dotted path to a function (outputs, batch) -> value to minimise)") from None
    if not callable(function):
        raise RecipeError(source, "optimizer.objective", f"{name!r} is not callable")
    return function
