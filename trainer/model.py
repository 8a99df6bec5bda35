"""Hugging Face models and tokenizers from the recipe (hub names, local paths, packaged models)."""

from __future__ import annotations

import importlib.resources
from contextlib import contextmanager

import torch

from .errors import RecipeError
from .schema import ModelConfig, Recipe

PACKAGE_PREFIX = "package:"


def resolve_path(name: str) -> str:
    """``package:<module>/<subdir>`` -> the directory inside that installed package."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    module, _, sub = name[len(PACKAGE_PREFIX):].partition("/")
    try:
        path = importlib.resources.files(module) / sub
    except ModuleNotFoundError:
        raise OSError(f"package {module!r} is not installed (pip install it)") from None
    if not path.is_dir():
        raise OSError(f"package {module!r} has no directory {sub!r}")
    return str(path)


@contextmanager
def loading_errors(source: str, key: str, what: str):
    """Turn a hub/disk loading failure inside the block into one line naming the recipe key."""
    try:
        yield
    except RecipeError:
        raise
    except (OSError, ConnectionError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(source, key, f"cannot load {what}: {first[:300]}") from None


def _auto_class(task: str):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def build_config(cfg: ModelConfig, *, num_labels: int | None = None):
    from transformers import AutoConfig

    overrides = dict(cfg.from_config or {})
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    if cfg.name_or_path:
        config = AutoConfig.from_pretrained(resolve_path(cfg.name_or_path))
        overrides.pop("model_type", None)
    else:
        config = AutoConfig.for_model(overrides.pop("model_type"))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _follow_tokenizer(config, tokenizer) -> None:
    """A random init takes its vocabulary and special ids from the (possibly trained) tokenizer."""
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))


def build_model(recipe: Recipe, *, tokenizer=None, num_labels: int | None = None):
    cfg = recipe.model
    config = build_config(cfg, num_labels=num_labels)
    if tokenizer is not None and cfg.from_config is not None:
        _follow_tokenizer(config, tokenizer)
    auto = _auto_class(cfg.task)
    dtype = getattr(torch, cfg.dtype)
    if cfg.from_config is not None:
        model = auto.from_config(config, dtype=dtype)
    else:
        model = auto.from_pretrained(resolve_path(cfg.name_or_path), config=config, dtype=dtype)
    if tokenizer is not None and tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 classification needs it to find the last token
    if cfg.gradient_checkpointing:
        # Non-reentrant: fused accumulation needs each parameter's gradient in one piece.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_meta_model(recipe: Recipe, *, num_labels: int | None = None, vocab_size: int | None = None):
    """The recipe's model on the meta device: shapes and dtypes, no memory, no weights.

    ``vocab_size``: a random init takes the tokenizer's vocabulary (trained or loaded); without
    a tokenizer at hand, ``tokenizer.train_vocab_size`` stands in for it.
    """
    config = build_config(recipe.model, num_labels=num_labels or recipe.model.num_labels or 2)
    vocab_size = vocab_size or recipe.tokenizer.train_vocab_size
    if recipe.model.from_config is not None and vocab_size:
        config.vocab_size = vocab_size
    with torch.device("meta"):
        return _auto_class(recipe.model.task).from_config(config, dtype=getattr(torch, recipe.model.dtype))
