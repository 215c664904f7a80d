"""Analysis of bench/lrp2_rule_power.py from stored per-query outcomes only (no model): the rules on seeded subsets.

Each subset's choice is made by the library's search (each rule of choice.RULES) and judged by the chosen cell's gain
on John, where every cell is scored; John chooses nothing.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from polypeft.core.fileio import atomic_write
from polypeft.interventions.search import search_layers

RULES = ("split", "bonferroni", "maxt", "argmax")  # argmax: the best cell on the subset, kept unchecked (the old search)
LABELS = {"split": "split (default)", "bonferroni": "Bonferroni", "maxt": "max-t (sign flips)",
          "argmax": "argmax, unchecked (old)"}


def numbers(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def john_truth(test: dict, layers: list[int], resamples: int = 2000, seed: int = 0) -> dict:
    """Per cell: John gain over the plain encoder (points) with a paired bootstrap 95 % interval over John's queries,
    and its class: "gain" (interval above 0), "loss" (gain <= 0) or "unclear" (above 0, interval reaching 0)."""
    base = test["base"].double()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(base), (resamples, len(base)), generator=generator)
    truth = {}
    for layer in layers:
        differences = 100.0 * (test[f"lirp:{layer}"].double() - base)
        means = differences[index].mean(1)
        low, high = float(means.quantile(0.025)), float(means.quantile(0.975))
        gain = float(differences.mean())
        kind = "gain" if low > 0 else ("loss" if gain <= 0 else "unclear")
        truth[layer] = {"gain": gain, "low": low, "high": high, "class": kind}
    return truth


def subset_searches(valid: dict, languages: list[str], layers: list[int], size: int, draws: int, seed: int):
    """For each draw: the subset drawn per language (sorted, so the interleaved halves stay spread over the books)
    and the library's search on it, once per rule (the outcomes are read once, the rule swapped after)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + size)
    for _ in range(draws):
        chosen = {}
        for language in languages:
            pool = len(valid[language]["base"])
            if size > pool:
                raise ValueError(f"validation size {size} exceeds the pool of {pool} queries for {language!r}")
            chosen[language] = torch.randperm(pool, generator=generator)[:size].sort().values

        def score(language, lirp, lsrp):
            name = "base" if lirp is None else f"lirp:{lirp}"
            return valid[language][name][chosen[language]].double()

        split = search_layers(score, languages, layers, pairs=False, lirp_only=True, progress=False, rule="split")
        yield {"split": split, "bonferroni": dataclasses.replace(split, rule="bonferroni"),
               "maxt": dataclasses.replace(split, rule="maxt")}


def decisions(searches: dict, language: str) -> dict[str, Optional[int]]:
    """The LIRP layer each rule keeps for `language` (None: no LRP2)."""
    return {"split": searches["split"].best(language)["lirp_layer"],
            "bonferroni": searches["bonferroni"].best(language)["lirp_layer"],
            "maxt": searches["maxt"].best(language)["lirp_layer"],
            "argmax": searches["split"].best_cell(language)["lirp_layer"]}


def rates(kept: list[Optional[int]], truth: dict) -> dict:
    """Shares of draws keeping a real gain, a loss, an unclear cell or nothing, and the mean John gain delivered."""
    total = len(kept)
    kind = lambda layer: "none" if layer is None else truth[layer]["class"]  # noqa: E731
    return {"power": sum(kind(layer) == "gain" for layer in kept) / total,
            "false_keep": sum(kind(layer) == "loss" for layer in kept) / total,
            "unclear_keep": sum(kind(layer) == "unclear" for layer in kept) / total,
            "refused": sum(layer is None for layer in kept) / total,
            "john_gain": sum(0.0 if layer is None else truth[layer]["gain"] for layer in kept) / total,
            "layers": {str(layer): kept.count(layer) for layer in sorted(set(kept), key=lambda v: (v is None, v))}}


def analyse(outcomes: dict, languages: list[str], args) -> dict:
    """Truth on John, then per validation size and rule: per-language and pooled power, false-keep and John gain."""
    layers = numbers(args.layers)
    truth = {language: john_truth(outcomes["test"][language], layers) for language in languages}
    with_gain = [language for language in languages if any(c["class"] == "gain" for c in truth[language].values())]
    without_gain = [language for language in languages if language not in with_gain]
    per_size = {}
    for size in numbers(args.sizes):
        kept = {rule: {language: [] for language in languages} for rule in RULES}
        draw_means = {rule: {"power": [], "false_keep": [], "john_gain": []} for rule in RULES}
        for searches in subset_searches(outcomes["valid"], languages, layers, size, args.draws, args.seed):
            for language in languages:
                for rule, layer in decisions(searches, language).items():
                    kept[rule][language].append(layer)
            for rule in RULES:  # this draw's pooled figures, for the Monte-Carlo error of the pooled means
                draw = {language: rates(kept[rule][language][-1:], truth[language]) for language in languages}
                draw_means[rule]["power"].append(sum(draw[lang]["power"] for lang in with_gain) / max(1, len(with_gain)))
                draw_means[rule]["false_keep"].append(sum(draw[lang]["false_keep"] for lang in languages) / len(languages))
                draw_means[rule]["john_gain"].append(sum(draw[lang]["john_gain"] for lang in languages) / len(languages))
        per_size[str(size)] = {}
        for rule in RULES:
            by_language = {language: rates(kept[rule][language], truth[language]) for language in languages}
            pooled = {}
            for name, values in draw_means[rule].items():
                series = torch.tensor(values, dtype=torch.float64)
                pooled[name] = float(series.mean())
                pooled[f"{name}_mc_se"] = float(series.std() / len(series) ** 0.5) if len(series) > 1 else 0.0
            pooled["false_keep_no_gain_languages"] = (
                sum(by_language[lang]["false_keep"] for lang in without_gain) / len(without_gain) if without_gain else None)
            per_size[str(size)][rule] = {"pooled": pooled, "per_language": by_language}
    oracle = {language: max(0.0, max(c["gain"] for c in truth[language].values())) for language in languages}
    pool = {language: len(outcomes["valid"][language]["base"]) for language in languages}
    summary = {size: {rule: {key: round(value, 4) for key, value in result["pooled"].items() if value is not None}
                      for rule, result in by_rule.items()} for size, by_rule in per_size.items()}
    return {"truth": {language: {str(k): v for k, v in cells.items()} for language, cells in truth.items()},
            "languages_with_a_real_gain": with_gain, "languages_without_a_real_gain": without_gain,
            "best_john_gain": oracle, "per_size": per_size, "summary": summary, "pool": pool,
            "pool_share": {str(size): round(size / min(pool.values()), 3) for size in numbers(args.sizes)},
            "definitions": {
                "real gain": "John gain's paired bootstrap 95 % interval (2,000 resamples of John's queries) above 0",
                "power": "share of draws keeping a cell with a real gain, averaged over the languages that have one",
                "false_keep": "share of draws keeping a cell whose John gain is <= 0, averaged over all languages",
                "john_gain": "John gain (points) of the kept cell, 0 where refused, averaged over draws and languages",
                "mc_se": "Monte-Carlo standard error over the draws of the pooled figure",
                "pool_share": "validation size / pool: the share of its verses two draws of that size have in common "
                              "on average (drawn without replacement); near 1 every draw is the pool itself, and the "
                              "figures describe this pool's decisions more than fresh validation sets'"}}


def compare_with_earlier(outcomes: dict, folder: Optional[Path], languages: list[str]) -> Optional[dict]:
    """Where an earlier run stored John outcomes of the same cells (Result C), the share of queries that agree."""
    if folder is None or not folder.is_dir():
        return None
    from safetensors.torch import load_file

    agreement = {}
    for language in languages:
        path = folder / f"test_{language}.safetensors"
        if not path.exists():
            continue
        earlier = load_file(str(path))
        agreement[language] = {name: float((earlier[name] == values).double().mean())
                               for name, values in outcomes["test"][language].items()
                               if name in earlier and earlier[name].shape == values.shape}
    return agreement


def markdown(report: dict, languages: list[str]) -> str:
    """The tables of RESULTS §5: pooled figures per size and rule, then per language at each size."""
    lines = ["| validation verses per language | rule | power | false-keep (all languages) | false-keep (languages without a real gain) "
             "| mean John gain delivered (points) | refused |", "|---|---|---|---|---|---|---|"]
    for size, by_rule in report["per_size"].items():
        for rule in RULES:
            pooled = by_rule[rule]["pooled"]
            refused = sum(r["refused"] for r in by_rule[rule]["per_language"].values()) / len(languages)
            no_gain = pooled["false_keep_no_gain_languages"]
            lines.append(f"| {size} | {LABELS[rule]} | {100 * pooled['power']:.1f} % | {100 * pooled['false_keep']:.1f} % | "
                         f"{'n/a' if no_gain is None else f'{100 * no_gain:.1f} %'} | {pooled['john_gain']:+.2f} | "
                         f"{100 * refused:.0f} % |")
    best = report["best_john_gain"]
    shares = ", ".join(f"{size}: {share:.2f}" for size, share in report["pool_share"].items())
    lines += ["", f"Best John gain available (oracle): mean {sum(best.values()) / len(best):+.2f} points.",
              f"Validation pool: {min(report['pool'].values())}-{max(report['pool'].values())} verses per language; "
              f"size / pool (verses two draws share): {shares}.", "",
              "Per language: John truth of each rule's kept cell, as power / false-keep / mean John gain (points), "
              "split \\| Bonferroni \\| max-t.", "",
              "| language | best cell on John | " + " | ".join(report["per_size"]) + " |",
              "|---|---|" + "---|" * len(report["per_size"])]
    for language in languages:
        cells = report["truth"][language]
        top = max(cells, key=lambda layer: cells[layer]["gain"])
        row = [language, f"{top}: {cells[top]['gain']:+.1f} ({cells[top]['low']:+.1f}..{cells[top]['high']:+.1f})"]
        for by_rule in report["per_size"].values():
            row.append(" \\| ".join(
                f"{100 * got['power']:.0f}/{100 * got['false_keep']:.0f}/{got['john_gain']:+.1f}"
                for got in (by_rule[rule]["per_language"][language] for rule in ("split", "bonferroni", "maxt"))))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Power, false-keep and mean John gain against the validation size, one line per rule (bars: 95 % MC error)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12.0, 3.8))
    FigureCanvasAgg(figure)
    sizes = [int(size) for size in report["per_size"]]
    styles = {"split": ("tab:green", "o"), "bonferroni": ("tab:blue", "s"), "maxt": ("tab:purple", "D"),
              "argmax": ("tab:grey", "^")}
    panels = [("power", "power (keeps a real John gain)", 100.0),
              ("false_keep", "false-keep (keeps a John loss)", 100.0),
              ("john_gain", "mean John gain delivered (points)", 1.0)]
    for column, (key, title, scale) in enumerate(panels):
        axes = figure.add_subplot(1, 3, column + 1)
        for rule in RULES:
            if rule == "argmax" and key == "power":
                continue  # argmax keeps something every time: its "power" says nothing about the rule's power
            color, marker = styles[rule]
            pooled = [report["per_size"][str(size)][rule]["pooled"] for size in sizes]
            axes.errorbar(sizes, [scale * p[key] for p in pooled], yerr=[1.96 * scale * p[f"{key}_mc_se"] for p in pooled],
                          color=color, marker=marker, capsize=3, label=LABELS[rule])
        if key == "false_keep":
            axes.axhline(5.0, color="tab:red", linestyle=":", label="alpha 5 %")
        if key == "john_gain":
            best = report["best_john_gain"]
            axes.axhline(sum(best.values()) / len(best), color="black", linestyle="--", label="best cell per language")
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.set_xlabel("validation verses per language")
        axes.set_ylabel(title if key == "john_gain" else f"{title}, %")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=7)
    figure.suptitle(f"LRP2 layer choice (LIRP at layers {report['args']['layers']}), {len(report['truth'])} languages, "
                    f"{report['args']['draws']} draws per size; truth: John, every verse", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
