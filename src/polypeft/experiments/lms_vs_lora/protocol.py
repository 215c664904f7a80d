"""The comparison's protocol: trials on the valid books, one choice per method, then seeds on the test book.

Every finished trial and test run is a file in the run folder, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from ...core.fileio import write_json
from ...core.languages import SHARED
from ...training.loop import TrainSettings, train
from .settings import CHOSEN_BY, VARIANTS, ComparisonSettings
from .towers import Tower


class Bed(Protocol):
    """A testbed: what the protocol builds, trains and scores (`RetrievalBed`, `LanguageModelBed`)."""

    settings: ComparisonSettings
    metric: str
    statistic: str  # "accuracy" (per-example 0/1) or "perplexity" (per-example [nll sum, tokens])
    higher_is_better: bool
    english: str  # the English check's key in the test scores

    def build(self, method: str, trained_layers: int, seed: int) -> Tower: ...
    def plain(self) -> Tower: ...
    def batches(self, seed: int) -> Any: ...
    def loss_function(self, tower: Tower) -> Callable: ...
    def scores(self, tower: Tower, part: str, route: Optional[str] = None) -> dict[str, list]: ...
    def summary(self, per_language: dict[str, list]) -> float: ...


class RunFolderError(ValueError):
    """A run folder that holds another comparison's results."""


def variant_route(variant: str) -> Optional[str]:
    """FD-Share runs every example on the shared route; every other variant on each example's own route."""
    return SHARED if variant == "fd_share" else None


def open_run(folder: Path, settings: ComparisonSettings) -> Path:
    """The run folder, created with its settings; one holding other settings is refused, never overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    path, wanted = folder / "settings.json", json.loads(json.dumps(settings.as_dict()))
    if path.exists():
        stored_settings = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(stored_settings) | set(wanted) if stored_settings.get(k) != wanted.get(k))
        if changed:
            raise RunFolderError(f"{folder} holds a comparison run with other settings ({', '.join(changed)}); "
                                 "choose another folder, or remove that one")
    else:
        write_json(path, wanted)
    return folder


def stored(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_tower(bed: Bed, tower: Tower, lr: float, steps: int, seed: int,
                on_check: Optional[Callable[[Tower, int], float]] = None) -> list[float]:
    """AdamW at a constant rate after warm-up (so stopping at a checkpoint equals a shorter run) for `steps`
    steps; `on_check(tower, step)` runs every `check_every` steps. Returns each step's loss."""
    settings = bed.settings
    done = {"steps": 0}

    def valid_fn(model: torch.nn.Module) -> float:
        done["steps"] += settings.check_every
        return on_check(tower, done["steps"]) if on_check else 0.0

    loop = TrainSettings(steps=steps, lr=lr, warmup=settings.warmup, schedule="constant", betas=(0.9, 0.999),
                         clip_norm=1.0, seed=seed, valid_every=settings.check_every if on_check else 0,
                         checkpoint_every=steps, progress=False)
    result = train(tower.model, lambda: bed.batches(seed), bed.loss_function(tower), loop,
                   valid_fn=valid_fn if on_check else None,
                   parameters=[p for p in tower.model.parameters() if p.requires_grad], device_placement=False,
                   description=f"train {tower.method}")
    tower.model.eval()
    return [record["loss"] for record in result["history"]]


def run_trial(bed: Bed, method: str, trial: dict, folder: Path) -> dict:
    """Train one setting on the training books; score the valid books at every checkpoint."""
    path = folder / "trials" / f"{method}-lr{trial['lr']:g}-top{trial['trained_layers']}.json"
    done = stored(path)
    if done is not None:
        return done
    started = time.perf_counter()
    settings = bed.settings
    tower = bed.build(method, trial["trained_layers"], settings.trial_seed)
    checks: dict[str, dict[str, float]] = {}

    def on_check(current: Tower, step: int) -> float:
        scores = {variant: bed.summary(bed.scores(current, "valid", variant_route(variant)))
                  for variant in VARIANTS[method]}
        checks[str(step)] = {variant: round(score, 3) for variant, score in scores.items()}
        return scores[CHOSEN_BY[method]]  # logged by the loop as its valid figure

    losses = train_tower(bed, tower, trial["lr"], settings.max_steps, settings.trial_seed, on_check)
    result = {"method": method, **trial, "valid": checks, "first_loss": round(statistics.fmean(losses[:10]), 4),
              "last_loss": round(statistics.fmean(losses[-10:]), 4), "seconds": round(time.perf_counter() - started, 1)}
    write_json(path, result)
    return result


def choose(trials: list[dict], method: str, higher_is_better: bool = True) -> dict:
    """The trial and stop step with the best valid score of the method's chosen-by variant (ties: fewer steps,
    then the first trial in grid order)."""
    best = None
    sign = 1.0 if higher_is_better else -1.0
    for trial in trials:
        for step, scores in trial["valid"].items():
            key = (sign * scores[CHOSEN_BY[method]], -int(step))
            if best is None or key > best[0]:
                best = (key, {"lr": trial["lr"], "trained_layers": trial["trained_layers"], "steps": int(step),
                              "valid_score": scores[CHOSEN_BY[method]]})
    if best is None:
        raise ValueError(f"no trial of {method} finished")
    return best[1]


def run_test(bed: Bed, method: str, choice: dict, seed: int, folder: Path) -> dict:
    """One seed of the chosen setting, trained afresh and scored once on the test book (per-example scores)."""
    path = folder / "test" / f"{method}-seed{seed}.json"
    done = stored(path)
    if done is not None and done.get("choice") == choice:
        return done
    started = time.perf_counter()
    tower = bed.build(method, choice["trained_layers"], seed)
    train_tower(bed, tower, choice["lr"], choice["steps"], seed)
    seconds = time.perf_counter() - started
    result = {"method": method, "seed": seed, "choice": choice, "parameters": tower.parameters,
              "train_seconds": round(seconds, 1),
              "outcomes": {variant: bed.scores(tower, "test", variant_route(variant)) for variant in VARIANTS[method]}}
    write_json(path, result)
    return result


def base_outcomes(bed: Bed, folder: Path) -> dict:
    """The plain model (nothing trained) on the valid and the test book."""
    path = folder / "base.json"
    done = stored(path)
    if done is not None:
        return done
    tower = bed.plain()
    result = {"valid": bed.scores(tower, "valid"), "test": bed.scores(tower, "test")}
    write_json(path, result)
    return result


def run_comparison(bed: Bed, folder: Path, progress: Callable[[str], None] = print,
                   chosen: Optional[dict[str, dict]] = None) -> dict[str, Any]:
    """Trials, choices and test seeds of every method (each reused when already in the folder). `chosen` gives
    the choices instead (settings an earlier run chose on the valid books): no trial runs then."""
    settings = bed.settings
    open_run(folder, settings)
    base = base_outcomes(bed, folder)
    progress(f"base model: valid {bed.summary(base['valid']):.2f}, test {bed.summary(base['test']):.2f} ({bed.metric})")
    choices, tests = dict(chosen or {}), []
    for method in [m for m in settings.methods if m not in choices]:
        trials = []
        for trial in settings.trials(method):
            result = run_trial(bed, method, trial, folder)
            progress(f"trial {method} {trial}: valid {result['valid']} ({result['seconds']} s)")
            trials.append(result)
        choices[method] = choose(trials, method, bed.higher_is_better)
        progress(f"chosen for {method}: {choices[method]}")
    write_json(folder / "choices.json", choices)
    for seed in settings.seeds:
        for method in settings.methods:
            tests.append(run_test(bed, method, choices[method], seed, folder))
            progress(f"test {method} seed {seed}: {tests[-1]['train_seconds']} s")
    return {"base": base, "choices": choices, "tests": tests}
