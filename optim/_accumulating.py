"""Base class for optimizers with momentum-embedded gradient accumulation.

``step()`` is called after *every* micro-batch backward. It folds each
``p.grad`` into the optimizer's state (docs/design.md §2) and moves the
parameters only at the end of a cycle of ``accum_steps`` micro-steps; the
property ``updated`` tells the caller whether this call moved them (step LR
schedulers only then). No gradient-accumulation buffer exists for
configurations whose first moment is linear in the gradient, so ``.grad`` can
be zeroed (or freed inside backward) after every micro-step.

A subclass supplies the mathematics as small functions over lists of tensors
and chooses, per param group, between two ways of consuming gradients:

* embedded (``_embeds(group)`` is True): ``_fold`` adds micro-step ``j``'s
  share to the moments, ``_apply`` updates the parameters from the moments at
  the boundary. With ``decay=True`` the fold first decays the moments; that
  happens once per cycle, at the first micro-step in which the parameter has
  a gradient, in both modes (``ema`` differs only in the per-micro-step
  weights, see ``ema_split``). A micro-step without a gradient therefore
  counts as a zero gradient, exactly as ``.grad`` accumulation treats it, and
  per-update terms (weight decay) are added once per cycle.
* on the averaged gradient (``_embeds`` False, e.g. Nesterov, AdaFactor
  without momentum): with k = 1 ``_step_on_grad`` runs the whole update at
  once; with k > 1 the base keeps an explicit buffer ``grad_accum`` (dtype
  ``accum_dtype``) holding the cycle's mean gradient and calls
  ``_step_on_grad`` on it at the boundary. Exact, never approximated, and
  visible in ``state_bytes()``.

The math functions see plain local tensors: FSDP2 shards (DTensor) arrive as
their local part, complex tensors as real views (torch's rule), and every
cross-tensor reduction they need goes through ``_sharding`` with the
``layouts`` they are given. They mutate state tensors in place and never add
keys to a state dict.

Bookkeeping is state, so ``state_dict()`` resumes mid-cycle:
``group["micro_step"]`` counts micro-steps (same in every group), per-parameter
``state["step"]`` counts updates (bias corrections use it, as torch does) and
``state["cycle"]`` records the last cycle in which the parameter received a
gradient. A parameter without any gradient in a cycle is skipped at the
boundary, exactly as torch's optimizers skip ``grad is None``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict

import torch
from torch.optim import Optimizer

from . import _interop, _lazy_rows, _replicas
from ._checks import check_accum_mode, check_accum_steps, check_flag, check_state_dtype
from ._rounding import write_back
from ._sharding import layout_of, local
from ._tensor_lists import chunks
from .memory import state_bytes, state_bytes_by_component

_ACCUM_KEYS = ("accum_steps", "accum_mode")
_FULL_PRECISION = (torch.float32, torch.float64)


class AccumulatingOptimizer(Optimizer):
    """Shared plumbing: cycle position, state creation, dispatch, accounting.

    Keyword arguments every leantrain optimizer accepts:

    - ``accum_steps`` (k, default 1): micro-steps per parameter update.
    - ``accum_mode``: ``"exact"`` (default) or ``"ema"`` (docs/design.md §2.2).
    - ``accum_dtype``: dtype of the explicit ``grad_accum`` buffer, for the
      configurations that need one (None: fp32, float64 for float64 params;
      bf16 halves it).
    - ``lazy_rows``: rows of ≥2-D tensors without gradient over a whole cycle
      keep their value and state (see ``_lazy_rows``).
    - ``stochastic_rounding`` (default True): bf16 parameters are updated in
      fp32 and written back with stochastic rounding; False rounds to nearest.
      The noise is a pure function of ``rounding_seed``, the update count and
      the parameter's position, so a resumed run (or every DDP rank) rounds
      identically without any generator state to save.
    - ``maximize`` (torch's keyword): ascend instead of descend.
    """

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        accum_steps: int = 1,
        accum_mode: str = "exact",
        accum_dtype: torch.dtype | None = None,
        lazy_rows: bool = False,
        stochastic_rounding: bool = True,
        rounding_seed: int = 0,
        maximize: bool = False,
    ) -> None:
        if isinstance(rounding_seed, bool) or not isinstance(rounding_seed, int):
            raise ValueError(f"rounding_seed={rounding_seed!r}: expected an integer")
        defaults = dict(
            defaults,
            accum_steps=check_accum_steps(accum_steps),
            accum_mode=check_accum_mode(accum_mode),
            accum_dtype=check_state_dtype("accum_dtype", accum_dtype),
            lazy_rows=check_flag("lazy_rows", lazy_rows),
            stochastic_rounding=check_flag("stochastic_rounding", stochastic_rounding),
            rounding_seed=rounding_seed,
            maximize=check_flag("maximize", maximize),
        )
        self._param_positions: dict[torch.Tensor, int] | None = None
        self._replica_group = None  # set by replicated_over(): state averaged across DDP ranks
        self.communicated_bytes = 0  # bytes this optimizer all-reduced (replicated state), for benchmarks
        super().__init__(params, defaults)

    # ----------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        first = self.param_groups[0]
        for key in _ACCUM_KEYS:
            if group[key] != first[key]:
                raise ValueError(
                    f"param group {len(self.param_groups) - 1}: {key}={group[key]!r} differs from "
                    f"{first[key]!r}; every group must share the accumulation cycle"
                )
        group["micro_step"] = first.get("micro_step", 0)
        self._param_positions = None
        self._validate_group(group)

    def _validate_group(self, group: dict) -> None:
        """Subclass hook: check a group's hyperparameters together."""
        check_accum_steps(group["accum_steps"])
        check_accum_mode(group["accum_mode"])
        check_state_dtype("accum_dtype", group["accum_dtype"])
        if group["accum_mode"] == "ema" and group["accum_steps"] > 1 and not self._embeds(group):
            raise ValueError(
                f"accum_mode='ema' needs a first moment to embed the accumulation into; "
                f"{type(self).__name__} with these settings ({self._why_not_embedded(group)}) "
                "has none: use accum_mode='exact'"
            )
        if group["lazy_rows"] and not self._embeds(group):
            raise ValueError(
                f"lazy_rows=True needs embedded accumulation; {type(self).__name__} with these "
                f"settings ({self._why_not_embedded(group)}) steps on the averaged gradient"
            )
        for p in group["params"]:
            if p.is_complex():
                self._check_complex(group, p)

    def _check_complex(self, group: dict, param: torch.Tensor) -> None:
        """Complex parameters are optimised as real views (torch's rule); state stays complex."""
        for key in ("momentum_dtype", "accum_dtype"):
            if group.get(key) == torch.bfloat16:
                raise ValueError(f"{key}=torch.bfloat16 with a complex parameter of shape {tuple(param.shape)}: "
                                 f"there is no complex bf16; use {key}=None for complex parameters")

    # ------------------------------------------------------------- properties
    @property
    def accum_steps(self) -> int:
        return self.param_groups[0]["accum_steps"]

    @property
    def micro_step(self) -> int:
        """Micro-steps folded so far (all groups advance together)."""
        return self.param_groups[0]["micro_step"]

    @property
    def updated(self) -> bool:
        """Whether the last ``step()`` closed a cycle and moved the parameters.

        Derived from the cycle position, so it survives ``deepcopy`` and
        ``load_state_dict`` like the rest of the state.
        """
        return self.micro_step > 0 and self.micro_step % self.accum_steps == 0

    @property
    def next_step_updates(self) -> bool:
        """True when the next ``step()`` closes the cycle and moves the parameters."""
        return (self.micro_step + 1) % self.accum_steps == 0

    # ------------------------------------------------------- subclass contract
    def _embeds(self, group: dict) -> bool:
        """Whether this group folds gradients into its moments (else: averaged gradient)."""
        raise NotImplementedError

    def _why_not_embedded(self, group: dict) -> str:
        return "no first moment"

    def _init_state(self, group: dict, param: torch.Tensor, state: dict) -> None:
        raise NotImplementedError

    def _decay_factors(self, group: dict, t: int) -> dict[str, float]:
        """Per-cycle decay of each moment buffer (used for lazy rows)."""
        raise NotImplementedError

    def _fold(self, group, params, grads, states, *, t: int, j: int, decay: bool, layouts) -> None:
        raise NotImplementedError

    def _apply(self, group, params, states, *, t: int, layouts) -> None:
        raise NotImplementedError

    def _step_on_grad(self, group, params, grads, states, *, t: int, layouts) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self, closure=None):
        """Fold this micro-batch's gradients; update the parameters at a boundary."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._fold_group(group, params, [p.grad for p in params])
        self._advance()
        return loss

    @torch.no_grad()
    def _fold_group(self, group: dict, params: list, grads: list) -> None:
        """Fold one micro-batch's gradients of ``params`` (all in ``group``)."""
        k = group["accum_steps"]
        cycle, j = divmod(group["micro_step"], k)
        states = []
        for p, g in zip(params, grads):
            if g.is_sparse:
                raise ValueError(
                    f"{type(self).__name__}: sparse gradients are not supported; use a dense "
                    "embedding (sparse=False) and the param-group option lazy_rows=True"
                )
            states.append(self._state_for(group, p))
        if group["maximize"]:
            grads = torch._foreach_neg(grads)  # a transient copy: the caller's .grad stays as it was

        if not self._embeds(group):
            if not self._buffers_mean_grad(group):
                for t, idx in _by_update_count(states):
                    self._update(group, _pick(params, idx), _pick(states, idx), t, _pick(grads, idx))
                _mark_cycle(states, cycle)
                return
            views = _MathViews(params, states, grads)
            self._fold_into_buffer(views.states, views.grads, states, cycle)
            return

        views = _MathViews(params, states, grads)
        lazy = [group["lazy_rows"] and "rows_touched" in s for s in states]
        for i in (i for i, is_lazy in enumerate(lazy) if is_lazy):
            self._decay_lazy_rows(group, views.grads[i], views.states[i], cycle)
        decay = [s["cycle"] != cycle and not is_lazy for s, is_lazy in zip(states, lazy)]
        _mark_cycle(states, cycle)
        for (t, dec), idx in _by_update_count(states, decay):
            self._fold(group, _pick(views.params, idx), _pick(views.grads, idx), _pick(views.states, idx),
                       t=t, j=j, decay=dec, layouts=_pick(views.layouts, idx))

    def _buffers_mean_grad(self, group: dict) -> bool:
        """Whether this group keeps ``grad_accum``: it steps on the mean gradient, and either k > 1
        or the state is replicated across ranks (the mean over ranks is taken at the boundary)."""
        return not self._embeds(group) and (group["accum_steps"] > 1 or self._replica_group is not None)

    def _accumulated_keys(self, group: dict) -> tuple[str, ...]:
        """State entries that micro-steps add to (averaged across replicated ranks)."""
        return ("grad_accum",) if self._buffers_mean_grad(group) else self._moment_keys(group)

    def _moment_keys(self, group: dict) -> tuple[str, ...]:
        """Subclass hook: the moments ``_fold`` updates."""
        raise NotImplementedError

    def _state_dtype(self, group: dict, param: torch.Tensor, key: str | None = None) -> torch.dtype:
        """A state buffer's dtype: the group's explicit choice ``group[key]``, else fp32 (float64
        for float64 parameters, complex for complex ones: they are optimised as real views)."""
        if param.is_complex():
            return param.dtype
        requested = group.get(key) if key else None
        if requested is not None:
            return requested
        return torch.float64 if param.dtype == torch.float64 else torch.float32

    def _state_for(self, group: dict, param: torch.Tensor) -> dict:
        """The parameter's state, created on first use (all of it, buffers included)."""
        state = self.state[param]
        if "step" not in state:  # wrappers may have put their buffers here first
            state["step"] = 0
            state["cycle"] = -1
            self._init_state(group, param, state)
            if group["lazy_rows"] and param.dim() >= 2:
                state["rows_touched"] = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
        if "grad_accum" not in state and self._buffers_mean_grad(group):  # also after loading a k = 1 state
            state["grad_accum"] = torch.zeros_like(param, dtype=self._state_dtype(group, param, "accum_dtype"))
        return state

    @torch.no_grad()
    def init_all_state(self) -> None:
        """Create every state tensor now instead of at the first step.

        On meta-device parameters this gives the exact state bytes of a model
        that does not fit in memory (``leantrain estimate``).
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._state_for(group, p)

    def _fold_into_buffer(self, buffer_states, grads, states, cycle: int) -> None:
        """Explicit accumulation for configurations that need the mean gradient itself."""
        k = self.accum_steps
        fresh = [b["grad_accum"] for b, s in zip(buffer_states, states) if s["cycle"] != cycle]
        if fresh:
            torch._foreach_zero_(fresh)
        torch._foreach_add_([b["grad_accum"] for b in buffer_states], grads, alpha=1.0 / k)
        _mark_cycle(states, cycle)

    def _decay_lazy_rows(self, group, grad, state, cycle: int) -> None:
        """Decay, once per cycle, only the rows that receive their first gradient of the cycle."""
        rows = _lazy_rows.rows_with_gradient(grad)
        touched = state["rows_touched"]
        if state["cycle"] != cycle:
            touched.zero_()
        new_rows = rows & ~touched
        for key, factor in self._decay_factors(group, state["step"] + 1).items():
            if key in state:
                _lazy_rows.decay_rows(state[key], new_rows, factor)
        touched |= rows

    @torch.no_grad()
    def _advance(self) -> None:
        """Count the micro-step; at a boundary update every parameter folded this cycle."""
        if self.next_step_updates:
            self._update_cycle(self.param_groups)
        self._count_micro_step(self.param_groups)

    def _update_cycle(self, groups: list[dict]) -> None:
        """The boundary: update every parameter of ``groups`` that had a gradient in the open cycle.

        With replicated state the accumulated buffers are first averaged over
        the ranks (and which parameters had a gradient is decided globally).
        """
        cycle = self.micro_step // self.accum_steps
        if self._replica_group is not None:
            _replicas.average_state(self, group=self._replica_group, cycle=cycle)
        for group in groups:
            params = [p for p in group["params"] if self.state[p].get("cycle") == cycle]
            if not params:
                continue
            states = [self.state[p] for p in params]
            if self._embeds(group) or self._buffers_mean_grad(group):
                self._boundary_update(group, params, states)
            for state in states:
                state["step"] += 1

    def _count_micro_step(self, groups: list[dict]) -> None:
        for group in groups:
            group["micro_step"] += 1
        self._check_schedule(cycle_starts=self.micro_step % self.accum_steps == 1)

    # ------------------------------------------------------ data parallelism
    def replicated_over(self, group=None) -> AccumulatingOptimizer:
        """Declare the state replicated across the ranks of ``group`` (DDP; default: all ranks).

        Each rank then folds its own micro-batches (run backward under DDP's
        ``no_sync()``: no gradient all-reduce inside the cycle), and every
        boundary averages the accumulated buffers in bucketed all-reduces
        (``_replicas``). Every parameter gets its state at the first update.
        Configurations that step on the mean gradient keep ``grad_accum`` at
        any k here (the mean over ranks needs a buffer; DDP would hold one in
        its buckets anyway). Returns the optimizer.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{type(self).__name__}.replicated_over: torch.distributed is not initialized")
        if any(g["lazy_rows"] for g in self.param_groups):
            raise ValueError(f"{type(self).__name__}.replicated_over: lazy_rows=True is not supported with replicated "
                             "data parallelism (rows touched on one rank only would need per-row decays on the others)")
        self._replica_group = group if group is not None else dist.group.WORLD
        return self

    def sync_state(self) -> None:
        """Make mid-cycle state rank-independent (call on every rank, e.g. before a checkpoint).

        Replicated state is averaged now (closed under averaging: the cycle
        still ends exactly), and sharded partial sums are completed. A no-op
        at a cycle boundary and on one process.
        """
        if self.micro_step % self.accum_steps == 0:
            return
        cycle = self.micro_step // self.accum_steps
        if self._replica_group is not None:
            _replicas.average_state(self, group=self._replica_group, cycle=cycle)
        self._sync_partial_sums()

    def _sync_partial_sums(self) -> None:
        """Subclass hook: complete per-rank partial sums of sharded state (AdaFactor's C)."""

    @torch.no_grad()
    def _zero_fold(self, group: dict, param: torch.Tensor, state: dict, keys: tuple[str, ...], cycle: int) -> list:
        """Copies of ``state[keys]`` as if ``param`` had folded a zero gradient in ``cycle`` (for averaging)."""
        if "grad_accum" in keys:
            return [torch.zeros_like(state["grad_accum"])]
        copies = {key: state[key].clone() for key in keys if key in state}
        views = _MathViews([param], [{**state, **copies}])
        zero = torch.zeros_like(views.params[0])
        self._fold(group, views.params, [zero], views.states, t=state["step"] + 1, j=0, decay=True,
                   layouts=views.layouts)
        return list(copies.values())

    def _check_schedule(self, *, cycle_starts: bool) -> None:
        """Warn once if the learning rate changes inside a cycle: a scheduler stepped per micro-batch.

        A schedule counted in micro-steps runs k times too fast; step it only
        when ``optimizer.updated`` (transformers.Trainer: see
        leantrain.integrations.transformers).
        """
        if self.accum_steps == 1:
            return
        # A tensor lr is skipped: reading it would cost a host sync per micro-step on a GPU.
        lrs = [g["lr"] if isinstance(g.get("lr"), (int, float)) else None for g in self.param_groups]
        seen = getattr(self, "_cycle_lrs", None)
        if cycle_starts or seen is None:
            self._cycle_lrs = lrs
        elif lrs != seen and not getattr(self, "_warned_schedule", False):
            self._warned_schedule = True
            warnings.warn(
                f"{type(self).__name__}: the learning rate changed inside an accumulation cycle "
                f"(accum_steps={self.accum_steps}): a scheduler is stepped per micro-batch and runs "
                f"{self.accum_steps}x too fast; step it only when optimizer.updated is True "
                "(docs/design.md §2)", stacklevel=3)

    def end_cycle(self) -> None:
        """Close the open cycle now: update with what was folded, as if the boundary was reached.

        For loops that decide the boundary themselves and sometimes run a
        shorter cycle (transformers.Trainer's last accumulation window of an
        epoch). The micro-step counter jumps to the boundary; gradients folded
        with weight 1/k were scaled by the loop to sum to the window's mean.
        """
        remaining = (-self.micro_step) % self.accum_steps
        if remaining == 0:
            return
        for group in self.param_groups:
            group["micro_step"] += remaining - 1
        self._advance()

    def _boundary_update(self, group, params, states) -> None:
        views = _MathViews(params, states)
        lazy = [(p, p.clone(), s["rows_touched"]) for p, s in zip(views.params, views.states) if "rows_touched" in s]
        for t, idx in _by_update_count(states):
            grads = None if self._embeds(group) else [states[i]["grad_accum"] for i in idx]
            self._update(group, _pick(params, idx), _pick(states, idx), t, grads)
        for p, before, touched in lazy:
            _lazy_rows.keep_untouched_rows(p, before, touched)

    def _update(self, group, params, states, t: int, grads) -> None:
        """Run ``_apply`` (grads None) or ``_step_on_grad`` with full-precision parameter math.

        fp32 and float64 parameters are updated in place, all at once.
        Low-precision (bf16) parameters are updated on fp32 working copies, a
        chunk at a time (bounded transient memory), and written back with
        stochastic rounding when ``stochastic_rounding`` is on.
        """
        views = _MathViews(params, states, grads)
        if all(p.dtype in _FULL_PRECISION for p in views.params):
            return self._update_full(group, views.params, views.states, t, views.grads, views.layouts)
        positions = self._positions()
        for idx in chunks(views.params):
            chunk = _pick(views.params, idx)
            work = [p.float() if p.dtype not in _FULL_PRECISION else p for p in chunk]
            self._update_full(group, work, _pick(views.states, idx), t,
                              None if grads is None else _pick(views.grads, idx), _pick(views.layouts, idx))
            for i, p, w in zip(idx, chunk, work):
                if w is not p:
                    seed = hash((group["rounding_seed"], t, positions[params[i]])) & 0x7FFF_FFFF_FFFF_FFFF
                    write_back(w, p, stochastic=group["stochastic_rounding"], seed=seed)

    def _update_full(self, group, params, states, t: int, grads, layouts) -> None:
        def update(idx):
            ps, ss, ls = _pick(params, idx), _pick(states, idx), _pick(layouts, idx)
            if grads is None:
                self._apply(group, ps, ss, t=t, layouts=ls)
            else:
                self._step_on_grad(group, ps, _pick(grads, idx), ss, t=t, layouts=ls)

        if group.get("layer_adaptation"):  # LayerAdaptation: each tensor's step scaled by its trust ratio
            from .layer_adaptation import adapted_update

            adapted_update(update, group, params, layouts)
        else:
            update(list(range(len(params))))

    def _positions(self) -> dict[torch.Tensor, int]:
        """Each parameter's position in the optimizer (its index in ``state_dict()``)."""
        if getattr(self, "_param_positions", None) is None:
            self._param_positions = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return self._param_positions

    # ------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but each state tensor keeps its saved dtype, and foreign state is mapped.

        torch casts every floating state tensor to its parameter's dtype: fp32
        moments of bf16 parameters would be rounded to bf16 on every resume,
        bf16 moments widened, bool masks turned into floats. Here values only
        move to the parameter's device. A state dict of the optimizer this one
        replaces (torch.optim.AdamW/SGD, transformers' Adafactor) is mapped
        (``_interop``); one that cannot be mapped raises one ValueError line.
        """
        # torch runs pre-hooks on the dict it is given and post-hooks at its end: run them here
        # instead, around the state as it is really loaded.
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        state_dict = state_dict.copy()
        for hook in pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        state_dict = _interop.to_native(self, state_dict)
        saved_state = state_dict["state"]
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": {}})
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre_hooks, post_hooks
        by_index = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]),
                            (p for g in self.param_groups for p in g["params"])))
        for index, entry in saved_state.items():
            param = by_index[index]
            self.state[param] = {key: _to_device(value, param) for key, value in entry.items()}
        self._param_positions = None
        for hook in post_hooks.values():
            hook(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._param_positions = None
        self.__dict__.setdefault("_replica_group", None)  # a copy is not replicated until replicated_over() again
        self.__dict__.setdefault("communicated_bytes", 0)

    def state_bytes(self) -> int:
        """Exact bytes of all state tensors this rank holds (moments, factored stats, buffers)."""
        return state_bytes(self)

    def state_bytes_by_component(self) -> dict[str, int]:
        return state_bytes_by_component(self)


class _MathViews:
    """Parameters, gradients and states as the math functions see them.

    A DTensor becomes its local shard, a complex tensor its real view (both
    share storage, so in-place updates land in the real tensors); ``layouts``
    says how each parameter is split across ranks (None: whole here). Plain
    real tensors pass through untouched and cost nothing.
    """

    def __init__(self, params, states, grads=None) -> None:
        if not any(_needs_view(p) for p in params):
            self.params, self.states, self.grads = params, states, grads
            self.layouts = [None] * len(params)
            return
        self.layouts = [layout_of(p) for p in params]
        self.params = [_view(p) for p in params]
        self.grads = None if grads is None else [_view(g) for g in grads]
        self.states = [{k: _view(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in states]


def _needs_view(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.is_complex()


def _view(tensor: torch.Tensor) -> torch.Tensor:
    tensor = local(tensor)
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _to_device(value, param: torch.Tensor):
    if isinstance(value, torch.Tensor) and value.device != param.device:
        return value.to(device=param.device)
    return value


def _mark_cycle(states: list[dict], cycle: int) -> None:
    for state in states:
        state["cycle"] = cycle


def _pick(items: list, idx: list[int]) -> list:
    return [items[i] for i in idx]


def _by_update_count(states: list[dict], flags: list | None = None):
    """Indices grouped by the update number ``t`` about to happen (and a flag).

    Parameters skipped in earlier cycles have fewer updates, so their bias
    corrections differ; grouping keeps every multi-tensor call on one ``t``.
    Yields ``(t, indices)``, or ``((t, flag), indices)`` when ``flags`` is given.
    """
    groups: dict = defaultdict(list)
    for i, state in enumerate(states):
        key = state["step"] + 1 if flags is None else (state["step"] + 1, flags[i])
        groups[key].append(i)
    return groups.items()
