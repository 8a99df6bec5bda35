"""Malformed recipes through the real console script: one line on stderr, exit code 2, no traceback.

Each case is a recipe (or a command line) with one mistake, the key the
error must name, and a fragment of what it must say. The line must read
``leantrain: error: <file>: <key>: <message>``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "leantrain"
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "leantrain.trainer"]

BASE = """\
model:
  name_or_path: gpt2
  task: causal-lm
data:
  builtin: python-docs
max_updates: 2
"""

# id: (recipe text, or None for no file; extra command-line arguments; key named (None: the file only); fragment)
CASES = {
    "unknown-top-level-key": (BASE + "colour: red\n", [], "colour", "unknown key"),
    "unknown-key-in-section": (BASE.replace("  task: causal-lm\n", "  task: causal-lm\n  colour: red\n"), [],
                               "model.colour", "unknown key"),
    "wrong-type": (BASE.replace("  builtin: python-docs\n", "  builtin: python-docs\n  micro_batch_size: many\n"), [],
                   "data.micro_batch_size", "valid integer, unable to parse string as an integer (got 'many')"),
    "negative-lr": (BASE + "optimizer:\n  lr: -1.0e-3\n", [], "optimizer.lr", "greater than or equal to 0"),
    "unknown-accumulation-mode": (BASE + "accumulation:\n  mode: sometimes\n", [], "accumulation.mode",
                                  "'standard', 'exact' or 'ema' (got 'sometimes')"),
    "fused-with-global-clipping": (BASE + "optimizer:\n  max_grad_norm: 1.0\naccumulation:\n  steps: 4\n"
                                   "  fused: true\n", [], "optimizer.max_grad_norm", "max_update_rms"),
    "ema-without-momentum": (BASE + "optimizer:\n  name: SGD\n  lr: 0.1\n  momentum: 0.0\n"
                             "accumulation:\n  steps: 4\n  mode: ema\n", [], "accumulation.mode", "needs a first moment"),
    "torch-optimizer-in-exact-mode": (BASE + "optimizer:\n  name: Adam\naccumulation:\n  steps: 4\n  mode: exact\n",
                                      [], "accumulation.mode", "Adam cannot"),
    "missing-data-file": (BASE.replace("  builtin: python-docs\n", "  files:\n    train: no_such_file.jsonl\n"), [],
                          "data.files.train", "'no_such_file.jsonl' not found"),
    "unknown-optimizer": (BASE + "optimizer:\n  name: Adamm\n", [], "optimizer.name", "unknown optimizer 'Adamm'"),
    "unknown-optimizer-keyword": (BASE + "optimizer:\n  name: AdamW\n  colour: red\n", [], "optimizer.colour",
                                  "AdamW takes no argument 'colour'"),
    "invalid-yaml": (BASE + "optimizer:\n  lr: [1.0e-3\n", [], None, "not valid YAML (line 9"),
    "not-a-mapping": ("- model\n- data\n", [], None, "a recipe is a mapping of sections"),
    "override-without-equals": (BASE, ["optimizer.lr"], "optimizer.lr", "overrides are written section.key=value"),
    "override-with-empty-key": (BASE, ["=3"], "=3", "overrides are written section.key=value"),
    "override-into-a-value": (BASE.replace("  builtin: python-docs\n", "  builtin: python-docs\n  micro_batch_size: 4\n"),
                              ["data.micro_batch_size.x=1"], "data.micro_batch_size", "is a value, not a section"),
    "override-wrong-type": (BASE, ["optimizer.lr=fast"], "optimizer.lr", "valid number"),
    "adafactor-lr-with-relative-step": (BASE + "optimizer:\n  name: AdaFactor\n  lr: 1.0e-3\n  relative_step: true\n",
                                        [], "optimizer.lr", "lr=0.001 with relative_step=True"),
    "null-lr-without-relative-step": (BASE + "optimizer:\n  name: AdamW\n  lr: null\n", [], "optimizer.lr",
                                      "AdamW needs a number"),
    "relative-step-under-a-schedule": (BASE + "optimizer:\n  name: AdaFactor\n  lr: null\nschedule:\n  name: cosine\n",
                                       [], "schedule.name", "its own schedule"),
    "two-data-sources": (BASE.replace("  builtin: python-docs\n", "  builtin: python-docs\n  dataset: glue\n"), [],
                         "data", "exactly one of data.dataset, data.files, data.builtin"),
    "no-length": (BASE.replace("max_updates: 2\n", ""), [], "max_updates", "one of max_updates, epochs is required"),
    "resume-from-a-non-checkpoint": (BASE + "checkpointing:\n  resume: /nonexistent/ckpt\n", [], "checkpointing.resume",
                                     "'/nonexistent/ckpt' is not a leantrain checkpoint directory"),
    "fp16-refused": (BASE + "precision: fp16\n", [], "precision", "'fp32' or 'bf16' (got 'fp16')"),
}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _run(args: list[str], cwd: Path, command: list[str] = COMMAND) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, prefix: str, fragment: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    line = lines[0]
    assert line.startswith(prefix), line
    assert fragment in line, line
    return line


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_reports_one_line(case, tmp_path):
    text, extra, key, fragment = CASES[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    proc = _run(["validate", str(recipe), *extra], cwd=tmp_path)
    where = f"{recipe}: {key}: " if key else f"{recipe}: "
    _assert_one_line_error(proc, f"leantrain: error: {where}", fragment)
    assert proc.stdout == ""


def test_base_recipe_is_valid(tmp_path):
    """The cases above break a recipe that is otherwise valid, so each error is the one intended."""
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(BASE)
    proc = _run(["validate", str(recipe)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"{recipe}: valid"
    assert lines[:-1] == ["leantrain: the hub is not reachable: model 'gpt2' not checked (max_length, decoder start)"]


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "no_such_recipe.yaml"
    proc = _run(["validate", str(missing)], cwd=tmp_path)
    _assert_one_line_error(proc, f"leantrain: error: {missing}: ", "no such recipe file")


def test_override_without_a_recipe_reads_as_a_recipe_name(tmp_path):
    """The first positional is the recipe unless it contains '=': a bare ``optimizer.lr`` is a file name."""
    proc = _run(["validate", "optimizer.lr"], cwd=tmp_path)
    _assert_one_line_error(proc, "leantrain: error: optimizer.lr: ", "no such recipe file")


# An in-process probe: after the CLI returns, did it import what loads models, data or trackers?
# (accelerate may be imported: Trainer imports it just before checking combinations, creating nothing.)
PROBE = ("import sys; from leantrain.trainer.cli import main; code = main(sys.argv[1:]); "
         "print(sorted(m for m in ('transformers', 'datasets', 'wandb') if m in sys.modules)); "
         "sys.exit(code)")


@pytest.mark.parametrize("mistake, key, fragment", [
    ("accumulation:\n  mode: sometimes\n", "accumulation.mode", "got 'sometimes'"),  # schema
    ("optimizer:\n  name: Adam\naccumulation:\n  steps: 4\n  mode: exact\n", "accumulation.mode", "Adam cannot"),
])
def test_train_stops_before_loading_anything(mistake, key, fragment, tmp_path):
    """``leantrain train`` refuses a bad recipe before transformers, datasets or wandb are imported.

    The model path does not exist either: reaching the model loader would fail differently.
    """
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BASE.replace("name_or_path: gpt2", f"name_or_path: {tmp_path / 'no_model_here'}") + mistake)
    prefix = f"leantrain: error: {recipe}: {key}: "

    proc = _run(["train", str(recipe)], cwd=tmp_path)
    _assert_one_line_error(proc, prefix, fragment)
    assert not (tmp_path / "runs").exists()

    proc = _run(["train", str(recipe)], cwd=tmp_path, command=[sys.executable, "-c", PROBE])
    _assert_one_line_error(proc, prefix, fragment)
    assert proc.stdout.strip() == "[]", proc.stdout

    proc = _run([str(recipe)], cwd=tmp_path, command=[sys.executable, "-m", "leantrain.trainer"])  # train by default
    _assert_one_line_error(proc, prefix, fragment)
