"""Bible verse retrieval xx->en on e5-small: plain encoder vs LRP2 (LIRP only) vs LENS, plus hook overhead.

Layers for LRP2 are chosen per language on the valid books (default 45-49, 200 queries; a language whose best
layer is inside the noise gets none), accuracy is reported on the test book (43).
Usage: python bench/lrp2_lens_bible.py [--queries-per-language 120] [--valid-books 45,46,47,48,49]
       [--out bench/experiments/lrp2_lens/lrp2_lens_bible.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from polypeft.data.bible import BibleCorpus
from polypeft.core.fileio import write_json
from polypeft.interventions import lens
from polypeft.interventions.lrp2 import LRP2, language_vectors
from polypeft.interventions.search import DEFAULT_RULE, RULES, lrp2_scorer, search_layers
from polypeft.backbones.e5 import embed, load_encoder
from polypeft.tasks.retrieval import correct_at_1

TEST_BOOK = 43
PREFIX = "query: "  # e5's prefix for symmetric tasks; used on both sides and for the language vectors


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over the list (a fixed, seed-free subset)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(index * step)] for index in range(count)]


def accuracy_at_1(queries: torch.Tensor, candidates: torch.Tensor, gold: list[int]) -> float:
    return float(correct_at_1(queries, candidates, gold).mean())


def encode(model, tokenizer, texts: list[str], args) -> torch.Tensor:
    return embed(model, tokenizer, texts, prefix=PREFIX, batch_size=args.batch_size,
                 max_length=args.max_length, progress=False)


def retrieval_set(corpus: BibleCorpus, languages: list[str], books: list[int], per_language: Optional[int],
                  candidate_limit: Optional[int] = None):
    """English candidates (every verse of the books) and, per language, spread queries with gold indices
    (`per_language` None: every verse present in that language)."""
    english = corpus.verses("en", books)
    keys = list(english)[:candidate_limit]
    position = {key: index for index, key in enumerate(keys)}
    queries = {}
    for language in languages:
        verses = corpus.verses(language, books)
        present = [key for key in keys if key in verses]
        chosen = spread(present, per_language or len(present))
        queries[language] = ([verses[key] for key in chosen], [position[key] for key in chosen])
    return [english[key] for key in keys], queries, keys


def set_sizes(candidates: list, queries: dict) -> dict:
    """How many candidates and, per language, queries a retrieval set holds (for the report)."""
    return {"candidates": len(candidates), "queries": {language: len(gold) for language, (_, gold) in queries.items()}}


def evaluate_all(model, tokenizer, candidates, queries, args, lrp2_layers: Optional[dict] = None, vectors=None):
    """Accuracy@1 per language; LRP2 leaves the English candidates as they are (zero shift for the pivot).

    `lrp2_layers` maps a language to its (LIRP layer, LSRP layer or None)."""
    scores = {}
    for language, (texts, gold) in queries.items():
        if lrp2_layers is None or lrp2_layers[language][0] is None:  # the search refused LRP2 for this language
            embedded = encode(model, tokenizer, texts, args)
        else:
            lirp, lsrp = lrp2_layers[language]
            with LRP2(model, vectors, lirp_layer=lirp, lsrp_layer=lsrp) as lrp2, lrp2.languages(language):
                embedded = encode(model, tokenizer, texts, args)
        scores[language] = accuracy_at_1(embedded, candidates, gold)
    return scores


def english_versions(model, tokenizer, corpus, candidates, args) -> float:
    """KJV verses of the test book retrieving their WEB verse among all WEB verses of the book."""
    web, kjv = corpus.verses("en", [TEST_BOOK]), corpus.verses("kjv", [TEST_BOOK])
    keys = list(web)[:args.candidate_limit]
    present = [key for key in keys if key in kjv]
    chosen = spread(present, args.queries_per_language or len(present))
    queries = encode(model, tokenizer, [kjv[key] for key in chosen], args)
    return accuracy_at_1(queries, candidates, [keys.index(key) for key in chosen])


def hook_overhead(model, tokenizer, vectors, texts, layer, language, args, repeats: int = 5) -> dict:
    """Median time of the same batch with and without the LRP2 hook, alternated in one process."""
    plain_times, hooked_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(model, tokenizer, texts, args)
        plain_times.append(time.perf_counter() - start)
        with LRP2(model, vectors, lirp_layer=layer) as lrp2, lrp2.languages(language):
            start = time.perf_counter()
            encode(model, tokenizer, texts, args)
            hooked_times.append(time.perf_counter() - start)
    plain, hooked = statistics.median(plain_times), statistics.median(hooked_times)
    return {"sentences": len(texts), "repeats": repeats, "plain_s": plain, "hooked_s": hooked, "ratio": hooked / plain}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--languages", default="fr,es,de,ru,ar,ko")
    parser.add_argument("--queries-per-language", type=int, default=120,
                        help="test queries per language (book 43); 0: every verse of the book")
    parser.add_argument("--valid-queries", type=int, default=200, help="valid queries per language, spread over "
                        "the valid books; their candidates are every English verse of those books")
    parser.add_argument("--valid-books", default="45,46,47,48,49", help="books for the layer search (comma-separated numbers)")
    parser.add_argument("--search-layers", default="6,9,11,12")
    parser.add_argument("--rule", choices=RULES, default=DEFAULT_RULE, help="the layer search's choice rule")
    parser.add_argument("--pairs", action="store_true",
                        help="also search LIRP at i with LSRP at j > i (the paper's pair), not LIRP alone only")
    parser.add_argument("--no-lens", action="store_true", help="skip the LENS part")
    parser.add_argument("--no-lrp2", action="store_true", help="skip the LRP2 part")
    parser.add_argument("--vector-sentences", type=int, default=200, help="train-book verses per language for mu_l")
    parser.add_argument("--probe-sentences", type=int, default=100)
    parser.add_argument("--lens-verses", type=int, default=200, help="parallel train verses for LENS")
    parser.add_argument("--lens-steps", type=int, default=60)
    parser.add_argument("--lens-lr", type=float, default=5e-5)
    parser.add_argument("--lens-top-k", type=int, default=2)
    parser.add_argument("--lens-weights", default="1,1,1", help="align,separate,retain loss weights")
    parser.add_argument("--lens-push", type=float, default=1.0,
                        help="separation target s * d_l: 1 pushes away from the pivot (paper), -1 pulls toward it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--candidate-limit", type=int, default=None, help="smoke runs only: fewer candidates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/experiments/lrp2_lens/lrp2_lens_bible.json")
    parser.add_argument("--figures", default="bench/experiments/lrp2_lens/figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    languages = args.languages.split(",")
    corpus = BibleCorpus()
    model, tokenizer = load_encoder("e5-small")
    report: dict = {"args": vars(args), "machine": platform.platform(), "timings_s": {}}
    clock = time.perf_counter()

    # Training verses: every book except the test and valid ones, spread over the canon.
    valid_books = [int(book) for book in args.valid_books.split(",")]
    if TEST_BOOK in valid_books:
        raise SystemExit(f"--valid-books {args.valid_books} includes the test book {TEST_BOOK}")
    train_rows = [row for row in corpus.parallel(["en", *languages])
                  if int(row["ref"].split(":")[0]) not in (TEST_BOOK, *valid_books)]
    vectors = None
    if not args.no_lrp2:
        vector_rows = spread(train_rows, args.vector_sentences)
        texts = {language: [PREFIX + row[language] for row in vector_rows] for language in ["en", *languages]}
        vectors = language_vectors(model, texts, tokenizer, pooling="mean", batch_size=args.batch_size,
                                   max_length=args.max_length)
        report["timings_s"]["language_vectors"] = time.perf_counter() - clock

    test_candidates, test_queries, _ = retrieval_set(corpus, languages, [TEST_BOOK], args.queries_per_language,
                                                   args.candidate_limit)
    report["test_sizes"] = set_sizes(test_candidates, test_queries)
    clock = time.perf_counter()
    candidates = encode(model, tokenizer, test_candidates, args)
    report["plain"] = evaluate_all(model, tokenizer, candidates, test_queries, args)
    report["plain_en_kjv_to_web"] = english_versions(model, tokenizer, corpus, candidates, args)
    report["timings_s"]["test_plain"] = time.perf_counter() - clock
    shown = ["plain", "plain_mean", "plain_en_kjv_to_web", "test_sizes"]
    if not args.no_lrp2:
        run_lrp2(report, model, tokenizer, corpus, languages, valid_books, vectors, candidates, test_queries, args)
        shown += ["lrp2", "lrp2_mean", "lrp2_chosen_layers", "lrp2_hook_overhead", "valid_sizes"]
    if not args.no_lens:
        run_lens(report, model, tokenizer, corpus, languages, train_rows, test_candidates, test_queries, args)
        shown += ["lens", "lens_mean", "lens_en_kjv_to_web", "lens_history"]
    for name in ("plain", "lrp2", "lens"):
        if name in report:
            report[f"{name}_mean"] = sum(report[name].values()) / len(report[name])
    write_report(report, args, (*shown, "timings_s"))


def run_lrp2(report, model, tokenizer, corpus, languages, valid_books, vectors, candidates, test_queries, args):
    """LRP2's layer search on the valid books (LIRP only, the variant for sentence embedders; with --pairs
    also LIRP at i + LSRP at j > i), then the chosen layers on the test book and the hook's overhead."""
    valid_candidates, valid_queries, _ = retrieval_set(corpus, languages, valid_books, args.valid_queries,
                                                      args.candidate_limit)
    report["valid_sizes"] = set_sizes(valid_candidates, valid_queries)
    valid_candidate_embeddings = encode(model, tokenizer, valid_candidates, args)

    def evaluate(language, lrp2):
        # English candidates carry a zero LIRP shift (pivot), so their embeddings are computed once.
        query_texts, gold = valid_queries[language]
        # per-query outcomes, so the search can refuse a layer whose gain is inside the noise
        return correct_at_1(encode(model, tokenizer, query_texts, args), valid_candidate_embeddings, gold)

    clock = time.perf_counter()
    search = search_layers(lrp2_scorer(model, vectors, evaluate), languages,
                           [int(layer) for layer in args.search_layers.split(",")], pairs=args.pairs, lirp_only=True,
                           rule=args.rule)
    report["timings_s"]["layer_search"] = time.perf_counter() - clock
    search.save_json(Path(args.out).with_name("lrp2_layer_search.json"))
    search.plot_heatmaps(args.figures, prefix="lrp2_heatmap", metric="xx->en retrieval accuracy@1 (valid books)")
    chosen = {language: (search.best(language)["lirp_layer"], search.best(language)["lsrp_layer"])
              for language in languages}
    report["lrp2_search"] = search.to_dict()
    report["lrp2_chosen_layers"] = chosen
    clock = time.perf_counter()
    report["lrp2"] = evaluate_all(model, tokenizer, candidates, test_queries, args, chosen, vectors)
    report["timings_s"]["test_lrp2"] = time.perf_counter() - clock
    some_language = next((language for language in languages if chosen[language][0] is not None), None)
    if some_language is None:  # every language refused: no hook to time
        return
    report["lrp2_hook_overhead"] = hook_overhead(
        model, tokenizer, vectors, test_queries[some_language][0][:64], chosen[some_language][0], some_language, args
    )


def run_lens(report, model, tokenizer, corpus, languages, train_rows, test_candidates, test_queries, args):
    """LENS: probe and train on training-book verses (the model changes in place), then the same test."""
    clock = time.perf_counter()
    probe_rows = spread(train_rows, args.probe_sentences)
    probe_texts = {language: [PREFIX + row[language] for row in probe_rows] for language in ["en", *languages]}
    lens_probe = lens.probe(model, tokenizer, probe_texts, pooling="mean", batch_size=args.batch_size,
                            max_length=args.max_length)
    lens_probe.plot(Path(args.figures) / "lens_probe_layer12.png")
    lens_rows = spread(train_rows[1::2], args.lens_verses)
    pairs = [{language: PREFIX + row[language] for language in ["en", *languages]} for row in lens_rows]
    weights = tuple(float(w) for w in args.lens_weights.split(","))
    settings = lens.LensTrainSettings(top_k_layers=args.lens_top_k, weights=list(weights), batch_size=8,
                                      max_length=args.max_length, push_strength=args.lens_push,
                                      training=lens.lens_schedule(steps=args.lens_steps, lr=args.lens_lr))
    result = lens.train(model, tokenizer, pairs, lens_probe, settings)
    report["timings_s"]["lens_probe_train"] = time.perf_counter() - clock
    report["lens_history"] = {"first": result.history[0], "last": result.history[-1]}
    report["lens_settings"] = result.settings
    candidates = encode(model, tokenizer, test_candidates, args)
    report["lens"] = evaluate_all(model, tokenizer, candidates, test_queries, args)
    report["lens_en_kjv_to_web"] = english_versions(model, tokenizer, corpus, candidates, args)


def write_report(report: dict, args, shown: tuple) -> None:
    write_json(args.out, report)
    print(json.dumps({key: report[key] for key in shown}, indent=2))


if __name__ == "__main__":
    main()
