"""The `polypeft` command: translation runs (`mmt`), the demo, and the method-specific commands.

Each subcommand reads a YAML recipe; `--set key=value` overrides single keys from the command line.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .recipes import (add_recipe_arguments, check_output_dir, check_outputs_apart, check_safetensors, load_recipe,
                      user_error_message)


def _recipe(args):
    from ..tasks.translation.run import MMTRecipe

    extra = {"seed": args.seed} if getattr(args, "seed", None) is not None else {}
    recipe = load_recipe(MMTRecipe, args.config, args.set, extra)
    check_output_dir(recipe.run_dir, "output_dir/name")
    return recipe


def mmt_prepare(args) -> int:
    from ..tasks.translation.run import prepare

    recipe = _recipe(args)
    data = prepare(recipe)
    if recipe.base is not None:
        print(f"tokenizer: {recipe.base.encoder}'s, pruned to {data.tokenizer.source_vocab_size} source and "
              f"{data.tokenizer.vocab_size} target pieces")
    else:
        print(f"tokenizer: {data.tokenizer.model_path} ({data.tokenizer.vocab_size} pieces)")
    print(f"examples: train {len(data.train):,}, valid {len(data.valid):,}, test {len(data.test):,} "
          f"over {len(recipe.languages) - 1} languages, directions: {recipe.directions}")
    return 0


def mmt_train(args) -> int:
    from ..tasks.translation.run import train_run
    from ..training.processes import process_state

    recipe = _recipe_to_evaluate(args)
    run_dir = train_run(recipe, resume=args.resume, overwrite=args.overwrite)
    if not process_state().is_main_process:  # under accelerate launch, one process writes and evaluates
        return 0
    print(f"trained: {run_dir}")
    evaluate_after(args, run_dir)
    return 0


def _recipe_to_evaluate(args):
    """The command's recipe, its `--eval-books` checked against its test books before training, not after."""
    recipe = _recipe(args)
    if args.eval_books:
        recipe.split().check_scored_books(args.eval_books)
    return recipe


def evaluate_after(args, run_dir: Path) -> None:
    """`--eval`: the test split as the recipe draws it; `--eval-books`: some test books alone; both: each."""
    from ..tasks.translation.run import evaluate_run

    if args.eval:
        print_scores(evaluate_run(run_dir))
    if args.eval_books:
        print_scores(evaluate_run(run_dir, books=args.eval_books))


def mmt_build(args) -> int:
    from ..tasks.translation.cached import build_cached
    from ..training.processes import process_state

    run_dir = build_cached(_recipe_to_evaluate(args))
    if not process_state().is_main_process:
        return 0
    print(f"built: {run_dir}")
    evaluate_after(args, run_dir)
    return 0


def mmt_eval(args) -> int:
    from ..tasks.translation.run import evaluate_run, read_run_recipe

    read_run_recipe(args.run)  # the run's recipe and weights are checked before any data is prepared
    check_safetensors(Path(args.run) / "model.safetensors")
    print_scores(evaluate_run(args.run, split=args.split, books=args.books))
    return 0


def print_scores(results: dict) -> None:
    from ..tasks.confidence import bleu_intervals

    for variant, scores in results["variants"].items():
        averages = scores["averages"]
        print(f"{results['name']} seed {results['seed']} [{variant}] " +
              ", ".join(f"{k} {v}" for k, v in averages.items() if v is not None))
        if not scores.get("sentences"):  # scored by a polypeft that kept no per-verse statistics
            continue
        intervals = bleu_intervals(scores["sentences"], results.get("pivot", "en"))
        print("  BLEU 95 % intervals (verses resampled): " + ", ".join(
            f"{group} [{found['low']:.2f}, {found['high']:.2f}]" for group, found in intervals.items()
            if group != "directions"))


def mmt_compare(args) -> int:
    from ..tasks.translation.compare import labelled_run, load_labelled, write_comparison

    check_output_dir(args.out, "--out")
    check_outputs_apart({f"runs[{i}]": labelled_run(run)[1] for i, run in enumerate(args.runs)},
                        {"--out": (args.out, "folder")})
    comparison = write_comparison(load_labelled(args.runs, args.split), args.baseline, args.out, pivot=args.pivot,
                                  paired_tests=not args.no_paired_tests)
    print(Path(args.out, "comparison.md").read_text(encoding="utf-8"))
    print(f"plot: {Path(args.out, 'bleu_gain_vs_parameters.png')}")
    return 0 if comparison else 1


def demo(args) -> int:
    from ..experiments.demo import run_demo

    check_output_dir(args.output_dir, "--output-dir")
    run_demo(args.parts, quick=args.quick, output_dir=args.output_dir, steps=args.steps, seed=args.seed,
             test_book=args.test_book)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="polypeft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"polypeft {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    mmt = commands.add_parser("mmt", help="multilingual translation on the Bible corpus")
    mmt_commands = mmt.add_subparsers(dest="mmt_command", required=True)
    for name, func, help_text in (("prepare", mmt_prepare, "train the tokenizer, build the splits"),
                                  ("train", mmt_train, "train one run of a recipe"),
                                  ("build", mmt_build, "train a recipe once into the cache root (reused, resumed)")):
        sub = mmt_commands.add_parser(name, help=help_text)
        add_recipe_arguments(sub)
        sub.add_argument("--seed", type=int)
        sub.set_defaults(func=func)
        if name == "train":
            sub.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
            sub.add_argument("--overwrite", action="store_true", help="delete the run's folder and train afresh")
        if name != "prepare":
            sub.add_argument("--eval", action="store_true", help="evaluate on the test books afterwards")
            sub.add_argument("--eval-books", nargs="+", type=int, default=None,
                             help="evaluate afterwards on these of the recipe's test books alone (with several "
                                  "held out, --eval scores a sample drawn from all of them)")
    evaluate = mmt_commands.add_parser("eval", help="beam search + BLEU/chrF per direction of a trained run")
    evaluate.add_argument("run", help="run directory written by `mmt train`")
    evaluate.add_argument("--split", default="test", choices=("test", "valid"))
    evaluate.add_argument("--books", nargs="+", type=int, default=None,
                          help="score these of the run's test books alone (eval_test_books-<ids>.json)")
    evaluate.set_defaults(func=mmt_eval)
    comparison = mmt_commands.add_parser("compare", help="table, win ratios and plot over evaluated runs")
    comparison.add_argument("runs", nargs="+", help="run directories (or eval JSON files); NAME=RUN names a run's row "
                            "(seeds of one method built under different names share a row)")
    comparison.add_argument("--baseline", default="naive")
    comparison.add_argument("--out", default="runs/compare")
    comparison.add_argument("--split", default="test", choices=("test", "valid"))
    comparison.add_argument("--pivot", default="en", help="the hub language of the en->xx / xx->en averages")
    comparison.add_argument("--no-paired-tests", action="store_true",
                            help="leave out sacreBLEU's paired bootstrap (it reads the references from the corpus); "
                                 "the paired intervals stay")
    comparison.set_defaults(func=mmt_compare)

    demo_parser = commands.add_parser("demo", help="every method against its baseline on the Bible corpus, minutes")
    demo_parser.add_argument("parts", nargs="*", metavar="PART", help="run only these parts, from lrp2, lens, lms, "
                             "flare, mmt (default: all but mmt, whose BLEU ranks nothing at CPU size)")
    demo_parser.add_argument("--quick", action="store_true", help="a smoke run (<= 2 min; its figures mean nothing)")
    demo_parser.add_argument("--output-dir", default="runs/demo")
    demo_parser.add_argument("--steps", type=int, help="translation training steps per method (default 100; --quick: 8)")
    demo_parser.add_argument("--seed", type=int, default=0, help="seeds every part's training (LMS runs SEED and "
                             "SEED+1; LRP2 has no randomness); default 0")
    demo_parser.add_argument("--test-book", type=int, default=43, help="the held-out book scored once (default 43, "
                             "John); choices are made on books 45-49 (LMS: 49), so pick another")
    demo_parser.set_defaults(func=demo)

    from .encoder import add_cli as add_encoder
    from .flare import add_cli as add_flare
    from .lrp2_lens import add_cli as add_lrp2_lens

    add_encoder(commands)
    add_lrp2_lens(commands)
    add_flare(commands)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command. A user error (a bad value, file or folder; polypeft's errors name the value and what is
    allowed) prints one message and exits 2; POLYPEFT_TRACEBACK=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        message = user_error_message(error)
        if message is None or os.environ.get("POLYPEFT_TRACEBACK"):
            raise
        print(f"polypeft {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
