"""The LMS paper's comparison in BLEU on the warm-start translation model: every method, every seed, one table.

Each method is the base recipe with its method block as the only change, placed where the naive baseline trains:
the decoder's FFN linears (Switch: every second one; the encoder is frozen, and routes in it would need a backward
pass through it). The decoder trains in every row, so LoRA there adds no capacity beyond naive's: it is the shared
low-rank control at LMS's parameter count, not peft's frozen-base LoRA (bench/RESULTS.md §12 compares that one).
Builds are cached and resumable (as `polypeft mmt build`), each scored once on the books named; run the script
again after a stop and it picks up where it stopped. A build of configs/mmt_warm_e5.yaml (xx->en) takes about 65
minutes on the idle 2-core CPU; FD runs every batch twice.

Rows scored before (by `polypeft mmt eval RUN --books ...`, e.g. the evaluations under bench/experiments/) join the
table with `--scored NAME=EVAL_JSON ...`: they are compared, not built again, so a machine without the builds in its
cache need not rebuild the baseline.

Usage: python bench/mmt_warm_table.py --out DIR [--recipe configs/mmt_warm_e5_both.yaml] [--methods ...]
       [--seeds 0 1] [--books 43] [--scored NAME=EVAL_JSON ...]
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Sequence

from polypeft.core.fileio import write_json
from polypeft.tasks.translation import run as mmt
from polypeft.tasks.translation.cached import build_cached, cached_recipe
from polypeft.tasks.translation.compare import (WEIGHTS_NAME, StaleEvaluationError, labelled_run, load_labelled,
                                                load_results, write_comparison)

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
    """The method block on the decoder's FFN linears; LoRA's rank is languages x LMS's rank, so it holds as many
    parameters as pair-wise LMS (one V and one F per language per linear; into English alone, F[en] serves all)."""
    block = dict(METHODS[method])
    if method != "naive":
        block["target_modules"] = DECODER_FFN
    if method == "lora":
        block.update(rank=len(languages) * LMS_RANK, alpha=2 * len(languages) * LMS_RANK)
    return block


def recipe_for(base: mmt.MMTRecipe, method: str, seed: int) -> mmt.MMTRecipe:
    """The base recipe with `method`'s block and `seed`, named after the method (checked as any recipe is)."""
    return dataclasses.replace(base, name=f"{base.name}-{method}", method=method_block(method, base.languages),
                               seed=seed)


def check_methods(base: mmt.MMTRecipe, methods: Sequence[str], scored_names: Sequence[str] = ()) -> None:
    """Refuse unknown methods, a table without its baseline (built or scored before), a row both built and given as
    scored, and decoder routes that would have one language."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if "naive" not in [*methods, *scored_names]:
        raise SystemExit(f"--methods {list(methods)}: the table compares with naive; add it (or --scored naive=EVAL)")
    twice = sorted(set(methods) & set(scored_names))
    if twice:
        raise SystemExit(f"{twice}: both in --methods and in --scored; build a row or give its scores, not both")
    by_target = sorted({"lms_lang", "ls_ffn"} & set(methods))
    if by_target and base.directions == "into_pivot":
        raise SystemExit(f"--methods {by_target}: in the decoder they route by the target language, and "
                         f"{base.name!r} translates into {base.pivot!r} alone, so each would be one shared module; "
                         "use a recipe with both directions (configs/mmt_warm_e5_both.yaml) or leave them out")


def scored(recipe: mmt.MMTRecipe, run_dir: Path, books: Sequence[int]) -> dict:
    """The run's evaluation on `books`: the one already written when it scores these weights, else a new one; a
    build reused from another name must decode as the recipe asks."""
    used = mmt.read_run_recipe(run_dir)
    if (used.beam, used.length_penalty) != (recipe.beam, recipe.length_penalty):
        raise SystemExit(f"{run_dir} decodes with beam {used.beam}, length penalty {used.length_penalty}; the table "
                         f"asks beam {recipe.beam}, length penalty {recipe.length_penalty}: score it apart")
    file = mmt.eval_file(run_dir, books=books)
    if file.is_file():
        try:
            return load_results([file])[0]
        except StaleEvaluationError:
            pass
    return mmt.evaluate_run(run_dir, books=books)


def scored_names(arguments: Sequence[str]) -> list[str]:
    """The row name of each NAME=EVAL_JSON argument; one without a name is refused."""
    try:
        names = [labelled_run(argument)[0] for argument in arguments]
    except ValueError as error:
        raise SystemExit(f"--scored: {error}") from None
    unnamed = [argument for argument, name in zip(arguments, names) if name is None]
    if unnamed:
        raise SystemExit(f"--scored {unnamed[0]}: write NAME=EVAL_JSON, the row's name first (e.g. naive=...)")
    return names


def load_scored(arguments: Sequence[str], books: Sequence[int], pivot: str) -> list[dict]:
    """The NAME=EVAL_JSON rows scored before, each checked to score `books` with `pivot`, no seed of a row twice."""
    results = load_labelled(arguments)
    seen = set()
    for argument, result in zip(arguments, results):
        if result.get("books") != list(books):
            raise SystemExit(f"--scored {argument}: it scores books {result.get('books')}; the table scores "
                             f"{list(books)}")
        if result.get("pivot", "en") != pivot:
            raise SystemExit(f"--scored {argument}: its pivot is {result.get('pivot')!r}; the recipe's is {pivot!r}")
        if (result["name"], result["seed"]) in seen:
            raise SystemExit(f"--scored {argument}: {result['name']!r} seed {result['seed']} is given twice")
        seen.add((result["name"], result["seed"]))
    return results


def run_table(recipe_file: Path, methods: Sequence[str], seeds: Sequence[int], books: Sequence[int], out: Path,
              scored_before: Sequence[str] = ()) -> dict:
    """Build and score every method for every seed (each seed of every method before the next seed), keep each
    evaluation under its method's name in `out/runs`, and compare this call's runs and the ones `scored_before`
    (NAME=EVAL_JSON) once they are all scored."""
    base = mmt.MMTRecipe.from_yaml(recipe_file)
    check_methods(base, methods, scored_names(scored_before))
    base.split().check_scored_books(books)  # before any training
    results = load_scored(scored_before, books, base.pivot)
    recipes = [recipe_for(base, method, seed) for seed in seeds for method in methods]
    data = None  # prepared once, when a build needs it: data, tokenizer and splits are the same for every method
    for recipe in recipes:
        method = recipe.name[len(base.name) + 1:]
        if data is None and not (cached_recipe(recipe).run_dir / WEIGHTS_NAME).is_file():
            data = mmt.prepare(recipe)
        result = {**scored(recipe, build_cached(recipe, data=data), books), "name": method}
        write_json(out / "runs" / f"{method}-seed{recipe.seed}.json", result)
        results.append(result)
    books_named = ", ".join(str(book) for book in books)
    return write_comparison(results, "naive", out / "compare", title=f"{recipe_file.name}, books {books_named}")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: arguments as the module's usage line says."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "mmt_warm_e5_both.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--books", nargs="+", type=int, default=[43])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scored", nargs="+", default=[], metavar="NAME=EVAL_JSON",
                        help="rows scored before, compared and not built again (e.g. naive=bench/experiments/...)")
    args = parser.parse_args(argv)
    run_table(args.recipe, args.methods, args.seeds, args.books, args.out, args.scored)
    print((args.out / "compare" / "comparison.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
