"""Scores of generated answers against references, as the original TAID code computes them: ROUGE-L F-measure
with the Porter stemmer (`rouge-score`, Google's implementation that `evaluate`'s rouge wraps) and exact match
after lower-casing and removing punctuation and extra whitespace; both as percentages, averaged over answers."""

from __future__ import annotations

import string

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    return 100.0 * sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / max(len(references), 1)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)
