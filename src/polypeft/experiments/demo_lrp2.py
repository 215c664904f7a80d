"""The demo's LRP2 part: xx->en verse retrieval on e5-small, plain against LIRP at a layer chosen on held-out books.

LRP2 is parameter-free: it subtracts the query language's mean state and adds English's at one layer.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..interventions.choice import DEFAULT_RULE
from ..interventions.lrp2 import LRP2, language_vectors
from ..interventions.search import lrp2_scorer, search_layers
from ..tasks.retrieval import correct_at_1
from . import demo_retrieval as retrieval
from ..tasks.confidence import gain_interval
from .demo_store import PartResult, Row

FULL_LAYERS = [4, 8, 12]  # candidate LIRP layers; RESULTS §5 searched 1-12 and chose fr 12, ar 12, ko 4
QUICK_LAYERS = [6, 12]
FULL_BENCH_GAIN = 11.9  # RESULTS §5, "The protocol": 76.8 -> 88.7 over six languages


def settings(quick: bool, retrieval_settings: retrieval.RetrievalSettings) -> dict[str, Any]:
    """What the part's stored result depends on, so a result computed under another choice rule is not reused."""
    return {"retrieval": retrieval_settings.as_dict(), "candidate_layers": QUICK_LAYERS if quick else FULL_LAYERS,
            "rule": DEFAULT_RULE}


def choose_layers(model, tokenizer, corpus, vectors, config: retrieval.RetrievalSettings,
                  candidate_layers: list[int]) -> tuple[dict[str, Optional[int]], dict]:
    """Per language, the LIRP layer scoring best on the valid books' queries (never John), or None where no
    layer beats the plain encoder by more than the validation noise (the search's rule)."""
    valid = retrieval.valid_set(corpus, config)
    candidates = retrieval.encode(model, tokenizer, valid.candidates, config)  # English: zero LIRP shift

    def evaluate(language: str, lrp2: Optional[LRP2]) -> torch.Tensor:
        texts, gold = valid.queries[language]
        # per query, so the search can measure the noise
        return correct_at_1(retrieval.encode(model, tokenizer, texts, config), candidates, gold)

    search = search_layers(lrp2_scorer(model, vectors, evaluate), list(config.languages), candidate_layers,
                           pairs=False, lirp_only=True, baseline=True)
    chosen = {language: search.best(language)["lirp_layer"] for language in config.languages}
    return chosen, search.to_dict()


def lrp2_embeddings(model, tokenizer, vectors, test: retrieval.RetrievalSet, chosen: dict[str, Optional[int]],
                    config: retrieval.RetrievalSettings, candidates) -> dict:
    """Each language's queries with LIRP at its chosen layer (plain where none was chosen); English (KJV) plain,
    as the pivot's shift is zero."""
    embedded = {"candidates": candidates}
    for language, (texts, _) in test.queries.items():
        layer = chosen.get(language)
        if layer is None:  # no LRP2 for this language (or English, the pivot): the plain encoder
            embedded[language] = retrieval.encode(model, tokenizer, texts, config)
            continue
        with LRP2(model, vectors, lirp_layer=layer) as lrp2, lrp2.languages(language):
            embedded[language] = retrieval.encode(model, tokenizer, texts, config)
    return embedded


def run(model, tokenizer, corpus, quick: bool, config: retrieval.RetrievalSettings, folder: Path,
        cache_dir: Path) -> PartResult:
    candidate_layers = QUICK_LAYERS if quick else FULL_LAYERS
    started = time.perf_counter()
    test = retrieval.test_set(corpus, config)
    plain = retrieval.plain_embeddings(model, tokenizer, test, config, cache_dir)
    plain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    texts = retrieval.training_texts(corpus, config)
    vectors = language_vectors(model, texts, tokenizer, layers=sorted(set(candidate_layers)), pooling="mean",
                               batch_size=config.batch_size, max_length=config.max_length)
    chosen, search = choose_layers(model, tokenizer, corpus, vectors, config, candidate_layers)
    with_lrp2 = lrp2_embeddings(model, tokenizer, vectors, test, chosen, config, plain["candidates"])
    seconds = time.perf_counter() - started
    before, after = retrieval.scores(plain, test), retrieval.scores(with_lrp2, test)
    outcomes_before, outcomes_after = retrieval.outcomes(plain, test), retrieval.outcomes(with_lrp2, test)
    languages = list(config.languages)
    interval = gain_interval({l: [outcomes_after[l]] for l in languages}, {l: [outcomes_before[l]] for l in languages})
    english = gain_interval({"en": [outcomes_after["en"]]}, {"en": [outcomes_before["en"]]})
    book = retrieval.book_name(corpus, config.test_book)
    noise = f"{config.test_verses} test queries per language, paired; LRP2 has no seed"
    mean_before, mean_after = retrieval.mean_over(before, languages), retrieval.mean_over(after, languages)
    used_layers = {layer for layer in chosen.values() if layer is not None}
    stored_numbers = len(["en", *languages]) * len(used_layers) * model.config.hidden_size
    agrees = mean_after > mean_before
    task = f"xx->en verse retrieval, {book} ({', '.join(languages)}; {config.test_verses} verses)"
    rows = [
        Row("LRP2 (LIRP)", task, "acc@1 %", "plain e5-small", mean_before, mean_after,
            extra_train="0", extra_inference=f"0 ({stored_numbers:,} stored means)", seconds=seconds,
            agrees_with_full_bench=agrees, full_bench=f"+{FULL_BENCH_GAIN} (RESULTS §5)", interval=interval,
            noise=noise),
        Row("LRP2 (LIRP)", f"en->en (KJV->WEB), {book}", "acc@1 %", "plain e5-small", before["en"], after["en"],
            extra_train="0", extra_inference="0", seconds=0.0, agrees_with_full_bench=after["en"] == before["en"],
            full_bench="unchanged (RESULTS §5)", interval=english, noise=noise),
    ]
    notes = [f"LRP2: LIRP layer per language chosen on books {list(config.valid_books)} "
             f"(valid queries {config.valid_queries}, candidates {config.valid_candidates}) among "
             f"{candidate_layers}: {chosen} (None: no LRP2, no layer beat the plain encoder by more than the "
             f"validation noise); the test book ({book}) never chooses."]
    details = {"plain": before, "lrp2": after, "chosen_layers": chosen, "search": search,
               "plain_embeddings_seconds": round(plain_seconds, 1)}
    return PartResult("lrp2", {}, rows, notes, details)
