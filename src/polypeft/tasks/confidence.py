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


STATISTICS = ("accuracy", "perplexity", "bleu")


def per_seed_scores(values: np.ndarray, weights: np.ndarray, statistic: str) -> np.ndarray:
    """(seeds, replicates) scores under example weights (replicates, examples): the weighted mean of 0/1 outcomes
    ("accuracy", values (seeds, examples)), exp of the weighted token NLL ("perplexity", values (seeds, examples,
    2) holding each example's NLL sum and token count), or the corpus BLEU of the weighted sentence statistics
    ("bleu", values (seeds, examples, 10): the `bleu_statistics` of `translation.evaluate.sentences_by_direction`)."""
    if statistic == "accuracy":
        return values @ weights.T / weights.sum(1)
    if statistic == "perplexity":
        return np.exp((values[..., 0] @ weights.T) / (values[..., 1] @ weights.T))
    if statistic == "bleu":
        return corpus_bleu(np.einsum("sek,re->srk", values, weights))
    raise ValueError(f"statistic={statistic!r}; allowed: {list(STATISTICS)}")


def corpus_bleu(statistics: np.ndarray) -> np.ndarray:
    """sacreBLEU's corpus BLEU (exp smoothing) of summed sentence statistics (..., 10): hypothesis length,
    reference length, then matches and totals for 1- to 4-grams."""
    from sacrebleu.metrics import BLEU

    flat = np.rint(statistics.reshape(-1, statistics.shape[-1])).astype(np.int64)  # resample counts are whole
    scores = [BLEU.compute_bleu(correct=row[2:6].tolist(), total=row[6:10].tolist(), sys_len=int(row[0]),
                                ref_len=int(row[1]), smooth_method="exp").score for row in flat]
    return np.asarray(scores).reshape(statistics.shape[:-1])


def compared(a, b, statistic: str):
    """Accuracy: the difference in points; BLEU: in BLEU points; perplexity: the relative change in % (negative =
    lower = better)."""
    if statistic == "accuracy":
        return 100.0 * (a - b)
    return a - b if statistic == "bleu" else 100.0 * (a / b - 1.0)


def score_intervals(scores: Mapping[str, Sequence], replicates: int = 1000, seed: int = 0,
                    statistic: str = "bleu") -> dict[str, dict[str, float]]:
    """Per language and for the mean over languages: one method's score with its 95 % interval (examples and seeds
    resampled, as `difference_intervals` does for a difference); `scores` holds per-example values per seed."""
    if not scores:
        raise ValueError("score_intervals: no languages to score")
    rng = np.random.default_rng(seed)
    arrays = {lang: np.asarray(values, float) for lang, values in scores.items()}
    seeds = seed_draws(len(next(iter(arrays.values()))), replicates, rng)
    scale = 100.0 if statistic == "accuracy" else 1.0
    result, replicate_scores = {}, []
    for lang, values in arrays.items():
        replicated = scale * (seeds * per_seed_scores(values, example_weights(values.shape[1], replicates, rng),
                                                      statistic).T).sum(1)
        replicate_scores.append(replicated)
        point = scale * per_seed_scores(values, np.ones((1, values.shape[1])), statistic)[:, 0]
        result[lang] = interval(float(point.mean()), replicated)
    points = [result[lang]["score"] for lang in arrays]
    result["mean"] = interval(float(np.mean(points)), np.mean(replicate_scores, axis=0))
    return result


def bleu_intervals(sentences: Mapping[str, Mapping], pivot: str = "en", replicates: int = 1000) -> dict:
    """One translation run's corpus BLEU with 95 % intervals, verses resampled: per direction and the means into
    the pivot, out of it and over all (`sentences`: an eval JSON variant's per-direction `bleu_statistics`)."""
    statistics = {name: [rows["bleu_statistics"]] for name, rows in sentences.items()}
    groups = {f"xx_{pivot}": [n for n in statistics if n.endswith(f"-{pivot}")],
              f"{pivot}_xx": [n for n in statistics if n.startswith(f"{pivot}-")], "all": list(statistics)}
    result = {"directions": {name: score_intervals({name: rows}, replicates)[name] for name, rows in statistics.items()}}
    means: dict[tuple[str, ...], dict] = {}  # "all" is often the one-sided group again: resampled once
    for group, names in groups.items():
        if names:
            if tuple(names) not in means:
                means[tuple(names)] = score_intervals({name: statistics[name] for name in names}, replicates)["mean"]
            result[group] = means[tuple(names)]
    return result


def interval(point: float, replicated: np.ndarray) -> dict[str, float]:
    return {"score": round(point, 3), "low": round(float(np.percentile(replicated, 2.5)), 3),
            "high": round(float(np.percentile(replicated, 97.5)), 3)}


def difference_intervals(method: Mapping[str, Sequence], reference: Mapping[str, Sequence], replicates: int = 2000,
                         seed: int = 0, statistic: str = "accuracy") -> dict[str, dict[str, float]]:
    """Per language and for the mean over languages: the method's difference to the reference (`compared`) with
    its 95 % interval. Each mapping holds, per language, one row of per-example values per seed (the same
    examples in the same order in both). Seed resamples are shared across languages (a seed is one run)."""
    languages = list(reference)
    missing = [lang for lang in languages if lang not in method]
    if missing:
        raise ValueError(f"difference_intervals: the method has no scores for {missing}")
    rng = np.random.default_rng(seed)
    arrays = {lang: (np.asarray(method[lang], float), np.asarray(reference[lang], float)) for lang in languages}
    first = next(iter(arrays.values()))
    seeds_a, seeds_b = seed_draws(len(first[0]), replicates, rng), seed_draws(len(first[1]), replicates, rng)
    scale = 100.0 if statistic == "accuracy" else 1.0
    result, replicate_differences = {}, []
    for lang, (a, b) in arrays.items():
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"difference_intervals: {lang} has {a.shape[1]} examples for the method and "
                             f"{b.shape[1]} for the reference; they must be the same examples")
        weights = example_weights(a.shape[1], replicates, rng)
        score_a = (seeds_a * per_seed_scores(a, weights, statistic).T).sum(1)
        score_b = (seeds_b * per_seed_scores(b, weights, statistic).T).sum(1)
        differences = compared(score_a, score_b, statistic)
        replicate_differences.append(differences)
        ones = np.ones((1, a.shape[1]))
        point_a, point_b = per_seed_scores(a, ones, statistic)[:, 0], per_seed_scores(b, ones, statistic)[:, 0]
        result[lang] = summary(compared(point_a.mean(), point_b.mean(), statistic), differences, point_a, point_b,
                               scale)
    mean_differences = np.mean(replicate_differences, axis=0)
    point = float(np.mean([result[lang]["difference"] for lang in languages]))
    result["mean"] = {"difference": round(point, 3), "low": round(float(np.percentile(mean_differences, 2.5)), 3),
                      "high": round(float(np.percentile(mean_differences, 97.5)), 3)}
    return result


def summary(point: float, differences: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> dict[str, float]:
    """The point difference, its 95 % interval, and both sides' scores (mean and population std over seeds)."""
    return {"difference": round(float(point), 3), "low": round(float(np.percentile(differences, 2.5)), 3),
            "high": round(float(np.percentile(differences, 97.5)), 3),
            "method": round(scale * float(a.mean()), 3), "reference": round(scale * float(b.mean()), 3),
            "method_seed_std": round(scale * float(a.std()), 3),
            "reference_seed_std": round(scale * float(b.std()), 3)}


def verdict(interval: Mapping[str, float], higher_is_better: bool = True) -> str:
    """"better" / "worse" when the 95 % interval excludes zero (on the side the metric prefers), else "within
    noise"."""
    if interval["low"] > 0:
        return "better" if higher_is_better else "worse"
    if interval["high"] < 0:
        return "worse" if higher_is_better else "better"
    return "within noise"


def gain_interval(method: Mapping[str, Sequence], reference: Mapping[str, Sequence], replicates: int = 1000,
                  higher_is_better: bool = True, statistic: str = "accuracy") -> list[float]:
    """The 95 % interval of the mean-over-languages gain (signed so that > 0 is better), for a demo row."""
    mean = difference_intervals(method, reference, replicates=replicates, statistic=statistic)["mean"]
    low, high = mean["low"], mean["high"]
    return [round(low, 3), round(high, 3)] if higher_is_better else [round(-high, 3), round(-low, 3)]
