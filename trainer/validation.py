"""Data and environment checks: every bad input is one line naming the file, the line and the field.

Run by ``leantrain validate`` and at the start of ``leantrain train``, before
any model loads or any step runs:

- local files are read fully (json/jsonl with line numbers, csv, txt,
  parquet): a malformed line, a record without the text (target, label)
  field or with a null or empty one, text that is not in ``data.encoding``,
  labels that are strings, negative or at least ``model.num_labels``, a file
  without records;
- the model's limits: ``max_length`` against its position embeddings, a
  sequence-to-sequence model without ``decoder_start_token_id``;
- the output directory must be writable.

Hub datasets are checked after they load (row numbers instead of lines);
``leantrain validate`` samples them when the hub is reachable and says so
when it is not.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RecipeError
from .schema import DataConfig, Recipe

_PREVIEW = 60


@dataclass
class DataSummary:
    """What the checks learnt: records per split and the largest label seen."""

    records: dict[str, int] = field(default_factory=dict)
    max_label: int | None = None

    def see_label(self, label: int) -> None:
        self.max_label = label if self.max_label is None else max(self.max_label, label)


def _fields(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe key, column) pairs every record must carry as a non-empty string, plus the label."""
    cfg, task = recipe.data, recipe.model.task
    needed = [("data.text_field", cfg.text_field)]
    if cfg.text_pair_field:
        needed.append(("data.text_pair_field", cfg.text_pair_field))
    if task == "seq2seq" and cfg.target_field:
        needed.append(("data.target_field", cfg.target_field))
    if task == "sequence-classification":
        needed.append(("data.label_field", cfg.label_field))
    return needed


def check_record(record, where: str, line: str, recipe: Recipe, summary: DataSummary) -> None:
    """One record (a dict) against the recipe's fields; ``where`` is the file, ``line`` e.g. 'line 7'."""
    if not isinstance(record, dict):
        raise RecipeError(where, line, f"expected a JSON object (a record), got {type(record).__name__}")
    for key, column in _fields(recipe):
        if column not in record:
            raise RecipeError(where, line, f"no field {column!r} ({key}); the record has {sorted(record)[:8]}")
        value = record[column]
        if key == "data.label_field":
            _check_label(value, where, line, column, recipe, summary)
            continue
        if value is None:
            raise RecipeError(where, line, f"field {column!r} is null; {key} must be a non-empty string")
        if not isinstance(value, str):
            raise RecipeError(where, line, f"field {column!r} is a {type(value).__name__} ({_show(value)}); "
                              f"{key} must be a non-empty string")
        if not value.strip():
            raise RecipeError(where, line, f"field {column!r} is empty; {key} must be a non-empty string")


def _check_label(value, where: str, line: str, column: str, recipe: Recipe, summary: DataSummary) -> None:
    limit = recipe.model.num_labels
    allowed = f"an integer 0..{limit - 1}" if limit else "an integer >= 0"
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (map class names to integers first)" if isinstance(value, str) else ""
        raise RecipeError(where, line, f"label {column!r} is {_show(value)}; allowed: {allowed}{hint}")
    if value < 0 or (limit is not None and value >= limit):
        outside = f", outside model.num_labels={limit}" if limit else ""
        raise RecipeError(where, line, f"label {column!r} is {value}{outside}; allowed: {allowed}")
    summary.see_label(value)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


# ------------------------------------------------------------------ local files
def check_files(recipe: Recipe, source: str) -> DataSummary:
    """Read every local data file fully and check each record; returns what was learnt."""
    summary = DataSummary()
    cfg = recipe.data
    if cfg.eval_split and cfg.eval_split not in cfg.files and cfg.eval_fraction is None:
        raise RecipeError(source, "data.eval_split", f"{cfg.eval_split!r} not in data.files ({', '.join(cfg.files)}); "
                          "set data.eval_fraction (e.g. 0.1) to carve it from the training split, or "
                          "data.eval_split: null for no evaluation")
    for split, path in (cfg.files or {}).items():
        count = 0
        for line, record in _records(Path(path), cfg, recipe):
            check_record(record, path, line, recipe, summary)
            count += 1
        if count == 0:
            raise RecipeError(path, None, f"no records (data.files.{split} is empty)")
        summary.records[split] = count
    return summary


def _records(path: Path, cfg: DataConfig, recipe: Recipe):
    """(line label, record) for every record of a local file, decoding with ``data.encoding``."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(path)
        return
    lines = list(_decoded_lines(path, cfg.encoding))
    if suffix in (".txt", ".text"):
        if cfg.text_field != "text":
            raise RecipeError(str(path), "data.text_field", f"{cfg.text_field!r}: text files have one column, 'text'")
        for number, text in lines:
            if text.strip():  # blank lines separate paragraphs; the text loader's empty rows are dropped
                yield f"line {number}", {"text": text.rstrip("\n")}
        return
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO("".join(text for _, text in lines)))
        for row in reader:
            yield f"line {reader.line_num}", row
        return
    whole = "".join(text for _, text in lines).strip()
    if suffix == ".json" and whole.startswith("["):  # one JSON array of records
        try:
            records = json.loads(whole)
        except json.JSONDecodeError as err:
            raise RecipeError(str(path), f"line {err.lineno}", f"malformed JSON ({err.msg})") from None
        for i, record in enumerate(records, 1):
            yield f"record {i}", record
        return
    for number, text in lines:  # JSON Lines
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecipeError(str(path), f"line {number}", f"malformed JSON ({err.msg} at column {err.colno}); "
                              "every line must be one JSON object") from None
        yield f"line {number}", record


def _decoded_lines(path: Path, encoding: str):
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise RecipeError(str(path), None, f"cannot read ({err.strerror or err})") from None
    for number, chunk in enumerate(raw.splitlines(keepends=True), 1):
        try:
            yield number, chunk.decode(encoding)
        except UnicodeDecodeError as err:
            raise RecipeError(str(path), f"line {number}", f"byte 0x{chunk[err.start]:02x} at column {err.start + 1} "
                              f"is not valid {encoding}; set data.encoding to the file's encoding "
                              "(e.g. data.encoding=latin-1)") from None
        except LookupError:
            raise RecipeError(str(path), "data.encoding", f"unknown encoding {encoding!r}") from None


def _parquet_records(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise RecipeError(str(path), None, f"not a readable parquet file ({str(err).splitlines()[0][:200]})") from None
    for i, record in enumerate(table.to_pylist(), 1):
        yield f"row {i}", record


# -------------------------------------------------------------- loaded datasets
def check_dataset(dataset, name: str, recipe: Recipe, summary: DataSummary) -> None:
    """The same checks on a loaded ``datasets.Dataset`` (a hub split), rows numbered from 1.

    Whole columns at once through Arrow (null counts, string lengths, label
    range), so a split of millions of rows costs seconds, not a Python loop.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for key, column in _fields(recipe):
        if column not in dataset.column_names:
            raise RecipeError(name, key, f"column {column!r} not in the data (columns: {dataset.column_names})")
        values = table.column(column)
        if values.null_count:
            row = pc.index(pc.is_null(values), True).as_py() + 1
            raise RecipeError(name, f"row {row}", f"field {column!r} is null; {key} must not be null")
        if key == "data.label_field":
            if not pa.types.is_integer(values.type):
                raise RecipeError(name, key, f"labels {column!r} are {values.type}, not integers (map class names to "
                                  "integers first)")
            low, high = pc.min_max(values).values()
            limit = recipe.model.num_labels
            if low.as_py() < 0 or (limit is not None and high.as_py() >= limit):
                bad = low.as_py() if low.as_py() < 0 else high.as_py()
                row = pc.index(values, bad).as_py() + 1
                raise RecipeError(name, f"row {row}", f"label {column!r} is {bad}; allowed: an integer "
                                  + (f"0..{limit - 1} (model.num_labels={limit})" if limit else ">= 0"))
            summary.see_label(high.as_py())
            continue
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
            raise RecipeError(name, key, f"column {column!r} holds {values.type}, not text")
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
        if pc.any(empty).as_py():
            row = pc.index(empty, True).as_py() + 1
            raise RecipeError(name, f"row {row}", f"field {column!r} is empty; {key} must be a non-empty string")
    summary.records[name] = len(dataset)


def infer_num_labels(recipe: Recipe, summary: DataSummary, model_config=None) -> tuple[int, str]:
    """num_labels for classification: the recipe's, else the model config's, else max label + 1."""
    if recipe.model.num_labels is not None:
        return recipe.model.num_labels, "model.num_labels"
    from_model = getattr(model_config, "num_labels", None) if recipe.model.from_config is None else None
    seen = (summary.max_label or 0) + 1
    if from_model is not None and len(getattr(model_config, "id2label", {}) or {}) == from_model and from_model >= seen:
        return from_model, "the model's config"
    return seen, "the largest label + 1"


# ---------------------------------------------------------------- model limits
def check_model_limits(recipe: Recipe, source: str, config) -> None:
    """max_length within the model's positions; seq2seq models know how to start decoding."""
    cfg = recipe.data
    positions = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, name, None), int)), None)
    if positions is not None:
        if cfg.max_length > positions:
            raise RecipeError(source, "data.max_length", f"{cfg.max_length} exceeds the model's {positions} position "
                              "embeddings; allowed: at most that")
        if recipe.model.task == "seq2seq" and cfg.max_target_length > positions:
            raise RecipeError(source, "data.max_target_length", f"{cfg.max_target_length} exceeds the model's "
                              f"{positions} position embeddings")
    if recipe.model.task == "seq2seq" and getattr(config, "decoder_start_token_id", None) is None:
        key = "model.from_config.decoder_start_token_id" if recipe.model.from_config is not None else "model.name_or_path"
        raise RecipeError(source, key, "the sequence-to-sequence config has no decoder_start_token_id (the token the "
                          "decoder starts from; T5 uses its pad token, 0): set it")


def check_output_dir(recipe: Recipe, source: str, *, create: bool) -> None:
    """The output directory exists or can be made, and a file can be written in it.

    ``create=False`` (validate) only looks: the nearest existing ancestor must
    be a writable directory.
    """
    out = Path(recipe.output_dir)
    if not create:
        ancestor = next(p for p in (out, *out.parents) if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
            what = "not a directory" if not ancestor.is_dir() else "not writable"
            raise RecipeError(source, "output_dir", f"cannot write {str(out)!r} ({str(ancestor)!r} is {what})")
        return
    probe = out / f".leantrain-write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RecipeError(source, "output_dir", f"cannot write {str(out)!r} ({type(err).__name__}: "
                          f"{err.strerror or err})") from None


def check_model_path(recipe: Recipe, source: str) -> None:
    """A local model path must exist (rather than fail later as an unknown hub repository)."""
    for key, name in (("model.name_or_path", recipe.model.name_or_path),
                      ("tokenizer.name_or_path", recipe.tokenizer.name_or_path)):
        if name and not name.startswith("package:") and _looks_like_path(name) and not Path(name).expanduser().exists():
            raise RecipeError(source, key, f"no such directory {name!r} (a local path; hub names look like "
                              "'gpt2' or 'org/model')")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name and Path(name).parent.exists()


# ------------------------------------------------------------------- validate
_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hugging Face hub (the libraries' own retries take ~25 s offline)."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
            _HUB_REACHABLE = False
        else:
            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
            try:
                socket.create_connection((host, 443), timeout=timeout).close()
                _HUB_REACHABLE = True
            except OSError:
                _HUB_REACHABLE = False
    return _HUB_REACHABLE


def _is_local(name: str) -> bool:
    return name.startswith("package:") or Path(name).expanduser().exists()


def config_available(name: str | None) -> bool:
    """Whether the model config ``name`` can be read now: local, cached, or the hub answers."""
    if not name or _is_local(name) or hub_reachable():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def require_config(recipe: Recipe, source: str) -> None:
    """One line at once instead of the hub client's retries when the model config cannot be had."""
    name = recipe.model.name_or_path
    if not config_available(name):
        raise RecipeError(source, "model.name_or_path", f"cannot load the config of {name!r}: the Hugging Face hub "
                          "is not reachable and it is not in the local cache (download it once, or give a local path)")


def validate_recipe(recipe: Recipe, source: str) -> list[str]:
    """Everything that can be checked without training; returns notes to print (raises on an error)."""
    from .model import build_config, loading_errors

    notes = []
    check_model_path(recipe, source)
    check_output_dir(recipe, source, create=False)
    summary = check_files(recipe, source) if recipe.data.files else DataSummary()
    if recipe.data.dataset:
        if hub_reachable():
            import datasets

            with loading_errors(source, "data.dataset", "the dataset"):
                stream = datasets.load_dataset(recipe.data.dataset, recipe.data.dataset_config,
                                               split=recipe.data.train_split, streaming=True)
                sample = datasets.Dataset.from_list(list(stream.take(200)))
            check_dataset(sample, f"{recipe.data.dataset} ({recipe.data.train_split}, first 200)", recipe, summary)
            notes.append(f"sampled 200 records of the hub dataset {recipe.data.dataset!r}")
        else:
            notes.append(f"the hub is not reachable: dataset {recipe.data.dataset!r} not sampled (checked when it loads)")
    name = recipe.model.name_or_path
    if config_available(name):
        with loading_errors(source, "model.name_or_path", "the model config"):
            config = build_config(recipe.model)
        check_model_limits(recipe, source, config)
    else:
        config = None
        notes.append(f"the hub is not reachable: model {name!r} not checked (max_length, decoder start)")
    if recipe.model.task == "sequence-classification" and summary.max_label is not None:
        n, origin = infer_num_labels(recipe, summary, config)
        notes.append(f"num_labels = {n} ({origin})")
    return notes
