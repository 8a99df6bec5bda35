"""The command line: estimate, validate, python -m, accelerate launch; and transformers.Trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from trainer_helpers import metrics, write_text_files

from leantrain import optim
from leantrain.trainer.estimate import estimate_recipe
from leantrain.trainer.schema import Recipe

SCRIPT = str(Path(sys.executable).with_name("leantrain"))


def _recipe(**sections) -> Recipe:
    base = {"model": {"from_config": {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25}},
            "data": {"builtin": "python-docs"}, "max_updates": 1}
    base.update(sections)
    return Recipe.model_validate(base)


def test_estimate_is_exact_on_the_meta_device_for_a_model_that_would_not_fit():
    """GPT-2 XL (1.56B parameters) from its config: shapes only, no memory, in seconds."""
    ours, baseline = estimate_recipe(_recipe(
        optimizer={"name": "AdaFactor", "lr": 1e-3, "relative_step": False, "beta1": 0.9, "momentum_on": "grad",
                   "momentum_dtype": "bfloat16"},
        accumulation={"steps": 8, "mode": "exact", "fused": True}), "test")
    n = ours.trainable
    assert 1.55e9 < n < 1.6e9
    assert ours.parameters == 4 * n and ours.gradients == 0 and ours.accumulation == 0
    assert 2.0 < ours.optimizer_state / n < 2.01  # bf16 momentum + factored vectors
    assert baseline.total == 16 * n


@pytest.mark.parametrize("sections, state_per_param, grads_per_param, accumulation_per_param", [
    ({"optimizer": {"name": "AdamW"}, "accumulation": {"steps": 4, "mode": "exact", "fused": True}}, 8, 0, 0),
    ({"optimizer": {"name": "AdamW"}, "accumulation": {"steps": 4, "mode": "standard"}}, 8, 4, 0),
    ({"optimizer": {"name": "torch.AdamW"}, "accumulation": {"steps": 4, "mode": "standard"}}, 8, 4, 0),
    ({"optimizer": {"name": "AdaFactor", "lr": None}, "accumulation": {"steps": 4}, "schedule": {"name": "none"}}, 0, 0, 4),
    ({"optimizer": {"name": "AdamW", "lookahead": {"k": 5}, "ema": {"decay": 0.99}},
      "accumulation": {"steps": 4, "fused": True}}, 16, 0, 0),
], ids=["adamw-fused", "adamw-standard", "torch-adamw-standard", "adafactor-buffer", "adamw-lookahead-ema"])
def test_estimate_components(sections, state_per_param, grads_per_param, accumulation_per_param):
    sections = {**sections, "model": {"from_config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2}}}
    ours, _ = estimate_recipe(_recipe(**sections), "test")
    n = ours.trainable
    assert ours.gradients == grads_per_param * n
    assert ours.accumulation == accumulation_per_param * n
    if state_per_param:  # torch's optimizers add a 4-byte `step` tensor per parameter tensor
        scalars = 4 * 28 if sections["optimizer"]["name"].startswith("torch.") else 0
        assert ours.optimizer_state == state_per_param * n + scalars
    else:  # factored: a small fraction of a byte per parameter
        assert 0 < ours.optimizer_state < 0.2 * n


def _run(args, cwd=None, env=None, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_estimate_and_validate_commands(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"from_config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64,
                                                                  "n_head": 2}},
                                      "data": {"builtin": "python-docs"}, "optimizer": {"name": "AdamW"},
                                      "accumulation": {"steps": 4, "fused": True}, "max_updates": 1}))
    out = _run([SCRIPT, "estimate", str(recipe)])
    assert out.returncode == 0, out.stderr
    assert "AdamW, exact fused, k=4" in out.stdout and "AdamW, standard accumulation" in out.stdout
    assert "12.00 B/param" in out.stdout and "16.00 B/param" in out.stdout
    by_launch_name = _run([SCRIPT, "estimate", str(recipe), "--engine", "zero2", "--ranks", "2"])
    by_engine_name = _run([SCRIPT, "estimate", str(recipe), "--engine", "deepspeed-zero2", "--ranks", "2"])
    assert by_launch_name.returncode == 0, by_launch_name.stderr
    assert by_launch_name.stdout == by_engine_name.stdout and "deepspeed-zero2" in by_launch_name.stdout
    out = _run([sys.executable, "-m", "leantrain.trainer", "validate", str(recipe), "optimizer.lr=1e-4"])
    assert out.returncode == 0 and out.stdout.strip() == f"{recipe}: valid"


def _tiny_recipe_file(tmp_path, files, **extra) -> Path:
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # masks differ across batch splits
    data = {"model": {"task": "causal-lm", "from_config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                                           "n_head": 2, "n_positions": 64, **no_dropout}},
            "tokenizer": {"train_vocab_size": 300},
            "data": {"files": files, "max_length": 48, "micro_batch_size": 8},
            "optimizer": {"name": "torch.AdamW", "lr": 3e-3},
            "accumulation": {"steps": 1, "mode": "standard"}, "max_updates": 4, "seed": 0}
    data.update(extra)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, micro-batch 8, via the console script."""
    root = tmp_path_factory.mktemp("launch")
    recipe = _tiny_recipe_file(root, write_text_files(root))
    out = _run([SCRIPT, "train", str(recipe), f"output_dir={root / 'one'}"])
    assert out.returncode == 0, out.stderr[-2000:]
    return recipe, [m["loss"] for m in metrics(root / "one")]


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.skip(f"{name} not installed next to {sys.executable}")
    return str(path)


def test_accelerate_launch_runs_the_trainer_unchanged(single_run, tmp_path):
    recipe, reference = single_run
    launched = _run([_tool("accelerate"), "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", "-m", "leantrain.trainer", str(recipe), f"output_dir={tmp_path}"])
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert [m["loss"] for m in metrics(tmp_path)] == pytest.approx(reference, rel=1e-6)


def test_two_ranks_train_the_same_curve_as_one(single_run, tmp_path):
    """torchrun, 2 CPU processes (gloo, DDP): rank-sharded micro-batches of 4 = one batch of 8."""
    recipe, reference = single_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = _run([_tool("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "leantrain.trainer",
                     str(recipe), f"output_dir={tmp_path}", "data.micro_batch_size=4"], env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 rank(s)" in launched.stdout
    assert [m["loss"] for m in metrics(tmp_path)] == pytest.approx(reference, rel=1e-5)


def test_transformers_trainer_with_a_leantrain_optimizer(tmp_path):
    """The documented recipe: pass (optimizer, scheduler) to transformers.Trainer.

    Let the Trainer accumulate (gradient_accumulation_steps=k) and give leantrain's
    optimizer accum_steps=1, so the Trainer's step and schedule counting stay its own.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    gen = torch.Generator().manual_seed(0)
    pattern = torch.arange(16) % 8  # a learnable repeating sequence
    examples = [{"input_ids": (pattern + torch.randint(0, 8, (1,), generator=gen)) % 64} for _ in range(64)]
    for ex in examples:
        ex["labels"] = ex["input_ids"]
    optimizer = optim.AdaFactor(model.parameters(), lr=1e-2, relative_step=False, scale_parameter=False,
                                beta1=0.9, momentum_on="grad")
    schedule = optim.PiecewiseLinearLR(optimizer, {0: 0.1, 5: 1.0})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             max_steps=20, logging_steps=5, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, optimizers=(optimizer, schedule))
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 20 and losses[-1] < 0.5 * losses[0]
    assert optimizer.state_bytes_by_component()["accumulation"] == 0


@pytest.mark.parametrize("weight_decay", [None, 0.05], ids=["optimizer-default", "recipe-sets-it"])
def test_one_dimensional_parameters_get_no_weight_decay(weight_decay):
    """no_decay_1d (default) holds whether or not the recipe sets weight_decay itself."""
    from leantrain.trainer.optimizers import build_optimizer

    recipe = _recipe(optimizer={"name": "AdamW", "lr": 1e-3, "weight_decay": weight_decay})
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(recipe, "test", model)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert [decay_of[id(p)] for p in model.parameters() if p.dim() < 2] == [0.0, 0.0, 0.0]
    expected = 0.05 if weight_decay else optim.AdamW([torch.zeros(1)]).defaults["weight_decay"]
    assert decay_of[id(model[0].weight)] == expected
