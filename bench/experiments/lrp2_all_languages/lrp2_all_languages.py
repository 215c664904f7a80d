"""LRP2 on all 11 non-English languages of the Bible corpus (e5-small): layers chosen on books 45-49, scored on John.

Per language and split, the per-query outcome (right/wrong at rank 1) of every cell is stored, so that the choice
(robust or plain argmax), its bootstrap spread and the variants are all read off the same forward passes.
Usage: python bench/experiments/lrp2_all_languages/lrp2_all_languages.py [--tiny] [--out bench/experiments/lrp2_all_languages]   (stopped runs resume)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
BENCH = HERE.parents[1]  # bench/, whose kept benchmarks (lrp2_lens_bible) this experiment reuses
sys.path[:0] = [str(HERE), str(BENCH)]  # its own modules and the benchmarks are scripts, not a package

from lrp2_all_engine import BlockRunner, batches, cell_embeddings  # noqa: E402
from lrp2_all_report import analyse, markdown, plot_all, test_cells  # noqa: E402
from lrp2_lens_bible import PREFIX, TEST_BOOK, retrieval_set, spread  # noqa: E402
from polypeft.tasks.retrieval import correct_at_1  # noqa: E402

from polypeft.backbones.e5 import load_encoder  # noqa: E402
from polypeft.core.fileio import write_json, write_safetensors  # noqa: E402
from polypeft.data.bible import BibleCorpus  # noqa: E402
from polypeft.interventions.capture import model_identity  # noqa: E402
from polypeft.interventions.lrp2 import LRP2, LanguageVectors  # noqa: E402
from polypeft.interventions.search import DEFAULT_RULE, RULES  # noqa: E402

LANGUAGES = "fr,es,de,it,pt,ru,ar,fa,ko,vi,tl"
VALID_BOOKS = [45, 46, 47, 48, 49]
MEAN = "all"  # the pseudo-language of the both-sides variant: the average of every language's vector


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--languages", default=LANGUAGES)
    parser.add_argument("--valid-queries", type=int, default=200, help="per language, spread over books 45-49")
    parser.add_argument("--test-queries", type=int, default=0, help="John queries per language; 0: every verse")
    parser.add_argument("--layers", default="2,4,6,8,10,12", help="LIRP layers searched (LIRP alone and pairs)")
    parser.add_argument("--lsrp-layers", default="10,12", help="LSRP layers j > i of the pairs")
    parser.add_argument("--both-layers", default="2,4,6,8,10,12", help="layers of the both-sides variant")
    parser.add_argument("--pool", type=int, default=2000, help="training verses per language encoded for vectors")
    parser.add_argument("--vector-sizes", default="50,100,200,500,1000,2000")
    parser.add_argument("--vector-seeds", default="0,1")
    parser.add_argument("--default-vectors", type=int, default=500, help="sentences per language of the main run")
    parser.add_argument("--resamples", type=int, default=25, help="bootstrap resamples of the validation queries")
    parser.add_argument("--resample-seeds", default="0,1")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96, help="bench/lrp2_lens_bible.py's default")
    parser.add_argument("--candidate-limit", type=int, default=None, help="tiny runs only: fewer candidates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", type=int, default=8, help="queries on which the cached runner is checked "
                        "against the LRP2 hooks (0: skip)")
    parser.add_argument("--out", default="bench/experiments/lrp2_all_languages")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "polypeft" / "lrp2_all"))
    parser.add_argument("--test-all-cells", action="store_true", help="score every cell on the test book, "
                        "not only those a choice rule (or a bootstrap resample) picks")
    parser.add_argument("--rule", choices=RULES, default=DEFAULT_RULE, help="the search's choice rule; Results A-C "
                        "of RESULTS §5 ran before 'split' existed, under 'bonferroni'")
    parser.add_argument("--tiny", action="store_true", help="pipeline check: 2 languages, small sets")
    args = parser.parse_args()
    if args.tiny:
        args.languages, args.valid_queries, args.test_queries, args.pool = "fr,ko", 60, 40, 100
        args.vector_sizes, args.default_vectors, args.candidate_limit, args.resamples = "50,100", 100, 200, 5
    return args


def numbers(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def run_key(args, split: str = "test") -> str:
    """Outcome files are kept per settings that change them, so a resumed run never mixes two settings (the
    valid outcomes do not depend on the test's or the curve's settings, so a larger test reuses them)."""
    keys = ["valid_queries", "layers", "lsrp_layers", "both_layers", "pool", "default_vectors", "max_length",
            "candidate_limit"]
    if split == "test":
        keys += ["test_queries", "vector_sizes", "vector_seeds"]
        if not args.test_all_cells:  # the cells scored depend on the bootstrap's resamples and the rule
            keys += ["test_all_cells", "resamples", "resample_seeds"] + (["rule"] if args.rule != "bonferroni" else [])
    settings = {key: getattr(args, key) for key in keys}
    if split != "test":
        settings["default_seed"] = numbers(args.vector_seeds)[0]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:10]


def vector_pool(runner, corpus, languages, args, cache: Path) -> dict[str, torch.Tensor]:
    """(pool, layers, hidden) mean-pooled states of `--pool` training verses per language (cached on disk)."""
    held_out = {TEST_BOOK, *VALID_BOOKS}
    rows = [row for row in corpus.parallel(["en", *languages]) if int(row["ref"].split(":")[0]) not in held_out]
    rows = spread(rows, args.pool)
    pooled = {}
    for language in ["en", *languages]:
        path = cache / f"pool_{language}.safetensors"
        if path.exists():
            pooled[language] = load_file(str(path))["pooled"]
            continue
        texts = [row[language] for row in rows]
        states = torch.empty(len(texts), runner.num_layers + 1, runner.model.config.hidden_size)
        for index in tqdm(list(batches(texts, args.batch_size)), desc=f"vector pool {language}"):
            states[index] = runner.pooled_layers(runner.states([texts[i] for i in index])).transpose(0, 1)
        write_safetensors(path, {"pooled": states})
        pooled[language] = states
    return pooled


def vector_sets(pooled, model, args) -> dict[tuple[int, int], LanguageVectors]:
    """Language vectors from `size` pool verses drawn with `seed` (every size and seed of the curve)."""
    total = next(iter(pooled.values())).shape[0]
    sets = {}
    for size in numbers(args.vector_sizes):
        for seed in numbers(args.vector_seeds):
            chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:min(size, total)]
            means = {language: states[chosen].double().mean(0).float() for language, states in pooled.items()}
            sets[(size, seed)] = LanguageVectors({"encoder": means}, list(range(next(iter(means.values())).shape[0])),
                                                 "mean", model_identity(model), {k: len(chosen) for k in means})
    return sets


def plans(vectors: LanguageVectors, language: str, args, curve=None):
    """Query-side cells of one language: base, lirp:i, pair:i:j, both:i, and (test) curve:size:seed at one layer."""
    both = vectors.with_mean_language(MEAN)
    lirp = {i: vectors.vector("en", i) - vectors.vector(language, i) for i in numbers(args.layers)}
    plan: dict = {"base": None}
    for i, shift in lirp.items():
        plan[f"lirp:{i}"] = ((i, shift),)
        for j in numbers(args.lsrp_layers):
            if j > i:
                plan[f"pair:{i}:{j}"] = ((i, shift), (j, vectors.vector(language, j) - vectors.vector("en", j)))
    for i in numbers(args.both_layers):
        plan[f"both:{i}"] = ((i, both.vector(MEAN, i) - both.vector(language, i)),)
    for (size, seed), (layer, other) in (curve or {}).items():
        plan[f"curve:{size}:{seed}"] = ((layer, other.vector("en", layer) - other.vector(language, layer)),)
    return plan


def candidate_embeddings(runner, texts, vectors, layers: list[int], args) -> dict[str, torch.Tensor]:
    """English candidates: plain, and shifted toward the mean of all languages for each both-sides layer."""
    both = vectors.with_mean_language(MEAN)
    plan = {"base": None, **{f"both:{i}": ((i, both.vector(MEAN, i) - both.vector("en", i)),) for i in layers}}
    with tqdm(total=len(texts), desc="English candidates") as bar:
        return cell_embeddings(runner, texts, plan, args.batch_size, bar)


def outcomes_of(runner, texts, gold, plan, candidates, args, desc) -> dict[str, torch.Tensor]:
    with tqdm(total=len(texts), desc=desc) as bar:
        embedded = cell_embeddings(runner, texts, plan, args.batch_size, bar)
    return {name: correct_at_1(embedding, candidates[name if name.startswith("both:") else "base"], gold)
            .to(torch.uint8) for name, embedding in embedded.items()}


def check_runner(runner, model, tokenizer, vectors, texts, language, args) -> dict:
    """The cached runner against the library's LRP2 hooks on the same queries (largest |difference|)."""
    from polypeft.backbones.e5 import embed

    texts = texts[:args.check]
    i, j, k = numbers(args.layers)[0], numbers(args.lsrp_layers)[-1], numbers(args.both_layers)[0]
    both = vectors.with_mean_language(MEAN)
    ours = cell_embeddings(runner, texts, plans(vectors, language, args), args.batch_size)
    reference = {"base": embed(model, tokenizer, texts, prefix=PREFIX, max_length=args.max_length)}
    for name, vecs, pivot, lsrp in ((f"lirp:{i}", vectors, "en", None), (f"pair:{i}:{j}", vectors, "en", j),
                                    (f"both:{k}", both, MEAN, None)):
        layer = k if pivot == MEAN else i
        with LRP2(model, vecs, lirp_layer=layer, lsrp_layer=lsrp, pivot=pivot) as lrp2, lrp2.languages(language):
            reference[name] = embed(model, tokenizer, texts, prefix=PREFIX, max_length=args.max_length)
    return {name: float((ours[name] - value).abs().max()) for name, value in reference.items()}


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    languages = args.languages.split(",")
    out, key = Path(args.out), run_key(args)
    pool_settings = json.dumps([args.pool, args.max_length, languages])
    cache = Path(args.cache) / hashlib.sha256(pool_settings.encode()).hexdigest()[:10]
    corpus = BibleCorpus()
    model, tokenizer = load_encoder("e5-small")
    runner = BlockRunner(model, tokenizer, args.max_length, PREFIX)
    clock, timings = time.perf_counter(), {}
    pooled = vector_pool(runner, corpus, languages, args, cache)
    sets = vector_sets(pooled, model, args)
    vectors = sets[(args.default_vectors, numbers(args.vector_seeds)[0])]
    timings["vector_pool_s"] = time.perf_counter() - clock
    report = {"args": vars(args), "run_key": key, "machine": platform.platform(), "date": "2026-12-02"}
    splits = {"valid": (VALID_BOOKS, args.valid_queries), "test": ([TEST_BOOK], args.test_queries or None)}
    outcomes: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for split, (books, per_language) in splits.items():
        clock = time.perf_counter()
        english, queries, _ = retrieval_set(corpus, languages, books, per_language, args.candidate_limit)
        report[f"{split}_sizes"] = {"candidates": len(english), "queries": {k: len(v[1]) for k, v in queries.items()}}
        if split == "valid" and args.check:
            report["runner_check_max_abs_diff"] = check_runner(runner, model, tokenizer, vectors,
                                                               queries[languages[0]][0], languages[0], args)
            print("runner vs LRP2 hooks:", report["runner_check_max_abs_diff"])
        candidates = None
        outcomes[split] = {}
        needed = None if split == "valid" or args.test_all_cells else test_cells(outcomes["valid"], languages, args)
        for language in languages:
            path = out / "outcomes" / run_key(args, split) / f"{split}_{language}.safetensors"
            if path.exists():
                outcomes[split][language] = load_file(str(path))
                continue
            both_layers = numbers(args.both_layers) if needed is None else sorted(
                {int(name.split(":")[1]) for cells in needed.values() for name in cells if name.startswith("both:")})
            candidates = candidates or candidate_embeddings(runner, english, vectors, both_layers, args)
            curve = None
            if split == "test":  # the vector-size curve at the LIRP layer the valid books chose (argmax)
                valid = outcomes["valid"][language]
                layer = max(numbers(args.layers), key=lambda i: (float(valid[f"lirp:{i}"].float().mean()), -i))
                curve = {size_seed: (layer, other) for size_seed, other in sets.items()}
            texts, gold = queries[language]
            plan = plans(vectors, language, args, curve)
            if needed is not None:
                plan = {name: cell for name, cell in plan.items() if name in needed[language] or name.startswith("curve:")}
            found = outcomes_of(runner, texts, gold, plan, candidates, args, f"{split} {language}")
            write_safetensors(path, found)
            outcomes[split][language] = found
        timings[f"{split}_s"] = time.perf_counter() - clock
    report["timings_s"] = timings
    report.update(analyse(outcomes, languages, args))
    write_json(out / "results.json", report)
    plot_all(report, outcomes, languages, args, out)
    (out / "table.md").write_text(markdown(report, languages), encoding="utf-8")
    print(json.dumps({name: report[name] for name in ("table_mean", "timings_s")}, indent=2))


if __name__ == "__main__":
    main()
