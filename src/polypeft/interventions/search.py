"""The LRP2 layer search: score every (LIRP layer, LSRP layer) pair per language; keep a cell only if it beats noise.

Results go to JSON and to one heat map per language; a language whose chosen cell is inside the noise gets no LRP2.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.fileio import atomic_write, single_path_component
from .capture import InterventionError
from .choice import (  # noqa: F401  (the rules' names are part of the search's interface)
    DEFAULT_ALPHA, DEFAULT_RULE, MAX_T_FLIPS, MAX_T_SEED, MIN_VALIDATION_EXAMPLES, RULES, SELECTION_SHARE, bonferroni_z,
    check_rule, max_t_threshold, split_examples, studentised,
)
from .lrp2 import LRP2, LanguageVectors

# A score function returns one number, or one score per validation example (e.g. a 0/1 tensor for
# accuracy@1): only per-example scores let the search tell a gain from noise.
Score = Union[float, torch.Tensor, Sequence[float]]
ScoreFn = Callable[[str, Optional[int], Optional[int]], Score]
Cell = tuple[str, Optional[int], Optional[int]]

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
    them), keyed (language, lirp_layer, lsrp_layer) with (language, None, None) the baseline. `rule` names
    the choice rule (choice.RULES); `z` None means the rule's own bar (one test for "split", Bonferroni over the
    cells, the sign-flip quantile for "maxt").
    """

    rows: list[dict]
    baseline: dict[str, float]
    higher_is_better: bool = True
    outcomes: dict[Cell, torch.Tensor] = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA
    z: Optional[float] = None
    min_examples: int = MIN_VALIDATION_EXAMPLES
    rule: str = DEFAULT_RULE
    selection_share: float = SELECTION_SHARE

    def __post_init__(self) -> None:
        check_rule(self.rule, self.alpha, self.selection_share, self.min_examples, "LayerSearchResult")

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

    def _with_gain(self, row: dict) -> dict:
        chosen = dict(row)
        if row["language"] in self.baseline:
            chosen["baseline"] = self.baseline[row["language"]]
            chosen["gain"] = chosen["score"] - self.baseline[row["language"]]
        return chosen

    def best_cell(self, language: str, lirp_only: bool = False) -> dict:
        """The top-scoring row (optionally among LIRP-only rows) with its gain over no LRP2, noise unchecked."""
        sign = 1.0 if self.higher_is_better else -1.0
        return self._with_gain(max(self._rows(language, lirp_only), key=lambda row: sign * row["score"]))

    def _paired(self, language: str, rows: list[dict]) -> Optional[tuple[torch.Tensor, list[torch.Tensor]]]:
        """The baseline's and each row's per-example outcomes, or None where the score function gave numbers."""
        base = self.outcomes.get((language, None, None))
        cells = [self.outcomes.get((language, row["lirp_layer"], row["lsrp_layer"])) for row in rows]
        if base is None or any(values is None for values in cells):
            return None
        for row, values in zip(rows, cells):
            if values.numel() != base.numel():
                raise InterventionError(
                    f"LRP2 search {language!r}: {values.numel()} outcomes for the cell ({row['lirp_layer']}, "
                    f"{row['lsrp_layer']}) but {base.numel()} for the baseline; paired outcomes need the same "
                    f"validation examples"
                )
        return base, cells

    def best(self, language: str, lirp_only: bool = False) -> dict:
        """The chosen row: the rule's cell if it beats the baseline by more than the noise, else the baseline row
        (lirp_layer None: no LRP2). `decision`, `reason` and `rule` say which and why; `best_cell` is the cell the
        rule tested (for "split" the best on the selection part, for "bonferroni" the best on all examples)."""
        rows = self._rows(language, lirp_only)
        if language not in self.baseline:
            return {**self.best_cell(language, lirp_only), "rule": self.rule, "decision": "lrp2",
                    "reason": "no baseline scored: top cell kept unchecked"}
        sign = 1.0 if self.higher_is_better else -1.0
        one_test = self.rule == "split"
        z = self.z if self.z is not None else {"split": lambda: bonferroni_z(1, self.alpha), "maxt": lambda: None,
                                               "bonferroni": lambda: bonferroni_z(len(rows), self.alpha)}[self.rule]()
        check = {"rule": self.rule, "cells": len(rows), "z": z, "se": None, "threshold": None, "examples": None,
                 "selection_examples": None, "test_examples": None, "test_gain": None}
        paired = self._paired(language, rows)
        if paired is None:
            cell = self.best_cell(language, lirp_only)
            keep = sign * cell["gain"] > 0
            reason = ("scores without per-example outcomes: no noise estimate, the top cell is kept when it "
                      "beats the baseline at all")
        else:
            base, cells = paired
            examples = base.numel()
            selection = held_back = torch.arange(examples)
            if one_test:
                selection, held_back = split_examples(examples, self.selection_share)
                gains = [float((values[selection] - base[selection]).mean()) if len(selection) else 0.0
                         for values in cells]
                index = max(range(len(rows)), key=lambda k: sign * gains[k])
            elif self.rule == "maxt" and examples >= self.min_examples:
                oriented = sign * (torch.stack(cells, 1) - base[:, None])
                z = z if z is not None else max_t_threshold(oriented, self.alpha)
                clearing = (studentised(oriented.mean(0), (oriented ** 2).sum(0), examples) > z).nonzero().flatten()
                index = max(clearing.tolist() or range(len(rows)), key=lambda k: sign * rows[k]["score"])
                check["z"] = z
            else:
                index = max(range(len(rows)), key=lambda k: sign * rows[k]["score"])
            cell = self._with_gain(rows[index])
            differences = (cells[index] - base)[held_back]
            check.update(examples=examples, selection_examples=len(selection), test_examples=len(held_back))
            where = {"split": f"cell ({cell['lirp_layer']}, {cell['lsrp_layer']}) chosen among {len(rows)} on "
                              f"{len(selection)} selection examples, tested on the {len(held_back)} held back",
                     "bonferroni": f"top of {len(rows)} cells on all {examples} examples",
                     "maxt": f"top of the {len(rows)} cells that clear the max-t bar (if none, the top cell) on all "
                             f"{examples} examples"}[self.rule]
            if len(held_back) < self.min_examples:
                keep = False
                reason = (f"validation too small ({len(held_back)} < {self.min_examples} examples in the test; "
                          f"{examples} in all, rule {self.rule!r}) to tell a layer from noise: no LRP2")
            else:
                improvement = sign * float(differences.mean())
                se = float(differences.std(unbiased=True) / math.sqrt(len(held_back)))
                check.update(se=se, threshold=z * se, test_gain=float(differences.mean()))
                keep = improvement > 0 and improvement > z * se
                bar = {"split": "one test", "bonferroni": "Bonferroni", "maxt": "max-t over sign flips"}[self.rule]
                reason = (f"{where}: gain {improvement:+.4f} {'>' if keep else '<='} z*SE = {z:.2f}*{se:.4f} "
                          f"({bar}, alpha {self.alpha})")
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
            "rule": {"name": self.rule, "alpha": self.alpha, "min_examples": self.min_examples,
                     "z": self.z if self.z is not None else {"split": "one test", "maxt": "max-t over sign flips",
                                                             "bonferroni": "bonferroni over the cells"}[self.rule],
                     "selection_share": self.selection_share if self.rule == "split" else None,
                     "split": "interleaved: the cell is chosen on the selection positions, tested on the rest"
                     if self.rule == "split" else None,
                     "max_t": {"flips": MAX_T_FLIPS, "seed": MAX_T_SEED} if self.rule == "maxt" else None},
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
                chosen = self.best(language)
                tested = chosen.get("best_cell", {}).get("lirp_layer")
                axes.bar(range(len(lirp_layers)), grid[:, 0].numpy(), color=[
                    "tab:orange" if layer == tested else "tab:blue" for layer in lirp_layers])
                if language in self.baseline:
                    axes.axhline(self.baseline[language], color="grey", linestyle="--", label="without LRP2")
                    threshold, sign = chosen.get("threshold"), 1.0 if self.higher_is_better else -1.0
                    if threshold is not None:  # the tested (orange) cell's gain must clear this line to be used
                        held_back = " on the held-back part" if self.rule == "split" else ""
                        axes.axhline(self.baseline[language] + sign * threshold, color="tab:red", linestyle=":",
                                     label=f"without + noise (z*SE{held_back})")
                    if self.rule == "split" and chosen.get("test_gain") is not None:
                        axes.plot([lirp_layers.index(tested)], [self.baseline[language] + chosen["test_gain"]], "kD",
                                  label="without + orange cell's held-back gain")
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
    rule: str = DEFAULT_RULE,
    selection_share: float = SELECTION_SHARE,
) -> LayerSearchResult:
    """Score `score_fn(language, i, j)` over the grid and keep the best per language.

    The grid is every (i, j) with i from `candidate_layers`, j from `candidate_lsrp_layers`
    (default the same) and j > i when `pairs`, plus (i, None) for LIRP only when `lirp_only`;
    `baseline` also scores (None, None), the model without LRP2. `lrp2_scorer` builds a score_fn.
    A score_fn returning per-example scores (a 0/1 tensor for accuracy@1) lets `best` refuse a cell inside the
    noise by `rule` (choice.RULES: "maxt", the default, "bonferroni" or "split"); one returning a float keeps any top cell
    above the baseline. The examples' order matters to "split" (interleaved parts): keep it fixed across cells.
    """
    check_rule(rule, alpha, selection_share, min_examples, "search_layers")
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
                             alpha=alpha, z=z, min_examples=min_examples, rule=rule,
                             selection_share=selection_share)


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
    """A heat map's title: the chosen cell, or "no LRP2" with the cell the rule tested and the noise it did not clear."""
    rule, test_gain, threshold = best.get("rule"), best.get("test_gain"), best.get("threshold")
    measured = "" if test_gain is None else (f"{'held-back ' if rule == 'split' else ''}gain {test_gain:+.3f}, "
                                             f"noise {threshold:.3f}")
    if best.get("decision") == "no LRP2":
        top = best["best_cell"]
        return (f"LRP2 {language}: no LRP2 (rule {rule}; tested i={top['lirp_layer']}, j={top['lsrp_layer']}: "
                f"{measured or format(top['gain'], '+.3f')})\n{metric} {best['baseline']:.3f} without")
    title = f"LRP2 {language}: chosen i={best['lirp_layer']}, j={best['lsrp_layer']}"
    if rule is not None:
        title += f" (rule {rule}{'; ' + measured if measured else ''})"
    if "baseline" in best:
        title += f"\n{metric} {best['score']:.3f} vs {best['baseline']:.3f} without"
    return title
