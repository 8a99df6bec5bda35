"""``leantrain train`` under the shipped accelerate configs, 2 CPU processes each: DDP, FSDP2 and
DeepSpeed ZeRO 1/2/3. Each run stops mid-cycle (checkpoint), resumes, and must end equal to the
single-process run on the same global micro-batches; FSDP2 also resumes 2 → 1 rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from distributed import free_port
from safetensors.torch import load_file
from trainer_helpers import metrics, write_text_files

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "launch" / "accelerate"
K = 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny GPT-2 saved with its tokenizer (every run starts from the same weights), and text files."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from leantrain.trainer.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("engines")
    files = write_text_files(root)
    texts = [json.loads(line)["text"] for line in Path(files["train"]).read_text().splitlines()]
    tokenizer = train_bpe(texts, 300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root, files


def _recipe(root: Path, files: dict, name: str, optimizer: dict, **extra) -> Path:
    recipe = {
        "model": {"name_or_path": str(root / "model"), "task": "causal-lm"},
        "data": {"files": files, "max_length": 48, "micro_batch_size": 2},
        "optimizer": optimizer,
        "accumulation": {"steps": K, "mode": "exact", **extra.pop("accumulation", {})},
        "checkpointing": {"every_updates": 1, "keep_last": 4},
        "eval": {"max_batches": 1},
        "max_updates": 3, "seed": 0, "output_dir": str(root / name),
    }
    recipe.update(extra)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(config: str, recipe: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), "-m", "leantrain.trainer",
           str(recipe), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


_REFERENCES: dict[str, tuple[list[float], dict, dict]] = {}


def _single_process(recipe: Path, tmp: Path) -> tuple[list[float], dict, dict]:
    """The reference: one process, micro-batch 4 = the two ranks' micro-batches of 2 together
    (losses, final weights, run_info), computed once per recipe content."""
    key = recipe.read_text().replace(recipe.stem, "")
    if key not in _REFERENCES:
        out = tmp / f"single-{recipe.stem}"
        done = subprocess.run([sys.executable, "-m", "leantrain.trainer", str(recipe), f"output_dir={out}",
                               "data.micro_batch_size=4"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        _REFERENCES[key] = (_losses(out), load_file(str(out / "final" / "model.safetensors")),
                            json.loads((out / "run_info.json").read_text()))
    return _REFERENCES[key]


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]  # one line per update, the last with the final evaluation


def _estimated_state_bytes(recipe: Path, engine: str, ranks: int) -> int:
    from leantrain.trainer.estimate import estimate_recipe
    from leantrain.trainer.recipe import load_recipe

    loaded, source = load_recipe(str(recipe))
    return estimate_recipe(loaded, source, engine=engine, ranks=ranks)[0].optimizer_state


def _assert_same_run(out: Path, reference: tuple[list[float], dict, dict], rtol: float = 1e-5) -> None:
    losses, weights, _ = reference
    assert _losses(out) == pytest.approx(losses, rel=rtol)
    final = load_file(str(out / "final" / "model.safetensors"))
    assert final.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(final[name], value, rtol=rtol, atol=1e-6, msg=name)


ENGINES = {
    # DDP averages the optimizer's replicated state once per update: SGD's single moment is exactly the
    # global batch's (AdamW's v is the mean of the 2·k micro-batch squares, tested at optimizer level).
    "ddp": ("ddp", {"name": "SGD", "lr": 0.5, "momentum": 0.9}, {"accumulation": {"fused": True}}),
    "fsdp2": ("fsdp2", {"name": "AdamW", "lr": 3e-3}, {"accumulation": {"fused": True}}),
    "zero1": ("zero1", {"name": "AdamW", "lr": 3e-3}, {}),
    "zero2": ("zero2", {"name": "AdamW", "lr": 3e-3}, {}),
    "zero3": ("zero3", {"name": "AdamW", "lr": 3e-3}, {}),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_stop_mid_cycle_and_resume_equals_the_single_process_run(workdir, tmp_path, engine):
    root, files = workdir
    config, optimizer, extra = ENGINES[engine]
    recipe = _recipe(root, files, f"run-{engine}", optimizer, **extra)
    reference = _single_process(recipe, tmp_path)
    out = tmp_path / engine
    stopped = _launch(config, recipe, f"output_dir={out}", "stop_after_micro_steps=6")  # update 1, 2 micro-steps in
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert "stopped at update 1, micro-step 6" in stopped.stdout
    resumed = _launch(config, recipe, f"output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout and "micro-step 6" in resumed.stdout
    _assert_same_run(out, reference)
    info = json.loads((out / "run_info.json").read_text())
    expected_engine = {"ddp": "ddp", "fsdp2": "fsdp2"}.get(engine, f"deepspeed-{engine}")
    assert info["engine"] == expected_engine and info["world_size"] == 2
    single = reference[2]
    assert single["engine"] == "ddp" and single["world_size"] == 1
    assert info["parameters"] == single["parameters"]
    ratio = info["optimizer_state_bytes_per_rank"] / single["optimizer_state_bytes_per_rank"]
    assert ratio == pytest.approx(1.0 if engine == "ddp" else 0.5, abs=0.05), ratio  # sharded state: about half
    predicted = _estimated_state_bytes(recipe, info["engine"], ranks=2)  # leantrain estimate, before training
    assert predicted == pytest.approx(info["optimizer_state_bytes_per_rank"], rel=0.02)
    if engine == "zero2":  # DeepSpeed's checkpoints resume only on the rank count that wrote them
        first = sorted((out / "checkpoints").glob("checkpoint-u0000001-*"))[0]
        refused = _launch("zero2", recipe, f"output_dir={out}", f"checkpointing.resume={first}",
                          "data.micro_batch_size=4", nproc=1)
        _assert_one_line_refusal(refused, "written by 2 DeepSpeed ranks and this run has 1: resume it with 2 ranks")


def test_fsdp2_factored_adafactor_resumes_on_one_rank(workdir, tmp_path):
    """Stopped at an update boundary on 2 ranks, resumed on 1 (the sharded checkpoint reshards):
    the run ends as the single-process one, AdaFactor's factored statistics included."""
    root, files = workdir
    # eps1 = 1e-16: GPT-2's key biases get gradients that are pure rounding noise (~1e-10; softmax ignores
    # them), and with the default 1e-30 AdaFactor's normalisation turns that noise into full-size steps
    # that differ with every summation order.
    optimizer = {"name": "AdaFactor", "lr": 1e-2, "relative_step": False, "beta1": 0.9, "momentum_on": "grad",
                 "eps": [1.0e-16, 1.0e-3]}
    recipe = _recipe(root, files, "run-adafactor", optimizer, accumulation={"fused": True})
    reference = _single_process(recipe, tmp_path)
    out = tmp_path / "fsdp2-2to1"
    stopped = _launch("fsdp2", recipe, f"output_dir={out}", "stop_after_micro_steps=4")
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    resumed = _launch("fsdp2", recipe, f"output_dir={out}", "data.micro_batch_size=4", nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    _assert_same_run(out, reference, rtol=2e-5)


def _assert_one_line_refusal(done: subprocess.CompletedProcess, message: str) -> None:
    """Each rank exits 2 after rank 0 printed one line; the launcher (torchrun) reports it and exits 1."""
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("leantrain: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert "failed (exitcode: 2)" in done.stderr
    assert "leantrain/trainer" not in done.stderr and "/trainer/" not in done.stderr  # no traceback of ours


def test_fused_under_deepspeed_is_refused_in_one_line(workdir, tmp_path):
    root, files = workdir
    recipe = _recipe(root, files, "run-zero-fused", {"name": "AdamW", "lr": 3e-3}, accumulation={"fused": True})
    done = _launch("zero2", recipe, f"output_dir={tmp_path / 'z'}")
    _assert_one_line_refusal(done, "accumulation.fused: true under DeepSpeed ZeRO")


@pytest.mark.parametrize("config,engine", [("fsdp2", "FSDP2"), ("zero2", "DeepSpeed")])
def test_model_compile_under_a_sharding_engine_is_refused_in_one_line(workdir, tmp_path, config, engine):
    root, files = workdir
    recipe = _recipe(root, files, f"run-compile-{config}", {"name": "AdamW", "lr": 3e-3})
    done = _launch(config, recipe, f"output_dir={tmp_path / 'c'}", "model.compile=true")
    _assert_one_line_refusal(done, f"model.compile: true under {engine}")


def test_a_compiled_model_trains_the_same_curve(workdir, tmp_path):
    """model.compile (one process) against the uncompiled reference run: the same losses to float rounding."""
    root, files = workdir
    recipe = _recipe(root, files, "run-compiled", {"name": "AdamW", "lr": 3e-3})
    losses, _, _ = _single_process(recipe, tmp_path)
    out = tmp_path / "compiled"
    done = subprocess.run([sys.executable, "-m", "leantrain.trainer", str(recipe), f"output_dir={out}",
                           "data.micro_batch_size=4", "model.compile=true"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(compiled) == len(losses) == 3
    assert compiled == pytest.approx(losses, rel=1e-5)


@pytest.mark.parametrize("config,optimizer,extra", [
    ("zero2_offload", {"name": "AdamW", "lr": 3e-3}, {}),
    ("zero3_offload", {"name": "AdamW", "lr": 3e-3}, {}),
    # standard mode: DeepSpeed accumulates k micro-batches itself and clips the averaged gradient
    ("zero2", {"name": "AdamW", "lr": 3e-3, "max_grad_norm": 0.05}, {"accumulation": {"mode": "standard"}}),
], ids=["zero2-offload", "zero3-offload", "zero2-standard-clipped"])
def test_offloaded_and_standard_mode_deepspeed_equal_the_single_process_run(workdir, tmp_path, config, optimizer,
                                                                            extra):
    """The shipped offload configs (optimizer state in host memory) and DeepSpeed's own accumulation with
    the recipe's clipping train the single-process curve: one update per k micro-batches, not k."""
    root, files = workdir
    recipe = _recipe(root, files, f"run-{config}-{len(extra)}", optimizer, **extra)
    reference = _single_process(recipe, tmp_path)
    out = tmp_path / config
    done = _launch(config, recipe, f"output_dir={out}")
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_same_run(out, reference)
    assert [m["update"] for m in metrics(out)] == [1, 2, 3]


def test_an_engine_that_cannot_run_is_one_line(monkeypatch, tmp_path):
    from trainer_helpers import tiny_lm_recipe

    from leantrain.trainer.engines import build_engine
    from leantrain.trainer.errors import RecipeError

    recipe = tiny_lm_recipe(tmp_path, {"train": str(tmp_path / "t.jsonl")})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RecipeError, match=r"fsdp_config.fsdp_version: 1: leantrain runs FSDP2 \(fully_shard\) only"):
        build_engine(recipe, "r.yaml")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    with pytest.raises(RecipeError, match=r"DEEPSPEED is requested but the deepspeed package is not installed"):
        build_engine(recipe, "r.yaml")
