"""Comparison of evaluated runs: mean and spread over seeds, win ratios, a Markdown table, the plot.

The plot is the LMS paper's Figure 1: BLEU gain over the baseline against extra parameters.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev
from typing import Optional, Sequence

from .evaluate import win_ratio
from .significance import paired_against, paired_markdown, paired_test_corpus
from ...core.fileio import atomic_write, file_sha256, write_json, write_text

# A run directory's weights, beside the eval_<split>.json files that score them (run.py writes both).
WEIGHTS_NAME = "model.safetensors"
EVAL_SPLITS = ("test", "valid")


class StaleEvaluationError(ValueError):
    """An evaluation file that does not score the weights now in its run directory."""


def load_results(paths: Sequence[str | Path], split: str = "test") -> list[dict]:
    """The evaluation JSON of each run directory (or of each JSON file given directly)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"load_results: split={split!r}; choose one of {list(EVAL_SPLITS)}")
    results = []
    for path in paths:
        path = Path(path)
        file = path if path.is_file() else path / f"eval_{split}.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: run `polypeft mmt eval` on {path} first")
        try:
            result = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not an evaluation written by `polypeft mmt eval` ({error}); pass run "
                             "directories or their eval_<split>.json files") from error
        if not isinstance(result, dict) or "variants" not in result:
            raise ValueError(f"{file} is not an evaluation written by `polypeft mmt eval`: it has no 'variants'")
        check_current(file, result)
        results.append(result)
    return results


def labelled_run(argument: str) -> tuple[Optional[str], str]:
    """`NAME=RUN` -> (NAME, RUN): the run's row name in a comparison, so seeds of one method built under different
    names (a cached build's name carries its seed's key) share a row; a plain RUN (or an existing path) keeps its own."""
    label, sep, path = argument.partition("=")
    if not sep or Path(argument).exists():
        return None, argument
    label = label.strip()
    if not label or not path:
        raise ValueError(f"run {argument!r}: write NAME=RUN (a row name, '=', a run directory or eval JSON file), "
                         "e.g. naive=runs/warm-e5-seed1, or the run alone")
    return label, path


def load_labelled(arguments: Sequence[str], split: str = "test") -> list[dict]:
    """load_results over RUN or NAME=RUN arguments, each NAME replacing its run's own name."""
    labelled = [labelled_run(argument) for argument in arguments]
    results = load_results([path for _, path in labelled], split)
    return [{**result, "name": label} if label else result for (label, _), result in zip(labelled, results)]


def check_current(file: Path, result: dict) -> None:
    """Refuse an evaluation whose run directory now holds other weights than the ones it scored.

    A JSON file away from any run (no weights beside it) is taken as it is: there is nothing to check.
    """
    weights = file.parent / WEIGHTS_NAME
    if not weights.is_file():
        return
    scored = result.get("weights_sha256")
    if scored is None:
        raise StaleEvaluationError(f"{file} does not record which weights it scored (written before evaluations "
                                   f"did): run `polypeft mmt eval {file.parent}` again")
    if scored != file_sha256(weights):
        raise StaleEvaluationError(f"{file} scored other weights than {weights} holds now (the run was trained "
                                   f"again since): run `polypeft mmt eval {file.parent}` again")


def run_label(result: dict, variant: str) -> str:
    return result["name"] if variant == "default" else f"{result['name']} ({variant.replace('_', '-')})"


def _inference_extra(result: dict, variant: str) -> int:
    params = result["parameters"]
    if variant == "fd_share":
        return params["inference_extra_shared_route"]
    return params["inference_extra_language_routes"]


def compare(results: Sequence[dict], baseline: str, paired_tests: bool = True) -> dict:
    """Rows per (run name, variant): metric means and spreads over seeds, parameters, win ratio, and the difference
    to the baseline paired verse by verse (`paired_against`; `paired_tests` adds sacreBLEU's tests, which read the
    references back from the corpus)."""
    grouped: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for result in results:
        for variant in result["variants"]:
            grouped[run_label(result, variant)].append((result, variant))
    if baseline not in grouped:
        raise ValueError(f"baseline {baseline!r} is not among the runs: {sorted(grouped)}")
    base_by_seed = {r["seed"]: r["variants"][v]["directions"] for r, v in grouped[baseline]}
    rows = {}
    for label, members in grouped.items():
        averages = defaultdict(list)
        for result, variant in members:
            for key, value in result["variants"][variant]["averages"].items():
                if value is not None:
                    averages[key].append(value)
        wins = [win_ratio(r["variants"][v]["directions"], base_by_seed[r["seed"]])
                for r, v in members if r["seed"] in base_by_seed]
        first, variant = members[0]
        per_direction = {"bleu": defaultdict(list), "chrf": defaultdict(list)}
        for result, v in members:
            for name, scores in result["variants"][v]["directions"].items():
                for metric, values in per_direction.items():
                    values[name].append(scores[metric])
        rows[label] = {
            "seeds": sorted(r["seed"] for r, _ in members),
            "averages": {k: {"mean": round(mean(v), 2), "std": round(pstdev(v), 2)} for k, v in averages.items()},
            **{f"{metric}_per_direction": {k: round(mean(v), 2) for k, v in sorted(values.items())}
               for metric, values in per_direction.items()},
            "win_ratio_vs_baseline": round(mean(wins), 3) if wins else None,
            "training_extra": first["parameters"]["training_extra"],
            "inference_extra": _inference_extra(first, variant),
            "base": first["parameters"]["base"],
        }
    base_bleu = rows[baseline]["averages"]["bleu_all"]["mean"]
    for row in rows.values():
        row["bleu_gain"] = round(row["averages"]["bleu_all"]["mean"] - base_bleu, 2)
    tests = paired_test_corpus() if paired_tests else None
    for label, members in grouped.items():
        if label != baseline:
            rows[label]["paired"] = paired_against(members, grouped[baseline], tests)
    return {"baseline": baseline, "rows": rows}


def markdown(comparison: dict, pivot: str = "en") -> str:
    rows = comparison["rows"]
    lines = [
        f"| run | seeds | BLEU {pivot}→xx | BLEU xx→{pivot} | BLEU avg | gain | chrF avg | win ratio | extra train | extra infer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict, key: str) -> str:
        value = row["averages"].get(key)
        return f"{value['mean']:.2f} ± {value['std']:.2f}" if value else "–"

    for label, row in rows.items():
        win = "–" if row["win_ratio_vs_baseline"] is None else f"{row['win_ratio_vs_baseline']:.2f}"
        lines.append(
            f"| {label} | {','.join(map(str, row['seeds']))} | {cell(row, f'bleu_{pivot}_xx')} | "
            f"{cell(row, f'bleu_xx_{pivot}')} | {cell(row, 'bleu_all')} | {row['bleu_gain']:+.2f} | "
            f"{cell(row, 'chrf_all')} | {win} | {row['training_extra']:,} | {row['inference_extra']:,} |"
        )
    directions = sorted({d for row in rows.values() for d in row["bleu_per_direction"]})
    for metric, title in (("bleu", "BLEU"), ("chrf", "chrF")):
        lines += ["", f"{title} per direction (mean over seeds):", "",
                  "| run | " + " | ".join(directions) + " |", "|---|" + "---|" * len(directions)]
        for label, row in rows.items():
            scores = row[f"{metric}_per_direction"]
            lines.append(f"| {label} | " + " | ".join(f"{scores.get(d, float('nan')):.2f}" for d in directions) + " |")
    return "\n".join(lines + paired_markdown(comparison)) + "\n"


def plot_gain_vs_parameters(comparison: dict, path: str | Path, title: Optional[str] = None) -> Path:
    """BLEU gain over the baseline against extra inference parameters, one point per run with its spread over
    seeds; the title names the directions and seeds (and whatever `title` adds: dataset, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison["rows"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    right_half = max((row["inference_extra"] for row in rows.values()), default=0) / 2
    for index, (label, row) in enumerate(rows.items()):
        extra = row["inference_extra"] / 1e6
        spread = row["averages"]["bleu_all"]["std"]
        axes.errorbar(extra, row["bleu_gain"], yerr=spread, fmt="o", capsize=3)
        # Labels on alternating sides of their point and inward from the edges, so none overlaps or is cut.
        leftward = row["inference_extra"] > right_half
        offset = (-6 if leftward else 6, 8 if index % 2 else -12)
        axes.annotate(label, (extra, row["bleu_gain"]), textcoords="offset points", xytext=offset, fontsize=8,
                      ha="right" if leftward else "left")
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.margins(x=0.15, y=0.2)
    axes.set_xlabel("extra inference parameters (millions)")
    axes.set_ylabel(f"BLEU gain over {comparison['baseline']} (mean ± std over seeds)")
    directions = sorted({d for row in rows.values() for d in row["bleu_per_direction"]})
    seeds = sorted({len(row["seeds"]) for row in rows.values()})
    heading = f"BLEU gain against parameter cost: {len(directions)} directions, {'/'.join(map(str, seeds))} seed(s)"
    axes.set_title(heading + (f"\n{title}" if title else ""), fontsize=10)
    figure.tight_layout()
    try:
        return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    finally:
        plt.close(figure)


def write_comparison(results: Sequence[dict], baseline: str, out_dir: str | Path, pivot: str = "en",
                     title: Optional[str] = None, paired_tests: bool = True) -> dict:
    comparison = compare(results, baseline, paired_tests)
    out_dir = Path(out_dir)
    write_json(out_dir / "comparison.json", comparison)
    write_text(out_dir / "comparison.md", markdown(comparison, pivot))
    plot_gain_vs_parameters(comparison, out_dir / "bleu_gain_vs_parameters.png", title)
    return comparison
