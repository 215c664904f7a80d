"""A translation model built once per recipe under the cache root, so a later command can reuse it (the folder
is what FLARE's --translation-run takes), and a build that was stopped continues from its last checkpoint. One
command at a time builds a folder: a second one is refused while the first holds the folder's lock.

The folder is named by the recipe's name and a hash of every setting that shapes the model; a finished build of
the same hash under another name serves too (its recipe.json's decoding settings, beam and length penalty, apply).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from accelerate.utils import broadcast_object_list
from filelock import FileLock, Timeout

from ...core.fileio import cache_root
from ...training.checkpoint import CHECKPOINT_NAME
from ...training.processes import process_state
from .compare import WEIGHTS_NAME
from .run import MMTData, MMTRecipe, train_run
from .run_dir import RESUMABLE_KEYS, flat_keys

# How often a run checkpoints, validates and decodes does not change its weights; its step count does.
NOT_SHAPING = (*(key for key in RESUMABLE_KEYS if key != "training.steps"), "name", "output_dir")
FORMAT = 1  # bump when what a cached translation folder holds changes
# Settings added after builds existed, at the value that builds what came before: left out of the key there, so
# those builds keep their folders.
ADDED_LATER = {("base", "decoder_start"): "bos"}


class BuildInProgressError(ValueError):
    """Another command is building the same folder now: two writers would wipe or overwrite each other's steps."""


def recipe_key(recipe: MMTRecipe) -> str:
    """A short hash of the recipe's model-shaping settings (more steps: another model, another folder)."""
    shaping = {key: value for key, value in flat_keys(dataclasses.asdict(recipe)).items() if key not in NOT_SHAPING}
    for (block, key), earlier in ADDED_LATER.items():
        if isinstance(shaping.get(block), dict) and shaping[block].get(key) == earlier:
            shaping[block] = {name: value for name, value in shaping[block].items() if name != key}
    return hashlib.sha256(json.dumps({"format": FORMAT, **shaping}, sort_keys=True).encode()).hexdigest()[:16]


def cached_recipe(recipe: MMTRecipe, cache_dir: Optional[str | Path] = None) -> MMTRecipe:
    """The recipe with its run folder under `cache_root()/translation`: its own finished build, else a finished build
    of the same settings under another name (the name shapes nothing), else its own `<name>-<key>-seed<seed>`.

    Another name's stopped build is not taken: nothing tells it from one another command is still writing."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "translation"
    key, seed = recipe_key(recipe), f"-seed{recipe.seed}"
    own = dataclasses.replace(recipe, output_dir=str(folder), name=f"{recipe.name}-{key}")
    if not (own.run_dir / WEIGHTS_NAME).is_file():
        finished = sorted(path.name for path in folder.glob(f"*-{key}{seed}") if (path / WEIGHTS_NAME).is_file())
        if finished:  # decoded with its own recipe.json's beam and length penalty (see the module's doc)
            return dataclasses.replace(own, name=finished[0][:-len(seed)])
    return own


def build_cached(recipe: MMTRecipe, data: Optional[MMTData] = None, cache_dir: Optional[str | Path] = None) -> Path:
    """The recipe's trained run folder: reused when finished, continued from its checkpoint when a build stopped,
    trained from nothing otherwise (a folder a build left before its first checkpoint is started again).

    The first process decides, holding the folder's lock, and under a launcher every process follows its decision."""
    state = process_state()
    lock, plan = None, [None]
    if state.is_main_process:
        cached = cached_recipe(recipe, cache_dir)
        lock = FileLock(lock_file(cached.run_dir))
        plan = [(cached, build_action(recipe, cached, lock))]
    if state.num_processes > 1:
        broadcast_object_list(plan)
    cached, action = plan[0]
    try:
        if action == "refused":
            raise BuildInProgressError(
                f"another command is building {cached.run_dir} now (it holds {lock_file(cached.run_dir)}); wait until "
                "it finishes and run this again to reuse its build, or give this one another cache root "
                "(POLYPEFT_CACHE)")
        if action == "reuse":
            return cached.run_dir
        return train_run(cached, resume=action == "resume", data=data, overwrite=action == "overwrite")
    finally:
        if lock is not None and lock.is_locked:
            lock.release()


def lock_file(run_dir: Path) -> Path:
    """Beside the folder, so clearing the folder leaves it; the OS lets go of it when its holder exits, even killed."""
    return run_dir.with_name(f"{run_dir.name}.lock")


def build_action(recipe: MMTRecipe, cached: MMTRecipe, lock: FileLock) -> str:
    """What to do with the cached folder: reuse, refused (another command holds its lock), resume, overwrite (a
    build stopped before its first checkpoint) or fresh; the lock is taken, and kept, unless it is reused or refused."""
    run_dir = cached.run_dir
    if (run_dir / WEIGHTS_NAME).is_file():
        if cached.name != f"{recipe.name}-{recipe_key(recipe)}":
            print(f"reusing {run_dir}: the same model settings built under another name (its recipe.json's beam and "
                  "length penalty decode it)")
        return "reuse"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "refused"
    if (run_dir / WEIGHTS_NAME).is_file():  # finished by the command that held the lock a moment ago
        lock.release()
        return "reuse"
    if (run_dir / CHECKPOINT_NAME).is_file():
        return "resume"
    return "overwrite" if run_dir.is_dir() and any(run_dir.iterdir()) else "fresh"
