"""FLARE against its baselines in one table and one plot, from bench/flare_bible.py JSONs: accuracy with 95 %
intervals and each recipe's paired difference to LoRA translate-train, test verses and seeds resampled.

Usage: python bench/flare_report.py RESULTS.json [MORE.json ...] --out DIR
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Optional

from polypeft.core.fileio import write_json, write_text
from polypeft.tasks.confidence import difference_intervals, score_intervals, verdict

REFERENCE = "translate_train"


# Settings that decide which verses are scored and how every model is trained: equal in every merged file, so runs
# pair verse for verse (the test verses depend on the books and the per-section count, not on the seed).
SAME_IN_EVERY_FILE = ("layers", "rank", "lr", "batch", "max_length", "per_class_train", "per_class_test",
                      "stage1_steps", "stage2_steps", "test_books", "translation_run", "mixup_layer", "mixup_ratio")


def merged(paths: list[Path]) -> tuple[dict, dict, list]:
    """Every file's runs per target and recipe, its test-verse translations, and each file's settings with its step
    ratios. Files add seeds, targets or recipes of one protocol (SAME_IN_EVERY_FILE); a run (target, recipe, seed)
    found in two files must have the same outcome on every verse (a deterministic rerun, e.g. the stage-1 model
    every file trains), else it is refused by name, as are two different translations of one target's verses."""
    results: dict = {}
    translations: dict = {}
    settings: list = []
    orders: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        check_recipe_order(path, data["settings"], orders)
        if settings:
            mine = data["settings"]
            differing = [key for key in SAME_IN_EVERY_FILE if mine.get(key) != settings[0].get(key)]
            if differing:
                shown = ", ".join(f"{key}={mine.get(key)!r}" for key in differing)
                raise ValueError(f"{path}: {shown} where {settings[0]['file']} has "
                                 f"{[settings[0].get(key) for key in differing]}; merge files of one protocol only")
        for target, recipes in data["results"].items():
            for recipe, runs in recipes.items():
                kept = results.setdefault(target, {}).setdefault(recipe, [])
                for run in runs:
                    earlier = next((seen for seen in kept if seen["seed"] == run["seed"]), None)
                    if earlier is None:
                        kept.append({**run, "file": str(path)})
                    elif "correct" not in earlier or "correct" not in run:
                        raise ValueError(f"{path}: {target}/{recipe} seed {run['seed']}: written before "
                                         "flare_bible.py kept each verse's outcome; run it again")
                    elif earlier["correct"] != run["correct"]:
                        raise ValueError(f"{path}: {target}/{recipe} seed {run['seed']} is in {earlier['file']} too, "
                                         "with other outcomes; give each run once")
        for target, record in data.get("translations", {}).items():
            if target in translations and translations[target] != record:
                raise ValueError(f"{path}: the {target} test verses were translated differently in an earlier file")
            translations[target] = record
        settings.append({"file": str(path), **data["settings"], "step_ratios": step_ratios(data["results"])})
    return results, translations, settings


def check_recipe_order(path: Path, file_settings: dict, orders: dict) -> None:
    """Refuse a recipe run after other recipes than in an earlier file: the bench draws every recipe's adapter
    start from one random stream per seed, so a recipe's result depends on the recipes that ran before it.
    `orders` (recipe -> (recipes before it, file)) grows with each file."""
    order = list(file_settings.get("recipes") or [])
    for index, recipe in enumerate(order):
        before = order[:index]
        seen = orders.setdefault(recipe, (before, str(path)))
        if seen[0] != before:
            raise ValueError(f"{path}: {recipe} ran after {before} where {seen[1]} ran it after {seen[0]}; its "
                             "adapter start depends on the recipes before it: merge files of one recipe order")


def step_ratios(results: dict) -> dict:
    """Per recipe and target of one file (one machine load): its training step over translate-train's."""
    ratios: dict = {}
    for target, recipes in results.items():
        reference = [run["train_step_s"] for run in recipes.get(REFERENCE, []) if "train_step_s" in run]
        for recipe, runs in recipes.items():
            steps = [run["train_step_s"] for run in runs if "train_step_s" in run]
            if reference and steps:
                ratios.setdefault(recipe, {})[target] = statistics.mean(steps) / statistics.mean(reference)
    return ratios


def step_ratio(settings: list, recipe: str, targets: list) -> Optional[float]:
    """The recipe's step over translate-train's, mean over targets of the files that ran both; None when a target
    has no such file."""
    per_target = []
    for target in targets:
        found = [one["step_ratios"][recipe][target] for one in settings
                 if target in one["step_ratios"].get(recipe, {})]
        if not found:
            return None
        per_target.append(statistics.mean(found))
    return round(statistics.mean(per_target), 2)


def outcomes(runs: list, where: str) -> list[list[int]]:
    """Per seed (in seed order), each test verse's 0/1 outcome."""
    if any("correct" not in run for run in runs):
        raise ValueError(f"{where}: written before flare_bible.py kept each verse's outcome; run it again")
    return [run["correct"] for run in sorted(runs, key=lambda run: run["seed"])]


def figures(results: dict, settings: list, replicates: int = 2000) -> dict:
    """Per recipe found for every target: accuracy with its interval, the paired difference to translate-train
    (same test verses), and the training step over translate-train's, all means over the targets."""
    targets = list(results)
    missing = [target for target in targets if REFERENCE not in results[target]]
    if missing:
        raise ValueError(f"targets {missing} have no {REFERENCE} results, the reference every recipe is compared with")
    recipes = [name for name in results[targets[0]] if all(name in results[target] for target in targets)]
    reference = {target: outcomes(results[target][REFERENCE], f"{target}/{REFERENCE}") for target in targets}
    rows = {}
    for recipe in recipes:
        seeds = {target: sorted(run["seed"] for run in results[target][recipe]) for target in targets}
        uneven = [target for target in targets if seeds[target] != seeds[targets[0]]]
        if uneven:
            raise ValueError(f"{recipe}: seeds {seeds[targets[0]]} for {targets[0]} but "
                             f"{ {target: seeds[target] for target in uneven} }; every target needs the same seeds")
        scores = {target: outcomes(results[target][recipe], f"{target}/{recipe}") for target in targets}
        row = {"seeds": seeds[targets[0]],
               "accuracy": score_intervals(scores, replicates=replicates, statistic="accuracy")}
        if recipe != REFERENCE:
            row["vs_translate_train"] = difference_intervals(scores, reference, replicates=replicates)
        ratio = step_ratio(settings, recipe, targets)
        if ratio is not None:
            row["step_over_lora"] = ratio
        rows[recipe] = row
    return {"targets": targets, "test_verses": {t: len(reference[t][0]) for t in targets}, "recipes": rows}


def markdown(summary: dict, translations: dict) -> str:
    targets = summary["targets"]
    lines = ["| recipe | seeds | accuracy, mean of targets [95 % CI] | vs LoRA translate-train, points [95 % CI] | "
             "step / LoRA |", "|---|---|---|---|---|"]
    for recipe, row in summary["recipes"].items():
        mean = row["accuracy"]["mean"]
        difference = row.get("vs_translate_train", {}).get("mean")
        compared = (f"{difference['difference']:+.1f} [{difference['low']:+.1f}, {difference['high']:+.1f}] "
                    f"{verdict(difference)}" if difference else "reference")
        lines.append(f"| {recipe} | {len(row['seeds'])} | {mean['score']:.1f} [{mean['low']:.1f}, {mean['high']:.1f}]"
                     f" | {compared} | {row.get('step_over_lora', '-')} |")
    lines += ["", "| recipe | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for recipe, row in summary["recipes"].items():
        cells = []
        for target in targets:
            cell = f"{row['accuracy'][target]['score']:.1f}"
            difference = row.get("vs_translate_train", {}).get(target)
            if difference:
                cell += f" ({difference['difference']:+.1f} [{difference['low']:+.1f}, {difference['high']:+.1f}])"
            cells.append(cell)
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    if translations:
        lines += ["", "Machine-translated English of the test verses against the gold English verse (sacreBLEU 13a):",
                  "", "| | " + " | ".join(t for t in targets if t in translations) + " |",
                  "|---|" + "---|" * sum(t in translations for t in targets),
                  *(f"| {label} | " + " | ".join(f"{translations[t][key]:.1f}" for t in targets if t in translations)
                    + " |" for label, key in (("BLEU", "bleu"), ("chrF", "chrf")))]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Each recipe's mean accuracy with its 95 % interval, and every target's accuracy as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(summary["recipes"])
    figure, axis = plt.subplots(figsize=(10, 0.5 * len(recipes) + 1.5))
    for position, recipe in enumerate(recipes):
        accuracy = summary["recipes"][recipe]["accuracy"]
        mean = accuracy["mean"]
        axis.errorbar(mean["score"], position, xerr=[[mean["score"] - mean["low"]], [mean["high"] - mean["score"]]],
                      fmt="o", color="black", capsize=3)
        targets = summary["targets"]
        axis.scatter([accuracy[target]["score"] for target in targets], [position] * len(targets), s=12, alpha=0.5)
    axis.set_yticks(range(len(recipes)), recipes)
    axis.set_xlabel("accuracy (%): mean of targets, 95 % CI (black); each target (dots)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--replicates", type=int, default=2000)
    args = parser.parse_args()
    try:
        results, translations, settings = merged(args.results)
        summary = figures(results, settings, args.replicates)
    except ValueError as error:
        parser.error(str(error))
    text = markdown(summary, translations)
    write_text(args.out / "flare_report.md", text)
    write_json(args.out / "flare_report.json", {"settings": settings, **summary})
    plot(summary, args.out / "flare_report.png")
    print(text)


if __name__ == "__main__":
    main()
