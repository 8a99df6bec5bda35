"""Invalid arguments raise ValueError/TypeError naming the argument, value and range."""

from __future__ import annotations

import pytest
import torch
from helpers import make_params

from leantrain import optim


def _p():
    return make_params([(3, 2)])


ERRORS = [
    ("negative lr", lambda: optim.SGD(_p(), lr=-0.1), ValueError, r"lr=-0\.1: allowed range is \[0\.0, inf\]"),
    ("nan lr", lambda: optim.AdamW(_p(), lr=float("nan")), ValueError, r"lr=nan: expected a finite number"),
    ("beta1 = 1", lambda: optim.AdamW(_p(), betas=(1.0, 0.9)), ValueError, r"betas\[0\]=1\.0: allowed range is \[0\.0, 1\.0\)"),
    ("beta2 < 0", lambda: optim.AdamW(_p(), betas=(0.9, -0.1)), ValueError, r"betas\[1\]=-0\.1"),
    ("betas not a pair", lambda: optim.AdamW(_p(), betas=0.9), ValueError, r"betas=0\.9: expected a pair"),
    ("k = 0", lambda: optim.AdamW(_p(), accum_steps=0), ValueError, r"accum_steps=0: expected an integer >= 1"),
    ("k float", lambda: optim.SGD(_p(), momentum=0.9, accum_steps=2.5), ValueError, r"accum_steps=2\.5"),
    ("unknown mode", lambda: optim.AdamW(_p(), accum_mode="sometimes"), ValueError,
     r"accum_mode='sometimes': allowed values are 'exact', 'ema'"),
    ("fp16 momentum", lambda: optim.AdamW(_p(), momentum_dtype=torch.float16), ValueError,
     r"momentum_dtype=torch\.float16: allowed dtypes are None \(the parameter's precision\), torch\.float32, torch\.bfloat16"),
    ("momentum >= 1", lambda: optim.SGD(_p(), momentum=1.5), ValueError, r"momentum=1\.5: allowed range"),
    ("nesterov with dampening", lambda: optim.SGD(_p(), momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     r"nesterov=True needs momentum > 0 and dampening=0"),
    ("ema without momentum", lambda: optim.SGD(_p(), accum_steps=4, accum_mode="ema"), ValueError,
     r"accum_mode='ema' needs a first moment.*momentum=0"),
    ("ema with adafactor beta1=None", lambda: optim.AdaFactor(_p(), accum_steps=4, accum_mode="ema"), ValueError,
     r"accum_mode='ema' needs a first moment.*beta1=None"),
    ("lazy rows with coupled decay", lambda: optim.SGD(_p(), momentum=0.9, weight_decay=0.1, lazy_rows=True),
     ValueError, r"lazy_rows=True with weight_decay=0\.1"),
    ("lazy rows on factored adafactor", lambda: optim.AdaFactor(_p(), beta1=0.9, momentum_on="grad", lazy_rows=True),
     ValueError, r"lazy_rows=True with AdaFactor"),
    ("adafactor lr with relative step", lambda: optim.AdaFactor(_p(), lr=1e-3), ValueError,
     r"lr=0\.001 with relative_step=True"),
    ("adafactor no lr", lambda: optim.AdaFactor(_p(), relative_step=False), ValueError, r"lr=None with relative_step=False"),
    ("adafactor warmup without relative", lambda: optim.AdaFactor(_p(), lr=1e-3, relative_step=False, warmup_init=True),
     ValueError, r"warmup_init=True needs relative_step=True"),
    ("adafactor momentum_on", lambda: optim.AdaFactor(_p(), beta1=0.9, momentum_on="params"), ValueError,
     r"momentum_on='params': allowed values are 'update', 'grad'"),
    ("adafactor grad momentum without beta1", lambda: optim.AdaFactor(_p(), momentum_on="grad"), ValueError,
     r"momentum_on='grad' needs beta1"),
    ("adafactor clip", lambda: optim.AdaFactor(_p(), clip_threshold=0.0), ValueError, r"clip_threshold=0\.0: allowed range is \(0\.0, inf\]"),
    ("adafactor decay_rate", lambda: optim.AdaFactor(_p(), decay_rate=0.5), ValueError, r"decay_rate=0\.5"),
    ("adafactor min size", lambda: optim.AdaFactor(_p(), min_dim_size_to_factor=-1), ValueError, r"min_dim_size_to_factor=-1"),
    ("adax beta2 = 0", lambda: optim.AdaX(_p(), betas=(0.9, 0.0)), ValueError, r"betas\[1\]=0\.0: allowed range is \(0\.0, 1\.0\)"),
    ("lookahead non-optimizer", lambda: optim.Lookahead(object()), TypeError,
     r"base='object' is not a torch\.optim\.Optimizer"),
    ("lookahead k", lambda: optim.Lookahead(optim.AdamW(_p()), k=0), ValueError, r"k=0: expected an integer >= 1"),
    ("lookahead alpha", lambda: optim.Lookahead(optim.AdamW(_p()), alpha=1.5), ValueError, r"alpha=1\.5: allowed range is \(0\.0, 1\.0\]"),
    ("ema decay", lambda: optim.EMA(optim.AdamW(_p()), decay=1.0), ValueError, r"decay=1\.0: allowed range is \[0\.0, 1\.0\)"),
    ("schedule empty", lambda: optim.PiecewiseLinearLR(optim.AdamW(_p()), {}), ValueError, r"milestones=\{\}: expected a non-empty dict"),
    ("schedule negative step", lambda: optim.PiecewiseLinearLR(optim.AdamW(_p()), {-1: 1.0}), ValueError,
     r"milestones key -1: expected an integer update count >= 0"),
    ("schedule bad multiplier", lambda: optim.PiecewiseLinearLR(optim.AdamW(_p()), {0: float("inf")}), ValueError,
     r"milestones\[0\]=inf: expected a finite multiplier >= 0"),
]


@pytest.mark.parametrize("make, exc, pattern", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_invalid_argument_message(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


@pytest.mark.parametrize("cls", [optim.SGD, optim.AdamW, optim.AdaFactor, optim.AdaX])
def test_sparse_gradients_are_refused_with_the_alternative(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse gradients are not supported.*lazy_rows=True"):
        opt.step()
