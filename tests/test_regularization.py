"""Flooding and the finite-difference gradient penalty against their equations; both, and
ZerothOrder, through the trainer."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import metrics, reset_accelerate, tiny_lm_recipe, write_text_files

from leantrain.trainer.errors import RecipeError
from leantrain.trainer.loop import train
from leantrain.trainer.regularization import GradientPenalty, flood


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_text_files(tmp_path_factory.mktemp("text"))


def test_flooding_is_the_loss_above_the_level_and_ascends_below():
    for value, sign in ((3.0, 1.0), (1.0, -1.0)):
        loss = torch.tensor(value, requires_grad=True)
        flooded = flood(loss, 2.0)
        flooded.backward()
        assert flooded.item() == pytest.approx(abs(value - 2.0) + 2.0) and loss.grad.item() == sign
    assert flood(torch.tensor(0.5), None).item() == 0.5


def test_gradient_penalty_equals_double_backward():
    """g + (2λ/ε)(∇L(θ+εg) − g) against autograd's exact ∇(L + λ‖∇L‖²), float64, a small radius."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
    params = list(model.parameters())
    weight, scale = 0.3, 2.0
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    exact = torch.autograd.grad(loss_fn() + weight * penalty, params)
    (loss_fn() * scale).backward()
    norm_sq = GradientPenalty(weight, radius=1e-5).apply(params, scale, lambda: (loss_fn() * scale).backward())
    assert norm_sq == pytest.approx(penalty.item(), rel=1e-12)
    for p, e in zip(params, exact):
        torch.testing.assert_close(p.grad / scale, e, rtol=1e-4, atol=1e-7)


def test_regularisers_through_the_trainer(tmp_path, files):
    recipe = tiny_lm_recipe(tmp_path, files, max_updates=3, accumulation__steps=2, data__micro_batch_size=4,
                            optimizer={"name": "SGD", "lr": 0.3, "momentum": 0.9},
                            regularization={"flooding": 6.0, "gradient_penalty": 0.05})
    train(recipe, "test")
    lines = metrics(tmp_path)
    assert len(lines) == 3
    for line in lines:  # below the flood level: |L − b| + b > L, plus the penalty
        assert line["regularised_loss"] > line["loss"]


def test_gradient_penalty_with_fused_is_refused(tmp_path, files):
    recipe = tiny_lm_recipe(tmp_path, files, accumulation__fused=True, accumulation__steps=2,
                            regularization={"gradient_penalty": 0.1})
    with pytest.raises(RecipeError, match=r"regularization.gradient_penalty: cannot compose with fused"):
        train(recipe, "test")


def test_zeroth_order_trains_without_state_and_resumes_mid_cycle(tmp_path, files):
    common = dict(max_updates=4, accumulation__steps=2, data__micro_batch_size=4,
                  optimizer={"name": "ZerothOrder", "lr": 1e-3, "eps": 1e-3, "perturbations": 2},
                  checkpointing={"every_updates": 2})
    whole = tmp_path / "whole"
    result = train(tiny_lm_recipe(whole, files, **common), "test")
    reset_accelerate()
    assert result["update"] == 4
    assert (whole / "run_info.json").read_text().count('"optimizer_state_bytes_per_rank": 0') == 1
    parts = tmp_path / "parts"
    train(tiny_lm_recipe(parts, files, stop_after_micro_steps=3, **common), "test")
    reset_accelerate()
    train(tiny_lm_recipe(parts, files, **common), "test")
    assert [m["loss"] for m in metrics(parts)] == [m["loss"] for m in metrics(whole)]


def test_zeroth_order_refusals(tmp_path, files):
    with pytest.raises(RecipeError, match=r"accumulation.fused: ZerothOrder computes no gradient"):
        train(tiny_lm_recipe(tmp_path, files, accumulation__fused=True, optimizer={"name": "ZerothOrder"}), "t")
    with pytest.raises(RecipeError, match=r"optimizer.objective: 'accuracy' has no gradient"):
        train(tiny_lm_recipe(tmp_path, files, optimizer={"name": "AdamW", "objective": "accuracy"}), "t")
    with pytest.raises(RecipeError, match=r"optimizer.objective: accuracy needs model.task: sequence-classification"):
        train(tiny_lm_recipe(tmp_path, files, optimizer={"name": "ZerothOrder", "objective": "accuracy"}), "t")


def doubled_loss(outputs, batch):
    """A user objective for the test below: twice the model's loss."""
    return 2.0 * outputs.loss


def test_a_component_objective_is_what_zeroth_order_minimises(tmp_path, files):
    """SPSA's step is linear in the objective: 2·L at lr/2 moves θ exactly as L at lr, so the logged
    objective is twice the loss run's at every update (and the user's function was really called)."""
    common = dict(max_updates=3, data__micro_batch_size=4)
    plain = tmp_path / "plain"
    train(tiny_lm_recipe(plain, files, optimizer={"name": "ZerothOrder", "lr": 2e-3, "perturbations": 2}, **common),
          "test")
    reset_accelerate()
    doubled = tmp_path / "doubled"
    train(tiny_lm_recipe(doubled, files, optimizer={
        "name": "ZerothOrder", "lr": 1e-3, "perturbations": 2,
        "objective": {"_component_": "test_regularization.doubled_loss"}}, **common), "test")
    plain_losses = [m["loss"] for m in metrics(plain)]
    assert len(plain_losses) == 3 and len(set(plain_losses)) == 3  # the parameters moved
    assert [m["loss"] for m in metrics(doubled)] == pytest.approx([2 * v for v in plain_losses], rel=1e-6)


def test_an_objective_that_cannot_be_imported_is_refused(tmp_path, files):
    recipe = tiny_lm_recipe(tmp_path, files, optimizer={"name": "ZerothOrder",
                                                        "objective": {"_component_": "no_such_module.error_rate"}})
    with pytest.raises(RecipeError, match=r"optimizer.objective: cannot import 'no_such_module.error_rate'"):
        train(recipe, "test")
