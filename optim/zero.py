"""A leantrain optimizer as DeepSpeed ZeRO's client optimizer.

DeepSpeed ZeRO (stages 1, 2, 3) owns the fp32 master partitions and calls its
client optimizer's ``step()`` once per parameter (sub-)group, with
``param_groups`` narrowed to that group's flat partition; stage 3 calls it
once per sub-group. A leantrain optimizer counts micro-steps in ``step()``, so
handed over directly it would advance its cycle once per group (stage 3 with
two groups: twice per micro-batch, every update at the wrong time).
``ZeroClient`` is what DeepSpeed should hold instead::

    client = leantrain.optim.ZeroClient(AdamW(model.parameters(), accum_steps=8))
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
    client.bind(zero_optimizer)

with ``gradient_accumulation_steps: 1`` and ``zero_allow_untested_optimizer:
true`` in the DeepSpeed config (leantrain counts the micro-steps; ``engine.step()``
after every micro-batch). Each per-group call folds that group's gradient
partition and, at the cycle's boundary, updates it in the same call (DeepSpeed
copies the partition to the model right after); the cycle position advances
once per micro-step, after the last group.

Under ZeRO the gradients a rank folds are already averaged over ranks, so
elementwise optimizers are exact. What a flat partition cannot carry is
refused or reported, never silently changed:

- AdaFactor's factored statistics need each tensor's rows and columns: on a
  flat partition they fall back to an unfactored second moment (4 B/param of
  the partition). ``bind`` warns once with the bytes this costs; FSDP2 keeps
  them factored.
- ``max_update_rms`` would clip the RMS of a whole partition, mixing tensors:
  refused.
- fused accumulation: the model's gradients are DeepSpeed's to partition;
  ``fuse_into_backward`` on a model whose optimizer DeepSpeed wrapped raises.
"""

from __future__ import annotations

import math
import warnings

import torch

from ._accumulating import AccumulatingOptimizer
from .fused import innermost_optimizer


class ZeroClient(torch.optim.Optimizer):
    """Presents a leantrain optimizer to DeepSpeed ZeRO; see the module docstring."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        inner = innermost_optimizer(optimizer)
        if not isinstance(inner, AccumulatingOptimizer):
            raise TypeError(f"ZeroClient: optimizer={type(inner).__name__!r} is not a leantrain optimizer")
        if inner is not optimizer:
            raise ValueError("ZeroClient: Lookahead/EMA keep copies of whole parameters, which ZeRO partitions; "
                             "hand DeepSpeed the leantrain optimizer itself")
        if any(g.get("max_update_rms") is not None for g in inner.param_groups):
            raise ValueError("ZeroClient: max_update_rms clips each tensor's update RMS, but a ZeRO partition is a "
                             "flat slice of many tensors; leave max_update_rms unset under DeepSpeed (or use FSDP2)")
        self.inner = inner
        self._all_groups = list(inner.param_groups)  # DeepSpeed reassigns the list; the group dicts stay
        self._factored_bytes = _factored_bytes(inner)
        self._calls_per_step: int | None = None
        self._calls = 0
        self.defaults = inner.defaults
        self._optimizer_step_pre_hooks: dict = {}
        self._optimizer_step_post_hooks: dict = {}
        self._optimizer_state_dict_pre_hooks: dict = {}
        self._optimizer_state_dict_post_hooks: dict = {}
        self._optimizer_load_state_dict_pre_hooks: dict = {}
        self._optimizer_load_state_dict_post_hooks: dict = {}

    # DeepSpeed reads and reassigns these on the client: they are the leantrain optimizer's.
    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.inner.param_groups = groups

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        self.inner.state = value

    def bind(self, zero_optimizer) -> ZeroClient:
        """Learn from DeepSpeed's ZeRO optimizer how many ``step()`` calls make one micro-step."""
        groups = getattr(zero_optimizer, "fp16_groups", None)  # stage 3: one call per sub-group
        if groups is None:
            groups = getattr(zero_optimizer, "bit16_groups", None)  # stages 1 and 2: one call per group
        if groups is None:
            raise TypeError(f"ZeroClient.bind: {type(zero_optimizer).__name__} is not a DeepSpeed ZeRO optimizer")
        self._calls_per_step = len(groups)
        _zero_stage3_padding(zero_optimizer)
        if type(self.inner).__name__ == "AdaFactor" and self._factored_bytes is not None:
            flat = sum(p.numel() for g in self.inner.param_groups for p in g["params"]) * 4
            factored, whole = self._factored_bytes
            warnings.warn(
                f"AdaFactor under DeepSpeed ZeRO: a flat partition cannot be factored, so its second moment is "
                f"unfactored, {_size(flat)} on this rank instead of {_size(factored)} of row and column statistics "
                f"for the whole model; its parameter scale and update clipping are computed per partition, not per "
                "tensor. FSDP2 keeps AdaFactor factored and per-tensor (launch/accelerate/fsdp2.yaml)", stacklevel=2)
        return self

    @property
    def calls_per_step(self) -> int | None:
        return self._calls_per_step

    @torch.no_grad()
    def step(self, closure=None):
        """One group's share of a micro-step: fold it, update it at a boundary; count after the last group."""
        if self._calls_per_step is None:
            raise RuntimeError("ZeroClient.step before bind(): call client.bind(zero_optimizer) with the optimizer "
                               "deepspeed.initialize returned")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        inner = self.inner
        for group in inner.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                inner._fold_group(group, params, [p.grad for p in params])
        if inner.next_step_updates:
            inner._update_cycle(inner.param_groups)
        self._calls += 1
        if self._calls == self._calls_per_step:
            self._calls = 0
            inner._count_micro_step(self._all_groups)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
        self._all_groups = list(self.inner.param_groups)

    def __getattr__(self, name):
        # updated, micro_step, accum_steps, state_bytes...: the leantrain optimizer's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _zero_stage3_padding(zero_optimizer) -> None:
    """Zero the padding ZeRO-3 leaves uninitialised at the end of each parameter's partition.

    ZeRO-3 pads every parameter to a multiple of the world size; on the last rank the padding of
    each parameter's partition (and so of the fp32 flat partition the client optimizer steps) is
    ``torch.empty`` memory. An elementwise update never looks at it, but AdaFactor's partition-wide
    parameter scale and update RMS do: garbage there (measured: inf in 2 of 6 runs) turns every
    update of the partition into inf. Stages 1 and 2 pad with zeros already. Cost: one pass over the
    padding, at most world_size - 1 elements per parameter, once.
    """
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    partitions = getattr(zero_optimizer, "fp16_partitioned_groups", None)
    paddings = getattr(zero_optimizer, "groups_padding", None)
    if flats is None or partitions is None or paddings is None:
        return
    with torch.no_grad():
        for flat, tensors, pads in zip(flats, partitions, paddings):
            if flat.numel() == 0 or any(t.numel() < pad for t, pad in zip(tensors, pads)):
                continue  # swapped out to NVMe (a placeholder buffer stands in): DeepSpeed's swapper owns it
            offset = 0
            for tensor, pad in zip(tensors, pads):
                if pad:
                    flat.narrow(0, offset + tensor.numel() - pad, pad).zero_()
                    tensor.view(-1).narrow(0, tensor.numel() - pad, pad).zero_()
                offset += tensor.numel()


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _factored_bytes(optimizer) -> tuple[int, int] | None:
    """(bytes of AdaFactor's row+column statistics, bytes of an unfactored v) for the original tensors."""
    if type(optimizer).__name__ != "AdaFactor":
        return None
    factored = whole = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            whole += 4 * p.numel()
            if p.dim() >= 2 and min(p.shape[-2:]) >= group["min_dim_size_to_factor"]:
                lead = math.prod(p.shape[:-2])
                factored += 4 * lead * (p.shape[-2] + p.shape[-1])
            else:
                factored += 4 * p.numel()
    return factored, whole
