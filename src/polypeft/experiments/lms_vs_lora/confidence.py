"""Confidence intervals of a method's difference to a reference: test examples and seeds resampled together.

Examples are paired (the same resample for both methods); each method's seeds are resampled on their own.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def example_weights(size: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """How often each example is drawn in each bootstrap replicate: (replicates, size) counts summing to size."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=replicates).astype(np.float64)


def seed_draws(seeds: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, seeds) one-hot-summed draws: how often each seed is taken in each replicate."""
    picks = rng.integers(seeds, size=(replicates, seeds))
    counts = np.zeros((replicates, seeds))
    np.add.at(counts, (np.arange(replicates)[:, None], picks), 1.0)
    return counts / seeds


def resampled_scores(values: np.ndarray, weights: np.ndarray, seed_mix: np.ndarray) -> np.ndarray:
    """Per replicate, the seed-resampled mean of the example-resampled mean: values (seeds, examples)."""
    per_seed = values @ weights.T / weights.sum(1)  # (seeds, replicates)
    return (seed_mix * per_seed.T).sum(1)


def difference_intervals(method: Mapping[str, Sequence[Sequence[float]]],
                         reference: Mapping[str, Sequence[Sequence[float]]], replicates: int = 2000,
                         seed: int = 0, scale: float = 100.0) -> dict[str, dict[str, float]]:
    """Per language and for the mean over languages: the difference of mean scores (method - reference) with its
    95 % interval. Each mapping holds, per language, one row of per-example scores per seed (same examples, same
    order, in both). Seed resamples are shared across languages (a seed is one run over every language)."""
    languages = list(reference)
    missing = [lang for lang in languages if lang not in method]
    if missing:
        raise ValueError(f"difference_intervals: the method has no scores for {missing}")
    rng = np.random.default_rng(seed)
    arrays = {lang: (np.asarray(method[lang], float), np.asarray(reference[lang], float)) for lang in languages}
    seeds_a = seed_draws(len(next(iter(arrays.values()))[0]), replicates, rng)
    seeds_b = seed_draws(len(next(iter(arrays.values()))[1]), replicates, rng)
    result, replicate_differences = {}, []
    for lang, (a, b) in arrays.items():
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"difference_intervals: {lang} has {a.shape[1]} examples for the method and "
                             f"{b.shape[1]} for the reference; they must be the same examples")
        weights = example_weights(a.shape[1], replicates, rng)
        differences = scale * (resampled_scores(a, weights, seeds_a) - resampled_scores(b, weights, seeds_b))
        replicate_differences.append(differences)
        result[lang] = summary(scale * (a.mean() - b.mean()), differences, a, b, scale)
    mean_differences = np.mean(replicate_differences, axis=0)
    point = float(np.mean([result[lang]["difference"] for lang in languages]))
    result["mean"] = {"difference": round(point, 3), "low": round(float(np.percentile(mean_differences, 2.5)), 3),
                      "high": round(float(np.percentile(mean_differences, 97.5)), 3)}
    return result


def summary(point: float, differences: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> dict[str, float]:
    """The point difference, its 95 % interval, and both sides' means and seed spreads (population std)."""
    return {"difference": round(float(point), 3), "low": round(float(np.percentile(differences, 2.5)), 3),
            "high": round(float(np.percentile(differences, 97.5)), 3),
            "method": round(scale * float(a.mean()), 3), "reference": round(scale * float(b.mean()), 3),
            "method_seed_std": round(scale * float(a.mean(1).std()), 3),
            "reference_seed_std": round(scale * float(b.mean(1).std()), 3)}


def verdict(interval: Mapping[str, float]) -> str:
    """"better" / "worse" when the 95 % interval excludes zero, else "within noise"."""
    if interval["low"] > 0:
        return "better"
    if interval["high"] < 0:
        return "worse"
    return "within noise"
