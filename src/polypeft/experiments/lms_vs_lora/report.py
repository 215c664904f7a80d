"""The comparison's report: every variant against LoRA with 95 % intervals, the goals met or not, a table, a plot.

Reads only the run folder's per-example scores, so the report can be written again without training anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ...core.fileio import write_json, write_text
from ...tasks.confidence import difference_intervals, verdict
from .protocol import Bed
from .settings import LABELS

# Each variant against which LoRA: its trainable-parameter twin, and FD-Share also against its inference twin.
COMPARISONS = [("lms", "lora_train"), ("fd_ls", "lora_train"), ("fd_share", "lora_train"), ("full", "lora_train"),
               ("lora_infer", "lora_train"), ("fd_share", "lora_infer"), ("lms", "lora_infer")]


def outcomes_by_variant(tests: list[dict]) -> dict[str, dict[str, list[list]]]:
    """variant -> language -> one row of per-example scores per seed (seeds in increasing order)."""
    table: dict[str, dict[str, list[list]]] = {}
    for test in sorted(tests, key=lambda t: t["seed"]):
        for variant, per_language in test["outcomes"].items():
            for lang, values in per_language.items():
                table.setdefault(variant, {}).setdefault(lang, []).append(values)
    return table


def compare(table: dict, variant: str, reference: str, bed: Bed) -> Optional[dict]:
    """The variant minus the reference per language and for the mean over the non-English languages; the English
    check on its own, outside the mean."""
    if variant not in table or reference not in table:
        return None
    settings = bed.settings
    pick = lambda name, langs: {lang: table[name][lang] for lang in langs}  # noqa: E731
    result = difference_intervals(pick(variant, settings.languages), pick(reference, settings.languages),
                                  replicates=settings.bootstrap, statistic=bed.statistic)
    result[bed.english] = difference_intervals(pick(variant, [bed.english]), pick(reference, [bed.english]),
                                               replicates=settings.bootstrap, statistic=bed.statistic)[bed.english]
    for interval in result.values():
        interval["verdict"] = verdict(interval, bed.higher_is_better)
    return result


def goals(comparisons: dict, bed: Bed) -> dict[str, Any]:
    """The three goals, each with its evidence and met / not met (a gain is signed so that > 0 is better)."""
    languages, sign = bed.settings.languages, 1.0 if bed.higher_is_better else -1.0
    result: dict[str, Any] = {}
    lms = comparisons.get("lms - lora_train")
    if lms:
        better = [lang for lang in languages if lms[lang]["verdict"] == "better"]
        ahead = [lang for lang in languages if sign * lms[lang]["difference"] > 0]
        result["lms_beats_lora_equal_trainable"] = {
            "mean": lms["mean"], "languages_interval_better": better, "languages_ahead": ahead,
            "met": lms["mean"]["verdict"] == "better" and len(better) >= 8}
    share, lms_i = comparisons.get("fd_share - lora_infer"), comparisons.get("lms - lora_infer")
    if share and lms_i:
        gain_lms, gain_share = sign * lms_i["mean"]["difference"], sign * share["mean"]["difference"]
        kept = gain_share / gain_lms if gain_lms > 0 else None
        result["fd_share_keeps_70_percent"] = {
            "lms_gain_over_lora_infer": lms_i["mean"], "fd_share_gain_over_lora_infer": share["mean"],
            "kept": None if kept is None else round(kept, 3),
            "met": kept is not None and kept >= 0.7 and lms_i["mean"]["verdict"] == "better"}
    english = {name: comparisons[name][bed.english] for name in ("lms - lora_train", "fd_share - lora_train",
                                                                 "fd_ls - lora_train") if name in comparisons}
    if english:
        result["english_not_worse_than_lora"] = {
            "differences": english, "met": not any(e["verdict"] == "worse" for e in english.values())}
    return result


def score_of(bed: Bed, rows: list) -> float:
    """The mean over seeds of one language's score (accuracy in %, or perplexity)."""
    per_seed = [bed.summary({"one": row}) for row in rows]
    return round(sum(per_seed) / len(per_seed), 3)


def write_report(results: dict, bed: Bed, out: Path, speed: bool = True) -> dict[str, Any]:
    """results.json, table.md and plot.png under `out`, from the run's scores (step times measured anew)."""
    from .speed import merged_fd_share, step_times

    settings = bed.settings
    table = outcomes_by_variant(results["tests"])
    comparisons = {f"{v} - {r}": c for v, r in COMPARISONS if (c := compare(table, v, r, bed)) is not None}
    report = {"settings": settings.as_dict(), "metric": bed.metric, "choices": results["choices"],
              "parameters": {t["method"]: t["parameters"] for t in results["tests"]},
              "base": {lang: score_of(bed, [v]) for lang, v in results["base"]["test"].items()},
              "scores": {variant: {lang: score_of(bed, rows) for lang, rows in per_language.items()}
                         for variant, per_language in table.items()},
              "comparisons": comparisons, "goals": goals(comparisons, bed),
              "train_seconds": {f"{t['method']}-seed{t['seed']}": t["train_seconds"] for t in results["tests"]}}
    if speed:
        depth = max(settings.trained_layers)
        report["step_time"] = step_times(bed, list(settings.methods), depth)
        if "lms_fd" in settings.methods:
            report["fd_share_merged"] = merged_fd_share(bed, depth)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    write_text(out / "table.md", markdown(report, bed))
    plot(report, bed, out / "plot.png")
    return report


def fmt(interval: dict) -> str:
    return f"{interval['difference']:+.2f} [{interval['low']:+.2f}, {interval['high']:+.2f}]"


def markdown(report: dict, bed: Bed) -> str:
    """Scores per variant and language, then each comparison with its intervals, then the goals."""
    settings = bed.settings
    languages = [*settings.languages, bed.english]
    unit = "accuracy points" if bed.statistic == "accuracy" else "% change in perplexity, negative = better"
    lines = [f"{bed.metric} on book {settings.test_book}, mean over seeds {settings.seeds} ({bed.english}: the "
             "English check)", "", "| variant | " + " | ".join(languages) + " | mean (xx) |",
             "|---|" + "---|" * (len(languages) + 1)]
    for variant, scores in [("base", report["base"]), *report["scores"].items()]:
        mean = sum(scores[lang] for lang in settings.languages) / len(settings.languages)
        lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(f"{scores[l]:.1f}" for l in languages)
                     + f" | {mean:.2f} |")
    lines += ["", f"Differences (method - reference, {unit}) with 95 % intervals (test examples and seeds "
              "resampled); * marks an interval that excludes 0:", "",
              "| comparison | mean (xx) | " + " | ".join(languages) + " |", "|---|---|" + "---|" * len(languages)]
    for name, comparison in report["comparisons"].items():
        cells = [f"{comparison[l]['difference']:+.1f}{'' if comparison[l]['verdict'] == 'within noise' else '*'}"
                 for l in languages]
        lines.append(f"| {name} | {fmt(comparison['mean'])} ({comparison['mean']['verdict']}) | "
                     + " | ".join(cells) + " |")
    lines += ["", "Chosen on the valid books: " + "; ".join(
        f"{m}: lr {c['lr']:g}, top {c['trained_layers']} blocks, {c['steps']} steps"
        for m, c in report["choices"].items()),
        "", "Parameters: " + "; ".join(
            f"{m}: {p['trainable']:,} trained, {p['inference_extra']:,} added at inference"
            + (f" ({p['inference_extra_shared']:,} on FD-Share, 0 merged)" if m == "lms_fd" else "")
            for m, p in report["parameters"].items())]
    if "step_time" in report:
        lines.append("Training-step time relative to LoRA at equal trainable parameters (side by side): " + ", ".join(
            f"{m} {r:.2f}x" for m, r in report["step_time"]["ratio"].items()))
    if "fd_share_merged" in report:
        merged = report["fd_share_merged"]
        lines.append(f"FD-Share merged into a plain model: forward {merged['forward_ratio_to_plain']:.2f}x the plain "
                     f"model's; outputs equal to the shared route's within {merged['max_abs_output_diff_to_shared_route']:.1e}")
    lines += ["", "Goals:"] + [f"- {name}: {'met' if goal['met'] else 'NOT met'}"
                               for name, goal in report["goals"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, bed: Bed, path: Path) -> None:
    """Per-language differences to LoRA (equal trainable) with their 95 % intervals, one marker per variant."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    settings = bed.settings
    languages = [*settings.languages, bed.english, "mean"]
    names = [name for name in report["comparisons"] if name.endswith("- lora_train")]
    figure, axis = plt.subplots(figsize=(max(8, len(languages) * 0.8), 4.5))
    width = 0.8 / max(1, len(names))
    for offset, name in enumerate(names):
        comparison = report["comparisons"][name]
        xs = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(languages))]
        ys = [comparison[lang]["difference"] for lang in languages]
        errors = [[y - comparison[l]["low"] for y, l in zip(ys, languages)],
                  [comparison[l]["high"] - y for y, l in zip(ys, languages)]]
        axis.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=LABELS.get(name.split(" - ")[0], name))
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(languages)), languages)
    axis.set_ylabel("acc@1 difference (points)" if bed.statistic == "accuracy" else "perplexity change (%)")
    axis.set_title(f"{bed.metric} on book {settings.test_book}: each method minus LoRA at equal trainable "
                   f"parameters\n(95 % intervals over test examples and {len(settings.seeds)} seeds)", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
