"""The warm-start build in one table and one plot: each option's validation curve, and the chosen run's test BLEU
and chrF per direction with 95 % intervals (verses resampled), from the run folders alone.

Usage: python bench/warm_start_report.py --chosen RUN_DIR --options RUN_DIR [RUN_DIR ...] --out DIR
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from polypeft.core.fileio import write_text
from polypeft.tasks.confidence import bleu_intervals
from polypeft.training.loop import LOG_NAME


def validation_curve(run_dir: Path) -> dict[int, float]:
    """Step -> validation CE, from the run's training log."""
    curve = {}
    for line in (run_dir / LOG_NAME).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "valid_loss" in row:
            curve[int(row["step"])] = float(row["valid_loss"])
    return curve


def report(chosen: Path, options: list[Path], out: Path, scored: str = "eval_test.json") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {run.name: validation_curve(run) for run in options}
    steps = sorted({step for curve in curves.values() for step in curve})
    lines = ["| step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    lines += [f"| {step} | " + " | ".join(f"{curve[step]:.3f}" if step in curve else "" for curve in curves.values())
              + " |" for step in steps]
    evaluated = json.loads((chosen / scored).read_text(encoding="utf-8"))
    scores = evaluated["variants"]["default"]
    intervals = bleu_intervals(scores["sentences"], evaluated["pivot"], replicates=2000)
    lines += ["", f"Test ({chosen.name}, beam search, sacreBLEU 13a; 95 % intervals with the verses resampled):", "",
              "| direction | verses | BLEU | 95 % interval | chrF |", "|---|---|---|---|---|"]
    for direction, found in intervals["directions"].items():
        measured = scores["directions"][direction]
        lines.append(f"| {direction} | {measured['sentences']} | {measured['bleu']:.2f} | "
                     f"[{found['low']:.2f}, {found['high']:.2f}] | {measured['chrf']:.2f} |")
    for group in ("xx_en", "en_xx"):
        if group in intervals:
            found = intervals[group]
            lines.append(f"| mean {group} | | {found['score']:.2f} | [{found['low']:.2f}, {found['high']:.2f}] | "
                         f"{scores['averages'][f'chrf_{group}']:.2f} |")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        left.plot(list(curve), list(curve.values()), marker="o", label=name)
    left.set(xlabel="step", ylabel="validation CE (Ephesians)", title="Options, validation book")
    left.legend()
    names = list(intervals["directions"])
    points = [intervals["directions"][n]["score"] for n in names]
    errors = [[p - intervals["directions"][n]["low"] for n, p in zip(names, points)],
              [intervals["directions"][n]["high"] - p for n, p in zip(names, points)]]
    right.bar(names, points, yerr=errors, capsize=4)
    right.axhline(10, color="grey", linestyle="--", label="target mean xx->en")
    right.set(ylabel="BLEU (John)", title=f"{chosen.name}: test, 95 % intervals")
    right.legend()
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / "warm_start.png", dpi=110)
    text = "\n".join(lines) + "\n"
    write_text(out / "warm_start.md", text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chosen", required=True, type=Path)
    parser.add_argument("--options", nargs="+", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scored", default="eval_test.json",
                        help="the chosen run's eval JSON to report (e.g. eval_test_books-43.json, `mmt eval --books 43`)")
    args = parser.parse_args()
    print(report(args.chosen, args.options, args.out, args.scored))


if __name__ == "__main__":
    main()
