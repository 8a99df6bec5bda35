"""Tokenizers: loaded from the hub/a path, or trained offline on the training text."""

from __future__ import annotations

from collections.abc import Iterable

from .model import resolve_path
from .schema import Recipe

SPECIAL = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on ``texts``: needs no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=PAD)


def build_tokenizer(recipe: Recipe, train_texts: Iterable[str] | None = None):
    if recipe.tokenizer.train_vocab_size:
        return train_bpe(train_texts or [], recipe.tokenizer.train_vocab_size)
    from transformers import AutoTokenizer

    name = recipe.tokenizer.name_or_path or recipe.model.name_or_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; padded positions are masked out of the loss
    return tokenizer
