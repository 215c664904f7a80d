"""The comparison's protocol: trials on the valid books, one choice per method, then seeds on the test book.

Every finished trial and test run is a file in the run folder, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from ...core.fileio import write_json
from .retrieval_data import TestbedData
from .retrieval_run import outcomes, train_tower, variant_route
from .settings import CHOSEN_BY, VARIANTS, RetrievalTestbed
from .towers import QueryTower, build_tower, upper_blocks


class RunFolderError(ValueError):
    """A run folder that holds another comparison's results."""


def open_run(folder: Path, testbed: RetrievalTestbed) -> Path:
    """The run folder, created with its settings; one holding other settings is refused, never overwritten."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "settings.json"
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != json.loads(json.dumps(testbed.as_dict())):
            changed = sorted(k for k in set(stored) | set(testbed.as_dict())
                             if stored.get(k) != json.loads(json.dumps(testbed.as_dict())).get(k))
            raise RunFolderError(f"{folder} holds a comparison run with other settings ({', '.join(changed)}); "
                                 "choose another folder, or remove that one")
    else:
        write_json(path, testbed.as_dict())
    return folder


def stored(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def mean_accuracy(per_language: dict[str, list[int]]) -> float:
    """Mean over languages of the per-language accuracy, in %."""
    return 100.0 * statistics.fmean(sum(v) / len(v) for v in per_language.values())


def run_trial(encoder, data: TestbedData, testbed: RetrievalTestbed, method: str, trial: dict, folder: Path) -> dict:
    """Train one setting on the training books; score the valid books at every checkpoint."""
    path = folder / "trials" / f"{method}-lr{trial['lr']:g}-top{trial['trained_layers']}.json"
    done = stored(path)
    if done is not None:
        return done
    started = time.perf_counter()
    tower = build_tower(encoder, method, trial["trained_layers"], testbed, testbed.trial_seed)
    checks: dict[str, dict[str, float]] = {}

    def on_check(current, step: int) -> float:
        scores = {variant: mean_accuracy(outcomes(current, data.valid, variant_route(variant)))
                  for variant in VARIANTS[method]}
        checks[str(step)] = {variant: round(score, 3) for variant, score in scores.items()}
        return 1.0 - scores[CHOSEN_BY[method]] / 100.0  # the loop logs it as the valid figure (an error rate)

    losses = train_tower(tower, data.train, testbed, trial["lr"], testbed.max_steps, testbed.trial_seed, on_check)
    result = {"method": method, **trial, "valid": checks, "first_loss": round(statistics.fmean(losses[:10]), 4),
              "last_loss": round(statistics.fmean(losses[-10:]), 4), "seconds": round(time.perf_counter() - started, 1)}
    write_json(path, result)
    return result


def choose(trials: list[dict], method: str) -> dict:
    """The trial and stop step with the best valid score of the method's chosen-by variant (ties: fewer steps,
    then the first trial in grid order)."""
    best = None
    for trial in trials:
        for step, scores in trial["valid"].items():
            key = (scores[CHOSEN_BY[method]], -int(step))
            if best is None or key > best[0]:
                best = (key, {"lr": trial["lr"], "trained_layers": trial["trained_layers"], "steps": int(step),
                              "valid_score": scores[CHOSEN_BY[method]]})
    if best is None:
        raise ValueError(f"no trial of {method} finished")
    return best[1]


def run_test(encoder, data: TestbedData, testbed: RetrievalTestbed, method: str, choice: dict, seed: int,
             folder: Path) -> dict:
    """One seed of the chosen setting, trained afresh and scored once on the test book (per-query outcomes)."""
    path = folder / "test" / f"{method}-seed{seed}.json"
    done = stored(path)
    if done is not None and done.get("choice") == choice:
        return done
    started = time.perf_counter()
    tower = build_tower(encoder, method, choice["trained_layers"], testbed, seed)
    train_tower(tower, data.train, testbed, choice["lr"], choice["steps"], seed)
    seconds = time.perf_counter() - started
    result = {"method": method, "seed": seed, "choice": choice, "parameters": tower.parameters,
              "train_seconds": round(seconds, 1),
              "outcomes": {variant: outcomes(tower, data.test, variant_route(variant)) for variant in VARIANTS[method]}}
    write_json(path, result)
    return result


def base_outcomes(encoder, data: TestbedData, testbed: RetrievalTestbed, folder: Path) -> dict:
    """The plain encoder (no block trained) on the valid and the test book."""
    path = folder / "base.json"
    done = stored(path)
    if done is not None:
        return done
    tower = QueryTower(upper_blocks(encoder, testbed.cache_layer), "base", {"trainable": 0, "inference_extra": 0})
    result = {"valid": outcomes(tower, data.valid), "test": outcomes(tower, data.test)}
    write_json(path, result)
    return result


def run_comparison(encoder, data: TestbedData, testbed: RetrievalTestbed, folder: Path,
                   progress=print) -> dict[str, Any]:
    """Trials, choices and test seeds of every method (each reused when already in the folder)."""
    open_run(folder, testbed)
    base = base_outcomes(encoder, data, testbed, folder)
    progress(f"plain e5-small: valid {mean_accuracy(base['valid']):.2f}, test {mean_accuracy(base['test']):.2f}")
    choices, tests = {}, {}
    for method in testbed.methods:
        trials = []
        for trial in testbed.trials(method):
            result = run_trial(encoder, data, testbed, method, trial, folder)
            progress(f"trial {method} {trial}: valid {result['valid']} ({result['seconds']} s)")
            trials.append(result)
        choices[method] = choose(trials, method)
        progress(f"chosen for {method}: {choices[method]}")
    write_json(folder / "choices.json", choices)
    for seed in testbed.seeds:
        for method in testbed.methods:
            tests[(method, seed)] = run_test(encoder, data, testbed, method, choices[method], seed, folder)
            progress(f"test {method} seed {seed}: {tests[(method, seed)]['train_seconds']} s")
    return {"base": base, "choices": choices, "tests": list(tests.values())}
