"""Scoring a fine-tuned classifier: arg-max predictions on a route, accuracy per language.

FD models are scored on each route separately (FD-Share, FD-LS).
"""
from __future__ import annotations

import torch

from ...core.languages import SHARED
from .classifier import Classifier
from .examples import EncodedExamples


def predict(classifier: Classifier, examples: EncodedExamples, route: str = "language",
            batch_size: int = 64) -> list[int]:
    """Arg-max labels; `route` is "language" (each example's own route), "shared", or "none" (naive)."""
    if route not in ("language", "shared", "none"):
        raise ValueError(f"route={route!r}; allowed: 'language', 'shared', 'none'")
    model = classifier.model
    model.eval()
    predictions: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            index = list(range(start, min(start + batch_size, len(examples))))
            batch = examples.batch(index)
            langs = [SHARED] * len(index) if route == "shared" else [examples.langs[i] for i in index]
            predictions += classifier.logits(batch, langs).argmax(-1).tolist()
    return predictions


def accuracy_per_language(classifier: Classifier, test: EncodedExamples, route: str = "language",
                          batch_size: int = 64) -> dict[str, float]:
    """Accuracy (in %) per language, then their mean under "average"."""
    predictions = torch.tensor(predict(classifier, test, route, batch_size))
    correct = (predictions == test.labels).float()
    scores: dict[str, float] = {}
    for lang in dict.fromkeys(test.langs):
        mask = torch.tensor([l == lang for l in test.langs])
        scores[lang] = round(100.0 * float(correct[mask].mean()), 2)
    scores["average"] = round(sum(scores.values()) / len(scores), 2)
    return scores
