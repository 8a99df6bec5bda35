"""LayerAdaptation against LAMB's equations (float64), and composed with embedded accumulation,
fused mode, Lookahead, EMA and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_lists
from tiny_models import tiny_gpt2, token_batches, train_micro_steps

from leantrain import optim

SHAPES = [(5, 4), (4,), (3, 2, 5)]


def _run(make, steps=12, k=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = make(params)
    stream = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    for grads in stream:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
    return params, stream, opt


def _lamb(stream, k, *, lr, betas, eps, wd, max_ratio=None, exclude_1d=True, seed=0):
    """LAMB written out: AdamW's direction with decoupled decay, scaled by ‖θ‖/‖u‖ per tensor;
    embedded exact accumulation: m, v from the cycle's micro-batches (docs/design.md §2.1)."""
    gen = torch.Generator().manual_seed(seed)
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    m = [torch.zeros_like(x) for x in theta]
    v = [torch.zeros_like(x) for x in theta]
    (b1, b2) = betas
    for t, start in enumerate(range(0, len(stream), k), 1):
        cycle = stream[start:start + k]
        for i in range(len(theta)):
            m[i] = b1 * m[i] + (1 - b1) / k * sum(g[i] for g in cycle)
            v[i] = b2 * v[i] + (1 - b2) / k * sum(g[i] ** 2 for g in cycle)
            u = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps) + wd * theta[i]
            ratio = 1.0
            if theta[i].dim() >= 2 or not exclude_1d:
                ratio = theta[i].norm() / u.norm()
                if max_ratio is not None:
                    ratio = min(ratio, max_ratio)
            theta[i] = theta[i] - lr * ratio * u
    return theta


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("options", [dict(), dict(max_trust_ratio=0.5), dict(exclude_1d=False)],
                         ids=["plain", "clamped", "all_tensors"])
def test_with_adamw_it_is_lamb(k, options):
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    params, stream, _ = _run(lambda p: optim.LayerAdaptation(optim.AdamW(p, accum_steps=k, **kwargs), **options),
                             k=k)
    expected = _lamb(stream, k, lr=0.01, betas=(0.9, 0.99), eps=1e-8, wd=0.1, max_ratio=options.get("max_trust_ratio"),
                     exclude_1d=options.get("exclude_1d", True))
    assert_close_lists(params, expected, rtol=1e-10, atol=1e-12)


def test_each_step_has_norm_lr_times_the_weight_norm():
    """Unclamped, ‖Δθ‖ = lr·‖θ‖ for every ≥2-D tensor, whatever the optimizer (SGD here)."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
    opt = optim.LayerAdaptation(optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01))
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
        for p, b in zip(params, before):
            if p.dim() >= 2:
                assert (p.detach() - b).norm().item() == pytest.approx(0.05 * b.norm().item(), rel=1e-12)


def test_the_ratio_is_one_where_a_norm_is_zero():
    """A zero tensor (‖θ‖ = 0) and a tensor whose update is zero (‖u‖ = 0) take the wrapped optimizer's step."""
    zero, moving = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True), torch.ones(2, 5, dtype=torch.float64,
                                                                                        requires_grad=True)
    twin_zero, twin_moving = zero.detach().clone().requires_grad_(), moving.detach().clone().requires_grad_()
    opt = optim.LayerAdaptation(optim.SGD([zero, moving], lr=0.1))
    ref = optim.SGD([twin_zero, twin_moving], lr=0.1)
    for o, (z, m) in ((opt, (zero, moving)), (ref, (twin_zero, twin_moving))):
        z.grad = torch.full((3, 4), 0.5, dtype=torch.float64)  # θ = 0: ‖θ‖/‖u‖ would stop it forever
        m.grad = torch.zeros(2, 5, dtype=torch.float64)  # u = 0: the ratio would divide by zero
        o.step()
    assert torch.equal(zero, twin_zero) and zero.abs().sum() > 0
    assert torch.equal(moving, twin_moving) and torch.isfinite(moving).all()


def test_composes_with_fused_ema_mode_lookahead_and_ema_weights():
    """Fused equals unfused (ema mode, k=4) under Lookahead and EMA wrappers, on a tied GPT-2."""
    batches = token_batches(12)
    runs = []
    for fused in (False, True):
        model = tiny_gpt2()
        opt = optim.EMA(optim.Lookahead(optim.LayerAdaptation(optim.AdamW(model.parameters(), lr=1e-2, accum_steps=4,
                                                                          accum_mode="ema")), k=2), decay=0.9)
        train_micro_steps(model, opt, batches, fused=fused)
        runs.append((model, opt))
    assert_close_lists(list(runs[0][0].parameters()), list(runs[1][0].parameters()), rtol=1e-6, atol=1e-7)
    assert all("ema_weights" in s and "lookahead_slow" in s for s in runs[1][1].state.values())


def test_settings_travel_in_the_state_dict():
    params, stream, opt = _run(lambda p: optim.LayerAdaptation(optim.AdamW(p, lr=0.01), max_trust_ratio=2.0), steps=2)
    saved = copy.deepcopy(opt.state_dict())
    assert all(g["layer_adaptation"] and g["max_trust_ratio"] == 2.0 for g in saved["param_groups"])
    fresh = optim.AdamW([p.detach().clone().requires_grad_() for p in params], lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["layer_adaptation"]


def test_refusals():
    p = [torch.zeros(2, 2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"lr=None \(AdaFactor's relative step\)"):
        optim.LayerAdaptation(optim.AdaFactor(p))
    with pytest.raises(TypeError, match=r"base='SGD' is not a leantrain optimizer"):
        optim.LayerAdaptation(torch.optim.SGD(p, lr=0.1))
    with pytest.raises(ValueError, match=r"max_trust_ratio=0: allowed range"):
        optim.LayerAdaptation(optim.AdamW(p), max_trust_ratio=0)


def test_through_the_trainer_each_matrix_moves_lr_times_its_norm(tmp_path):
    """optimizer.layer_adaptation in a recipe: between updates 1 and 2 of a real run (AdamW, decoupled decay,
    constant lr), every matrix moves by exactly lr·‖θ‖ — the LAMB property, end to end."""
    from safetensors.torch import load_file
    from trainer_helpers import reset_accelerate, tiny_lm_recipe, write_text_files

    from leantrain.trainer.loop import train

    (tmp_path / "text").mkdir()
    files = write_text_files(tmp_path / "text")
    lr, finals = 1e-2, []
    for updates in (1, 2):
        out = tmp_path / f"u{updates}"
        train(tiny_lm_recipe(out, files, max_updates=updates, data__micro_batch_size=4, schedule={"name": "constant"},
                             optimizer={"name": "AdamW", "lr": lr, "weight_decay": 0.1, "layer_adaptation": {}}), "t")
        reset_accelerate()
        finals.append(load_file(str(out / "final" / "model.safetensors")))
    matrices = [name for name, t in finals[0].items() if t.dim() == 2]
    assert len(matrices) >= 6
    for name in matrices:
        before, after = finals[0][name], finals[1][name]
        assert (after - before).norm() / before.norm() == pytest.approx(lr, rel=1e-4), name
