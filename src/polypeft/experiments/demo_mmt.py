"""The demo's translation part: naive vs LMS vs LMS+FD on Bible translation, ranked by test cross-entropy and chrF.

At a few hundred CPU steps every BLEU is near zero (RESULTS §2.1), so BLEU is printed but ranks nothing.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..core.config import ConfigError
from ..tasks.translation.compare import load_results, markdown, write_comparison
from ..training.checkpoint import CHECKPOINT_NAME
from ..tasks.translation.run import (MMTRecipe, check_resumable, eval_variants, evaluate_run, load_run, prepare,
                                     train_run, valid_loss_fn)
from .demo_store import PartResult, Row, part_dir

# RESULTS §2.1 (7 languages, 600 steps, 2 seeds): test CE vs naive and chrF vs naive (5.03).
FULL_BENCH = {"lms": (0.169, "-0.169 CE", -0.98, "-0.98 chrF"),
              "lms_fd (fd-share)": (0.020, "-0.020 CE", -2.43, "-2.43 chrF"),
              "lms_fd (fd-ls)": (0.057, "-0.057 CE", -1.99, "-1.99 chrF")}
LABELS = {"lms": "LMS pair-wise", "lms_fd (fd-share)": "LMS+FD, FD-Share", "lms_fd (fd-ls)": "LMS+FD, FD-LS"}
BLEU_WHY = ("BLEU is printed but ranks nothing: after a few hundred CPU steps every model's BLEU is near 0 "
            "(RESULTS §2.1), so its differences compare zeros; cross-entropy and chrF still move.")


def settings(base: MMTRecipe, methods: dict) -> dict[str, Any]:
    recipe = {key: value for key, value in dataclasses.asdict(base).items() if key != "output_dir"}
    return {"recipe": json.loads(json.dumps(recipe)), "methods": methods}


def finished(recipe: MMTRecipe) -> bool:
    """True when the run directory holds this very recipe's weights and test scores (a demo run again)."""
    run_dir = recipe.run_dir
    try:
        stored = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (stored == json.loads(json.dumps(dataclasses.asdict(recipe))) and (run_dir / "model.safetensors").exists()
            and (run_dir / "eval_test.json").exists())


def refuse_runs_of_another_setting(recipes: list[MMTRecipe]) -> None:
    """Stop before any work when a run folder holds a demo trained with other settings (an older default)."""
    for recipe in recipes:
        if (recipe.run_dir / CHECKPOINT_NAME).exists() and not finished(recipe):
            try:
                check_resumable(recipe, recipe.run_dir)
            except ConfigError as error:
                raise ConfigError(f"polypeft demo: {recipe.run_dir} holds a run of another demo setting, so it can "
                                  f"neither be reused nor continued; remove that folder or pass --output-dir. "
                                  f"({error})") from error


def recipes_in(folder: Path, base: MMTRecipe, methods: dict) -> dict[str, MMTRecipe]:
    return {name: dataclasses.replace(base, name=name, method=method, output_dir=str(folder))
            for name, method in methods.items()}


def check_folder(output_dir: str, base: MMTRecipe, methods: dict) -> None:
    """The refusal above for the part's own folder, callable before the demo starts any other part."""
    refuse_runs_of_another_setting(list(recipes_in(part_dir(output_dir, "mmt", settings(base, methods)),
                                                   base, methods).values()))


def test_cross_entropy(run_dir: Path, data) -> dict[str, float]:
    """Teacher-forced token CE (no smoothing) on the test book, per evaluation variant (FD-Share, FD-LS)."""
    recipe, _, model = load_run(run_dir, data)
    model.eval()
    with torch.no_grad():
        return {variant: valid_loss_fn(recipe, data, model.config, examples=data.test, route=route)(model)
                for variant, route in eval_variants(recipe).items()}


def run(base: MMTRecipe, methods: dict, folder: Path) -> PartResult:
    recipes = recipes_in(folder, base, methods)
    refuse_runs_of_another_setting(list(recipes.values()))
    print(f"polypeft demo: {'/'.join(base.languages)} Bible translation, tiny model, {base.training.steps} steps per method")
    started = time.perf_counter()
    data = prepare(base)
    seconds: dict[str, float] = {"data": time.perf_counter() - started}
    print(f"data: {len(data.train):,} training pairs, {len(data.test):,} test pairs (book 43, John)")
    run_dirs, cross_entropy = [], {}
    for name, recipe in recipes.items():
        started = time.perf_counter()
        run_dir = recipe.run_dir
        if finished(recipe):
            print(f"[{name}] already trained and evaluated with this recipe: {run_dir}")
        else:  # a stopped demo continues from the run's last checkpoint; one stopped before any starts afresh
            resume = (run_dir / CHECKPOINT_NAME).exists()
            run_dir = train_run(recipe, resume=resume, overwrite=not resume, data=data)
            evaluate_run(run_dir, data=data)
        for variant, value in test_cross_entropy(run_dir, data).items():
            cross_entropy[name if variant == "default" else f"{name} ({variant.replace('_', '-')})"] = value
        run_dirs.append(run_dir)
        seconds[name] = time.perf_counter() - started
    title = f"Bible corpus, {'/'.join(base.languages)}, tiny model, {base.training.steps} steps per run (polypeft demo)"
    comparison = write_comparison(load_results(run_dirs), "naive", folder / "compare", pivot=base.pivot, title=title)
    print(markdown(comparison, base.pivot))
    return PartResult("mmt", {}, rows_of(comparison, cross_entropy, seconds, base), [BLEU_WHY],
                      {"test_cross_entropy": cross_entropy, "seconds": seconds, "comparison": comparison})


def rows_of(comparison: dict, cross_entropy: dict[str, float], seconds: dict[str, float], base: MMTRecipe) -> list[Row]:
    """A test-CE row and a chrF row for each method against naive."""
    directions = len(base.languages) - 1
    task = f"translation en<->{'/'.join(l for l in base.languages if l != base.pivot)} ({2 * directions} directions)"
    chrf = {label: row["averages"]["chrf_all"]["mean"] for label, row in comparison["rows"].items()}
    rows = []
    for label, (ce_gain, ce_text, chrf_gain, chrf_text) in FULL_BENCH.items():
        method = label.split(" ")[0]
        parameters = comparison["rows"][label]
        train_extra, inference_extra = f"{parameters['training_extra']:,}", f"{parameters['inference_extra']:,}"
        common = dict(baseline_name="naive", extra_train=train_extra, extra_inference=inference_extra,
                      seconds=seconds[method])
        ce = Row(LABELS[label], task, "test CE (lower better)", baseline=cross_entropy["naive"],
                 with_method=cross_entropy[label], higher_is_better=False, full_bench=ce_text + " (RESULTS §2.1)",
                 **common)
        ce.agrees_with_full_bench = ce.gain > 0
        score = Row(LABELS[label], task, "chrF", baseline=chrf["naive"], with_method=chrf[label],
                    full_bench=chrf_text + " (RESULTS §2.1)", **common)
        score.agrees_with_full_bench = (score.gain > 0) == (chrf_gain > 0)
        rows += [ce, score]
    return rows
