"""Base for optimizers that wrap another one (Lookahead, EMA).

A wrapper shares the wrapped optimizer's ``param_groups`` and ``state``
objects, so its buffers live in the wrapped optimizer's state: checkpoints,
``state_bytes()`` and LR schedulers see one optimizer whichever object they
hold. Wrappers compose (``EMA(Lookahead(AdamW(...)))``) and accept torch's own
optimizers, which update on every ``step()`` (``updated`` is then always True).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .memory import state_bytes, state_bytes_by_component


class OptimizerWrapper(Optimizer):
    def __init__(self, base: Optimizer) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(
                f"{type(self).__name__}: base={type(base).__name__!r} is not a torch.optim.Optimizer; "
                "wrap an optimizer instance, e.g. Lookahead(AdamW(model.parameters()))"
            )
        # torch's __init__ sets up hooks and re-registers the base's group dicts
        # (the same objects); the lists and the state are then shared outright.
        super().__init__(base.param_groups, base.defaults)
        self.base = base
        self._share_base()

    def _share_base(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def add_param_group(self, param_group: dict) -> None:
        if "base" not in self.__dict__:  # inside torch's __init__
            return super().add_param_group(param_group)
        self.base.add_param_group(param_group)
        self._init_group(self.param_groups[-1])

    def _init_group(self, group: dict) -> None:
        """Subclass hook: add the wrapper's defaults to a (new) param group."""

    @property
    def updated(self) -> bool:
        """Whether the last ``step()`` moved the parameters (always True for torch's optimizers)."""
        return getattr(self.base, "updated", True)

    @property
    def accum_steps(self) -> int:
        return getattr(self.base, "accum_steps", 1)

    @property
    def micro_step(self) -> int:
        return getattr(self.base, "micro_step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        self._before_step()
        loss = self.base.step(closure)
        if self.updated:
            self._after_update()
        return loss

    def sync_state(self) -> None:
        """The wrapped optimizer's ``sync_state`` (mid-cycle state made rank-independent)."""
        if hasattr(self.base, "sync_state"):
            self.base.sync_state()

    def replicated_over(self, group=None):
        """The wrapped optimizer's ``replicated_over`` (state averaged across DDP ranks); returns self."""
        self.base.replicated_over(group)
        return self

    def end_cycle(self) -> None:
        """Close the wrapped optimizer's open cycle now (see ``AccumulatingOptimizer.end_cycle``)."""
        was = self.base.micro_step
        self.base.end_cycle()
        if self.updated and self.base.micro_step != was:
            self._after_update()

    def _before_step(self) -> None:
        pass

    def _after_update(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def __getstate__(self) -> dict:
        # torch's Optimizer pickles only defaults/state/param_groups; a wrapper
        # also needs its base and settings (deepcopy, pickle).
        extra = {k: v for k, v in self.__dict__.items() if k == "base" or (k.startswith("_") and not k.startswith("_optimizer"))}
        return {**super().__getstate__(), **extra}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self._share_base()  # torch replaces the base's state and group objects on load

    def state_bytes(self) -> int:
        return state_bytes(self)

    def state_bytes_by_component(self) -> dict[str, int]:
        return state_bytes_by_component(self)


def _base_has_stepped(state, param: torch.Tensor) -> bool:
    """True once the wrapped optimizer has stepped ``param`` (or holds state for it).

    Called right after an update: a parameter with a gradient was just stepped,
    and torch's stateless optimizers (SGD without momentum) keep no state.
    """
    return bool(state.get(param)) or param.grad is not None
