"""A translation model built once per recipe under the cache root, so a later command can reuse it (the folder
is what FLARE's --translation-run takes), and a build that was stopped continues from its last checkpoint.

The folder is named by the recipe's name and a hash of every setting that shapes the model; a build of the same
hash under another name serves too, finished or continued (its recipe.json's beam and length penalty apply).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from ...core.fileio import cache_root
from ...training.checkpoint import CHECKPOINT_NAME
from .compare import WEIGHTS_NAME
from .run import MMTData, MMTRecipe, train_run
from .run_dir import RESUMABLE_KEYS, flat_keys

# How often a run checkpoints, validates and decodes does not change its weights; its step count does.
NOT_SHAPING = (*(key for key in RESUMABLE_KEYS if key != "training.steps"), "name", "output_dir")
FORMAT = 1  # bump when what a cached translation folder holds changes
# Settings added after builds existed, at the value that builds what came before: left out of the key there, so
# those builds keep their folders.
ADDED_LATER = {("base", "decoder_start"): "bos"}


def recipe_key(recipe: MMTRecipe) -> str:
    """A short hash of the recipe's model-shaping settings (more steps: another model, another folder)."""
    shaping = {key: value for key, value in flat_keys(dataclasses.asdict(recipe)).items() if key not in NOT_SHAPING}
    for (block, key), earlier in ADDED_LATER.items():
        if isinstance(shaping.get(block), dict) and shaping[block].get(key) == earlier:
            shaping[block] = {name: value for name, value in shaping[block].items() if name != key}
    return hashlib.sha256(json.dumps({"format": FORMAT, **shaping}, sort_keys=True).encode()).hexdigest()[:16]


def cached_recipe(recipe: MMTRecipe, cache_dir: Optional[str | Path] = None) -> MMTRecipe:
    """The recipe with its run folder moved to `cache_root()/translation/<name>-<key>-seed<seed>`, or to a build of
    the same settings under another name, finished or stopped (the name shapes nothing, so it is not built twice);
    the recipe's own folder comes first, and a finished build before a stopped one."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "translation"
    key, seed = recipe_key(recipe), f"-seed{recipe.seed}"
    name = f"{recipe.name}-{key}"

    def same_settings(holding: str) -> list[str]:
        return sorted(path.name[:-len(seed)] for path in folder.glob(f"*-{key}{seed}") if (path / holding).is_file())

    if not (folder / f"{name}{seed}" / WEIGHTS_NAME).is_file():
        finished = same_settings(WEIGHTS_NAME)
        if finished:
            name = finished[0]
        elif not (folder / f"{name}{seed}" / CHECKPOINT_NAME).is_file():
            name = next(iter(same_settings(CHECKPOINT_NAME)), name)
    return dataclasses.replace(recipe, output_dir=str(folder), name=name)


def build_cached(recipe: MMTRecipe, data: Optional[MMTData] = None, cache_dir: Optional[str | Path] = None) -> Path:
    """The recipe's trained run folder: reused when finished, continued from its checkpoint when a build stopped,
    trained from nothing otherwise (a folder a build left before its first checkpoint is started again)."""
    cached = cached_recipe(recipe, cache_dir)
    run_dir = cached.run_dir
    if (run_dir / WEIGHTS_NAME).is_file():
        if not cached.name.startswith(f"{recipe.name}-"):
            print(f"reusing {run_dir}: the same model settings built under another name (its recipe.json's beam and "
                  "length penalty decode it)")
        return run_dir
    resume = (run_dir / CHECKPOINT_NAME).is_file()
    if resume and not cached.name.startswith(f"{recipe.name}-"):
        print(f"continuing {run_dir}: a stopped build of the same model settings under another name")
    started = run_dir.is_dir() and any(run_dir.iterdir())
    return train_run(cached, resume=resume, data=data, overwrite=started and not resume)
