"""The first verses of John translated by a trained `polypeft mmt` run, beside the reference, to read by eye.

Usage: python bench/experiments/warm_start/samples.py RUN_DIR [--verses 3] > samples.txt
"""
from __future__ import annotations

import argparse

from polypeft.data.bible import BibleCorpus
from polypeft.data.parallel import ParallelExample
from polypeft.tasks.translation.evaluate import translate
from polypeft.tasks.translation.run import load_translation_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--verses", type=int, default=3)
    args = parser.parse_args()
    recipe, tokenizer, model = load_translation_model(args.run_dir)
    sources = [lang for lang in recipe.languages if lang != recipe.pivot]
    rows = BibleCorpus().parallel([recipe.pivot, *sources], books=[43], max_verses=args.verses)
    examples = [ParallelExample(lang, recipe.pivot, row[lang], row[recipe.pivot], row["ref"]) for row in rows
                for lang in sources]
    for example, hypothesis in zip(examples, translate(model, tokenizer, examples, beam=recipe.beam, progress=False)):
        print(example.ref, example.src_lang, "| ref:", example.tgt, "| hyp:", hypothesis)


if __name__ == "__main__":
    main()
