"""Checkpoints: everything needed to continue exactly, written atomically.

A checkpoint directory holds what the engine writes (accelerate's state
under DDP and DeepSpeed: model, optimizer — which carries the position inside
the accumulation cycle —, registered scheduler, every process's RNG; sharded
``torch.distributed.checkpoint`` files plus RNG and scheduler under FSDP2) and
``trainer_state.json`` (update count, data position, the open cycle's
bookkeeping, the tracker run id, the number of ranks). Saving is collective:
every rank writes into a temporary directory, all ranks finish, the main process writes a manifest
of every file's size and checksum (fsync'd, last, by atomic rename), and only
then is the directory renamed into place. ``resume: auto`` takes the newest
checkpoint whose manifest verifies and skips (with a warning) any that does
not: a crash or a second signal mid-write, a truncated or garbled file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import RecipeError

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: a checkpoint without a valid one is incomplete
PREFIX = "checkpoint-"
_CHUNK = 8 * 2**20


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
        write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in sorted(root.glob(f"{PREFIX}*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    """Size and checksum of every file, fsync'd, then the manifest itself, last, by atomic rename.

    Costs one read of the checkpoint on the main process (blake2b, ~1 GB/s).
    """
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    entries = {}
    for path in files:
        with path.open("rb") as f:
            os.fsync(f.fileno())
        entries[str(path.relative_to(directory))] = {"size": path.stat().st_size, "blake2b": _digest(path)}
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    _fsync_dir(directory)


def problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete, intact checkpoint (None: it is)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest (its writing was interrupted)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "its manifest is unreadable"
    for name, entry in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['size']} were written"
        if _digest(path) != entry["blake2b"]:
            return f"{name} does not match its checksum"
    return None


def latest(output_dir: str, warn=print) -> Path | None:
    """The newest intact checkpoint; newer incomplete or corrupt ones are skipped with a warning."""
    for path in sorted(checkpoint_dir(output_dir).glob(f"{PREFIX}*"), reverse=True):
        reason = problem(path)
        if reason is None:
            return path
        warn(f"leantrain: warning: skipping checkpoint {path}: {reason}; trying the previous one")
    return None


def find(resume: str, output_dir: str, source: str, warn=print) -> Path | None:
    """The checkpoint ``checkpointing.resume`` asks for (None: start fresh)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(output_dir, warn)
    reason = problem(Path(resume))
    if reason is not None:
        raise RecipeError(source, "checkpointing.resume", f"{resume!r} is not an intact checkpoint: {reason}")
    return Path(resume)


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
