"""Power and false-keep rate of the LRP2 layer-choice rules (split, Bonferroni, max-t) over validation sizes 100-1,000.

Per-query outcomes of e5-small with LIRP at every layer are stored for a validation pool (books 45-49) and for John;
the rules choose on seeded subsets of the pool and John, scored in every cell, says whether what they kept was a gain.
Outcomes are cached per language and split under <out>/outcomes/<settings key>/, so a stopped run resumes at the
language it was on, `--languages` computes a subset, and the analysis alone (all outcomes cached) loads no model.
Usage: python bench/lrp2_rule_power.py [--tiny] [--languages fr,ko] [--pool-queries 1000] [--outcomes-only]
       [--out bench/experiments/lrp2_rule_power]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parent
ENGINE = BENCH / "experiments" / "lrp2_all_languages"  # the cached-state runner of the all-languages experiment
sys.path[:0] = [str(BENCH), str(ENGINE)]  # the sibling benchmarks are scripts, not a package

from lrp2_all_engine import BlockRunner, batches, cell_embeddings  # noqa: E402
from lrp2_lens_bible import PREFIX, TEST_BOOK, retrieval_set, spread  # noqa: E402

from polypeft.core.fileio import write_json, write_safetensors, write_text  # noqa: E402
from polypeft.interventions.lrp2 import LRP2, LanguageVectors  # noqa: E402

LANGUAGES = "fr,es,de,it,pt,ru,ar,fa,ko,vi,tl"  # every non-English language of the corpus
VALID_BOOKS = [45, 46, 47, 48, 49]  # Romans .. Ephesians: the validation pool the subsets are drawn from (1,431 verses)
OUT = "bench/experiments/lrp2_rule_power"
SPLITS = ("test", "valid")


def arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages", default=LANGUAGES, help="languages computed and analysed (a subset of "
                        f"{LANGUAGES}); their cached outcomes are reused")
    parser.add_argument("--layers", default="1,2,3,4,5,6,7,8,9,10,11,12", help="LIRP layers searched")
    parser.add_argument("--sizes", default="100,200,400,700,1000", help="validation queries per language")
    parser.add_argument("--draws", type=int, default=200, help="seeded validation subsets per size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    parser.add_argument("--pool-queries", type=int, default=0, help="validation pool per language, spread over "
                        "books 45-49 (every English verse of them stays a candidate); 0: every verse (1,431)")
    parser.add_argument("--test-queries", type=int, default=0, help="John queries per language; 0: every verse")
    parser.add_argument("--vector-pool", type=int, default=2000, help="training verses spread over the books, "
                        "as bench/experiments/lrp2_all_languages draws them (Result C)")
    parser.add_argument("--vectors", type=int, default=500, help="of which this many (seeded) make the vectors")
    parser.add_argument("--vector-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--candidate-limit", type=int, default=None, help="tiny runs only: fewer candidates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", type=int, default=8, help="queries on which the cached runner is checked "
                        "against the LRP2 hooks (0: skip)")
    parser.add_argument("--outcomes-only", action="store_true", help="compute and store outcomes, no analysis")
    parser.add_argument("--compare-with", default="bench/experiments/lrp2_all_languages/full/outcomes/e8ae79f49c",
                        help="John outcomes of Result C (same vectors): the share of queries that agree is reported")
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--tiny", action="store_true", help="pipeline check: 2 languages, small sets")
    args = parser.parse_args(argv)
    if args.tiny:
        args.languages, args.layers, args.sizes, args.draws = "fr,ko", "2,6,12", "60,100", 20
        args.pool_queries, args.test_queries, args.vector_pool, args.vectors = 150, 60, 100, 50
        args.candidate_limit, args.compare_with = 300, ""
    unknown = sorted(set(args.languages.split(",")) - set(LANGUAGES.split(",")))
    if unknown:
        parser.error(f"--languages: {unknown} not among the corpus's languages {LANGUAGES}")
    if not numbers(args.layers) or not numbers(args.sizes) or args.draws < 1:
        parser.error("--layers and --sizes need at least one number each, --draws at least 1")
    if args.pool_queries and max(numbers(args.sizes)) > args.pool_queries:
        parser.error(f"--sizes up to {max(numbers(args.sizes))} cannot be drawn from --pool-queries "
                     f"{args.pool_queries}: the subsets are drawn without replacement (the split rule's halves "
                     f"must not share a verse)")
    return args


def numbers(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def outcome_key(args) -> str:
    """The folder of the outcomes: every setting that changes a cell's outcome on a query (the query counts are in
    the file names instead, so a smaller pool or John subset sits beside the full ones and shares the vectors)."""
    keys = ["layers", "vector_pool", "vectors", "vector_seed", "max_length", "candidate_limit"]
    settings = {key: getattr(args, key) for key in keys}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def outcome_path(folder: Path, split: str, language: str, args) -> Path:
    """valid_fr.safetensors for every verse of the split, valid1000_fr.safetensors for a spread 1,000."""
    count = args.test_queries if split == "test" else args.pool_queries
    return folder / f"{split}{count or ''}_{language}.safetensors"


def vector_rows(corpus, args) -> list[dict]:
    """The `--vectors` verses Result C's default drew (seed `--vector-seed` among the spread pool), from the verses
    every language of the corpus has, so a language's vector is the same whichever subset a run computes."""
    held_out = {TEST_BOOK, *VALID_BOOKS}
    rows = [row for row in corpus.parallel(["en", *LANGUAGES.split(",")])
            if int(row["ref"].split(":")[0]) not in held_out]
    rows = spread(rows, args.vector_pool)
    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.vector_seed))[:args.vectors]
    return [rows[int(index)] for index in chosen]


def language_vectors(models, corpus, languages, args, folder: Path) -> LanguageVectors:
    """Mean states per layer of the vector verses; languages missing from the stored file are added to it."""
    from tqdm.auto import tqdm

    path = folder / "language_vectors.safetensors"
    means = load_file(str(path)) if path.exists() else {}
    missing = [language for language in ["en", *languages] if language not in means]
    if missing:
        runner = models.runner
        rows = vector_rows(corpus, args)
        for language in missing:
            texts = [row[language] for row in rows]
            pooled = torch.empty(len(texts), runner.num_layers + 1, runner.model.config.hidden_size)
            for index in tqdm(list(batches(texts, args.batch_size)), desc=f"language vector {language}"):
                pooled[index] = runner.pooled_layers(runner.states([texts[i] for i in index])).transpose(0, 1)
            means[language] = pooled.double().mean(0).float()
        write_safetensors(path, means)
    from polypeft.interventions.capture import model_identity

    layers = list(range(next(iter(means.values())).shape[0]))
    return LanguageVectors({"encoder": means}, layers, "mean", model_identity(models.model),
                           {language: min(args.vectors, args.vector_pool) for language in means})


def plan(vectors: LanguageVectors, language: str, layers: list[int]) -> dict:
    """The plain encoder and LIRP alone at each layer: the cells the rules choose among."""
    cells: dict = {"base": None}
    for i in layers:
        cells[f"lirp:{i}"] = ((i, vectors.vector("en", i) - vectors.vector(language, i)),)
    return cells


def check_runner(models, vectors, texts, language, args) -> dict:
    """The cached runner against the library's LRP2 hooks on the same queries (largest |difference|)."""
    from polypeft.backbones.e5 import embed

    texts, layer = texts[:args.check], numbers(args.layers)[0]
    ours = cell_embeddings(models.runner, texts, plan(vectors, language, [layer]), args.batch_size)
    reference = {"base": embed(models.model, models.tokenizer, texts, prefix=PREFIX, max_length=args.max_length)}
    with LRP2(models.model, vectors, lirp_layer=layer) as lrp2, lrp2.languages(language):
        reference[f"lirp:{layer}"] = embed(models.model, models.tokenizer, texts, prefix=PREFIX,
                                           max_length=args.max_length)
    return {name: float((ours[name] - value).abs().max()) for name, value in reference.items()}


class Models:
    """e5-small and its cached-state runner, loaded on first use: a run whose outcomes are all stored loads none."""

    def __init__(self, args):
        self.args, self._loaded = args, None

    def _load(self):
        if self._loaded is None:
            from polypeft.backbones.e5 import load_encoder

            model, tokenizer = load_encoder("e5-small")
            self._loaded = model, tokenizer, BlockRunner(model, tokenizer, self.args.max_length, PREFIX)
        return self._loaded

    model = property(lambda self: self._load()[0])
    tokenizer = property(lambda self: self._load()[1])
    runner = property(lambda self: self._load()[2])


def compute_outcomes(args, languages: list[str], folder: Path, meta: dict, meta_path: Path) -> dict:
    """Per split and language, the 0/1 outcome of every query in every cell. One language at a time (John, then the
    validation pool), each stored as soon as it is done with its wall and CPU seconds in run.json: a stopped run
    resumes at the first language it had not stored."""
    from polypeft.data.bible import BibleCorpus
    from polypeft.tasks.retrieval import correct_at_1
    from tqdm.auto import tqdm

    outcomes: dict = {split: {} for split in SPLITS}
    todo = [(split, language) for language in languages for split in SPLITS
            if not outcome_path(folder, split, language, args).exists()]
    for split in SPLITS:
        for language in languages:
            if (split, language) not in todo:
                outcomes[split][language] = load_file(str(outcome_path(folder, split, language, args)))
    if not todo:
        return outcomes
    corpus, models = BibleCorpus(), Models(args)
    vectors = language_vectors(models, corpus, languages, args, folder)
    sets: dict = {}
    timings = meta.setdefault("timings_s", {})
    for split, language in todo:
        if split not in sets:
            books, per_language = ([TEST_BOOK], args.test_queries) if split == "test" else (VALID_BOOKS,
                                                                                             args.pool_queries)
            english, queries, _ = retrieval_set(corpus, languages, books, per_language or None, args.candidate_limit)
            with tqdm(total=len(english), desc=f"English candidates ({split})") as bar:  # the pivot: no LIRP shift
                candidates = cell_embeddings(models.runner, english, {"base": None}, args.batch_size, bar)["base"]
            sets[split] = candidates, queries
            meta.setdefault("sizes", {})[f"{split}{per_language or ''}"] = {
                "candidates": len(english), "queries": {key: len(value[1]) for key, value in queries.items()}}
            if args.check and "runner_check_max_abs_diff" not in meta:
                meta["runner_check_max_abs_diff"] = check_runner(models, vectors, queries[language][0], language, args)
                print("runner vs LRP2 hooks:", meta["runner_check_max_abs_diff"])
        candidates, queries = sets[split]
        texts, gold = queries[language]
        wall, cpu = time.perf_counter(), time.process_time()
        with tqdm(total=len(texts), desc=f"{split} {language}") as bar:
            embedded = cell_embeddings(models.runner, texts, plan(vectors, language, numbers(args.layers)),
                                       args.batch_size, bar)
        found = {name: correct_at_1(value, candidates, gold).to(torch.uint8) for name, value in embedded.items()}
        path = outcome_path(folder, split, language, args)
        write_safetensors(path, found)
        outcomes[split][language] = found
        timings[path.stem] = {"wall": round(time.perf_counter() - wall, 1), "cpu": round(time.process_time() - cpu, 1),
                              "queries": len(texts), "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M")}
        write_json(meta_path, meta)
    return outcomes


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=BENCH, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[list[str]] = None) -> dict:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    languages = args.languages.split(",")
    out = Path(args.out)
    folder = out / "outcomes" / outcome_key(args)
    meta_path = folder / "run.json"  # every start that computed or reused these outcomes, with its timings
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("runs", []).append({"date": time.strftime("%Y-%m-%d %H:%M"), "commit": commit(),
                                        "machine": platform.platform(), "languages": languages,
                                        "pool_queries": args.pool_queries, "test_queries": args.test_queries})
    outcomes = compute_outcomes(args, languages, folder, meta, meta_path)
    write_json(meta_path, meta)
    if args.outcomes_only:
        return {}
    from lrp2_rule_power_report import analyse, compare_with_earlier, markdown, plot  # noqa: E402

    report = {"args": vars(args), "outcome_key": outcome_key(args), "outcomes_run": meta,
              "date": time.strftime("%Y-%m-%d"), "commit": commit(), "machine": platform.platform()}
    report["agreement_with_result_c"] = compare_with_earlier(
        outcomes, Path(args.compare_with) if args.compare_with else None, languages)
    report.update(analyse(outcomes, languages, args))
    write_json(out / "results.json", report)
    write_text(out / "table.md", markdown(report, languages))
    plot(report, out / "power.png")
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
