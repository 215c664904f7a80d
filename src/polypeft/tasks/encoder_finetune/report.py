"""An encoder fine-tuning experiment's results as Markdown: accuracy, parameters, throughput.

The JSON results hold the same figures; this is for people.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def markdown_report(results: Mapping[str, Any]) -> str:
    """Accuracy tables (mean ± std over seeds per language) and the parameter table, as Markdown."""
    lines = [f"## {results['name']}: trained on {', '.join(results['train_languages'])}", ""]
    langs = list(results["languages"]) + ["average"]
    lines.append("| variant | " + " | ".join(langs) + " |")
    lines.append("|---|" + "---|" * len(langs))
    for variant, per_lang in results["summary"].items():
        cells = [f"{per_lang[l]['mean']:.2f} ± {per_lang[l]['std']:.2f}" if l in per_lang else "–" for l in langs]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in results["runs"]})
    split = results.get("scored_split", "test")
    lines += ["", f"Accuracy in % on the {split} split, mean ± std over seeds {seeds}.", ""]
    lines += ["| variant | base | trainable | training extra | inference extra | inference extra % |",
              "|---|---|---|---|---|---|"]
    for variant, p in results["parameters"].items():
        lines.append(f"| {variant} | {p['base']:,} | {p['trainable']:,} | {p['training_extra']:,} | "
                     f"{p['inference_extra']:,} | {p['inference_extra_percent']:.3f} |")
    if "throughput" in results:
        t = results["throughput"]
        lines += ["", f"Training throughput ({t['steps']} interleaved steps of {t['batch_size']} mixed-language "
                  "examples):", "", "| method | examples/s | relative |", "|---|---|---|"]
        for name, rate in t["examples_per_s"].items():
            lines.append(f"| {name} | {rate} | {t['relative'][name]:.3f} |")
    return "\n".join(lines) + "\n"
