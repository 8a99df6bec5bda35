"""Argument checks shared by the optimizers.

Every message names the argument, the value received and what is allowed, so a
bad recipe fails with one readable line instead of a NaN three hours later.
"""

from __future__ import annotations

import math

import torch

ACCUM_MODES = ("exact", "ema")
# Explicit state dtypes a user may ask for; None means "as precise as the
# parameter": fp32, or float64 for float64 parameters (torch's rule).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def scalar(value) -> float:
    """A hyperparameter as a Python float: torch accepts 1-element tensors (lr, betas) too.

    torch keeps such a tensor in the param group and reads it at every step;
    so does leantrain (one host read per update when it lives on a GPU).
    """
    return float(value) if isinstance(value, torch.Tensor) else value


def check_number(name: str, value, *, low=None, high=None, low_open=False, high_open=False):
    """Raise ValueError unless ``value`` is a finite real number inside the interval.

    A 1-element tensor is accepted and returned as given (torch's tensor ``lr``).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or not value.dtype.is_floating_point:
            raise ValueError(f"{name}: a tensor value must be one real floating-point element, got shape "
                             f"{tuple(value.shape)} {value.dtype}")
        _check_real(name, float(value), low, high, low_open, high_open)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return _check_real(name, value, low, high, low_open, high_open)


def _check_real(name, value, low, high, low_open, high_open) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value!r}: allowed range is {left}{lo}, {hi}{right}")
    return float(value)


def check_lr(value):
    return check_number("lr", value, low=0.0)


def check_betas(betas, *, names=("betas[0]", "betas[1]")) -> tuple:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas={betas!r}: expected a pair of numbers in [0, 1)")
    return (
        check_number(names[0], betas[0], low=0.0, high=1.0, high_open=True),
        check_number(names[1], betas[1], low=0.0, high=1.0, high_open=True),
    )


def check_max_update_rms(value) -> float | None:
    """Per-tensor update RMS clip: None (off) or a positive number."""
    if value is None:
        return None
    return check_number("max_update_rms", value, low=0.0, low_open=True)


def check_accum_steps(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"accum_steps={value!r}: expected an integer >= 1")
    return value


def check_accum_mode(value) -> str:
    if value not in ACCUM_MODES:
        raise ValueError(f"accum_mode={value!r}: allowed values are {', '.join(map(repr, ACCUM_MODES))}")
    return value


def check_state_dtype(name: str, value) -> torch.dtype | None:
    if value is not None and value not in STATE_DTYPES:
        allowed = ", ".join(str(d) for d in STATE_DTYPES)
        raise ValueError(f"{name}={value!r}: allowed dtypes are None (the parameter's precision), {allowed}")
    return value


def check_only(name: str, value, allowed: tuple, why: str):
    """torch keywords leantrain accepts at the values it can honour; anything else is refused."""
    if value not in allowed:
        shown = " or ".join(repr(a) for a in allowed)
        raise ValueError(f"{name}={value!r}: leantrain accepts only {shown} here ({why})")
    return value


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected True or False")
    return value
