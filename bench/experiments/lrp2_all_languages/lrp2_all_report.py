"""Analysis and plots of bench/experiments/lrp2_all_languages/lrp2_all_languages.py, from stored per-query outcomes only (no model).

Each variant's choice is made on the valid books by the library's search, then read on John; so is its bootstrap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from polypeft.core.fileio import atomic_write
from polypeft.interventions.search import LayerSearchResult, search_layers

# variant -> (grid, pairs searched, LIRP alone searched); "lirp" with the robust rule is the default search
VARIANTS = {"lirp": ("layers", False, True), "pairs": ("layers", True, False),
            "both": ("both_layers", False, True), "full": ("layers", True, True)}


def numbers(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def cell_name(variant: str, lirp: Optional[int], lsrp: Optional[int]) -> str:
    if lirp is None:
        return "base"
    if lsrp is not None:
        return f"pair:{lirp}:{lsrp}"
    return f"both:{lirp}" if variant == "both" else f"lirp:{lirp}"


def search(valid: dict, languages: list[str], variant: str, args, index: Optional[dict] = None) -> LayerSearchResult:
    """The library's search over one variant's cells, on all valid queries or on a resample (`index`)."""
    grid, pairs, alone = VARIANTS[variant]

    def score(language, lirp, lsrp):
        values = valid[language][cell_name(variant, lirp, lsrp)].double()
        return values if index is None else values[index[language]]

    return search_layers(score, languages, numbers(getattr(args, grid)), numbers(args.lsrp_layers), pairs=pairs,
                         lirp_only=alone, progress=False, rule=args.rule)


def test_gain(test: dict, variant: str, row: dict) -> float:
    """Points of accuracy@1 on John the chosen row adds over the plain encoder (0 for no LRP2)."""
    name = cell_name(variant, row["lirp_layer"], row["lsrp_layer"])
    return 100.0 * float(test[name].float().mean() - test["base"].float().mean())


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean": sum(values) / len(values), "p10": at(0.1), "p90": at(0.9), "min": ordered[0],
            "max": ordered[-1], "negative_share": sum(v < 0 for v in values) / len(values)}


def resampled_choices(valid: dict, languages: list[str], args) -> list[dict]:
    """Each bootstrap resample of the valid queries (per language) and the LIRP-alone rows it chooses:
    a list of {language: (robust row, argmax row)}, in the seeded order `bootstrap` reads."""
    choices = []
    for seed in numbers(args.resample_seeds):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(args.resamples):
            index = {language: torch.randint(len(valid[language]["base"]), (len(valid[language]["base"]),),
                                             generator=generator) for language in languages}
            result = search(valid, languages, "lirp", args, index)
            choices.append({language: (result.best(language), result.best_cell(language)) for language in languages})
    return choices


def test_cells(valid: dict, languages: list[str], args) -> dict[str, set[str]]:
    """Per language, the cells whose John outcomes the analysis reads: the plain model, every variant's robust
    and argmax choice and every bootstrap choice. Only these need scoring on the test book."""
    needed = {language: {"base"} for language in languages}
    for variant in VARIANTS:
        result = search(valid, languages, variant, args)
        for language in languages:
            for row in (result.best(language), result.best_cell(language)):
                needed[language].add(cell_name(variant, row["lirp_layer"], row["lsrp_layer"]))
    for resample in resampled_choices(valid, languages, args):
        for language, rows in resample.items():
            needed[language].update(cell_name("lirp", row["lirp_layer"], row["lsrp_layer"]) for row in rows)
    return needed


def bootstrap(outcomes: dict, languages: list[str], args) -> dict:
    """Resample each language's valid queries, redo the LIRP-alone choice (robust and argmax), read John's gain."""
    gains = {rule: {language: [] for language in languages} for rule in ("robust", "argmax")}
    refused = {language: 0 for language in languages}
    means = {"robust": [], "argmax": []}
    choices = resampled_choices(outcomes["valid"], languages, args)
    for resample in choices:
        for language, (robust, top) in resample.items():
            refused[language] += robust["lirp_layer"] is None
            gains["robust"][language].append(test_gain(outcomes["test"][language], "lirp", robust))
            gains["argmax"][language].append(test_gain(outcomes["test"][language], "lirp", top))
        for rule in means:
            means[rule].append(sum(gains[rule][language][-1] for language in languages) / len(languages))
    total = len(choices)
    return {"resamples": total,
            "per_language": {rule: {language: summary(values) for language, values in by_language.items()}
                             for rule, by_language in gains.items()},
            "refused_share": {language: count / total for language, count in refused.items()},
            "mean_over_languages": {rule: summary(values) for rule, values in means.items()}}


def curve(outcomes: dict, languages: list[str], default: LayerSearchResult, args) -> dict:
    """Mean John gain per vector size and seed, LIRP at the layer the valid books chose with the default vectors;
    'robust' counts a language the default search refused as 0."""
    points = []
    for name in sorted(outcomes["test"][languages[0]], key=lambda n: (len(n), n)):
        if not name.startswith("curve:"):
            continue
        _, size, seed = name.split(":")
        gains = {language: 100.0 * float(outcomes["test"][language][name].float().mean()
                                         - outcomes["test"][language]["base"].float().mean())
                 for language in languages}
        robust = [gains[language] if default.best(language)["lirp_layer"] is not None else 0.0 for language in languages]
        points.append({"sentences": int(size), "seed": int(seed), "per_language": gains,
                       "argmax_mean": sum(gains.values()) / len(gains), "robust_mean": sum(robust) / len(robust)})
    return {"points": sorted(points, key=lambda p: (p["sentences"], p["seed"]))}


def analyse(outcomes: dict, languages: list[str], args) -> dict:
    """Per-language table (baseline, each variant by argmax and by the robust rule), bootstrap and curve."""
    searches = {variant: search(outcomes["valid"], languages, variant, args) for variant in VARIANTS}
    table = {}
    for language in languages:
        test = outcomes["test"][language]
        row = {"baseline": 100.0 * float(test["base"].float().mean()),
               "valid_baseline": 100.0 * searches["lirp"].baseline[language]}
        for variant, result in searches.items():
            robust, top = result.best(language), result.best_cell(language)
            row[variant] = {
                "argmax": {"cell": [top["lirp_layer"], top["lsrp_layer"]], "valid_gain": 100.0 * top["gain"],
                           "test_gain": test_gain(test, variant, top)},
                "robust": {"cell": [robust["lirp_layer"], robust["lsrp_layer"]], "decision": robust["decision"],
                           "reason": robust["reason"], "test_gain": test_gain(test, variant, robust)},
            }
        table[language] = row
    mean = {"baseline": sum(row["baseline"] for row in table.values()) / len(table)}
    for variant in VARIANTS:
        for rule in ("argmax", "robust"):
            values = [row[variant][rule]["test_gain"] for row in table.values()]
            mean[f"{variant}_{rule}"] = sum(values) / len(values)
            mean[f"{variant}_{rule}_worse"] = [lang for lang, row in table.items() if row[variant][rule]["test_gain"] < 0]
    return {"table": table, "table_mean": mean, "searches": {v: r.to_dict() for v, r in searches.items()},
            "bootstrap": bootstrap(outcomes, languages, args), "curve": curve(outcomes, languages, searches["lirp"], args)}


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    result = Figure(figsize=(width, height))
    FigureCanvasAgg(result)
    return result


def save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda temporary: fig.savefig(temporary, format="png", dpi=110))


def plot_all(report: dict, outcomes: dict, languages: list[str], args, out: Path) -> None:
    """gains per language and variant, the vector-size curve, and the full search's heat maps."""
    table, spread = report["table"], report["bootstrap"]["per_language"]["robust"]
    fig = figure(max(7.0, 0.9 * len(languages)), 4.2)
    axes = fig.add_subplot()
    bars = [("lirp", "argmax", "LIRP alone, argmax (old)"), ("lirp", "robust", "LIRP alone, robust (default)"),
            ("pairs", "robust", "LIRP+LSRP, robust"), ("both", "robust", "both sides to mean, robust (beyond paper)")]
    width = 0.8 / len(bars)
    for offset, (variant, rule, label) in enumerate(bars):
        xs = [index + (offset - 1.5) * width for index in range(len(languages))]
        values = [table[language][variant][rule]["test_gain"] for language in languages]
        errors = None
        if (variant, rule) == ("lirp", "robust"):
            errors = [[values[k] - spread[lang]["p10"] for k, lang in enumerate(languages)],
                      [spread[lang]["p90"] - values[k] for k, lang in enumerate(languages)]]
            errors = [[max(0.0, e) for e in side] for side in errors]
        axes.bar(xs, values, width, label=label, yerr=errors, capsize=2)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xticks(range(len(languages)), languages)
    axes.set_ylabel("John acc@1 gain over plain e5 (points)")
    axes.set_title("LRP2 per language, layers chosen on books 45-49 (error bars: robust, bootstrap p10-p90)",
                   fontsize=9)
    low, high = axes.get_ylim()
    axes.set_ylim(low, high + 0.3 * (high - low))  # room for the legend above the bars
    axes.legend(fontsize=7, ncol=2, loc="upper center")
    save(fig, out / "gains_per_language.png")
    points = report["curve"]["points"]
    if points:
        fig = figure(6.0, 4.0)
        axes = fig.add_subplot()
        for key, label, color in (("argmax_mean", "LIRP at argmax layer", "tab:blue"),
                                  ("robust_mean", "robust (refused = 0)", "tab:green")):
            sizes = sorted({p["sentences"] for p in points})
            means = [sum(p[key] for p in points if p["sentences"] == s) / sum(p["sentences"] == s for p in points)
                     for s in sizes]
            axes.plot(sizes, means, marker="o", color=color, label=f"{label}, mean of seeds")
            axes.scatter([p["sentences"] for p in points], [p[key] for p in points], color=color, s=10, alpha=0.5)
        axes.set_xscale("log")
        axes.set_xticks(sorted({p["sentences"] for p in points}), [str(s) for s in sorted({p["sentences"] for p in points})])
        axes.minorticks_off()
        axes.set_xlabel("sentences per language in the language vectors")
        axes.set_ylabel("mean John acc@1 gain (points)")
        axes.set_title(f"Language-vector size, {len(languages)} languages (dots: seeds)", fontsize=9)
        axes.legend(fontsize=7)
        save(fig, out / "vector_size_curve.png")
    full = search(outcomes["valid"], languages, "full", args)
    full.plot_heatmaps(out / "heatmaps", prefix="lrp2_heatmap", metric="valid acc@1 (books 45-49)")


def markdown(report: dict, languages: list[str]) -> str:
    """The per-language table of RESULTS §5 (issue 19): John acc@1 of the plain encoder and each variant's gain (points)."""
    table, spread = report["table"], report["bootstrap"]["per_language"]["robust"]
    cell = lambda c: "none" if c[0] is None else (f"{c[0]}" if c[1] is None else f"{c[0]}+{c[1]}")  # noqa: E731
    lines = ["| language | plain | LIRP argmax (old) | LIRP+LSRP argmax | both sides argmax [beyond paper] | "
             "LIRP robust (default) | its bootstrap p10..p90 | refused in resamples | pairs robust | both robust |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for language in languages:
        row = table[language]
        got = lambda variant, rule: (f"{row[variant][rule]['test_gain']:+.1f} ({cell(row[variant][rule]['cell'])})")  # noqa: E731
        lines.append(
            f"| {language} | {row['baseline']:.1f} | {got('lirp', 'argmax')} | {got('pairs', 'argmax')} | "
            f"{got('both', 'argmax')} | **{got('lirp', 'robust')}** | {spread[language]['p10']:+.1f}..{spread[language]['p90']:+.1f} | "
            f"{100 * report['bootstrap']['refused_share'][language]:.0f} % | {got('pairs', 'robust')} | {got('both', 'robust')} |")
    mean = report["table_mean"]
    boot = report["bootstrap"]["mean_over_languages"]["robust"]
    lines.append(
        f"| **mean** | {mean['baseline']:.1f} | {mean['lirp_argmax']:+.1f} | {mean['pairs_argmax']:+.1f} | "
        f"{mean['both_argmax']:+.1f} | **{mean['lirp_robust']:+.1f}** | {boot['p10']:+.1f}..{boot['p90']:+.1f} | | "
        f"{mean['pairs_robust']:+.1f} | {mean['both_robust']:+.1f} |")
    return "\n".join(lines) + "\n"
