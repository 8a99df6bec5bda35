"""Writes the small offline sentiment data set used by ``recipes/minilm_offline.yaml``.

    python recipes/data/make_sentiment.py      # rewrites sentiment_train.jsonl, sentiment_validation.jsonl

Short English product/service reviews, label 1 positive, 0 negative, from
templates × subjects × opinion words, some negated ("was not great" is
negative). Validation uses subjects, phrasings and a quarter of its opinion
words that never occur in training, so its accuracy measures what the
pretrained encoder transfers rather than memorised sentences. Deterministic
(fixed seed): rerunning it reproduces the committed files byte for byte.
About 40 KB in all.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

POSITIVE = ["great", "excellent", "wonderful", "fantastic", "delightful", "superb", "lovely", "brilliant",
            "impressive", "pleasant", "amazing", "charming", "reliable", "outstanding", "enjoyable"]
NEGATIVE = ["terrible", "awful", "horrible", "disappointing", "dreadful", "boring", "poor", "useless",
            "annoying", "mediocre", "unpleasant", "broken", "miserable", "frustrating", "bland"]
# Only in validation: the fine-tuned head never sees these words, the pretrained encoder has.
EVAL_POSITIVE = ["terrific", "marvelous", "splendid", "gorgeous", "fabulous"]
EVAL_NEGATIVE = ["dismal", "atrocious", "tedious", "lousy", "pathetic"]

TRAIN_SUBJECTS = ["the movie", "the hotel room", "this phone", "the pasta", "our waiter", "the concert",
                  "the new album", "this laptop", "the tour guide", "the coffee", "the book", "the delivery",
                  "the game", "the app", "the museum", "this jacket"]
EVAL_SUBJECTS = ["the restaurant", "the headphones", "the play", "the camera", "the train ride", "the novel"]

TRAIN_TEMPLATES = ["{s} was {a}.", "I thought {s} was {a}.", "Honestly, {s} is {a}.", "Overall {s} felt {a}.",
                   "My friends said {s} was {a}.", "{s} turned out to be {a}."]
EVAL_TEMPLATES = ["In my opinion {s} was {a}.", "We all agreed that {s} was {a}."]
NEGATORS = [("was", "was not"), ("is", "is not"), ("felt", "did not feel"), ("be", "not be")]


def sentence(rng: random.Random, subjects: list[str], templates: list[str], positives: list[str],
             negatives: list[str]) -> dict:
    positive = rng.random() < 0.5
    adjective = rng.choice(positives if positive else negatives)
    text = rng.choice(templates).format(s=rng.choice(subjects), a=adjective)
    if rng.random() < 0.2:  # negation flips the label
        for verb, negated in NEGATORS:
            if f" {verb} {adjective}" in text:
                text, positive = text.replace(f" {verb} {adjective}", f" {negated} {adjective}"), not positive
                break
    return {"text": text[0].upper() + text[1:], "label": int(positive)}


def unique(rng: random.Random, n: int, *words: list[str]) -> list[dict]:
    rows: dict[str, dict] = {}
    while len(rows) < n:
        row = sentence(rng, *words)
        rows.setdefault(row["text"], row)
    return list(rows.values())


def main() -> None:
    rng = random.Random(0)
    splits = {"train": unique(rng, 480, TRAIN_SUBJECTS, TRAIN_TEMPLATES, POSITIVE, NEGATIVE),
              "validation": unique(rng, 160, EVAL_SUBJECTS, EVAL_TEMPLATES, POSITIVE + EVAL_POSITIVE,
                                   NEGATIVE + EVAL_NEGATIVE)}
    for split, rows in splits.items():
        path = HERE / f"sentiment_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        positives = sum(row["label"] for row in rows)
        print(f"{path}: {len(rows)} sentences, {positives} positive")


if __name__ == "__main__":
    main()
