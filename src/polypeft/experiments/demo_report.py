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


def _gain(row: Row) -> str:
    if row.interval is None:
        return f"{row.gain:+.3f}"
    return f"{row.gain:+.2f} [{row.interval[0]:+.2f}, {row.interval[1]:+.2f}]"


def _noise(row: Row) -> str:
    if row.outside_noise is None:
        return "no interval"
    return f"{'yes' if row.outside_noise else 'no, within noise'} ({row.noise})"


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
    lines += ["| method | task | metric | baseline | with method | gain [95 % interval] | outside noise? | "
              "extra parameters train / inference | seconds | full benchmark (sign) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result.rows:
            lines.append(f"| {row.method} | {row.task} | {row.metric} | {row.baseline_name} {_number(row.baseline)} | "
                         f"{_number(row.with_method)} | {_gain(row)} | {_noise(row)} | {row.extra_train} / "
                         f"{row.extra_inference} | {row.seconds:.0f} | {_agreement(row)} |")
    lines += ["", "Gain: with method minus baseline, sign turned so that positive is better (lower CE is better), "
              "with its 95 % interval from a paired bootstrap over the test examples (and the seeds, where a part "
              "runs several); a gain whose interval holds 0 is no gain. Seconds: this run's wall time for that "
              "method's work.", ""]
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
        errors = [[g - r.interval[0] if r.interval else 0.0 for g, r in zip(gains, members)],
                  [r.interval[1] - g if r.interval else 0.0 for g, r in zip(gains, members)]]
        axes.barh(positions, gains, color=colours, xerr=errors, capsize=3, error_kw={"linewidth": 0.8})
        axes.set_yticks(positions, labels, fontsize=8)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.set_xlabel(f"gain over baseline, {name}", fontsize=9)
        limit = max([abs(gain) for gain in gains] + [abs(b) for r in members if r.interval for b in r.interval]) or 1.0
        axes.set_xlim(-1.35 * limit, 1.35 * limit)
        digits = 3 if "cross-entropy" in name else 1
        for position, gain, row in zip(positions, gains, members):
            edge = gain if row.interval is None else (row.interval[1] if gain >= 0 else row.interval[0])
            axes.text(edge, position, f" {gain:+.{digits}f} ", va="center", ha="left" if gain >= 0 else "right",
                      fontsize=8)  # beyond the error bar, so the two never overlap
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
