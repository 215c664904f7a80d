"""`polypeft demo`: naive vs LMS vs LMS+FD on the real Bible corpus, small enough for a laptop CPU.

It trains the tiny preset on four languages, evaluates every run and prints the comparison table.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ..tasks.translation.compare import load_results, markdown, write_comparison
from ..core.config import ConfigError
from ..tasks.translation.run import MMTRecipe, check_resumable, evaluate_run, prepare, train_run
from ..training.checkpoint import CHECKPOINT_NAME

DEMO_METHODS = {
    "naive": {"name": "naive"},
    "lms": {"name": "lms", "rank": 8, "synthesis": "pair"},
    "lms_fd": {"name": "lms", "rank": 8, "synthesis": "pair", "fd": True},
}


def demo_recipe(quick: bool, output_dir: str) -> MMTRecipe:
    if quick:
        return MMTRecipe(languages=["en", "fr", "de"], vocab_size=1000, spm_max_sentences=2000, max_train_verses=400,
                         max_eval_verses=6, steps=8, warmup=4, checkpoint_every=4, max_tokens=1024, beam=2, max_length=48,
                         output_dir=output_dir)
    return MMTRecipe(languages=["en", "fr", "es", "de"], vocab_size=4000, spm_max_sentences=15000,
                     max_train_verses=None, max_eval_verses=60, steps=300, warmup=100, lr=1e-3, max_tokens=2000,
                     checkpoint_every=100, output_dir=output_dir)


def finished(recipe: MMTRecipe) -> bool:
    """True when the run directory holds this very recipe's weights and test scores (a demo run again)."""
    run_dir = recipe.run_dir
    try:
        stored = json.loads((run_dir / "recipe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (stored == json.loads(json.dumps(dataclasses.asdict(recipe))) and (run_dir / "model.safetensors").exists()
            and (run_dir / "eval_test.json").exists())


DEFAULT_OUTPUT_DIR = "runs/demo"


def refuse_runs_of_another_setting(recipes: list[MMTRecipe]) -> None:
    """Stop before any work when a run folder holds a demo trained with other settings (an older default)."""
    for recipe in recipes:
        if (recipe.run_dir / CHECKPOINT_NAME).exists() and not finished(recipe):
            try:
                check_resumable(recipe, recipe.run_dir)
            except ConfigError as error:
                raise ConfigError(f"polypeft demo: {recipe.run_dir} holds a run of another demo setting, so it can "
                                  f"neither be reused nor continued; remove that folder or pass --output-dir. "
                                  f"({error})") from error


def run_demo(quick: bool = False, output_dir: str = DEFAULT_OUTPUT_DIR, steps: Optional[int] = None) -> dict:
    base = demo_recipe(quick, output_dir)
    if steps is not None and steps != base.steps:  # longer runs show the methods' gains; the default the pipeline
        if output_dir == DEFAULT_OUTPUT_DIR:  # a run of another length is another run: never resumed or overwritten
            output_dir = f"{output_dir}-{steps}steps"
        base = dataclasses.replace(base, steps=steps, output_dir=output_dir)
    recipes = {name: dataclasses.replace(base, name=name, method=method) for name, method in DEMO_METHODS.items()}
    refuse_runs_of_another_setting(list(recipes.values()))
    print(f"polypeft demo: {'/'.join(base.languages)} Bible translation, tiny model, {base.steps} steps per method")
    data = prepare(base)
    print(f"data: {len(data.train):,} training pairs, {len(data.test):,} test pairs (book 43, John)")
    run_dirs = []
    for name, recipe in recipes.items():
        run_dir = recipe.run_dir
        if finished(recipe):
            print(f"[{name}] already trained and evaluated with this recipe: {run_dir}")
        else:  # a stopped demo continues from the run's last checkpoint; one stopped before any starts afresh
            resume = (run_dir / CHECKPOINT_NAME).exists()
            run_dir = train_run(recipe, resume=resume, overwrite=not resume, data=data)
            evaluate_run(run_dir, data=data)
        run_dirs.append(run_dir)
    out_dir = Path(output_dir) / "compare"
    comparison = write_comparison(load_results(run_dirs), "naive", out_dir, pivot=base.pivot)
    print()
    print(markdown(comparison, base.pivot))
    print(f"written: {out_dir / 'comparison.md'}, {out_dir / 'comparison.json'}, {out_dir / 'bleu_gain_vs_parameters.png'}")
    return comparison
