"""A run never loses work: bad data stops before training with one line; divergence stops (exit 3);
SIGTERM/SIGUSR1 checkpoint and exit 143; kill -9 at random moments, during checkpoint writes too,
resumes bit-identically; corrupt checkpoints are skipped; no secret reaches output_dir."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_helpers import metrics, reset_accelerate, write_text_files

from leantrain.trainer import cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_text_files(tmp_path_factory.mktemp("text"))


def _recipe(path: Path, out: Path, files: dict, **overrides) -> Path:
    recipe = {
        "model": {"task": "causal-lm", "from_config": {
            "model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}},
        "tokenizer": {"train_vocab_size": 300},
        "data": {"files": files, "max_length": 48, "micro_batch_size": 4},
        "optimizer": {"name": "AdamW", "lr": 3e-3},
        "accumulation": {"steps": 2, "mode": "exact"},
        "checkpointing": {"every_updates": 1, "keep_last": 3},
        "max_updates": 6, "seed": 0, "output_dir": str(out),
    }
    if "validation" not in files:
        recipe["data"]["eval_split"] = None
    for key, value in overrides.items():
        node = recipe
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "OMP_NUM_THREADS": "1", **extra}


def _train_process(recipe: Path, *overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "leantrain.trainer", str(recipe), *overrides], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _cli(capsys, *args: str) -> tuple[int, list[str], str]:
    """The console script in this process (no import cost): exit code, stderr lines, stdout."""
    code = cli.main(list(args))
    reset_accelerate()
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith("leantrain:")], captured.out


# --------------------------------------------------------------------------- bad data
def _write(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


GOOD = '{"text": "a sentence of several words"}\n'
LABELLED = '{"text": "good film", "label": 1}\n{"text": "bad film", "label": 0}\n'

# id: (train file name, content, recipe overrides, fragment of the one error line)
BAD_DATA = {
    "empty-jsonl": ("t.jsonl", "", {}, "t.jsonl: no records (data.files.train is empty)"),
    "record-without-text": ("t.jsonl", GOOD * 2 + '{"txt": "x"}\n', {}, "t.jsonl: line 3: no field 'text' (data.text_field)"),
    "null-text": ("t.jsonl", GOOD + '{"text": null}\n', {}, "t.jsonl: line 2: field 'text' is null"),
    "malformed-json": ("t.jsonl", GOOD * 3 + '{"text": "unterminated\n', {}, "t.jsonl: line 4: malformed JSON"),
    "latin-1-text": ("t.txt", "caf\xe9 au lait\n".encode("latin-1"), {},
                     "t.txt: line 1: byte 0xe9 at column 4 is not valid utf-8; set data.encoding"),
    "label-outside-num-labels": ("t.jsonl", LABELLED + '{"text": "meh", "label": 5}\n',
                                 {"model__task": "sequence-classification", "model__num_labels": 2},
                                 "t.jsonl: line 3: label 'label' is 5, outside model.num_labels=2"),
    "label-as-string": ("t.jsonl", LABELLED + '{"text": "meh", "label": "positive"}\n',
                        {"model__task": "sequence-classification"}, "t.jsonl: line 3: label 'label' is 'positive'"),
    "max-length-beyond-positions": ("t.jsonl", GOOD, {"data__max_length": 128},
                                    "data.max_length: 128 exceeds the model's 64 position embeddings"),
    "t5-without-decoder-start": ("t.jsonl", '{"text": "a b", "summary": "a"}\n',
                                 {"model__task": "seq2seq", "data__target_field": "summary", "model__from_config": {
                                     "model_type": "t5", "d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2,
                                     "d_kv": 8, "decoder_start_token_id": None}},
                                 "model.from_config.decoder_start_token_id: the sequence-to-sequence config has no"),
    "seq2seq-without-target": ("t.jsonl", GOOD, {"model__task": "seq2seq"},
                               "data.target_field: required for task seq2seq"),
    "model-path-missing": ("t.jsonl", GOOD, {"model__from_config": None, "model__name_or_path": "./no/such_model"},
                           "model.name_or_path: no such directory './no/such_model'"),
    "eval-split-missing": ("t.jsonl", GOOD, {"data__eval_split": "validation"},
                           "data.eval_split: 'validation' not in data.files (train); set data.eval_fraction"),
    "piecewise-without-points": ("t.jsonl", GOOD, {"schedule__name": "piecewise"},
                                 "schedule.points: required for schedule.name: piecewise"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_for_validate(tmp_path, capsys, case):
    name, content, overrides, fragment = BAD_DATA[case]
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "out", {"train": _write(tmp_path / name, content)}, **overrides)
    code, errors, _ = _cli(capsys, "validate", str(recipe))
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("leantrain: error: ") and fragment in errors[0], errors[0]


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_train_before_any_step(tmp_path, capsys, case):
    name, content, overrides, fragment = BAD_DATA[case]
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "out", {"train": _write(tmp_path / name, content)}, **overrides)
    code, errors, _ = _cli(capsys, "train", str(recipe))
    assert code == 2 and len(errors) == 1 and fragment in errors[0], errors
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_the_declared_encoding_reads_latin_1(tmp_path, capsys):
    latin = _write(tmp_path / "t.txt", "".join(f"caf\xe9 {i} au lait et cr\xe8me\n" for i in range(40)).encode("latin-1"))
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "out", {"train": latin}, data__encoding="latin-1",
                     data__eval_split=None, max_updates=1)
    code, errors, out = _cli(capsys, "validate", str(recipe))
    assert code == 0 and "valid" in out


def test_num_labels_is_the_largest_label_plus_one(tmp_path, capsys):
    data = _write(tmp_path / "t.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 3}\n')
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "out", {"train": data}, model__task="sequence-classification")
    code, _, out = _cli(capsys, "validate", str(recipe))
    assert code == 0 and "leantrain: num_labels = 4 (the largest label + 1)" in out


def test_unwritable_output_dir_and_offline_estimate_are_one_line(tmp_path, capsys, files):
    blocker = _write(tmp_path / "a_file", "x")
    recipe = _recipe(tmp_path / "r.yaml", Path(blocker) / "out", files)
    for command in ("validate", "train"):
        code, errors, _ = _cli(capsys, command, str(recipe))
        assert code == 2 and len(errors) == 1 and f"output_dir: cannot write '{blocker}/out'" in errors[0], errors
    done = subprocess.run([sys.executable, "-m", "leantrain.trainer", "estimate", "gpt2_wikitext2"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "model.name_or_path: cannot load the config of 'gpt2'" in done.stderr.strip().splitlines()[-1]


def test_resume_never_refuses_an_existing_run_unless_overwrite(tmp_path, capsys, files):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", out, files, max_updates=1, checkpointing__resume="never")
    assert _cli(capsys, "train", str(recipe))[0] == 0
    code, errors, _ = _cli(capsys, "train", str(recipe))
    assert code == 2 and "checkpointing.resume: never, but output_dir" in errors[0] and "overwrite: true" in errors[0]
    assert _cli(capsys, "train", str(recipe), "overwrite=true")[0] == 0
    assert [m["update"] for m in metrics(out)] == [1]


# -------------------------------------------------------------------------- divergence
def test_a_diverging_run_stops_with_exit_3(tmp_path, capsys, files):
    recipe = _recipe(tmp_path / "r.yaml", tmp_path / "out", files, optimizer__lr=1e6, max_nonfinite_updates=2,
                     max_updates=50)
    start = time.perf_counter()
    code, errors, _ = _cli(capsys, "train", str(recipe))
    assert code == 3 and len(errors) == 1, errors
    assert errors[0].startswith("leantrain: diverged: 4 consecutive micro-batches (2 updates' worth) had a non-finite "
                                "loss at update ")
    assert "last good checkpoint: " in errors[0] and "checkpoint-u0000001" in errors[0]
    assert time.perf_counter() - start < 120


def test_isolated_bad_micro_batches_are_skipped_and_counted(tmp_path, files, monkeypatch):
    from leantrain.trainer import loop
    from leantrain.trainer.recipe import load_recipe

    calls = {"n": 0}
    real = loop.optim.finite_loss

    def flaky(loss):
        calls["n"] += 1
        return False if calls["n"] in (3, 9) else real(loss)

    monkeypatch.setattr(loop.optim, "finite_loss", flaky)
    recipe, source = load_recipe(str(_recipe(tmp_path / "r.yaml", tmp_path / "out", files)))
    result = loop.train(recipe, source)
    assert result["update"] == 6 and result["micro_step"] == 12
    # finite_loss calls 1-2: update 1; 3 (skipped) 4 5: update 2; 6-7: update 3; 8 9 (skipped) 10: update 4
    assert [m.get("skipped_micro_batches", 0) for m in metrics(tmp_path / "out")] == [0, 1, 0, 1, 0, 0]


# ------------------------------------------------------------------------ preemption
def _final(out: Path) -> dict:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, files):
    """The reference run (12 updates, checkpoint every update), in a subprocess like the interrupted ones."""
    root = tmp_path_factory.mktemp("whole")
    recipe = _recipe(root / "r.yaml", root / "out", files, max_updates=12, data__micro_batch_size=2)
    done = subprocess.run([sys.executable, "-m", "leantrain.trainer", str(recipe)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, _final(root / "out"), [m["loss"] for m in metrics(root / "out")]


def _wait_for_updates(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no update {n} within {timeout} s")


@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGUSR1, signal.SIGUSR1)], ids=["SIGTERM", "SIGUSR1-twice"])
def test_a_signal_checkpoints_exits_143_and_resumes_bit_identical(tmp_path, uninterrupted, signals):
    recipe_path, reference, losses = uninterrupted
    out = tmp_path / "out"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["output_dir"] = str(out)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = _train_process(tmp_path / "r.yaml")
    _wait_for_updates(out, 2, proc)
    for sig in signals:  # a second signal while the checkpoint is being written changes nothing
        proc.send_signal(sig)
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert f"stopped on {signals[0].name} at update" in stdout
    resumed = subprocess.run([sys.executable, "-m", "leantrain.trainer", str(tmp_path / "r.yaml")], cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["update"] for m in metrics(out)] == list(range(1, 13))  # each update once
    assert [m["loss"] for m in metrics(out)] == losses
    final = _final(out)
    assert all(torch.equal(final[name], reference[name]) for name in reference)


def test_kill_9_at_random_moments_resumes_bit_identical(tmp_path, uninterrupted):
    """10 SIGKILLs at seeded moments, every other one while a checkpoint is being written; each restart
    resumes (or starts over before the first checkpoint) and the final model is bit-identical."""
    import threading

    recipe_path, reference, losses = uninterrupted
    out = tmp_path / "out"
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["output_dir"] = str(out)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rng = random.Random(1234)
    during_writes = resumed = 0
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "leantrain.trainer", str(path)], cwd=REPO,
                                env=_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        end = time.time() + 120
        if attempt % 2:  # kill while a checkpoint directory is being written
            while proc.poll() is None and time.time() < end and not any((out / "checkpoints").glob(".tmp-*")):
                time.sleep(0.0005)
        else:  # kill at a random moment of training
            while proc.poll() is None and time.time() < end and not any(line.startswith("update ") for line in lines):
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
        writing = any((out / "checkpoints").glob(".tmp-*"))
        if proc.poll() is None:
            proc.kill()
            during_writes += writing
        proc.wait(timeout=60)
        reader.join(timeout=10)
        resumed += any("resumed from" in line for line in lines)
    finished = subprocess.run([sys.executable, "-m", "leantrain.trainer", str(path)], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert during_writes >= 3 and resumed >= 5, (during_writes, resumed)
    assert [m["update"] for m in metrics(out)] == list(range(1, 13))
    assert [m["loss"] for m in metrics(out)] == losses
    final = _final(out)
    assert all(torch.equal(final[name], reference[name]) for name in reference)
    print(f"kill -9: 10 kills, {during_writes} during checkpoint writes, {resumed} restarts resumed, 0 mismatches")


# ------------------------------------------------------------------------ checkpoints
def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, capsys, files):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", out, files, max_updates=3)
    assert _cli(capsys, "train", str(recipe), "stop_after_micro_steps=4")[0] == 0  # checkpoints at updates 1, 2
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 2
    optimizer_file = next(p for p in checkpoints[-1].rglob("optimizer*.bin"))
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one garbled byte: loads silently without the manifest's checksum
    optimizer_file.write_bytes(bytes(data))
    code, lines, stdout = _cli(capsys, "train", str(recipe))
    warnings = [line for line in lines if "warning" in line]
    assert code == 0 and len(warnings) == 1
    assert f"skipping checkpoint {checkpoints[-1]}:" in warnings[0] and "does not match its checksum" in warnings[0]
    assert f"resumed from {checkpoints[0]}" in stdout
    newest = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    truncated = next(newest.glob("pytorch_model*.bin"))
    truncated.write_bytes(truncated.read_bytes()[:100])
    code, lines, _ = _cli(capsys, "train", str(recipe), f"checkpointing.resume={newest}")
    assert code == 2 and f"is not an intact checkpoint: {truncated.name} has 100 bytes" in lines[-1]


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys, files):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", out, files, max_updates=2)
    assert _cli(capsys, "train", str(recipe), "stop_after_micro_steps=2")[0] == 0
    code, lines, _ = _cli(capsys, "train", str(recipe), "model.from_config.n_embd=48")
    assert code == 2 and len(lines) == 1
    assert "checkpointing.resume:" in lines[0] and "holds a model of" in lines[0] and "this recipe builds" in lines[0]


def test_a_changed_max_updates_on_resume_is_explained(tmp_path, capsys, files):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", out, files, max_updates=4, schedule={"name": "linear"})
    assert _cli(capsys, "train", str(recipe), "stop_after_micro_steps=4")[0] == 0
    code, _, stdout = _cli(capsys, "train", str(recipe), "max_updates=8")
    assert code == 0
    line = next(line for line in stdout.splitlines() if "resuming with" in line)
    assert "max_updates 4 → 8: from update 3 the lr follows the new schedule (0.0015 at the checkpoint, 0.00225" in line


def test_no_secret_is_written_under_output_dir(tmp_path, files):
    out = tmp_path / "out"
    recipe = _recipe(tmp_path / "r.yaml", out, files, max_updates=1, tracking={"wandb": {"mode": "offline"}})
    secrets = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
               "HF_TOKEN": "hf_secretSECRETsecretSECRETsecret0123"}
    done = subprocess.run([sys.executable, "-m", "leantrain.trainer", str(recipe)], cwd=REPO,
                          env={**_env(**secrets), "WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "wandb").is_dir()
    for path in out.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for name, secret in secrets.items():
                assert secret.encode() not in content, f"{name} found in {path}"
