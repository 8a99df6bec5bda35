"""Each optimizer against its reference: torch, transformers, docs/design.md §2.1/§2.2."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    assert_close_lists,
    grad_stream,
    make_params,
    run_micro_steps,
    run_reference_accumulation,
    set_grads,
)

from leantrain import optim

SGD_CONFIGS = [
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, weight_decay=0.1),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.1),
    dict(momentum=0.9, nesterov=True, weight_decay=0.05),
    dict(),
]


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_sgd_equals_torch_sgd_on_accumulated_grads(config, k):
    ours, ref = make_params(), make_params()
    stream = grad_stream(40)
    run_micro_steps(optim.SGD(ours, lr=0.1, accum_steps=k, **config), ours, stream)
    run_reference_accumulation(torch.optim.SGD(ref, lr=0.1, **config), ref, stream, k)
    assert_close_lists(ours, ref, rtol=1e-6, atol=1e-6)


def test_sgd_k_micro_batches_equal_one_big_batch():
    """Same data split 1×8 and 4×2 on a least-squares model: same parameters."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 8, 3, generator=gen), torch.randn(6, 8, generator=gen)
    w0 = torch.randn(3, generator=gen)

    def train(micro_batch: int, k: int) -> torch.Tensor:
        w = w0.clone().requires_grad_()
        opt = optim.SGD([w], lr=0.1, momentum=0.9, accum_steps=k)
        for xb, yb in zip(x, y):  # 6 updates of 8 samples each
            for xs, ys in zip(xb.split(micro_batch), yb.split(micro_batch)):
                ((xs @ w - ys) ** 2).mean().backward()  # mean loss; the optimizer applies 1/k
                opt.step()
                opt.zero_grad()
        return w.detach()

    torch.testing.assert_close(train(8, 1), train(2, 4), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("use_fused_kernel", [True, False], ids=["fused_kernel", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_k1_equals_torch_adamw(use_fused_kernel, weight_decay):
    ours, ref = make_params(), make_params()
    stream = grad_stream(30)
    opt = optim.AdamW(ours, lr=0.05, betas=(0.8, 0.95), weight_decay=weight_decay, fused=None if use_fused_kernel else False)
    run_micro_steps(opt, ours, stream)
    run_reference_accumulation(torch.optim.AdamW(ref, lr=0.05, betas=(0.8, 0.95), weight_decay=weight_decay),
                               ref, stream, 1)
    assert_close_lists(ours, ref, rtol=1e-6, atol=1e-6)


def test_adamw_fused_kernel_and_foreach_paths_agree():
    a, b = make_params(), make_params()
    stream = grad_stream(20)
    run_micro_steps(optim.AdamW(a, lr=0.01, fused=True), a, stream)
    run_micro_steps(optim.AdamW(b, lr=0.01, fused=False), b, stream)
    assert_close_lists(a, b, rtol=1e-6, atol=1e-7)


def _adamw_design_reference(params, stream, *, k, lr, beta1, beta2, eps, wd, mode):
    """docs/design.md §2.1 (exact) / §2.2 (ema), written out per tensor."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    theta = [p.detach().clone() for p in params]
    for s, grads in enumerate(stream):
        j, t = s % k, s // k + 1
        for i, g in enumerate(grads):
            if mode == "exact":
                if j == 0:
                    m[i] = beta1 * m[i]
                    v[i] = beta2 * v[i]
                m[i] = m[i] + (1 - beta1) / k * g
                v[i] = v[i] + (1 - beta2) / k * g * g
            else:
                b1, b2 = beta1 ** (1 / k), beta2 ** (1 / k)
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
        if j == k - 1:
            for i in range(len(theta)):
                m_hat, v_hat = m[i] / (1 - beta1**t), v[i] / (1 - beta2**t)
                theta[i] = theta[i] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
    return theta


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_adamw_k4_equals_design_reference(mode):
    params = make_params()
    stream = grad_stream(24)
    hp = dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, wd=0.1)
    expected = _adamw_design_reference(params, stream, k=4, mode=mode, **hp)
    opt = optim.AdamW(params, lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, accum_steps=4, accum_mode=mode)
    run_micro_steps(opt, params, stream)
    assert_close_lists(params, expected, rtol=1e-6, atol=1e-6)


def test_adamw_k4_first_moment_is_exactly_that_of_the_mean_gradient():
    """m after a cycle equals torch's m stepped on the averaged gradient; v is >= it."""
    ours, ref = make_params(), make_params()
    stream = grad_stream(8)
    opt = optim.AdamW(ours, lr=0.0, accum_steps=4)
    run_micro_steps(opt, ours, stream)
    ref_opt = torch.optim.AdamW(ref, lr=0.0)
    run_reference_accumulation(ref_opt, ref, stream, 4)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-6, atol=1e-7)
        assert torch.all(opt.state[p]["exp_avg_sq"] >= ref_opt.state[q]["exp_avg_sq"] * (1 - 1e-6))


ADAFACTOR_CONFIGS = [
    dict(),
    dict(beta1=0.9),
    dict(weight_decay=0.1),
    dict(beta1=0.9, weight_decay=0.1),
    dict(lr=0.01, relative_step=False),
    dict(lr=0.01, relative_step=False, beta1=0.9, weight_decay=0.1),
    dict(lr=0.01, relative_step=False, scale_parameter=False),
    dict(warmup_init=True),
]


@pytest.mark.parametrize("config", ADAFACTOR_CONFIGS, ids=str)
def test_adafactor_equals_transformers_adafactor(config):
    from transformers.optimization import Adafactor as HFAdafactor

    ours, ref = make_params(), make_params()
    stream = grad_stream(20)
    run_micro_steps(optim.AdaFactor(ours, **config), ours, stream)
    run_reference_accumulation(HFAdafactor(ref, **config), ref, stream, 1)
    assert_close_lists(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [dict(), dict(beta1=0.9)], ids=str)
def test_adafactor_buffered_accumulation_equals_transformers_on_mean_gradient(config):
    """Configurations that need the mean gradient keep a buffer and stay exact."""
    from transformers.optimization import Adafactor as HFAdafactor

    ours, ref = make_params(), make_params()
    stream = grad_stream(24)
    opt = optim.AdaFactor(ours, accum_steps=4, **config)
    run_micro_steps(opt, ours, stream)
    run_reference_accumulation(HFAdafactor(ref, **config), ref, stream, 4)
    assert_close_lists(ours, ref, rtol=1e-5, atol=1e-7)
    assert opt.state_bytes_by_component()["accumulation"] == sum(p.numel() * 4 for p in ours)


def _adafactorw_design_reference(params, stream, *, k, beta1, d, eps1, eps2):
    """AdaFactorW from docs/design.md §2.1 with relative step and parameter scale, per tensor."""
    theta = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in theta]
    second = [None] * len(theta)
    for s, grads in enumerate(stream):
        j, t = s % k, s // k + 1
        beta2 = 1 - t ** -0.8
        for i, g in enumerate(grads):
            g = g.double()
            sq = g * g + eps1
            stat = (sq.mean(-1), sq.mean(-2)) if g.dim() >= 2 else (sq,)
            if j == 0:
                m[i] = beta1 * m[i]
                second[i] = tuple(beta2 * x for x in second[i]) if second[i] else tuple(0 * x for x in stat)
            m[i] = m[i] + (1 - beta1) / k * g
            second[i] = tuple(x + (1 - beta2) / k * y for x, y in zip(second[i], stat))
        if j == k - 1:
            for i in range(len(theta)):
                if theta[i].dim() >= 2:
                    r, c = second[i]
                    v_hat = (r / r.mean(-1, keepdim=True)).unsqueeze(-1) * c.unsqueeze(-2)
                else:
                    v_hat = second[i][0]
                u = (m[i] / (1 - beta1**t)) / v_hat.sqrt()
                u = u / max(1.0, (u.norm() / math.sqrt(u.numel())).item() / d)
                lr = min(1e-2, 1 / math.sqrt(t)) * max(eps2, (theta[i].norm() / math.sqrt(theta[i].numel())).item())
                theta[i] = theta[i] - lr * u
    return theta


@pytest.mark.parametrize("k", [1, 4])
def test_adafactor_grad_momentum_equals_design_reference(k):
    params = make_params()
    stream = grad_stream(8 * k)
    expected = _adafactorw_design_reference(params, stream, k=k, beta1=0.9, d=1.0, eps1=1e-30, eps2=1e-3)
    opt = optim.AdaFactor(params, beta1=0.9, momentum_on="grad", accum_steps=k)
    run_micro_steps(opt, params, stream)
    assert_close_lists(params, [e.float() for e in expected], rtol=1e-5, atol=1e-7)
    assert opt.state_bytes_by_component()["accumulation"] == 0


def _adax_reference(params, stream, *, k, lr, beta1, beta2, eps):
    """The AdaX equations with the raw, growing v, in float64, on mean gradients."""
    theta = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(p) for p in theta]
    v = [torch.zeros_like(p) for p in theta]
    for s, grads in enumerate(stream):
        j, t = s % k, s // k + 1
        for i, g in enumerate(grads):
            g = g.double()
            if j == 0:
                m[i] = beta1 * m[i]
                v[i] = (1 + beta2) * v[i]
            m[i] = m[i] + (1 - beta1) / k * g
            v[i] = v[i] + beta2 / k * g * g
        if j == k - 1:
            for i in range(len(theta)):
                v_hat = v[i] / ((1 + beta2) ** t - 1)
                theta[i] = theta[i] - lr * m[i] / (v_hat.sqrt() + eps)
    return theta


@pytest.mark.parametrize("k", [1, 4])
def test_adax_equals_its_equations(k):
    params = make_params()
    stream = grad_stream(10 * k)
    expected = _adax_reference(params, stream, k=k, lr=0.01, beta1=0.9, beta2=1e-3, eps=1e-8)
    run_micro_steps(optim.AdaX(params, lr=0.01, betas=(0.9, 1e-3), eps=1e-8, accum_steps=k), params, stream)
    assert_close_lists(params, [e.float() for e in expected], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t", [50_000, 1_000_000, 100_000_000])
def test_adax_second_moment_cannot_overflow_in_long_runs(t):
    """(1+β2)^t is 148 at t = 5·10^4, overflows fp32 at 10^6 and float64 at 10^8; v̂ stays exact.

    After g = 1 the state is v̂ = 1; one update at step t with g = 3 gives
    v̂ = (1 − a_t)·1 + a_t·9 with a_t = β2/((1+β2)^t − 1).
    """
    beta2 = 1e-4
    (p,) = make_params([(4, 3)])
    opt = optim.AdaX([p], lr=1e-3, betas=(0.9, beta2))
    set_grads([p], [torch.ones(4, 3)])
    opt.step()
    assert opt.state[p]["exp_avg_sq"].eq(1.0).all()
    opt.state[p]["step"] = t - 1  # the next update is number t
    set_grads([p], [torch.full((4, 3), 3.0)])
    opt.step()
    try:
        a_t = beta2 / math.expm1(t * math.log1p(beta2))
    except OverflowError:
        a_t = 0.0  # below the smallest double: v̂ keeps its whole memory
    v = opt.state[p]["exp_avg_sq"]
    assert torch.isfinite(v).all() and torch.isfinite(p).all()
    torch.testing.assert_close(v, torch.full((4, 3), (1 - a_t) + 9 * a_t), rtol=1e-6, atol=0)
    if t >= 1_000_000:  # the raw v of the paper's recursion would be inf in fp32 here
        assert (1 + beta2) ** 1_000_000 > torch.finfo(torch.float32).max


def test_adafactor_blocked_statistics_match_a_direct_reduction():
    """Row and column means of g² from one blocked pass equal direct reductions, across block edges."""
    from leantrain.optim import adafactor
    from leantrain.optim._sharding import GlobalSums

    gen = torch.Generator().manual_seed(0)
    for shape in [(5000, 7), (3, 2049, 4), (1, 1)]:
        g = torch.randn(shape, generator=gen)
        state = {"exp_avg_sq_row": torch.zeros(shape[:-1]), "exp_avg_sq_col": torch.zeros(shape[:-2] + shape[-1:])}
        adafactor._fold_second_moment(g, state, decay=None, weight=1.0, eps1=0.0, factored=True)
        sq = g.double().square()
        torch.testing.assert_close(state["exp_avg_sq_row"], sq.mean(dim=-1).float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(state["exp_avg_sq_col"], sq.mean(dim=-2).float(), rtol=1e-6, atol=0)
        update = adafactor._Preconditioned(g, g, state, True, 1.0, None, GlobalSums(), param_scale=False)
        direct = g * (state["exp_avg_sq_row"] / state["exp_avg_sq_row"].mean(-1, keepdim=True)).rsqrt().unsqueeze(-1) \
            * state["exp_avg_sq_col"].rsqrt().unsqueeze(-2)
        torch.testing.assert_close(update.rms(), direct.pow(2).mean().sqrt(), rtol=1e-5, atol=0)
        target = torch.zeros(shape)
        update.add_to(target, torch.tensor(-0.5))
        torch.testing.assert_close(target, -0.5 * direct, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("settings", [
    {},
    {"beta1": 0.9, "weight_decay": 0.1},
    {"beta1": 0.9, "momentum_on": "grad", "momentum_dtype": torch.bfloat16, "weight_decay": 0.1},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False, "beta2": 0.99, "beta1": 0.9, "momentum_on": "grad"},
    {"beta1": 0.9, "momentum_dtype": torch.bfloat16, "weight_decay": 0.1},
    {"lr": 1e-2, "relative_step": False, "clip_threshold": 1e-3, "min_dim_size_to_factor": 32, "dtype": torch.float64},
], ids=["transformers_defaults", "update_momentum_wd", "grad_momentum_bf16", "fixed_beta2", "update_momentum_bf16",
        "clipped_unfactored_float64"])
def test_adafactor_stacked_buckets_equal_the_per_tensor_path(monkeypatch, settings, k):
    """Same-shaped tensors stacked (and 1-D ones as foreach lists) give the per-tensor path's result bit for bit
    (these tensors have at most 2048 rows; longer ones the per-tensor path sums in row blocks)."""
    from tiny_models import tiny_gpt2, token_batches

    from leantrain.optim import _adafactor_batched

    runs = []
    for budget in (_adafactor_batched.BATCH_ELEMENTS, {"cpu": 0, "other": 0}):  # 0: all per tensor
        monkeypatch.setattr(_adafactor_batched, "BATCH_ELEMENTS", budget)
        options = dict(settings)
        model = tiny_gpt2().to(options.pop("dtype", torch.float32))
        opt = optim.AdaFactor(model.parameters(), accum_steps=k, **options)
        for ids in token_batches(3 * k):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((list(model.parameters()), opt.state_dict()["state"]))
    (stacked, stacked_state), (single, single_state) = runs
    for a, b in zip(stacked, single):
        assert torch.equal(a, b)
    for i, state in single_state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(stacked_state[i][key], value), key


def test_adafactor_steps_beside_an_empty_tensor():
    """An empty (0 × n) parameter is left to the per-tensor path; its neighbours step as without it."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=gen)
    alone, beside = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    empty = torch.zeros(0, 4, requires_grad=True)
    opts = optim.AdaFactor([alone]), optim.AdaFactor([empty, beside])
    for _ in range(3):
        grad = torch.randn(4, 4, generator=gen)
        alone.grad, beside.grad, empty.grad = grad.clone(), grad.clone(), torch.zeros(0, 4)
        for opt in opts:
            opt.step()
    assert torch.equal(alone, beside) and empty.shape == (0, 4)
