"""FD-Share on verse classification, re-checked: settings chosen on a valid split, the test split scored once.

The earlier +1.27 (RESULTS §4.3 (c)) was picked among settings compared on the test split. Here each method's
trained layers (top 2 or top 4 of e5-small) are chosen on verses held out of training (`score: valid`), naive by
its own accuracy and LMS+FD by FD-Share's; then the chosen settings train with each test seed and score the test
split once. Intervals resample test verses (paired) and seeds. Every run is a folder under OUT, reused when there.

    python bench/fd_classify_recheck.py valid TRIAL METHOD     # TRIAL: top2 | top4; METHOD: naive | lms_fd
    python bench/fd_classify_recheck.py test METHOD SEED       # after every valid run
    python bench/fd_classify_recheck.py report                 # choices, table.md, results.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from polypeft.cli.encoder import ClassifyRecipe, run_classify
from polypeft.core.fileio import write_json, write_text
from polypeft.tasks.confidence import difference_intervals, verdict

# The §4.3 (a)/(c) sizes; 15 % of each section's verses held out of training as the valid split.
BASE = {"languages": ["en", "fr", "es", "de", "ru", "ar", "ko"], "verses_per_section": 300, "steps": 600,
        "test_fraction": 0.3, "valid_fraction": 0.15, "throughput_steps": 0}
TRIALS = {"top2": {"frozen_layers": 10}, "top4": {"frozen_layers": 8}}
METHODS = ("naive", "lms_fd")
CHOSEN_BY = {"naive": "naive", "lms_fd": "lms_fd_share"}  # the variant whose valid accuracy picks the setting
TRIAL_SEED = 100


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("valid", "test", "report"))
    parser.add_argument("names", nargs="*", help="valid: TRIAL METHOD; test: METHOD SEED")
    parser.add_argument("--out", default="bench/experiments/fd_classify_recheck")
    parser.add_argument("--seeds", default="0,1", help="the test seeds the report expects")
    return parser.parse_args(argv)


def classify(folder: Path, **changes) -> dict:
    """One classify run into `folder` (reused when its results are there)."""
    path = folder / "classify.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    recipe = ClassifyRecipe.from_values(**{**BASE, **changes, "output_dir": str(folder)})
    results = run_classify(recipe)
    write_json(path, results)
    return results


def valid_accuracy(results: dict, variant: str) -> float:
    return next(run["accuracy"]["average"] for run in results["runs"] if run["variant"] == variant)


def choices(out: Path, methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Per method, the trial with the best valid accuracy of the variant that chooses it."""
    chosen = {}
    for method in methods:
        scored = {}
        for trial in TRIALS:
            path = out / "valid" / f"{trial}-{method}" / "classify.json"
            if not path.exists():
                raise SystemExit(f"{path} is missing: run `valid {trial} {method}` first")
            scored[trial] = valid_accuracy(json.loads(path.read_text(encoding="utf-8")), CHOSEN_BY[method])
        best = max(scored, key=scored.get)
        chosen[method] = {"trial": best, "valid_accuracy": scored}
    return chosen


def outcomes(out: Path, method: str, variant: str, seeds: list[int]) -> dict[str, list[list[int]]]:
    """Per language, one row of 0/1 test outcomes per seed."""
    rows: dict[str, list[list[int]]] = {}
    for seed in seeds:
        results = json.loads((out / "test" / f"{method}-seed{seed}" / "classify.json").read_text(encoding="utf-8"))
        run = next(r for r in results["runs"] if r["variant"] == variant)
        for lang, values in run["correct"].items():
            rows.setdefault(lang, []).append(values)
    return rows


def report(out: Path, seeds: list[int]) -> str:
    chosen = choices(out)
    reference = outcomes(out, "naive", "naive", seeds)
    share, ls = outcomes(out, "lms_fd", "lms_fd_share", seeds), outcomes(out, "lms_fd", "lms_fd_ls", seeds)
    comparisons = {"FD-Share − naive": difference_intervals(share, reference),
                   "FD-LS − naive": difference_intervals(ls, reference),
                   "FD-Share − FD-LS": difference_intervals(share, ls)}
    langs = list(reference)
    lines = ["| comparison | " + " | ".join(langs) + " | mean [95 % interval] | verdict |",
             "|---|" + "---|" * (len(langs) + 2)]
    for name, result in comparisons.items():
        cells = [f"{result[lang]['difference']:+.2f}" for lang in langs]
        mean = result["mean"]
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {mean['difference']:+.2f} [{mean['low']:+.2f}, {mean['high']:+.2f}] | {verdict(mean)} |")
    accuracy = {name: round(100.0 * sum(sum(map(sum, rows)) / sum(map(len, rows)) for rows in table.values())
                            / len(table), 2) for name, table in (("naive", reference), ("FD-Share", share),
                                                                  ("FD-LS", ls))}
    share_gain, ls_gain = comparisons["FD-Share − naive"]["mean"], comparisons["FD-LS − naive"]["mean"]
    # a share of a gain inside its noise means nothing, so it is given only for a gain whose interval is above 0
    kept = (f"FD-Share keeps {100.0 * share_gain['difference'] / ls_gain['difference']:.0f} % of FD-LS's gain"
            if ls_gain["low"] > 0 else "FD-LS's gain over naive is within noise: no share to keep")
    text = "\n".join([
        f"Choices (valid accuracy, mean of {len(langs)} languages, trial seed {TRIAL_SEED}): "
        + "; ".join(f"{m}: {c['trial']} ({', '.join(f'{t} {a:.2f}' for t, a in c['valid_accuracy'].items())})"
                    for m, c in chosen.items()),
        "", f"Test accuracy, mean of languages and seeds {seeds}: "
        + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()) + f"; {kept}.",
        "", "Differences in accuracy points per language (test split, seeds pooled):", "", *lines, ""])
    write_json(out / "results.json", {"choices": chosen, "seeds": seeds, "accuracy": accuracy,
                                      "comparisons": comparisons})
    write_text(out / "table.md", text)
    return text


def main(argv: list[str]) -> int:
    args = arguments(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.step == "valid":
        trial, method = args.names
        classify(out / "valid" / f"{trial}-{method}", **TRIALS[trial], methods=[method], seeds=[TRIAL_SEED],
                 score="valid")
    elif args.step == "test":
        method, seed = args.names[0], int(args.names[1])
        trial = choices(out, (method,))[method]["trial"]
        classify(out / "test" / f"{method}-seed{seed}", **TRIALS[trial], methods=[method], seeds=[seed])
    else:
        print(report(out, [int(s) for s in args.seeds.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
