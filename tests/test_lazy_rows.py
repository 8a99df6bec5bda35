"""lazy_rows: rows without gradient over a whole cycle keep their value and state."""

from __future__ import annotations

import pytest
import torch

from leantrain import optim


def _row_grads(rows_per_micro_step, shape=(6, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for rows in rows_per_micro_step:
        g = torch.zeros(shape)
        g[list(rows)] = torch.randn(len(rows), shape[1], generator=gen)
        grads.append(g)
    return grads


def _lazy_adamw_reference(w0, grads, *, k, lr, beta1, beta2, eps, wd):
    """LazyAdam semantics per row with embedded accumulation and the tensor's update count."""
    theta, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    touched = torch.zeros(w0.shape[0], dtype=torch.bool)
    for s, g in enumerate(grads):
        j, t = s % k, s // k + 1
        if j == 0:
            touched[:] = False
        rows = g.ne(0).any(dim=1)
        new = rows & ~touched
        m[new] *= beta1
        v[new] *= beta2
        touched |= rows
        m += (1 - beta1) / k * g
        v += (1 - beta2) / k * g * g
        if j == k - 1:
            upd = theta * (1 - lr * wd) - lr * (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            theta[touched] = upd[touched]
    return theta, m, v


def test_lazy_adamw_matches_lazy_reference_with_deferred_decay():
    # k = 2; row 4 appears only in the second micro-step of cycle 2; rows 0-1 in cycle 1 only.
    pattern = [{0, 1, 2}, {2}, {2, 3}, {3, 4}, {2}, {2}]
    grads = _row_grads(pattern)
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(9)).requires_grad_()
    w0 = w.detach().clone()
    opt = optim.AdamW([w], lr=0.1, weight_decay=0.1, accum_steps=2, lazy_rows=True)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        opt.zero_grad()
    theta, m, v = _lazy_adamw_reference(w0, grads, k=2, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.1)
    torch.testing.assert_close(w.detach(), theta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[w]["exp_avg"], m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], v, rtol=1e-6, atol=1e-9)
    assert torch.equal(w.detach()[5], w0[5])  # never touched: never moved (despite weight decay)


@pytest.mark.parametrize("cls, kwargs", [(optim.AdamW, {}), (optim.SGD, dict(momentum=0.9)), (optim.AdaX, {})])
def test_untouched_rows_keep_value_and_state_while_dense_optimizer_moves_them(cls, kwargs):
    grads = _row_grads([{0, 1}, {0, 1}, {0}, {0}])  # row 1 only in cycle 1
    lazy_w = torch.randn(6, 3, generator=torch.Generator().manual_seed(2)).requires_grad_()
    dense_w = lazy_w.detach().clone().requires_grad_()
    lazy = cls([lazy_w], lr=0.1, accum_steps=2, lazy_rows=True, **kwargs)
    dense = cls([dense_w], lr=0.1, accum_steps=2, **kwargs)
    for i, g in enumerate(grads):
        for w, opt in ((lazy_w, lazy), (dense_w, dense)):
            w.grad = g.clone()
            opt.step()
            opt.zero_grad()
        if i == 1:
            row1 = lazy_w.detach()[1].clone()
            state1 = {key: val[1].clone() for key, val in lazy.state[lazy_w].items()
                      if isinstance(val, torch.Tensor) and val.dim() == 2}
    assert torch.equal(lazy_w.detach()[1], row1)
    assert all(torch.equal(lazy.state[lazy_w][key][1], val) for key, val in state1.items())
    assert not torch.equal(dense_w.detach()[1], row1)  # momentum keeps moving it when not lazy
    assert lazy.state_bytes_by_component()["lazy_rows"] == 6  # one bool per row
