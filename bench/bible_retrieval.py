"""Verse retrieval xx->en on the test book (John) per language and per layer with e5-small.

Prints a markdown table (rows: layers, columns: languages) and writes JSON.
Usage: python bench/bible_retrieval.py [--langs fr es ...] [--max-verses N] [--json bench/experiments/e5_retrieval/bible_retrieval.json]
"""
from __future__ import annotations

import argparse
import json
import time

from polypeft.data.bible import BIBLE_VERSIONS
from polypeft.backbones.e5 import load_encoder
from polypeft.experiments.bible_eval import TEST_BOOKS, best_layers, mean_over_languages, verse_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--langs", nargs="+", default=[lang for lang in BIBLE_VERSIONS if lang != "en"])
    parser.add_argument("--max-verses", type=int, default=None)
    parser.add_argument("--json", default="bench/experiments/e5_retrieval/bible_retrieval.json")
    args = parser.parse_args()

    model, tokenizer = load_encoder("e5-small")
    started = time.time()
    results = verse_retrieval(model, tokenizer, args.langs, pivot="en", max_verses=args.max_verses)
    seconds = time.time() - started
    langs = list(results)
    print("| layer | " + " | ".join(langs) + " | mean |")
    print("|---" * (len(langs) + 2) + "|")
    means = mean_over_languages(results)
    for layer in means:
        cells = " | ".join(f"{100 * results[lang][layer]:.1f}" for lang in langs)
        print(f"| {layer} | {cells} | {100 * means[layer]:.1f} |")
    best = best_layers(results)
    print("best layer per language: " + ", ".join(f"{lang} {layer} ({100 * acc:.1f})" for lang, (layer, acc) in best.items()))
    print(f"{seconds:.0f} s")
    with open(args.json, "w") as handle:
        json.dump({"books": list(TEST_BOOKS), "pivot": "en", "max_verses": args.max_verses, "seconds": seconds,
                   "accuracy_at_1": {lang: {str(k): v for k, v in scores.items()} for lang, scores in results.items()}},
                  handle, indent=1)


if __name__ == "__main__":
    main()
