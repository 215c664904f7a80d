"""A fine-tuning experiment: methods x seeds trained and scored per language, means and spreads over seeds.

Also the parameter table of every scored variant.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torch import nn

from ...core.config import ConfigError, NonNegativeInt, TypedConfig
from .classifier import build_classifier
from .evaluation import accuracy_of, correct_per_language
from .examples import EncodedExamples
from .finetune import finetune
from .settings import EVAL_ROUTES, METHODS, VARIANT_NAMES, FinetuneSettings, Method


@dataclass
class ExperimentSpec(TypedConfig):
    """Which runs to make: methods x seeds, trained on `train_languages`, tested on every language."""

    languages: list[str]
    train_languages: Optional[list[str]] = None  # None: all (multilingual); ["en"]: zero-shot from English
    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    seeds: list[NonNegativeInt] = field(default_factory=lambda: [0])
    name: str = "classify"

    def __post_init__(self) -> None:
        super().__post_init__()
        outside = [l for l in (self.train_languages or []) if l not in self.languages]
        if outside:
            raise ConfigError(f"ExperimentSpec.train_languages {outside} are not in languages {self.languages}")
        if not self.seeds:
            raise ConfigError("ExperimentSpec.seeds=[] must list at least one seed")


def run_experiment(encoder: nn.Module, spec: ExperimentSpec, settings: FinetuneSettings,
                   train: EncodedExamples, test: EncodedExamples, label_names: Sequence[str],
                   progress: bool = True, test_variants: Optional[Mapping[str, EncodedExamples]] = None
                   ) -> dict[str, Any]:
    """Every method x seed: fine-tune, score every variant per language; means and spreads over seeds.

    `test_variants` maps a suffix to another version of `test` (e.g. "+lirp": LRP2-shifted states), each
    scored as its own variant ("naive+lirp")."""
    tests = {"": test, **(test_variants or {})}
    train_langs = spec.train_languages or spec.languages
    train_part = train.subset(train_langs)
    runs: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    for method in spec.methods:
        for seed in spec.seeds:
            run_settings = settings.replaced(method=method, seed=seed)
            classifier = build_classifier(encoder, label_names, spec.languages, run_settings)
            counts[method] = {**classifier.parameter_counts, "trainable": classifier.trainable}
            started = time.perf_counter()
            losses = finetune(classifier, train_part, run_settings, progress)
            seconds = time.perf_counter() - started
            for (route, suffix) in [(r, x) for r in EVAL_ROUTES[method] for x in tests]:
                correct = correct_per_language(classifier, tests[suffix], route, settings.eval_batch_size)
                runs.append({"variant": VARIANT_NAMES[(method, route)] + suffix, "method": method, "route": route,
                             "seed": seed, "accuracy": accuracy_of(correct), "correct": correct,
                             "first_loss": round(sum(losses[:10]) / len(losses[:10]), 4),
                             "last_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
                             "train_seconds": round(seconds, 1)})
    return {"name": spec.name, "languages": spec.languages, "train_languages": train_langs,
            "settings": asdict(settings), "runs": runs, "summary": summarize(runs),
            "parameters": parameter_table(counts)}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and language: mean and (population) standard deviation of accuracy over seeds."""
    by_variant: dict[str, list[Mapping[str, float]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["accuracy"])
    summary = {}
    for variant, scores in by_variant.items():
        summary[variant] = {}
        for lang in scores[0]:
            values = [s[lang] for s in scores]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            summary[variant][lang] = {"mean": round(mean, 2), "std": round(std, 2), "n": len(values)}
    return summary


def parameter_table(counts: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """Training and inference parameters of each variant, and the inference overhead over the base in %."""
    table = {}
    for method, c in counts.items():
        for route in EVAL_ROUTES[method]:
            extra = {"none": 0, "language": c["inference_extra_language_routes"],
                     "shared": c["inference_extra_shared_route"]}[route]
            table[VARIANT_NAMES[(method, route)]] = {
                "base": c["base"], "training_extra": c["training_extra"], "trainable": c["trainable"],
                "inference_extra": extra, "inference_total": c["base"] + extra,
                "inference_extra_percent": round(100.0 * extra / c["base"], 3)}
    return table
