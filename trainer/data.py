"""Datasets: hub or local files or a built-in corpus -> tokenized -> resumable micro-batches."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RecipeError
from .schema import DataConfig, Recipe

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".text": "text", ".parquet": "parquet"}


def python_docs_paragraphs() -> list[str]:
    """English prose of the Python reference help topics (ships with CPython as pydoc_data)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for block in re.split(r"\n\s*\n", text):
            block = " ".join(block.split())
            if len(block) > 40:
                paragraphs.append(block)
    return paragraphs


def load_raw(cfg: DataConfig, seed: int, source: str):
    """A ``datasets.DatasetDict`` with the train split and, if configured, an eval split."""
    import datasets

    if cfg.builtin == "python-docs":
        raw = datasets.DatasetDict({cfg.train_split: datasets.Dataset.from_dict({cfg.text_field: python_docs_paragraphs()})})
    elif cfg.files:
        suffixes = {FILE_FORMATS.get(Path(f).suffix.lower()) for f in cfg.files.values()}
        if None in suffixes or len(suffixes) != 1:
            raise RecipeError(source, "data.files", f"one format for all splits, from {sorted(FILE_FORMATS)}")
        kind = suffixes.pop()
        options = {"encoding": cfg.encoding} if kind in ("json", "text", "csv") else {}
        raw = datasets.load_dataset(kind, data_files=dict(cfg.files), **options)
        if kind == "text":  # blank lines separate paragraphs: no example
            raw = raw.filter(lambda row: bool(row["text"].strip()))
    else:
        raw = datasets.load_dataset(cfg.dataset, cfg.dataset_config)
    if cfg.train_split not in raw:
        raise RecipeError(source, "data.train_split", f"{cfg.train_split!r} not in the dataset's splits {list(raw)}")
    if cfg.eval_split and cfg.eval_split not in raw:
        if cfg.eval_fraction is None:
            raise RecipeError(source, "data.eval_split", f"{cfg.eval_split!r} not in the dataset's splits {list(raw)}; "
                              "set data.eval_fraction (e.g. 0.1) to carve it from the training split, or "
                              "data.eval_split: null for no evaluation")
        split = raw[cfg.train_split].train_test_split(test_size=cfg.eval_fraction, seed=seed)
        raw = datasets.DatasetDict({cfg.train_split: split["train"], cfg.eval_split: split["test"]})
    for split, limit in ((cfg.train_split, cfg.max_train_examples), (cfg.eval_split, cfg.max_eval_examples)):
        if split and limit is not None and len(raw[split]) > limit:
            raw[split] = raw[split].select(range(limit))
    return raw


def _check_fields(dataset, fields: list[str], source: str) -> None:
    for key, field in fields:
        if field not in dataset.column_names:
            raise RecipeError(source, key, f"column {field!r} not in the data (columns: {dataset.column_names})")


def tokenize(dataset, recipe: Recipe, tokenizer, source: str):
    """Task-specific features; drops the raw columns."""
    cfg, task = recipe.data, recipe.model.task
    _check_fields(dataset, [("data.text_field", cfg.text_field)], source)
    texts = lambda batch: [cfg.source_prefix + t for t in batch[cfg.text_field]]  # noqa: E731

    if task == "causal-lm":
        eos = tokenizer.eos_token or ""

        def fn(batch):
            if cfg.packing:  # every document ends with EOS, then one stream is cut into blocks
                return tokenizer([t + eos for t in texts(batch)])
            return tokenizer(texts(batch), truncation=True, max_length=cfg.max_length)
    elif task == "seq2seq":
        _check_fields(dataset, [("data.target_field", cfg.target_field or "<unset>")], source)

        def fn(batch):
            return tokenizer(texts(batch), text_target=batch[cfg.target_field], truncation=True,
                             max_length=cfg.max_length)
    else:
        pair = [("data.text_pair_field", cfg.text_pair_field)] if cfg.text_pair_field else []
        _check_fields(dataset, [("data.label_field", cfg.label_field), *pair], source)

        def fn(batch):
            second = batch[cfg.text_pair_field] if cfg.text_pair_field else None
            out = tokenizer(texts(batch), second, truncation=True, max_length=cfg.max_length)
            out["labels"] = batch[cfg.label_field]
            return out

    features = dataset.map(fn, batched=True, remove_columns=dataset.column_names)
    if task == "seq2seq":
        features = features.map(lambda b: {"labels": [x[: cfg.max_target_length] for x in b["labels"]]}, batched=True)
    if task == "causal-lm" and cfg.packing:
        features = features.map(_pack(cfg.max_length), batched=True, batch_size=1000, remove_columns=features.column_names)
    return features


def _pack(block: int):
    def fn(batch):
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        n = len(stream) // block * block
        ids = [stream[i:i + block] for i in range(0, n, block)]
        return {"input_ids": ids, "attention_mask": [[1] * block for _ in ids]}
    return fn


@dataclass
class Collator:
    """Pads a micro-batch to its longest sequence; padded label positions are -100."""

    pad_id: int
    task: str

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"input_ids": _pad([e["input_ids"] for e in examples], self.pad_id),
                 "attention_mask": _pad([e["attention_mask"] for e in examples], 0)}
        if self.task == "causal-lm":
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
        elif self.task == "seq2seq":
            labels = _pad([e["labels"] for e in examples], -100)
        else:
            labels = torch.tensor([e["labels"] for e in examples])
        batch["labels"] = labels
        return batch


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def loss_items(batch: dict[str, torch.Tensor], task: str) -> int:
    """How many terms the model's mean loss averages over (for token weighting).

    Causal LM shifts labels by one inside the model, so the first position of
    each row never counts. Classification averages over examples.
    """
    labels = batch["labels"]
    if task == "causal-lm":
        return int((labels[:, 1:] != -100).sum())
    if task == "seq2seq":
        return int((labels != -100).sum())
    return labels.shape[0]


@dataclass
class Position:
    """Where the stream of micro-batches stands: epoch and batch index within it."""

    epoch: int = 0
    batch: int = 0


class MicroBatches:
    """Deterministic, resumable micro-batches for this rank.

    Each epoch is one permutation of the examples drawn from ``seed + epoch``;
    rank r takes every world-th example, so ranks see disjoint data and the
    order does not depend on the micro-batch size (8×1 and 2×4 see the same
    examples in the same order). Incomplete trailing batches are dropped.
    """

    def __init__(self, dataset, batch_size: int, collate, *, seed: int, source: str = "recipe", rank: int = 0,
                 world: int = 1, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.per_epoch = len(dataset) // world // batch_size
        if self.per_epoch == 0:
            raise RecipeError(source, "data.micro_batch_size",
                              f"{batch_size} × {world} rank(s) exceeds the {len(dataset)} training examples")

    def _indices(self, epoch: int) -> list[int]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = order[self.rank::self.world].tolist()
        return mine[: self.per_epoch * self.batch_size]

    def after(self, position: Position) -> Position:
        """The position of the micro-batch that follows ``position``."""
        if position.batch + 1 < self.per_epoch:
            return Position(position.epoch, position.batch + 1)
        return Position(position.epoch + 1, 0)

    def iterate(self, start: Position) -> Iterator[tuple[Position, dict]]:
        """Yield ``(position, batch)`` forever from ``start``, crossing epochs."""
        epoch, first = start.epoch, start.batch
        while True:
            idx = self._indices(epoch)
            batches = [idx[i:i + self.batch_size] for i in range(first * self.batch_size, len(idx), self.batch_size)]
            # Its own generator: a DataLoader iterator otherwise draws its worker seed from the
            # global RNG, so a resumed run (one extra iterator mid-epoch) would shift dropout.
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                                 num_workers=self.num_workers,
                                                 generator=torch.Generator().manual_seed(self.seed + epoch))
            for offset, batch in enumerate(loader):
                yield Position(epoch, first + offset), batch
            epoch, first = epoch + 1, 0


def eval_batches(dataset, batch_size: int, collate, *, rank: int = 0, world: int = 1, max_batches: int | None = None):
    idx = list(range(rank, len(dataset), world))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)][:max_batches]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                       generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
