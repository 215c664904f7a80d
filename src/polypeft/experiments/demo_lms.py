"""The demo's LMS part on e5-small verse classification: naive fine-tuning against LMS and LMS+FD (FD-Share, FD-LS).

It also measures two things beyond the papers: a mixed-language batch equals per-example routes, and the FD
shared route merged into the weights runs at the plain model's speed.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..core.languages import SHARED
from ..tasks import encoder_finetune as ef
from .bible_eval import SECTION_NAMES, verse_classification
from .demo_store import PartResult, Row

# Recipe of RESULTS §4.3 (a): lr 2e-4, route lr 2e-3, rank 8, 48 tokens, layers 0-9 frozen; sizes cut for the CPU.
FULL = {"languages": ["en", "fr", "ar", "ko"], "verses_per_section": 30, "steps": 30, "batch_size": 16}
QUICK = {"languages": ["en", "fr"], "verses_per_section": 3, "steps": 2, "batch_size": 8}
FIXED = {"lr": 2e-4, "route_lr": 2e-3, "rank": 8, "max_length": 48, "frozen_layers": 10, "test_fraction": 0.3,
         "seed": 0, "speed_rounds": 15}
# RESULTS §4.3: LMS alone +0.02 (a) and +0.00 (c); FD-Share +1.27 and FD-LS +1.32 in (c), +0.3 in (a).
FULL_BENCH = {"lms": (0.0, "+0.02 / +0.00: no gain (RESULTS §4.3 a, c)"),
              "lms_fd_share": (1.27, "+1.27 (RESULTS §4.3 c; +0.3 in a)"),
              "lms_fd_ls": (1.32, "+1.32 (RESULTS §4.3 c; +0.3 in a)")}
LABELS = {"lms": "LMS (language routes)", "lms_fd_share": "LMS+FD, FD-Share", "lms_fd_ls": "LMS+FD, FD-LS"}


def settings(quick: bool) -> dict[str, Any]:
    return {**(QUICK if quick else FULL), **FIXED, "quick_speed": quick}


def finetune_settings(config: dict) -> ef.FinetuneSettings:
    return ef.FinetuneSettings(steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                               route_lr=config["route_lr"], warmup=max(1, config["steps"] // 10),
                               max_length=config["max_length"], frozen_layers=config["frozen_layers"],
                               rank=config["rank"], prefix="query: ", seed=config["seed"])


def mixed_batch_difference(classifier: ef.Classifier, test: ef.EncodedExamples, size: int = 16) -> float:
    """Max |logit difference| between one batch mixing every language and each example run alone on its route."""
    by_language: dict[str, list[int]] = {}
    for index, language in enumerate(test.langs):
        by_language.setdefault(language, []).append(index)
    mixed = [index for group in zip(*by_language.values()) for index in group][:size]
    with torch.inference_mode():
        together = classifier.logits(test.batch(mixed), [test.langs[i] for i in mixed])
        alone = torch.cat([classifier.logits(test.batch([i]), [test.langs[i]]) for i in mixed])
    return float((together - alone).abs().max())


def plain_model_with_shared_route(model) -> torch.nn.Module:
    """A copy of an LMS+FD model with its shared route folded into the weights and every routed wrapper swapped
    back for its base linear: a plain transformers model. (`merge_and_unload` finds layers by their names, which
    the cut-off frozen layers have renumbered.)"""
    poly = copy.deepcopy(model)
    poly.merge(route=SHARED)
    routed = {id(layer) for layer in poly.routed_layers.values()}
    for module in list(poly.base_model.modules()):
        for name, child in list(module.named_children()):
            if id(child) in routed:
                setattr(module, name, child.base_layer)
    return poly.base_model


def merged_speed(fd: ef.Classifier, naive: ef.Classifier, test: ef.EncodedExamples, rounds: int) -> dict:
    """The FD shared route folded into a plain model: its outputs against the shared route's, and its forward
    time against the naive model's (same architecture), interleaved round by round in this process (medians)."""
    batch = test.batch(list(range(min(64, len(test)))))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    merged = plain_model_with_shared_route(fd.model).eval()
    plain = naive.model.eval()
    with torch.inference_mode():
        shared = fd.logits(batch, [SHARED] * len(batch["labels"]))
        difference = float((merged(**inputs).logits - shared).abs().max())
        times: dict[str, list[float]] = {"plain": [], "merged": []}
        for round_index in range(rounds + 1):
            for name, model in (("plain", plain), ("merged", merged))[::1 if round_index % 2 else -1]:
                started = time.perf_counter()
                model(**inputs)
                if round_index:  # the first round warms up
                    times[name].append(time.perf_counter() - started)
    plain_s, merged_s = statistics.median(times["plain"]), statistics.median(times["merged"])
    return {"ratio": merged_s / plain_s, "plain_s": plain_s, "merged_s": merged_s, "rounds": rounds,
            "batch": len(batch["labels"]), "max_abs_diff_to_shared_route": difference}


def run(model, tokenizer, quick: bool, folder: Path) -> PartResult:
    config = settings(quick)
    languages = config["languages"]
    started = time.perf_counter()
    data = verse_classification(languages, valid_fraction=0.0, test_fraction=config["test_fraction"],
                                max_verses_per_section=config["verses_per_section"], seed=config["seed"])
    base = finetune_settings(config)
    train = ef.encode_examples(model, tokenizer, data["train"], base.max_length, base.frozen_layers, prefix=base.prefix)
    test = ef.encode_examples(model, tokenizer, data["test"], base.max_length, base.frozen_layers, prefix=base.prefix)
    encode_seconds = time.perf_counter() - started
    classifiers, accuracy, seconds, counts = {}, {}, {}, {}
    for method in ef.METHODS:
        run_settings = base.replaced(method=method)
        classifier = ef.build_classifier(model, list(SECTION_NAMES), languages, run_settings)
        started = time.perf_counter()
        ef.finetune(classifier, train, run_settings)
        for route in ef.EVAL_ROUTES[method]:
            accuracy[ef.VARIANT_NAMES[(method, route)]] = ef.accuracy_per_language(classifier, test, route)
        seconds[method] = time.perf_counter() - started
        classifiers[method], counts[method] = classifier, classifier.parameter_counts
    mixed = mixed_batch_difference(classifiers["lms"], test)
    speed = merged_speed(classifiers["lms_fd"], classifiers["naive"], test, 3 if quick else config["speed_rounds"])
    naive = accuracy["naive"]["average"]
    task = f"verse classification, 7 sections ({', '.join(languages)})"
    rows = []
    for variant, method in (("lms", "lms"), ("lms_fd_share", "lms_fd"), ("lms_fd_ls", "lms_fd")):
        full_gain, full_text = FULL_BENCH[variant]
        gain = accuracy[variant]["average"] - naive
        inference = (counts[method]["inference_extra_shared_route"] if variant == "lms_fd_share"
                     else counts[method]["inference_extra_language_routes"])
        rows.append(Row(LABELS[variant], task, "accuracy %", "naive fine-tune", naive, accuracy[variant]["average"],
                        extra_train=f"{counts[method]['training_extra']:,}",
                        extra_inference=f"{inference:,}" + (" (0 merged)" if variant == "lms_fd_share" else ""),
                        seconds=seconds[method], full_bench=full_text,
                        agrees_with_full_bench=None if full_gain == 0 else (gain > 0) == (full_gain > 0)))
    notes = [f"mixed-language batch = per-example routes: max |logit diff| {mixed:.2e} over 16 examples of "
             f"{len(languages)} languages in one batch against each run alone (LMS classifier).",
             f"FD shared route merged into a plain model: forward time {speed['ratio']:.2f}x the plain (naive) "
             f"model's, side by side over {speed['rounds']} interleaved rounds of {speed['batch']} verses (medians); "
             f"merged outputs = shared route within {speed['max_abs_diff_to_shared_route']:.1e}.",
             f"classification: {len(train) // len(languages)} training / {len(test) // len(languages)} test verses "
             f"per language, {config['steps']} steps of {config['batch_size']}, layers 10-11 + head trained "
             f"({encode_seconds:.0f} s to run the frozen layers once)."]
    details = {"accuracy": accuracy, "train_seconds": seconds, "parameters": counts, "mixed_batch_max_abs_diff": mixed,
               "merged_speed": speed, "encode_seconds": round(encode_seconds, 1)}
    return PartResult("lms", {}, rows, notes, details)
