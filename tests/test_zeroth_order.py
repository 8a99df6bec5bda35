"""ZerothOrder (SPSA/MeZO) against its equations, and the policy-gradient equivalence measured."""

from __future__ import annotations

import copy

import pytest
import torch

from leantrain import optim


def _linear_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()], \
        [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]


def test_one_update_is_the_spsa_equation():
    """A linear loss a·θ: p = (L(θ+εz) − L(θ−εz))/2ε = a·z exactly, and θ ← θ·(1−lrλ) − lr·p·z."""
    params, a = _linear_problem()
    start = [p.detach().clone() for p in params]
    opt = optim.ZerothOrder(params, lr=0.1, eps=1e-2, seed=7, weight_decay=0.5)
    z = [opt._noise(0, i, p) for i, p in enumerate(params)]
    loss = lambda: sum((ai * p).sum() for ai, p in zip(a, params))  # noqa: E731
    opt.step(loss)
    projection = sum((ai.double() * zi.double()).sum() for ai, zi in zip(a, z)).item()
    for p, s, zi in zip(params, start, z):
        torch.testing.assert_close(p.detach(), s * (1 - 0.1 * 0.5) - 0.1 * projection * zi, rtol=1e-5, atol=1e-5)
    assert opt.state_bytes() == 0  # no state: inference memory


def test_accumulation_averages_the_cycle_with_one_z():
    params, a = _linear_problem()
    twin = [p.detach().clone().requires_grad_() for p in params]
    opt = optim.ZerothOrder(params, lr=0.1, eps=1e-2, seed=3, accum_steps=2)
    ref = optim.ZerothOrder(twin, lr=0.1, eps=1e-2, seed=3)
    scales = [1.0, 3.0]
    for s in scales:  # two micro-batches whose losses differ by a factor
        opt.step(lambda s=s: s * sum((ai * p).sum() for ai, p in zip(a, params)))
        assert opt.updated == (s == scales[-1])
    ref.step(lambda: sum(scales) / 2 * sum((ai * p).sum() for ai, p in zip(a, twin)))  # the cycle's mean loss
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_it_descends_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(20, generator=gen)
    theta = torch.zeros(20, requires_grad=True)
    opt = optim.ZerothOrder([theta], lr=0.02, eps=1e-3, perturbations=4)
    loss = lambda: ((theta - target) ** 2).sum()  # noqa: E731
    first = loss().item()
    for _ in range(400):
        opt.step(loss)
    assert loss().item() < 0.05 * first


def test_a_checkpoint_mid_cycle_resumes_exactly():
    params, a = _linear_problem()
    opt = optim.ZerothOrder(params, lr=0.05, seed=1, accum_steps=3, momentum=0.9)
    loss = lambda ps: lambda: sum(((ai * p) ** 2).sum() for ai, p in zip(a, ps))  # noqa: E731
    for _ in range(4):
        opt.step(loss(params))
    saved = copy.deepcopy(opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in params]
    resumed = optim.ZerothOrder(twin, lr=0.05, seed=1, accum_steps=3, momentum=0.9)
    resumed.load_state_dict(saved)
    for _ in range(5):
        opt.step(loss(params))
        resumed.step(loss(twin))
    assert all(torch.equal(p, q) for p, q in zip(params, twin))


def test_spsa_and_policy_gradient_estimate_the_same_gradient():
    """The Gaussian-smoothed loss J(θ) = E[L(θ+σz)] has ∇J = E[L(θ+σz)·z]/σ (the policy gradient of a
    Gaussian policy over parameters, REINFORCE) = E[(L(θ+σz) − L(θ−σz))·z]/(2σ) (SPSA, an antithetic
    baseline). For a quadratic ∇J = ∇L exactly; both means agree with it (cosine 0.9998 and 0.99999, relative
    error 2.0% and 0.53% over 200,000 samples), SPSA with 14.7x less variance."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    hessian = a @ a.T / 10 + torch.eye(10, dtype=torch.float64)
    theta = torch.randn(10, generator=gen, dtype=torch.float64)
    loss = lambda x: 0.5 * ((x - 1.0) @ hessian @ (x - 1.0)).sum(-1) if x.dim() == 1 else \
        0.5 * torch.einsum("ni,ij,nj->n", x - 1.0, hessian, x - 1.0)  # noqa: E731
    gradient = hessian @ (theta - 1.0)
    sigma, n = 0.5, 200_000  # smoothing a quadratic moves only its constant: ∇J = ∇L for any σ
    z = torch.randn(n, 10, generator=gen, dtype=torch.float64)
    reinforce = (loss(theta + sigma * z)[:, None] * z / sigma)
    spsa = ((loss(theta + sigma * z) - loss(theta - sigma * z))[:, None] * z / (2 * sigma))
    for estimate in (reinforce, spsa):
        mean = estimate.mean(0)
        assert torch.nn.functional.cosine_similarity(mean, gradient, dim=0) > 0.99
    assert spsa.var(0).sum() < 0.1 * reinforce.var(0).sum()  # measured: 1072 vs 15801 (14.7x)


def test_refusals():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"perturbations=0"):
        optim.ZerothOrder(p, perturbations=0)
    with pytest.raises(ValueError, match=r"eps=0: allowed range"):
        optim.ZerothOrder(p, eps=0)
    with pytest.raises(ValueError, match=r"step\(closure\): the closure evaluates the loss"):
        optim.ZerothOrder(p).step(None)
