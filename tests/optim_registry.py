"""Registry of optimizer configurations driving the generic tests.

Each case builds an optimizer over a parameter list with sample kwargs; the
generic tests (state_dict round-trip, dtypes, convergence, errors) run over
every case. ``embeds`` says whether k > 1 folds into moments (no buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leantrain import optim


@dataclass(frozen=True)
class Case:
    name: str
    cls: type
    kwargs: dict = field(default_factory=dict)
    embeds: bool = True

    def build(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})


CASES = [
    Case("sgd_momentum", optim.SGD, dict(lr=0.05, momentum=0.9)),
    Case("sgd_dampening_wd", optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.01)),
    Case("sgd_nesterov", optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), embeds=False),
    Case("sgd_plain", optim.SGD, dict(lr=0.05), embeds=False),
    Case("adamw", optim.AdamW, dict(lr=0.05)),
    Case("adamw_bf16_momentum", optim.AdamW, dict(lr=0.05, momentum_dtype=torch.bfloat16)),
    Case("adafactor", optim.AdaFactor, dict(), embeds=False),
    Case("adafactor_update_momentum", optim.AdaFactor, dict(beta1=0.9, weight_decay=0.01), embeds=False),
    Case("adafactor_grad_momentum", optim.AdaFactor, dict(beta1=0.9, momentum_on="grad")),
    Case("adafactor_grad_momentum_lr", optim.AdaFactor,
         dict(lr=0.05, relative_step=False, scale_parameter=False, beta1=0.9, momentum_on="grad", beta2=0.99)),
    Case("adax", optim.AdaX, dict(lr=0.05, weight_decay=0.01)),
]

EMBEDDING_CASES = [c for c in CASES if c.embeds]


def ids(cases):
    return [c.name for c in cases]
