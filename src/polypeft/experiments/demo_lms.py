"""The demo's LMS part: e5-small adapted for xx->en verse retrieval, LMS and LMS+FD against LoRA at equal parameters.

The full comparison's testbed (bench/lms_vs_lora.py) at demo size, with the settings it chose on the valid books.
It also checks two things beyond the papers: a mixed-language batch equals per-example routes, and the FD shared
route merged into the weights runs at the plain model's speed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..tasks.confidence import difference_intervals
from .demo_retrieval import book_name
from .demo_store import PartResult, Row
from .lms_vs_lora.protocol import run_comparison, train_tower
from .lms_vs_lora.report import outcomes_by_variant, score_of
from .lms_vs_lora.retrieval_data import KJV, testbed_data
from .lms_vs_lora.retrieval_run import RetrievalBed
from .lms_vs_lora.settings import LABELS, demo_testbed
from .lms_vs_lora.speed import merged_fd_share

# What the full comparison chose on the valid books for the top two blocks (bench/RESULTS.md, "LMS and FD against
# LoRA"); the demo trains at those rates for its own, smaller number of steps instead of running trials.
DEMO_CHOICES = {"lora_train": {"lr": 1e-3, "trained_layers": 2},
                "lms": {"lr": 1e-3, "trained_layers": 2},
                "lms_fd": {"lr": 3e-3, "trained_layers": 2}}
FULL_BENCH = {"lms": "-0.42 [-0.93, +0.10], within noise (RESULTS §12.1)",
              "fd_share": "-0.04 [-0.50, +0.39], within noise (RESULTS §12.1)",
              "fd_ls": "+0.05 [-0.47, +0.56], within noise (RESULTS §12.1)"}
ROWS = [("lms", "lms", "LMS (language routes)"), ("fd_share", "lms_fd", "LMS+FD, FD-Share"),
        ("fd_ls", "lms_fd", "LMS+FD, FD-LS")]


def choices(quick: bool) -> dict[str, dict]:
    steps = demo_testbed(quick).max_steps
    return {method: {**choice, "steps": steps} for method, choice in DEMO_CHOICES.items()}


def settings(quick: bool, seed: int = 0, test_book: int = 43) -> dict[str, Any]:
    return {"testbed": demo_testbed(quick, seed, test_book).as_dict(), "choices": choices(quick)}


def mixed_batch_difference(bed: RetrievalBed, size: int = 16) -> float:
    """Max |difference| between one batch mixing every language and each query run alone on its route (an LMS
    tower trained a few steps, so its routes differ)."""
    tower = bed.build("lms", 2, 0)
    train_tower(bed, tower, 1e-2, 5, 0)
    queries = bed.data.test.queries
    by_language = {lang: queries.of_language(lang) for lang in bed.settings.languages}
    mixed = [index for group in zip(*by_language.values()) for index in group][:size]
    largest = 0.0
    with torch.inference_mode():
        langs = [queries.langs[i] for i in mixed]
        together = tower.model(**queries.batch(mixed), lang=langs).last_hidden_state
        for row, (index, lang) in enumerate(zip(mixed, langs)):
            alone = tower.model(**queries.batch([index]), lang=[lang]).last_hidden_state[0]
            largest = max(largest, float((together[row, :len(alone)] - alone).abs().max()))  # padding left out
    return largest


def run(encoder, tokenizer, corpus, quick: bool, folder: Path, seed: int = 0, test_book: int = 43) -> PartResult:
    testbed = demo_testbed(quick, seed, test_book)
    data = testbed_data(encoder, tokenizer, corpus, testbed)
    bed = RetrievalBed(encoder, data, testbed)
    results = run_comparison(bed, folder / "work", progress=lambda text: print(text, flush=True),
                             chosen=choices(quick))
    table = outcomes_by_variant(results["tests"])
    languages = testbed.languages
    book = book_name(corpus, test_book)
    queries = len(table["lms"][languages[0]][0])
    noise = f"{queries} test queries per language x {len(testbed.seeds)} seeds"
    parameters = {t["method"]: t["parameters"] for t in results["tests"]}
    seconds = {t["method"]: 0.0 for t in results["tests"]}
    for test in results["tests"]:
        seconds[test["method"]] += test["train_seconds"]
    lora = {lang: score_of(bed, table["lora_train"][lang]) for lang in [*languages, KJV]}
    rows = []
    for variant, method, label in ROWS:
        interval = difference_intervals({l: table[variant][l] for l in languages},
                                        {l: table["lora_train"][l] for l in languages},
                                        replicates=testbed.bootstrap)["mean"]
        mean = sum(score_of(bed, table[variant][l]) for l in languages) / len(languages)
        inference = parameters[method]["inference_extra_shared"] if variant == "fd_share" else \
            parameters[method]["inference_extra"]
        rows.append(Row(label, f"xx->en verse retrieval, {book} ({len(languages)} languages, {queries} verses each)",
                        "acc@1 %",
                        f"{LABELS['lora_train']} ({parameters['lora_train']['trainable']:,})",
                        sum(lora[l] for l in languages) / len(languages), mean,
                        extra_train=f"{parameters[method]['trainable']:,}",
                        extra_inference=f"{inference:,}" + (" (0 merged)" if variant == "fd_share" else ""),
                        seconds=seconds[method], full_bench=FULL_BENCH[variant],
                        interval=[interval["low"], interval["high"]], noise=noise))
    english = difference_intervals({KJV: table["lms"][KJV]}, {KJV: table["lora_train"][KJV]},
                                   replicates=testbed.bootstrap)[KJV]
    rows.append(Row("LMS (language routes)", f"en->en (KJV->WEB), {book}: English kept", "acc@1 %",
                    LABELS["lora_train"], lora[KJV], score_of(bed, table["lms"][KJV]), extra_train="same",
                    extra_inference="same", full_bench="English on its own untrained route",
                    interval=[english["low"], english["high"]], noise=f"{len(table['lms'][KJV][0])} queries x "
                                                                     f"{len(testbed.seeds)} seeds"))
    mixed = mixed_batch_difference(bed)
    merged = merged_fd_share(bed, 2, rounds=3 if quick else 15)
    notes = [f"LMS vs LoRA: e5-small's top 2 blocks adapted (FFN linears), queries in 11 languages mixed in every "
             f"batch, each on its language's route; the English index stays the plain model's. Rates and steps as "
             f"the full comparison chose them on the valid books ({choices(quick)}); seeds {testbed.seeds}; "
             f"{testbed.train_verses} training verses per language.",
             f"mixed-language batch = per-example routes: max |difference| {mixed:.2e} over 16 queries of "
             f"{len(languages)} languages in one batch against each run alone (LMS).",
             f"FD shared route merged into a plain model: forward {merged['forward_ratio_to_plain']:.2f}x the plain "
             f"model's, side by side over {merged['rounds']} interleaved rounds (medians); outputs = the shared "
             f"route's within {merged['max_abs_output_diff_to_shared_route']:.1e}."]
    details = {"scores": {v: {l: score_of(bed, rows_) for l, rows_ in per.items()} for v, per in table.items()},
               "parameters": parameters, "mixed_batch_max_abs_diff": mixed, "merged_fd_share": merged,
               "choices": results["choices"]}
    return PartResult("lms", {}, rows, notes, details)
