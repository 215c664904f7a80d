"""The demo's summary: one table of every method against its baseline (Markdown, JSON) and one figure of the gains.

A reader sees each gain beside the full benchmark's figure, and whether the two agree in sign.
"""
from __future__ import annotations

import platform
import textwrap
from pathlib import Path
from typing import Sequence

from ..core.fileio import atomic_write, write_json, write_text
from .demo_store import PartResult, Row

QUICK_WARNING = "--quick: a smoke run on a handful of verses and steps; its figures are NOT meaningful."


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def _agreement(row: Row) -> str:
    if row.gain == 0:
        return f"{row.full_bench}; no change at this scale"
    if row.agrees_with_full_bench is None:
        return f"{row.full_bench}; no sign to compare"
    return f"{row.full_bench}; {'agrees' if row.agrees_with_full_bench else 'does NOT agree at this scale'}"


def markdown(results: Sequence[PartResult], title: str, quick: bool) -> str:
    lines = [f"## {title}", ""]
    if quick:
        lines += [f"**{QUICK_WARNING}**", ""]
    lines += ["| method | task | metric | baseline | with method | gain | extra parameters train / inference | "
              "seconds | full benchmark (sign) |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result.rows:
            lines.append(f"| {row.method} | {row.task} | {row.metric} | {row.baseline_name} {_number(row.baseline)} | "
                         f"{_number(row.with_method)} | {row.gain:+.3f} | {row.extra_train} / {row.extra_inference} | "
                         f"{row.seconds:.0f} | {_agreement(row)} |")
    lines += ["", "Gain: with method minus baseline, sign turned so that positive is better (lower CE is better). "
              "One seed: no spread. Seconds: this run's wall time for that method's work.", ""]
    for result in results:
        lines += [f"- {note}" for note in result.notes]
    lines += ["", "Wall time per part (s): " + ", ".join(
        f"{r.part} {r.seconds:.0f}{' (reused)' if r.reused else ''}" for r in results)]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[PartResult], path: Path, title: str) -> Path:
    """Horizontal bars of the gains, one panel per unit, labels on the axis (they cannot overlap the bars)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for result in results for row in result.rows]
    panels = {"accuracy / chrF points": [r for r in rows if "CE" not in r.metric],
              "test cross-entropy reduction (nats/token)": [r for r in rows if "CE" in r.metric]}
    panels = {name: members for name, members in panels.items() if members}
    heights = [len(members) for members in panels.values()]
    figure = Figure(figsize=(10, 1.2 + 0.42 * sum(heights) + 0.6 * len(panels)))
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(len(panels), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    for axes, (name, members) in zip(axes_list, panels.items()):
        labels = [f"{row.method}: {row.task.split(', ')[0]} ({row.metric})" for row in members]
        gains = [row.gain for row in members]
        colours = ["tab:green" if gain > 0 else "tab:red" for gain in gains]
        positions = list(range(len(members)))[::-1]
        axes.barh(positions, gains, color=colours)
        axes.set_yticks(positions, labels, fontsize=8)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.set_xlabel(f"gain over baseline, {name}", fontsize=9)
        limit = max(abs(gain) for gain in gains) or 1.0
        axes.set_xlim(-1.35 * limit, 1.35 * limit)
        digits = 3 if "cross-entropy" in name else 1
        for position, gain in zip(positions, gains):
            axes.text(gain, position, f" {gain:+.{digits}f} ", va="center", ha="left" if gain >= 0 else "right",
                      fontsize=8)
    figure.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=10)
    figure.tight_layout()
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


def write_summary(results: Sequence[PartResult], output_dir: str | Path, title: str, quick: bool,
                  name: str = "summary") -> dict:
    """`<name>.md`, `<name>.json` and `<name>.png` (the gains) under `output_dir`; returns the JSON written."""
    output_dir = Path(output_dir)
    text = markdown(results, title, quick)
    summary = {"title": title, "quick": quick, "machine": platform.platform(),
               "parts": [result.as_dict() | {"reused": result.reused} for result in results],
               "rows": [row.as_dict() for result in results for row in result.rows]}
    paths = [output_dir / f"{name}.{suffix}" for suffix in ("md", "json", "png")]
    write_text(paths[0], text)
    write_json(paths[1], summary)
    plot(results, paths[2], title)
    print(text)
    print("written: " + ", ".join(str(path) for path in paths))
    return summary
