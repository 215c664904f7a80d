"""The LMS paper's comparison in BLEU on the warm-start translation model: every method, every seed, one table.

Each method is the base recipe with its method block as the only change, placed where the naive baseline trains:
the decoder's FFN linears (the encoder is frozen, and routes in it would need a backward pass through it). Builds
are cached and resumable (as `polypeft mmt build`), each scored once on the books named; run the script again
after a stop and it picks up where it stopped. About 65 minutes per build on the idle 2-core CPU.

Usage: python bench/mmt_warm_table.py --out DIR [--recipe configs/mmt_warm_e5_both.yaml] [--methods ...]
       [--seeds 0 1] [--books 43]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Sequence

from polypeft.core.fileio import write_json
from polypeft.tasks.translation import run as mmt
from polypeft.tasks.translation.cached import build_cached
from polypeft.tasks.translation.compare import StaleEvaluationError, load_results, write_comparison

ROOT = Path(__file__).resolve().parent.parent
DECODER_FFN = r"decoder\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"
LMS_RANK = 8  # as configs/mmt_bible7_lms_pair.yaml
# The LMS paper's table (naive, LMS pair-wise and language-wise, LMS+FD, Switch, LS-FFN) and LoRA at LMS's
# trainable parameters; the slowest first is not needed here, since builds run one after another.
METHODS = {
    "naive": {"name": "naive"},
    "lms_pair": {"name": "lms", "rank": LMS_RANK, "synthesis": "pair"},
    "lms_lang": {"name": "lms", "rank": LMS_RANK, "synthesis": "language"},
    "lms_fd": {"name": "lms", "rank": LMS_RANK, "synthesis": "pair", "fd": True},
    "switch": {"name": "switch", "num_experts": 3},
    "ls_ffn": {"name": "ls_ffn"},
    "lora": {"name": "lora"},
}


def method_block(method: str, languages: Sequence[str]) -> dict:
    """The method block on the decoder's FFN linears; LoRA's rank is languages x LMS's rank, so it trains as many
    parameters as pair-wise LMS (one V and one F per language per linear)."""
    block = dict(METHODS[method])
    if method != "naive":
        block["target_modules"] = DECODER_FFN
    if method == "lora":
        block.update(rank=len(languages) * LMS_RANK, alpha=2 * len(languages) * LMS_RANK)
    return block


def recipe_for(base: mmt.MMTRecipe, method: str, seed: int) -> mmt.MMTRecipe:
    return dataclasses.replace(base, name=f"{base.name}-{method}", method=method_block(method, base.languages),
                               seed=seed)


def scored(run_dir: Path, books: Sequence[int]) -> Path:
    """The run's evaluation on `books`: the one already written when it scores these weights, else a new one."""
    file = run_dir / f"eval_test_books-{'-'.join(str(book) for book in sorted(books))}.json"
    if file.is_file():
        try:
            load_results([file])
            return file
        except StaleEvaluationError:
            pass
    mmt.evaluate_run(run_dir, books=books)
    return file


def run_table(recipe_file: Path, methods: Sequence[str], seeds: Sequence[int], books: Sequence[int], out: Path) -> dict:
    """Build and score every method for every seed (each seed of every method before the next seed), copying each
    evaluation under its method's name and rewriting the comparison after each run."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "naive" not in methods:
        raise SystemExit(f"--methods {list(methods)}: unknown {unknown}; choose from {list(METHODS)}, naive among them")
    base = mmt.MMTRecipe.from_yaml(recipe_file)
    base.split().check_scored_books(books)  # before any training
    recipes = [recipe_for(base, method, seed) for seed in seeds for method in methods]
    data = mmt.prepare(recipes[0])  # data, tokenizer and splits are the same for every method
    comparison: dict = {}
    for recipe in recipes:
        method = recipe.name[len(base.name) + 1:]
        result = json.loads(scored(build_cached(recipe, data=data), books).read_text(encoding="utf-8"))
        write_json(out / "runs" / f"{method}-seed{recipe.seed}.json", {**result, "name": method})
        files = sorted((out / "runs").glob("*-seed*.json"))
        if any(file.name.startswith("naive-") for file in files):
            comparison = write_comparison(load_results(files), "naive", out / "compare",
                                          title=f"{recipe_file.name}, John")
    return comparison


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "mmt_warm_e5_both.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--books", nargs="+", type=int, default=[43])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    run_table(args.recipe, args.methods, args.seeds, args.books, args.out)
    print((args.out / "compare" / "comparison.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
