"""Teacher-forced cross-entropy of trained translation runs on the valid and test books, per evaluation variant.

Short CPU runs leave BLEU near zero in every direction; the token cross-entropy still ranks the methods.
Usage: python bench/mmt_cross_entropy.py runs/mmt_bible7/*-seed*/ --json bench/experiments/mmt_bible7/mmt_bible7_cross_entropy.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from polypeft.core.fileio import write_json
from polypeft.tasks.translation.compare import run_label
from polypeft.tasks.translation.run import MMTRecipe, eval_variants, load_run, prepare, read_run_recipe, valid_loss_fn


def data_key(recipe: MMTRecipe) -> str:
    """What the tokenizer and the splits depend on: runs that agree here share one `prepare`."""
    return json.dumps([recipe.languages, recipe.pivot, recipe.vocab_size, recipe.spm_max_sentences,
                       str(recipe.split()), recipe.max_train_verses, recipe.max_eval_verses])


def measure(run_dirs: list[str]) -> list[dict]:
    """One row per run and variant: the mean token CE (no smoothing) on the valid and the test book."""
    rows, prepared = [], {}
    for run_dir in run_dirs:
        stored = read_run_recipe(run_dir)
        key = data_key(stored)
        if key not in prepared:
            prepared[key] = prepare(stored)
        recipe, data, model = load_run(run_dir, prepared[key])
        model.eval()
        for variant, route in eval_variants(recipe).items():
            with torch.no_grad():
                scores = {split: valid_loss_fn(recipe, data, model.config, examples=examples, route=route)(model)
                          for split, examples in (("valid", data.valid), ("test", data.test))}
            rows.append({"run": str(run_dir), "name": recipe.name, "seed": recipe.seed, "variant": variant,
                         **{f"{split}_ce": round(value, 4) for split, value in scores.items()}})
            print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    grouped = defaultdict(list)
    for row in rows:
        grouped[run_label(row, row["variant"])].append(row)
    lines = ["| run | seeds | valid CE (mean ± half range) | test CE (mean ± half range) |", "|---|---|---|---|"]
    for label, group in grouped.items():
        cells = []
        for key in ("valid_ce", "test_ce"):
            values = [r[key] for r in group]
            cells.append(f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}")
        lines.append(f"| {label} | {','.join(str(r['seed']) for r in group)} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="trained run directories")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = measure(args.runs)
    print(markdown(rows))
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
