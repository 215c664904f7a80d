"""The LRP2 layer search: score every (LIRP layer, LSRP layer) pair per language and keep the best.

Results go to JSON and to one heat map per language.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.fileio import atomic_write, single_path_component
from .capture import InterventionError
from .lrp2 import LRP2, LanguageVectors

ScoreFn = Callable[[str, Optional[int], Optional[int]], float]


@dataclass
class LayerSearchResult:
    """Scores of every (language, lirp_layer, lsrp_layer) tried; lsrp_layer None is LIRP only."""

    rows: list[dict]
    baseline: dict[str, float]
    higher_is_better: bool = True

    @property
    def languages(self) -> list[str]:
        return sorted({row["language"] for row in self.rows})

    def best(self, language: str, lirp_only: bool = False) -> dict:
        """The best row of one language (optionally among LIRP-only rows), with its gain over no LRP2."""
        rows = [
            row for row in self.rows
            if row["language"] == language and (not lirp_only or row["lsrp_layer"] is None)
        ]
        if not rows:
            raise InterventionError(f"no search results for language {language!r}; searched {self.languages}")
        sign = 1.0 if self.higher_is_better else -1.0
        chosen = max(rows, key=lambda row: sign * row["score"])
        result = dict(chosen)
        if language in self.baseline:
            result["baseline"] = self.baseline[language]
            result["gain"] = chosen["score"] - self.baseline[language]
        return result

    def best_per_language(self, lirp_only: bool = False) -> dict[str, dict]:
        return {language: self.best(language, lirp_only) for language in self.languages}

    def to_dict(self) -> dict:
        return {
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "best": self.best_per_language(),
            "best_lirp_only": self.best_per_language(lirp_only=True)
            if any(row["lsrp_layer"] is None for row in self.rows) else {},
            "rows": self.rows,
        }

    def save_json(self, path: Union[str, os.PathLike]) -> Path:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        return atomic_write(path, lambda temporary: Path(temporary).write_text(text + "\n", encoding="utf-8"))

    def plot_heatmaps(self, directory: Union[str, os.PathLike], prefix: str = "lrp2_heatmap",
                      metric: str = "score") -> list[Path]:
        """One PNG per language: rows LIRP layer i, columns LSRP layer j plus a LIRP-only column, coloured by
        `metric`; a search over LIRP alone (one column) is drawn as bars against the no-LRP2 baseline instead."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        directory = Path(directory)
        paths = []
        for language in self.languages:
            rows = [row for row in self.rows if row["language"] == language]
            lirp_layers = sorted({row["lirp_layer"] for row in rows})
            lsrp_layers = sorted({row["lsrp_layer"] for row in rows if row["lsrp_layer"] is not None})
            has_lirp_only = any(row["lsrp_layer"] is None for row in rows)
            columns: list[Optional[int]] = list(lsrp_layers) + ([None] if has_lirp_only else [])
            grid = torch.full((len(lirp_layers), len(columns)), math.nan)
            for row in rows:
                grid[lirp_layers.index(row["lirp_layer"]), columns.index(row["lsrp_layer"])] = row["score"]
            figure = Figure(figsize=(max(4.8, 1.6 + 0.6 * len(columns)), max(3.4, 1.4 + 0.45 * len(lirp_layers))))
            FigureCanvasAgg(figure)
            axes = figure.add_subplot()
            if len(columns) == 1:  # LIRP alone: bars show the differences a one-column colour grid hides
                axes.bar(range(len(lirp_layers)), grid[:, 0].numpy(), color="tab:blue")
                if language in self.baseline:
                    axes.axhline(self.baseline[language], color="grey", linestyle="--", label="without LRP2")
                    axes.legend(fontsize=8)
                axes.set_xticks(range(len(lirp_layers)), [str(layer) for layer in lirp_layers])
                axes.set_xlabel("LIRP layer i (LIRP only)")
                axes.set_ylabel(metric)
            else:
                image = axes.imshow(grid.numpy(), cmap="viridis", aspect="auto")
                figure.colorbar(image, ax=axes, label=metric)
                axes.set_xticks(range(len(columns)), [("none" if c is None else str(c)) for c in columns])
                axes.set_yticks(range(len(lirp_layers)), [str(layer) for layer in lirp_layers])
                axes.set_xlabel("LSRP layer j (none = LIRP only)")
                axes.set_ylabel("LIRP layer i")
            best = self.best(language)
            title = f"LRP2 {language}: best i={best['lirp_layer']}, j={best['lsrp_layer']}"
            if language in self.baseline:
                title += f"\n{metric} {best['score']:.3f} vs {self.baseline[language]:.3f} without"
            axes.set_title(title, fontsize=9)
            if grid.numel() <= 400 and len(columns) > 1:
                for r in range(grid.shape[0]):
                    for c in range(grid.shape[1]):
                        if not math.isnan(grid[r, c]):
                            axes.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=6, color="w")
            figure.tight_layout()
            path = directory / single_path_component(f"{prefix}_{language}.png", "file name", "LRP2 heat map")
            atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))
            paths.append(path)
        return paths


def search_layers(
    score_fn: ScoreFn,
    languages: Sequence[str],
    candidate_layers: Sequence[int],
    candidate_lsrp_layers: Optional[Sequence[int]] = None,
    pairs: bool = True,
    lirp_only: bool = True,
    baseline: bool = True,
    higher_is_better: bool = True,
    progress: bool = True,
) -> LayerSearchResult:
    """Score `score_fn(language, i, j)` over the grid and keep the best per language.

    The grid is every (i, j) with i from `candidate_layers`, j from `candidate_lsrp_layers`
    (default the same) and j > i when `pairs`, plus (i, None) for LIRP only when `lirp_only`;
    `baseline` also scores (None, None), the model without LRP2. `lrp2_scorer` builds a score_fn.
    """
    if not languages:
        raise InterventionError("search_layers: no languages given")
    if not candidate_layers:
        raise InterventionError("search_layers: candidate_layers is empty")
    if not pairs and not lirp_only:
        raise InterventionError("search_layers: pairs=False and lirp_only=False leaves nothing to search")
    lsrp_candidates = list(candidate_lsrp_layers if candidate_lsrp_layers is not None else candidate_layers)
    grid: list[tuple[int, Optional[int]]] = []
    for i in candidate_layers:
        if lirp_only:
            grid.append((i, None))
        if pairs:
            grid.extend((i, j) for j in lsrp_candidates if j > i)
    if not grid:
        raise InterventionError(
            f"search_layers: no pair j > i between {list(candidate_layers)} and {lsrp_candidates}"
        )
    rows: list[dict] = []
    baselines: dict[str, float] = {}
    total = len(languages) * (len(grid) + (1 if baseline else 0))
    with tqdm(total=total, desc="LRP2 layer search", disable=not progress) as bar:
        for language in languages:
            if baseline:
                baselines[language] = float(score_fn(language, None, None))
                bar.update(1)
            for i, j in grid:
                rows.append({"language": language, "lirp_layer": i, "lsrp_layer": j, "score": float(score_fn(language, i, j))})
                bar.update(1)
    return LayerSearchResult(rows=rows, baseline=baselines, higher_is_better=higher_is_better)


def lrp2_scorer(
    model: nn.Module,
    vectors: LanguageVectors,
    evaluate: Callable[[str, Optional[LRP2]], float],
    pivot: str = "en",
    stack: Optional[str] = None,
) -> ScoreFn:
    """A score_fn that runs `evaluate(language, lrp2)` with LRP2 at (i, j) on (lrp2 None: without).

    The hooks start with `language` set for every example; an evaluation that also encodes pivot
    text (retrieval candidates) calls `lrp2.set_languages(pivot)` around those batches.
    """

    def score(language: str, lirp_layer: Optional[int], lsrp_layer: Optional[int]) -> float:
        if lirp_layer is None:
            return evaluate(language, None)
        with LRP2(model, vectors, lirp_layer, lsrp_layer, pivot=pivot, stack=stack) as lrp2:
            lrp2.set_languages(language)
            return evaluate(language, lrp2)

    return score
