"""Recipes for in-process trainer tests: a tiny GPT-2 on local variable-length text."""

from __future__ import annotations

import json
import random
from pathlib import Path

from leantrain.trainer.data import python_docs_paragraphs
from leantrain.trainer.schema import Recipe


def write_text_files(root: Path, n_train: int = 96, n_eval: int = 16, seed: int = 0) -> dict[str, str]:
    """jsonl files of English snippets whose lengths vary from 3 to 40 words."""
    rng = random.Random(seed)
    words = " ".join(python_docs_paragraphs()[:400]).split()
    files = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        path = root / f"{split}.jsonl"
        with path.open("w") as f:
            for _ in range(n):
                start, length = rng.randrange(len(words) - 50), rng.randint(3, 40)
                f.write(json.dumps({"text": " ".join(words[start:start + length])}) + "\n")
        files[split] = str(path)
    return files


def tiny_lm_recipe(output_dir: Path, files: dict[str, str], *, dropout: float = 0.0, **overrides) -> Recipe:
    data = {
        "model": {"task": "causal-lm", "from_config": {
            "model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64,
            "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}},
        "tokenizer": {"train_vocab_size": 300},
        "data": {"files": files, "max_length": 48, "micro_batch_size": 8},
        "optimizer": {"name": "AdamW", "lr": 3e-3},
        "accumulation": {"steps": 1, "mode": "exact"},
        "max_updates": 6,
        "seed": 0,
        "output_dir": str(output_dir),
    }
    for key, value in overrides.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return Recipe.model_validate(data)


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def reset_accelerate() -> None:
    """accelerate keeps process-global singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
