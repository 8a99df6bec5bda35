"""Checkpoints: everything needed to continue exactly, written atomically.

A checkpoint directory holds what the engine writes (accelerate's state
under DDP and DeepSpeed: model, optimizer — which carries the position inside
the accumulation cycle —, registered scheduler, every process's RNG; sharded
``torch.distributed.checkpoint`` files plus RNG and scheduler under FSDP2) and
``trainer_state.json`` (update count, data position, the open cycle's
bookkeeping, the tracker run id, the number of ranks). Saving is collective:
every rank writes into a temporary directory, all ranks finish, and only then
is it renamed into place, so a crash mid-write never leaves a half
checkpoint that ``resume: auto`` could pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRAINER_STATE = "trainer_state.json"
PREFIX = "checkpoint-"


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save(accelerator, engine, output_dir: str, trainer_state: dict, keep_last: int) -> Path:
    root = checkpoint_dir(output_dir)
    name = f"{PREFIX}u{trainer_state['update']:07d}-m{trainer_state['micro_step']:09d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    engine.save(str(tmp))
    accelerator.wait_for_everyone()  # every rank's files are complete before the directory gets its final name
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob(f"{PREFIX}*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest(output_dir: str) -> Path | None:
    found = sorted(checkpoint_dir(output_dir).glob(f"{PREFIX}*"))
    return found[-1] if found else None


def find(resume: str, output_dir: str) -> Path | None:
    """The checkpoint ``checkpointing.resume`` asks for (None: start fresh)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(output_dir)
    return Path(resume)  # checked when the recipe was loaded (recipe.check_files)


def is_checkpoint(path: str) -> bool:
    return (Path(path) / TRAINER_STATE).is_file()


def load(accelerator, engine, path: Path) -> dict:
    state = json.loads((path / TRAINER_STATE).read_text())
    engine.load(str(path), state)
    return state


def save_final(model, tokenizer, output_dir: str, state_dict: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer, swapped into ``final/`` atomically.

    ``state_dict``: the gathered weights of a sharded model (FSDP2, ZeRO-3).
    """
    final = Path(output_dir) / "final"
    tmp = Path(output_dir) / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = Path(output_dir) / ".old-final"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
