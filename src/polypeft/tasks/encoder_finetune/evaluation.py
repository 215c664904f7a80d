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


def correct_per_language(classifier: Classifier, test: EncodedExamples, route: str = "language",
                         batch_size: int = 64) -> dict[str, list[int]]:
    """Per language, 1/0 for each test example in order: what paired bootstrap intervals resample."""
    predictions = predict(classifier, test, route, batch_size)
    correct: dict[str, list[int]] = {lang: [] for lang in dict.fromkeys(test.langs)}
    for prediction, label, lang in zip(predictions, test.labels.tolist(), test.langs):
        correct[lang].append(int(prediction == label))
    return correct


def accuracy_of(correct: dict[str, list[int]]) -> dict[str, float]:
    """Accuracy (in %) per language, then their mean under "average"."""
    scores = {lang: round(100.0 * sum(values) / len(values), 2) for lang, values in correct.items()}
    scores["average"] = round(sum(scores.values()) / len(scores), 2)
    return scores


def accuracy_per_language(classifier: Classifier, test: EncodedExamples, route: str = "language",
                          batch_size: int = 64) -> dict[str, float]:
    """Accuracy (in %) per language, then their mean under "average"."""
    return accuracy_of(correct_per_language(classifier, test, route, batch_size))
