"""Base class for optimizers with momentum-embedded gradient accumulation.

``step()`` is called after *every* micro-batch backward. It folds each
``p.grad`` into the optimizer's state (DESIGN.md section 2) and moves the
parameters only at the end of a cycle of ``accum_steps`` micro-steps; the
attribute ``updated`` tells the caller whether this call moved them (step LR
schedulers only then). No gradient-accumulation buffer exists for
configurations whose first moment is linear in the gradient, so ``.grad`` can
be zeroed (or freed inside backward) after every micro-step.

A subclass supplies the mathematics as small functions over lists of tensors
and chooses, per param group, between two ways of consuming gradients:

* embedded (``_embeds(group)`` is True): ``_fold`` adds each micro-batch's
  share to the moments, ``_apply`` updates the parameters from the moments at
  the boundary. With ``decay=True`` the fold first decays the moments: once per
  cycle in mode ``exact``, every micro-step with ``beta ** (1/k)`` in ``ema``.
* on the averaged gradient (``_embeds`` False, e.g. Nesterov, AdaFactor
  without momentum): with k = 1 ``_step_on_grad`` runs the whole update at
  once; with k > 1 the base keeps an explicit buffer ``grad_accum`` (dtype
  ``accum_dtype``) holding the cycle's mean gradient and calls
  ``_step_on_grad`` on it at the boundary. Exact, never approximated, and
  visible in ``state_bytes()``.

Bookkeeping is state, so ``state_dict()`` resumes mid-cycle:
``group["micro_step"]`` counts micro-steps (same in every group), per-parameter
``state["step"]`` counts updates (bias corrections use it, as torch does) and
``state["cycle"]`` records the last cycle in which the parameter received a
gradient. A parameter without any gradient in a cycle is skipped at the
boundary, exactly as torch's optimizers skip ``grad is None``.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import _lazy_rows
from ._rounding import write_back
from ._tensor_lists import chunks
from ._checks import check_accum_mode, check_accum_steps, check_state_dtype
from .memory import state_bytes, state_bytes_by_component

_ACCUM_KEYS = ("accum_steps", "accum_mode")


class AccumulatingOptimizer(Optimizer):
    """Shared plumbing: cycle position, state creation, dispatch, accounting.

    Keyword arguments every leantrain optimizer accepts:

    - ``accum_steps`` (k, default 1): micro-steps per parameter update.
    - ``accum_mode``: ``"exact"`` (default) or ``"ema"`` (DESIGN.md 2.2).
    - ``accum_dtype``: dtype of the explicit ``grad_accum`` buffer, for the
      configurations that need one (fp32 default; bf16 halves it).
    - ``lazy_rows``: rows of ≥2-D tensors without gradient over a whole cycle
      keep their value and state (see ``_lazy_rows``).
    - ``stochastic_rounding`` (default True): bf16 parameters are updated in
      fp32 and written back with stochastic rounding; False rounds to nearest.
    """

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        accum_steps: int = 1,
        accum_mode: str = "exact",
        accum_dtype: torch.dtype = torch.float32,
        lazy_rows: bool = False,
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = dict(
            defaults,
            accum_steps=check_accum_steps(accum_steps),
            accum_mode=check_accum_mode(accum_mode),
            accum_dtype=check_state_dtype("accum_dtype", accum_dtype),
            lazy_rows=bool(lazy_rows),
            stochastic_rounding=bool(stochastic_rounding),
        )
        self.updated = False
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

    # ------------------------------------------------------------- properties
    @property
    def accum_steps(self) -> int:
        return self.param_groups[0]["accum_steps"]

    @property
    def micro_step(self) -> int:
        """Micro-steps folded so far (all groups advance together)."""
        return self.param_groups[0]["micro_step"]

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

    def _decay_factors(self, group: dict, t: int, j: int) -> dict[str, float]:
        """Per-fold decay of each moment buffer (used for lazy rows)."""
        raise NotImplementedError

    def _fold(self, group, params, grads, states, *, t: int, j: int, decay: bool) -> None:
        raise NotImplementedError

    def _apply(self, group, params, states, *, t: int) -> None:
        raise NotImplementedError

    def _step_on_grad(self, group, params, grads, states, *, t: int) -> None:
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

        if not self._embeds(group):
            if k == 1:
                for t, idx in _by_update_count(states):
                    self._update(group, _pick(params, idx), _pick(states, idx), t, _pick(grads, idx))
                _mark_cycle(states, cycle)
                return
            self._fold_into_buffer(group, params, grads, states, cycle)
            return

        ema = group["accum_mode"] == "ema"
        lazy = [group["lazy_rows"] and "rows_touched" in s for s in states]
        for i in (i for i, is_lazy in enumerate(lazy) if is_lazy):
            self._decay_lazy_rows(group, grads[i], states[i], cycle, j, ema)
        decay = [(ema or s["cycle"] != cycle) and not is_lazy for s, is_lazy in zip(states, lazy)]
        _mark_cycle(states, cycle)
        for (t, dec), idx in _by_update_count(states, decay):
            self._fold(group, _pick(params, idx), _pick(grads, idx), _pick(states, idx), t=t, j=j, decay=dec)

    def _state_for(self, group: dict, param: torch.Tensor) -> dict:
        """The parameter's state, created on first use (all of it, buffers included)."""
        state = self.state[param]
        if "step" not in state:  # wrappers may have put their buffers here first
            state["step"] = 0
            state["cycle"] = -1
            self._init_state(group, param, state)
            if group["lazy_rows"] and param.dim() >= 2:
                state["rows_touched"] = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
            if not self._embeds(group) and group["accum_steps"] > 1:
                state["grad_accum"] = torch.zeros_like(param, dtype=group["accum_dtype"])
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

    def _fold_into_buffer(self, group, params, grads, states, cycle: int) -> None:
        """Explicit accumulation for configurations that need the mean gradient itself."""
        k = group["accum_steps"]
        fresh, running = [], []
        for g, state in zip(grads, states):
            buf = state["grad_accum"]
            (fresh if state["cycle"] != cycle else running).append((buf, g))
        if fresh:
            torch._foreach_zero_([b for b, _ in fresh])
        pairs = fresh + running
        torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs], alpha=1.0 / k)
        _mark_cycle(states, cycle)

    def _decay_lazy_rows(self, group, grad, state, cycle: int, j: int, ema: bool) -> None:
        rows = _lazy_rows.rows_with_gradient(grad)
        touched = state["rows_touched"]
        if state["cycle"] != cycle:
            touched.zero_()
        new_rows = rows if ema else rows & ~touched
        for key, factor in self._decay_factors(group, state["step"] + 1, j).items():
            if key in state:
                _lazy_rows.decay_rows(state[key], new_rows, factor)
        touched |= rows

    @torch.no_grad()
    def _advance(self) -> None:
        """Count the micro-step; at a boundary update every parameter folded this cycle."""
        k = self.accum_steps
        cycle = self.micro_step // k
        for group in self.param_groups:
            group["micro_step"] += 1
        self.updated = self.micro_step % k == 0
        if not self.updated:
            return
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state[p].get("cycle") == cycle]
            if not params:
                continue
            states = [self.state[p] for p in params]
            if self._embeds(group) or k > 1:
                self._boundary_update(group, params, states)
            for state in states:
                state["step"] += 1

    def _boundary_update(self, group, params, states) -> None:
        lazy = [(p, p.detach().clone(), s["rows_touched"]) for p, s in zip(params, states) if "rows_touched" in s]
        for t, idx in _by_update_count(states):
            ps, ss = _pick(params, idx), _pick(states, idx)
            grads = None if self._embeds(group) else [s["grad_accum"] for s in ss]
            self._update(group, ps, ss, t, grads)
        for p, before, touched in lazy:
            _lazy_rows.keep_untouched_rows(p, before, touched)

    def _update(self, group, params, states, t: int, grads) -> None:
        """Run ``_apply`` (grads None) or ``_step_on_grad`` with fp32 parameter math.

        Low-precision parameters are updated on fp32 working copies, a chunk
        at a time (bounded transient memory), and written back with stochastic
        rounding when ``stochastic_rounding`` is on. fp32 parameters are
        updated in place, all at once.
        """
        if all(p.dtype == torch.float32 for p in params):
            return self._update_fp32(group, params, states, t, grads)
        for idx in chunks(params):
            chunk = _pick(params, idx)
            work = [p.detach().float() if p.dtype != torch.float32 else p for p in chunk]
            self._update_fp32(group, work, _pick(states, idx), t, None if grads is None else _pick(grads, idx))
            for p, w in zip(chunk, work):
                if w is not p:
                    write_back(w, p.detach(), stochastic=group["stochastic_rounding"])

    def _update_fp32(self, group, params, states, t: int, grads) -> None:
        if grads is None:
            self._apply(group, params, states, t=t)
        else:
            self._step_on_grad(group, params, grads, states, t=t)

    # ------------------------------------------------------------- state I/O
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keep each state tensor's saved dtype.

        torch casts every floating state tensor to its parameter's dtype, which
        would silently widen bf16 moments to fp32 (and turn bool masks into
        floats) on every resume.
        """
        saved_dtypes = {
            index: {key: value.dtype for key, value in entry.items() if isinstance(value, torch.Tensor)}
            for index, entry in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                for key, dtype in saved_dtypes.get(index, {}).items():
                    value = self.state[p][key]
                    if value.dtype != dtype:
                        self.state[p][key] = value.to(dtype)
                index += 1

    def state_bytes(self) -> int:
        """Exact bytes of all state tensors (moments, factored stats, buffers)."""
        return state_bytes(self)

    def state_bytes_by_component(self) -> dict[str, int]:
        return state_bytes_by_component(self)


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
