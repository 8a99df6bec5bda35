"""The training loop: token-weighted accumulation, exact resume, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import wandb_offline
from safetensors.torch import load_file
from trainer_helpers import metrics, reset_accelerate, tiny_lm_recipe, write_text_files

from leantrain.trainer.loop import train




@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_text_files(tmp_path_factory.mktemp("text"))


def _final_params(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


@pytest.mark.parametrize("mode, optimizer", [("standard", {"name": "AdamW", "lr": 3e-3}),
                                            ("standard", {"name": "torch.AdamW", "lr": 3e-3}),
                                            ("exact", {"name": "SGD", "lr": 0.5, "momentum": 0.9})],
                         ids=["standard-leantrain-adamw", "standard-torch-adamw", "exact-sgd"])
def test_micro_batch_splits_give_the_same_loss_curve(tmp_path, files, mode, optimizer):
    """8×1, 4×2 and 2×4 on variable-length text: identical losses per update (token-weighted)."""
    curves, finals = [], []
    for micro, k in ((8, 1), (4, 2), (2, 4)):
        out = tmp_path / f"{micro}x{k}"
        recipe = tiny_lm_recipe(out, files, data__micro_batch_size=micro, accumulation__steps=k,
                                accumulation__mode=mode, optimizer=optimizer)
        train(recipe, "test")
        reset_accelerate()
        curves.append([m["loss"] for m in metrics(out)])
        finals.append(_final_params(out))
    assert len(curves[0]) == 6
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], rel=2e-5)
    for final in finals[1:]:
        for name, value in final.items():
            torch.testing.assert_close(value, finals[0][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stop_after", [3 * 4, 3 * 4 + 2], ids=["at_update_3", "mid_cycle"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, files, stop_after, fused):
    """Stopped after update 3 (or 2 micro-steps into update 4) and resumed: same parameters at update 6."""
    common = dict(dropout=0.1, data__micro_batch_size=2, accumulation__steps=4, accumulation__fused=fused,
                  optimizer={"name": "AdaFactor", "lr": 1e-2, "relative_step": False, "beta1": 0.9,
                             "momentum_on": "grad"},
                  schedule={"name": "cosine", "warmup_updates": 2}, checkpointing={"every_updates": 2})
    whole = tmp_path / "whole"
    train(tiny_lm_recipe(whole, files, **common), "test")
    reset_accelerate()

    parts = tmp_path / "parts"
    first = train(tiny_lm_recipe(parts, files, stop_after_micro_steps=stop_after, **common), "test")
    assert first["stopped"] and first["micro_step"] == stop_after
    reset_accelerate()
    second = train(tiny_lm_recipe(parts, files, **common), "test")
    assert not second["stopped"] and second["update"] == 6
    assert [m["loss"] for m in metrics(parts)] == [m["loss"] for m in metrics(whole)]
    a, b = _final_params(whole), _final_params(parts)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_nonfinite_loss_micro_batch_is_replaced_not_counted(tmp_path, files, monkeypatch):
    from leantrain.trainer import loop

    calls = {"n": 0}
    real = loop.optim.finite_loss

    def flaky(loss):
        calls["n"] += 1
        return False if calls["n"] == 3 else real(loss)

    monkeypatch.setattr(loop.optim, "finite_loss", flaky)
    result = train(tiny_lm_recipe(tmp_path, files, accumulation__steps=2, data__micro_batch_size=4), "test")
    assert result["update"] == 6 and result["micro_step"] == 12  # the skipped one did not count


def test_quickstart_end_to_end_with_offline_wandb(tmp_path, monkeypatch):
    """The built-in default recipe, shortened: checkpoint, final model, metrics, offline W&B run."""
    from leantrain.trainer.recipe import load_recipe

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "qs"
    recipe, source = load_recipe(None, [f"output_dir={out}", "max_updates=4", "eval.every_updates=2",
                                        "checkpointing.every_updates=2", "tracking.wandb.mode=offline",
                                        "data.micro_batch_size=4", "accumulation.steps=2"])
    result = train(recipe, source)
    assert result["update"] == 4 and "eval_loss" in result
    lines = metrics(out)
    assert [m["update"] for m in lines] == [1, 2, 3, 4]  # each update once, the last with the final evaluation
    assert "eval_loss" in lines[-1]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-u0000002-m000000004", "checkpoint-u0000004-m000000008"]
    assert (out / "final" / "model.safetensors").is_file() and (out / "final" / "tokenizer.json").is_file()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # synced later with `wandb sync`
    logged = {row["_step"]: row["loss"] for row in wandb_offline.history(runs[0])}
    assert logged == pytest.approx({m["update"]: m["loss"] for m in lines})


def test_gradient_checkpointing_recipe_trains_the_same_curve(tmp_path, files):
    """model.gradient_checkpointing recomputes activations (non-reentrant) and changes no number."""
    curves = []
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        recipe = tiny_lm_recipe(out, files, accumulation__steps=2, accumulation__fused=True,
                                data__micro_batch_size=4, model__gradient_checkpointing=checkpointing)
        train(recipe, "test")
        reset_accelerate()
        curves.append([m["loss"] for m in metrics(out)])
    assert curves[1] == pytest.approx(curves[0], rel=1e-6)
