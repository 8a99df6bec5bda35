"""AdamW(compiled=True): the torch.compile'd fold and update equal the eager multi-tensor path, the
boundary fold rides with the update in one graph, a changing learning rate does not recompile, and
what the compiled update does not cover is refused in one line. Each new list of shapes compiles
(seconds on a cold inductor cache), so the tests share one set of parameter shapes."""

from __future__ import annotations

import pytest
import torch
from helpers import grad_stream

from leantrain import optim
from leantrain.optim import _compiled

SHAPES = [(6, 5), (5,), (2, 3, 4)]
K = 4


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _run(compiled: bool, stream, *, mode="exact", schedule=None, drop=None):
    params = _params()
    opt = optim.AdamW(params, lr=0.05, weight_decay=0.1, accum_steps=K, accum_mode=mode, compiled=compiled)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, schedule) if schedule else None
    for i, grads in enumerate(stream):
        for n, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if drop and drop(i, n) else g.clone()
        opt.step()
        if opt.updated and lr_schedule:
            lr_schedule.step()
    return params, opt


def _assert_equal_runs(a, b):
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_compiled_equals_the_eager_path(mode, monkeypatch):
    calls = []
    fold_and_apply = _compiled.adamw_fold_and_apply
    monkeypatch.setattr(_compiled, "adamw_fold_and_apply", lambda *a, **kw: calls.append(1) or fold_and_apply(*a, **kw))
    stream = grad_stream(3 * K, SHAPES)
    compiled, opt = _run(True, stream, mode=mode)
    assert len(calls) == 3  # every boundary's fold went with its update
    eager, _ = _run(False, stream, mode=mode)
    _assert_equal_runs(compiled, eager)


def test_the_compiled_setting_is_the_loading_optimizers_own():
    """A checkpoint of a compiled run resumes in an eager optimizer (a machine without a compiler), and back."""
    params = _params()
    opt = optim.AdamW(params, lr=0.05, accum_steps=K, compiled=True)
    for grads in grad_stream(K + 1, SHAPES):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    eager = optim.AdamW(_params(), lr=0.05, accum_steps=K)
    eager.load_state_dict(opt.state_dict())
    assert eager.param_groups[0]["compiled"] is False and eager.micro_step == K + 1
    opt.load_state_dict(eager.state_dict())
    assert opt.param_groups[0]["compiled"] is True


def test_a_changing_learning_rate_does_not_recompile():
    from torch._dynamo.utils import counters

    stream = grad_stream(2 * K, SHAPES)
    _run(True, stream)  # compiled (or cached) for these shapes
    graphs = counters["stats"]["unique_graphs"]
    compiled, _ = _run(True, grad_stream(4 * K, SHAPES), schedule=lambda update: 1.0 / (1 + update))
    eager, _ = _run(False, grad_stream(4 * K, SHAPES), schedule=lambda update: 1.0 / (1 + update))
    _assert_equal_runs(compiled, eager)
    assert counters["stats"]["unique_graphs"] == graphs


def test_partial_gradients_fold_before_the_update():
    """A tensor without a gradient at the last micro-step, and one whose cycle starts there."""
    def drop(i, n):
        return (n == 1 and i % K == K - 1) or (n == 2 and i % K < K - 1 and i >= K)

    stream = grad_stream(3 * K, SHAPES)
    compiled, opt = _run(True, stream, drop=drop)
    eager, _ = _run(False, stream, drop=drop)
    _assert_equal_runs(compiled, eager)
    assert not opt._deferred_fold


@pytest.mark.parametrize("kwargs,match", [
    ({"amsgrad": True}, "compiled=True: not with amsgrad"),
    ({"max_update_rms": 1.0}, "compiled=True: not with max_update_rms"),
    ({"lazy_rows": True}, "compiled=True: not with lazy_rows"),
])
def test_what_the_compiled_update_does_not_cover_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.AdamW(_params(), accum_steps=K, compiled=True, **kwargs)


def test_bf16_parameters_and_layer_adaptation_are_refused():
    with pytest.raises(ValueError, match=r"compiled=True: a torch\.bfloat16 parameter"):
        optim.AdamW([p.detach().bfloat16().requires_grad_() for p in _params()], accum_steps=K, compiled=True)
    with pytest.raises(ValueError, match="LayerAdaptation: base has compiled=True"):
        optim.LayerAdaptation(optim.AdamW(_params(), accum_steps=K, compiled=True))


def test_a_group_mixing_precisions_is_refused():
    mixed = [torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(ValueError, match=r"compiled=True: a group's parameters must share one device and one precision"):
        optim.AdamW(mixed, compiled=True)
