"""A translation run's folder: claimed before any work, continued only under a recipe that trains the same way.

Two runs never mix in one folder: a held folder is resumed, replaced on request, or refused with the way out.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from ...core.config import ConfigError
from ...core.fileio import is_temporary, remove_stale_temporaries
from ...training.processes import process_state

# What a resumed run may change: how long it trains, how often it saves and validates, how it is scored.
RESUMABLE_KEYS = ("training.steps", "training.checkpoint_every", "training.valid_every", "beam", "length_penalty",
                  "eval_batch_size")


def claim_run_dir(recipe: Any, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Make `run_dir` ready for this run, before any data is prepared; never silently mix two runs in it.

    Under `accelerate launch` every process decides on the same untouched folder, then one process clears it.
    """
    replace = run_dir_to_replace(recipe, run_dir, resume, overwrite)
    state = process_state()
    state.wait_for_everyone()
    if state.is_main_process:
        remove_stale_temporaries(run_dir)  # what killed runs left: half-written checkpoints and weights
        if replace:
            shutil.rmtree(run_dir)
    state.wait_for_everyone()


def run_dir_to_replace(recipe: Any, run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Whether `run_dir` holds a run that `overwrite` replaces; refuses every other way of mixing two runs."""
    if resume and overwrite:
        raise ConfigError(f"--resume and --overwrite both given for {run_dir}: continue the run or replace it, not both")
    if resume:
        check_resumable(recipe, run_dir)
        return False
    entries = run_dir.iterdir() if run_dir.is_dir() else ()
    held = sorted(entry.name for entry in entries if not is_temporary(entry.name))  # leftovers are cleaned, not kept
    if not held:
        return False
    if not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); pass --resume "
            "(resume=True) to continue it or --overwrite (overwrite=True) to delete it and train afresh"
        )
    if not (run_dir / "recipe.json").is_file():
        raise ConfigError(f"--overwrite: {run_dir} holds {held[:5]} but no recipe.json, so it is not a polypeft run "
                          "folder; it is left alone: remove it yourself or choose another name or output_dir")
    return True


def check_resumable(recipe: Any, run_dir: Path) -> None:
    """Refuse, naming each difference, to continue a run under a recipe that would train it differently."""
    stored_path = run_dir / "recipe.json"
    if not stored_path.exists():
        return
    # Both through the recipe's own reading, so a run written with the older flat keys compares key by key.
    stored = flat_keys(dataclasses.asdict(type(recipe).from_dict(json.loads(stored_path.read_text(encoding="utf-8")),
                                                              where=str(stored_path))))
    current = flat_keys(dataclasses.asdict(recipe))
    differing = sorted(k for k in set(stored) | set(current) if k not in RESUMABLE_KEYS and stored.get(k) != current.get(k))
    if differing:
        changes = "; ".join(f"{k}: {stored.get(k)!r} in the run, {current.get(k)!r} now" for k in differing)
        raise ConfigError(
            f"--resume: {run_dir} was trained with another recipe ({changes}); only {list(RESUMABLE_KEYS)} may "
            "change when a run continues: start a new run (another name or output_dir) instead"
        )


def flat_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """`{"training": {"steps": 6}}` as `{"training.steps": 6}`, JSON-shaped: each setting under its own key."""
    training = {f"training.{key}": value for key, value in data.get("training", {}).items()}
    return json.loads(json.dumps({**{k: v for k, v in data.items() if k != "training"}, **training}))
