"""The LRP2 layer search: score every (LIRP layer, LSRP layer) pair per language; keep the best only if it beats noise.

Results go to JSON and to one heat map per language; a language whose best cell is inside the noise gets no LRP2.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.fileio import atomic_write, single_path_component
from .capture import InterventionError
from .lrp2 import LRP2, LanguageVectors

# A score function returns one number, or one score per validation example (e.g. a 0/1 tensor for
# accuracy@1): only per-example scores let the search tell a gain from noise.
Score = Union[float, torch.Tensor, Sequence[float]]
ScoreFn = Callable[[str, Optional[int], Optional[int]], Score]
Cell = tuple[str, Optional[int], Optional[int]]

# The refusal rule. A cell is kept only if its mean paired gain over the baseline exceeds z standard
# errors, z one-sided at family-wise level DEFAULT_ALPHA over the cells searched for that language
# (Bonferroni: the best of many noisy cells looks better than it is). Below MIN_VALIDATION_EXAMPLES
# paired examples the standard error itself is too rough to trust, and LRP2 is not free (a wrong layer
# costs points, RESULTS section 5), so the default there is the model as it is: no LRP2.
DEFAULT_ALPHA = 0.05
MIN_VALIDATION_EXAMPLES = 50


def bonferroni_z(cells: int, alpha: float = DEFAULT_ALPHA) -> float:
    """One-sided z at level alpha / cells: 1.64 for one cell, 2.64 for 12, 3.2 for 78."""
    if cells < 1 or not 0.0 < alpha < 1.0:
        raise InterventionError(f"bonferroni_z: cells={cells} must be >= 1 and alpha={alpha} in (0, 1)")
    return NormalDist().inv_cdf(1.0 - alpha / cells)


def per_example(score: Score, where: str) -> Optional[torch.Tensor]:
    """A score function's per-example scores as a float64 vector, or None for a single number."""
    values = torch.as_tensor(score, dtype=torch.float64)
    if values.dim() == 0:  # a number (int, float, 0-d tensor, numpy scalar): no noise estimate
        return None
    values = values.flatten()
    if values.numel() == 0:
        raise InterventionError(f"{where}: the score function returned no per-example scores")
    return values


@dataclass
class LayerSearchResult:
    """Scores of every (language, lirp_layer, lsrp_layer) tried; lsrp_layer None is LIRP only.

    `outcomes` holds the per-example scores behind each row and baseline (when the score function gave
    them), keyed (language, lirp_layer, lsrp_layer) with (language, None, None) the baseline. `z` None
    means `bonferroni_z` over the cells a choice compares.
    """

    rows: list[dict]
    baseline: dict[str, float]
    higher_is_better: bool = True
    outcomes: dict[Cell, torch.Tensor] = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    z: Optional[float] = None
    min_examples: int = MIN_VALIDATION_EXAMPLES

    @property
    def languages(self) -> list[str]:
        return sorted({row["language"] for row in self.rows})

    def _rows(self, language: str, lirp_only: bool) -> list[dict]:
        rows = [
            row for row in self.rows
            if row["language"] == language and (not lirp_only or row["lsrp_layer"] is None)
        ]
        if not rows:
            raise InterventionError(f"no search results for language {language!r}; searched {self.languages}")
        return rows

    def best_cell(self, language: str, lirp_only: bool = False) -> dict:
        """The top-scoring row (optionally among LIRP-only rows) with its gain over no LRP2, noise unchecked."""
        sign = 1.0 if self.higher_is_better else -1.0
        chosen = dict(max(self._rows(language, lirp_only), key=lambda row: sign * row["score"]))
        if language in self.baseline:
            chosen["baseline"] = self.baseline[language]
            chosen["gain"] = chosen["score"] - self.baseline[language]
        return chosen

    def best(self, language: str, lirp_only: bool = False) -> dict:
        """The chosen row: the best cell if it beats the baseline by more than the noise, else the baseline
        row (lirp_layer None: no LRP2). `decision` and `reason` say which, `best_cell` keeps the top cell."""
        cell = self.best_cell(language, lirp_only)
        if language not in self.baseline:
            return {**cell, "decision": "lrp2", "reason": "no baseline scored: top cell kept unchecked"}
        cells = len(self._rows(language, lirp_only))
        z = self.z if self.z is not None else bonferroni_z(cells, self.alpha)
        sign = 1.0 if self.higher_is_better else -1.0
        improvement = sign * cell["gain"]
        check = {"cells": cells, "z": z, "se": None, "threshold": None, "examples": None}
        top = self.outcomes.get((language, cell["lirp_layer"], cell["lsrp_layer"]))
        base = self.outcomes.get((language, None, None))
        if top is None or base is None:
            keep = improvement > 0
            reason = ("scores without per-example outcomes: no noise estimate, the top cell is kept when it "
                      "beats the baseline at all")
        else:
            if top.numel() != base.numel():
                raise InterventionError(
                    f"LRP2 search {language!r}: {top.numel()} outcomes for the cell but {base.numel()} for the "
                    f"baseline; paired outcomes need the same validation examples"
                )
            differences = sign * (top - base)
            examples = differences.numel()
            check["examples"] = examples
            if examples < self.min_examples:
                keep = False
                reason = (f"validation too small ({examples} < {self.min_examples} examples) to tell a layer "
                          f"from noise: no LRP2")
            else:
                se = float(differences.std(unbiased=True) / math.sqrt(examples))
                check["se"], check["threshold"] = se, z * se
                keep = improvement > 0 and improvement > z * se
                reason = (f"gain {improvement:+.4f} {'>' if keep else '<='} z*SE = {z:.2f}*{se:.4f} "
                          f"({examples} paired examples, {cells} cells)")
        if keep:
            return {**cell, **check, "decision": "lrp2", "reason": reason, "best_cell": _cell_summary(cell)}
        return {"language": language, "lirp_layer": None, "lsrp_layer": None, "score": self.baseline[language],
                "baseline": self.baseline[language], "gain": 0.0, **check, "decision": "no LRP2",
                "reason": reason, "best_cell": _cell_summary(cell)}

    def best_per_language(self, lirp_only: bool = False) -> dict[str, dict]:
        return {language: self.best(language, lirp_only) for language in self.languages}

    def to_dict(self) -> dict:
        return {
            "higher_is_better": self.higher_is_better,
            "rule": {"alpha": self.alpha, "z": self.z if self.z is not None else "bonferroni over the cells",
                     "min_examples": self.min_examples},
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
                    threshold = self.best(language).get("threshold")
                    if threshold is not None:  # a bar must clear this line to be used
                        sign = 1.0 if self.higher_is_better else -1.0
                        axes.axhline(self.baseline[language] + sign * threshold, color="tab:red", linestyle=":",
                                     label="without + noise (z*SE)")
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
            title = heatmap_title(self.best(language), language, metric)
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
    alpha: float = DEFAULT_ALPHA,
    z: Optional[float] = None,
    min_examples: int = MIN_VALIDATION_EXAMPLES,
) -> LayerSearchResult:
    """Score `score_fn(language, i, j)` over the grid and keep the best per language.

    The grid is every (i, j) with i from `candidate_layers`, j from `candidate_lsrp_layers`
    (default the same) and j > i when `pairs`, plus (i, None) for LIRP only when `lirp_only`;
    `baseline` also scores (None, None), the model without LRP2. `lrp2_scorer` builds a score_fn.
    A score_fn returning per-example scores (a 0/1 tensor for accuracy@1) lets `best` refuse a top cell
    inside the noise (see DEFAULT_ALPHA); one returning a float keeps any top cell above the baseline.
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
    outcomes: dict[Cell, torch.Tensor] = {}

    def scored(language: str, i: Optional[int], j: Optional[int]) -> float:
        score = score_fn(language, i, j)
        values = per_example(score, f"LRP2 search {language!r} at ({i}, {j})")
        if values is None:
            return float(score)  # type: ignore[arg-type]
        outcomes[(language, i, j)] = values
        return float(values.mean())

    total = len(languages) * (len(grid) + (1 if baseline else 0))
    with tqdm(total=total, desc="LRP2 layer search", disable=not progress) as bar:
        for language in languages:
            if baseline:
                baselines[language] = scored(language, None, None)
                bar.update(1)
            for i, j in grid:
                rows.append({"language": language, "lirp_layer": i, "lsrp_layer": j, "score": scored(language, i, j)})
                bar.update(1)
    return LayerSearchResult(rows=rows, baseline=baselines, higher_is_better=higher_is_better, outcomes=outcomes,
                             alpha=alpha, z=z, min_examples=min_examples)


def lrp2_scorer(
    model: nn.Module,
    vectors: LanguageVectors,
    evaluate: Callable[[str, Optional[LRP2]], Score],
    pivot: str = "en",
    stack: Optional[str] = None,
) -> ScoreFn:
    """A score_fn that runs `evaluate(language, lrp2)` with LRP2 at (i, j) on (lrp2 None: without).

    The hooks start with `language` set for every example; an evaluation that also encodes pivot
    text (retrieval candidates) calls `lrp2.set_languages(pivot)` around those batches.
    """

    def score(language: str, lirp_layer: Optional[int], lsrp_layer: Optional[int]) -> Score:
        if lirp_layer is None:
            return evaluate(language, None)
        with LRP2(model, vectors, lirp_layer, lsrp_layer, pivot=pivot, stack=stack) as lrp2:
            lrp2.set_languages(language)
            return evaluate(language, lrp2)

    return score


def _cell_summary(row: dict) -> dict:
    return {key: row[key] for key in ("lirp_layer", "lsrp_layer", "score", "gain") if key in row}


def heatmap_title(best: dict, language: str, metric: str) -> str:
    """A heat map's title: the chosen cell, or "no LRP2" with the top cell that did not clear the noise."""
    if best.get("decision") == "no LRP2":
        top = best["best_cell"]
        noise = f" <= {best['threshold']:.3f} noise" if best.get("threshold") is not None else ""
        return (f"LRP2 {language}: no LRP2 (top cell i={top['lirp_layer']}, j={top['lsrp_layer']}: "
                f"{top['gain']:+.3f}{noise})\n{metric} {best['baseline']:.3f} without")
    title = f"LRP2 {language}: chosen i={best['lirp_layer']}, j={best['lsrp_layer']}"
    if "baseline" in best:
        title += f"\n{metric} {best['score']:.3f} vs {best['baseline']:.3f} without"
    return title
