"""State dicts across optimizers: continue a run started elsewhere, or hand one back.

``load_state_dict`` of a leantrain optimizer accepts the state of the
optimizer it replaces and maps it here:

- ``torch.optim.AdamW`` / ``Adam`` -> ``AdamW`` (step, exp_avg, exp_avg_sq,
  max_exp_avg_sq; Adam's L2 decay becomes decoupled decay: the moments mean
  the same thing);
- ``torch.optim.SGD`` -> ``SGD`` (momentum_buffer; torch counts no steps, so a
  present buffer counts as one update done);
- ``transformers.optimization.Adafactor`` -> ``AdaFactor`` with
  ``momentum_on="update"`` (its form).

The mapped run continues at a cycle boundary (micro-step 0). Hyperparameters
saved in the foreign groups (lr, betas, ...) win, as torch's own loading does;
leantrain's own keys (accum_steps, ...) keep this optimizer's values. A
state that cannot be mapped raises one ValueError line naming what is missing.

``export_state_dict(optimizer)`` goes the other way at a boundary, for
AdamW, SGD and AdaFactor(momentum_on="update").
"""

from __future__ import annotations

import copy

import torch

_TORCH_FLAGS = ("foreach", "capturable", "differentiable", "fused")


def to_native(optimizer, state_dict: dict) -> dict:
    """``state_dict`` in this optimizer's own layout, its state keys checked."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"{name}.load_state_dict: expected a dict with 'state' and 'param_groups' "
                         f"(an optimizer's state_dict()), got {type(state_dict).__name__}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"{name}.load_state_dict: the state dict has {len(saved_groups)} param group(s), "
                         f"this optimizer {len(optimizer.param_groups)}")
    if all("micro_step" in g for g in saved_groups):
        native = _fill_group_defaults(optimizer, state_dict)
    else:
        native = _from_foreign(optimizer, state_dict)
    _check_state_keys(optimizer, native)
    return native


# How an update runs, not what it computes: the optimizer being loaded into keeps its own setting (a run
# checkpointed with compiled=True may resume on a machine without a compiler).
IMPLEMENTATION_KEYS = ("compiled",)


def _fill_group_defaults(optimizer, state_dict: dict) -> dict:
    """A leantrain state dict from an older version may lack newer group keys: take ours."""
    groups = []
    for current, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        own = _own_keys(current)
        groups.append({**own, **saved, **{k: own[k] for k in IMPLEMENTATION_KEYS if k in own}})
    return {**state_dict, "param_groups": groups}


def _own_keys(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


def _detect(saved_groups: list[dict]) -> str:
    keys = set().union(*(g.keys() for g in saved_groups))
    if {"relative_step", "clip_threshold", "decay_rate"} <= keys:
        return "transformers.Adafactor"
    if "beta2_decay" in keys:
        return "torch.optim.Adafactor"
    if {"betas", "amsgrad"} <= keys:
        return "torch.optim.AdamW"
    if {"momentum", "dampening", "nesterov"} <= keys:
        return "torch.optim.SGD"
    return "an unknown optimizer"


def _from_foreign(optimizer, state_dict: dict) -> dict:
    name = type(optimizer).__name__
    source = _detect(state_dict["param_groups"])
    mapping = _MAPPINGS.get((name, source))
    if mapping is None:
        accepted = ", ".join(src for (ours, src) in _MAPPINGS if ours == name) or "none"
        raise ValueError(f"{name}.load_state_dict: cannot map the state of {source} "
                         f"(foreign states {name} accepts: {accepted})")
    group_keys, convert = mapping
    groups = []
    for current, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
        group = {**_own_keys(current), "params": list(saved["params"]), "micro_step": 0}
        group.update({k: saved[k] for k in group_keys if k in saved})
        if "param_names" in saved:
            group["param_names"] = saved["param_names"]
        groups.append(group)
    group_of = {index: g for g in groups for index in g["params"]}
    state = {}
    for index, entry in state_dict["state"].items():
        converted = convert(optimizer, group_of.get(index, groups[0]), dict(entry), name)
        if converted is not None:
            state[index] = converted
    return {"state": state, "param_groups": groups}


def _step_count(entry: dict) -> int:
    step = entry.pop("step", 0)
    return int(step.item() if isinstance(step, torch.Tensor) else step)


def _from_torch_adam(optimizer, group, entry: dict, name: str) -> dict:
    out = {"step": _step_count(entry), "cycle": -1}
    out.update({k: entry[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in entry})
    return out


def _from_torch_sgd(optimizer, group, entry: dict, name: str) -> dict | None:
    buffer = entry.get("momentum_buffer")
    if buffer is None:
        return None  # torch creates the buffer at the first step: nothing to carry over
    return {"step": 1, "cycle": -1, "momentum_buffer": buffer}


def _from_transformers_adafactor(optimizer, group, entry: dict, name: str) -> dict:
    if group.get("momentum_on") == "grad" and "exp_avg" in entry:
        raise ValueError(f"{name}.load_state_dict: transformers' Adafactor keeps momentum of the update, this "
                         "AdaFactor has momentum_on='grad'; construct it with momentum_on='update' to continue")
    out = {"step": _step_count(entry), "cycle": -1}
    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
        if key in entry:
            out[key] = entry[key]
    if "RMS" in entry:
        rms = entry["RMS"]
        out["RMS"] = rms.detach().clone().float() if isinstance(rms, torch.Tensor) else torch.tensor(float(rms))
    return out


_MAPPINGS = {
    ("AdamW", "torch.optim.AdamW"): (("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"), _from_torch_adam),
    ("SGD", "torch.optim.SGD"): (("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
                                 _from_torch_sgd),
    ("AdaFactor", "transformers.Adafactor"): (
        ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter", "relative_step",
         "warmup_init"), _from_transformers_adafactor),
}


def _check_state_keys(optimizer, state_dict: dict) -> None:
    """Every saved parameter state must hold what this optimizer would create for it."""
    name = type(optimizer).__name__
    params = [p for g in optimizer.param_groups for p in g["params"]]
    indices = [i for g in state_dict["param_groups"] for i in g["params"]]
    if len(params) != len(indices):
        raise ValueError(f"{name}.load_state_dict: the state dict holds {len(indices)} parameters, "
                         f"this optimizer {len(params)}")
    position = {index: n for n, index in enumerate(indices)}
    # The group each parameter will have after loading: saved hyperparameters, this optimizer's params.
    groups = [{**saved, "params": current["params"]}
              for current, saved in zip(optimizer.param_groups, state_dict["param_groups"]) for _ in saved["params"]]
    for index, entry in state_dict["state"].items():
        if index not in position:
            raise ValueError(f"{name}.load_state_dict: state for parameter {index!r}, which no param group lists")
        n = position[index]
        expected = _expected_keys(optimizer, groups[n], params[n])
        missing = sorted(expected - set(entry))
        if missing:
            raise ValueError(
                f"{name}.load_state_dict: parameter {n} (shape {tuple(params[n].shape)}) lacks state "
                f"{', '.join(map(repr, missing))}: the state dict comes from another optimizer or configuration")


def _expected_keys(optimizer, group: dict, param: torch.Tensor) -> set[str]:
    """The state keys ``_state_for`` creates for ``param`` (computed on the meta device, free)."""
    merged = {**_own_keys(optimizer.param_groups[0]), **group}  # an older leantrain group may lack new keys
    probe: dict = {}
    meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
    optimizer._init_state(merged, meta, probe)
    keys = {"step", "cycle", *probe}
    if merged.get("lazy_rows") and param.dim() >= 2:
        keys.add("rows_touched")
    if not optimizer._embeds(merged) and merged["accum_steps"] > 1:
        keys.add("grad_accum")
    return keys


# ------------------------------------------------------------------- export
_EXPORT_GROUP_KEYS = {
    "AdamW": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
    "SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
    "AdaFactor": ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                  "relative_step", "warmup_init"),
}
_EXPORT_TORCH_DEFAULTS = {
    "AdamW": {"foreach": None, "capturable": False, "differentiable": False, "fused": None,
              "decoupled_weight_decay": True},
    "SGD": {"foreach": None, "differentiable": False, "fused": None},
    "AdaFactor": {},
}


def export_state_dict(optimizer) -> dict:
    """This optimizer's state as the optimizer it replaces would save it.

    AdamW -> ``torch.optim.AdamW``, SGD -> ``torch.optim.SGD``, AdaFactor with
    ``momentum_on="update"`` -> ``transformers.optimization.Adafactor``. Only at
    a cycle boundary (``optimizer.updated`` or before the first step): mid-cycle
    moments hold part of a cycle, which those optimizers have no place for.
    """
    from .fused import innermost_optimizer

    inner = innermost_optimizer(optimizer)
    name = type(inner).__name__
    if name not in _EXPORT_GROUP_KEYS:
        raise ValueError(f"export_state_dict: {name} has no foreign equivalent (AdamW, SGD, AdaFactor have)")
    if inner.micro_step % inner.accum_steps:
        raise ValueError(f"export_state_dict: {name} is inside an accumulation cycle (micro-step "
                         f"{inner.micro_step}, k={inner.accum_steps}); export when optimizer.updated is True")
    if name == "AdaFactor" and any(g["momentum_on"] == "grad" and g["beta1"] is not None for g in inner.param_groups):
        raise ValueError("export_state_dict: AdaFactor with momentum_on='grad' keeps momentum of gradients, "
                         "which transformers' Adafactor cannot hold")
    native = inner.state_dict()
    groups = [{**{k: g[k] for k in _EXPORT_GROUP_KEYS[name]}, **_EXPORT_TORCH_DEFAULTS[name],
               "params": list(g["params"])} for g in native["param_groups"]]
    state = {}
    for index, entry in native["state"].items():
        out = {k: copy.copy(v) for k, v in entry.items() if k not in ("cycle", "grad_accum", "rows_touched")}
        if name == "AdamW":
            out["step"] = torch.tensor(float(entry["step"]))
        elif name == "SGD":
            out.pop("step")
        state[index] = out
    return {"state": state, "param_groups": groups}
