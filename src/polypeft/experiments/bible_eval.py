"""Real evaluations on the Bible corpus: verse retrieval xx->en per layer, and canon-section verse classification.

The corpus is verse-aligned in twelve languages, so both tasks hold out the same verses in every language.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Optional

import torch

from ..backbones.e5 import PASSAGE_PREFIX, embed_layers
from ..tasks.classification import ClassificationData, ClassificationExample
from ..tasks.retrieval import retrieval_accuracy

TEST_BOOKS = (43,)  # John, the corpus' default test book
# The parts of the canon, as inclusive book-number ranges (Protestant 66-book order).
CANON_SECTIONS: tuple[tuple[str, int, int], ...] = (
    ("law", 1, 5), ("history", 6, 17), ("wisdom", 18, 22), ("prophets", 23, 39),
    ("gospels_acts", 40, 44), ("epistles", 45, 65), ("revelation", 66, 66),
)
SECTION_NAMES = [name for name, _, _ in CANON_SECTIONS]


def _corpus(corpus):
    if corpus is not None:
        return corpus
    from ..data.bible import BibleCorpus

    return BibleCorpus()


def canon_section(book: int) -> str:
    """Name of the part of the canon that book number `book` (1..66) belongs to."""
    for name, first, last in CANON_SECTIONS:
        if first <= book <= last:
            return name
    raise ValueError(f"book number {book} is outside 1..66")


def verse_retrieval(model, tokenizer, langs: Sequence[str], pivot: str = "en", books: Sequence[int] = TEST_BOOKS,
                    layers: Optional[Sequence[Optional[int]]] = None, prefix: str = PASSAGE_PREFIX,
                    max_verses: Optional[int] = None, batch_size: int = 32,
                    corpus=None) -> dict[str, dict[Optional[int], float]]:
    """accuracy@1 of finding each `lang` verse's `pivot` verse among all pivot verses of `books`, per layer.

    Every language is scored on the same verses (those present in all of `langs` and `pivot`), so
    the numbers compare across languages. `layers` defaults to every hidden state (0 = embeddings).
    Returns `{lang: {layer: accuracy}}`; the pivot is left out.
    """
    others = [lang for lang in langs if lang != pivot]
    if not others:
        raise ValueError(f"verse_retrieval needs a language other than the pivot {pivot!r}; got {list(langs)}")
    rows = _corpus(corpus).parallel([pivot] + others, books=list(books), max_verses=max_verses)
    if not rows:
        raise ValueError(f"no verse of books {list(books)} is present in all of {[pivot] + others}")
    layers = list(range(model.config.num_hidden_layers + 1)) if layers is None else list(layers)
    pivot_side = embed_layers(model, tokenizer, [row[pivot] for row in rows], layers, prefix=prefix,
                              batch_size=batch_size)
    results = {}
    for lang in others:
        side = embed_layers(model, tokenizer, [row[lang] for row in rows], layers, prefix=prefix,
                            batch_size=batch_size)
        results[lang] = {layer: retrieval_accuracy(side[layer], pivot_side[layer]) for layer in layers}
    return results


def verse_classification(langs: Sequence[str], valid_fraction: float = 0.05, test_fraction: float = 0.1,
                         seed: int = 0, max_verses_per_section: Optional[int] = None,
                         corpus=None, exclude_books: Sequence[int] = ()) -> dict[str, dict[str, ClassificationData]]:
    """Verse -> canon section, split by verse and stratified by section: `{split: {lang: data}}`.

    Only verses present in every language are used, and a held-out verse is held out in every
    language, so a model trained on one language and tested on another never saw the test verse.
    `max_verses_per_section` caps each section (chosen at random with `seed`) to balance the labels.
    Verses of `exclude_books` are in no split (a book kept apart as another task's test book).
    """
    if not 0 <= valid_fraction < 1 or not 0 < test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise ValueError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
                         "and together below 1")
    langs = list(langs)
    excluded = {int(book) for book in exclude_books}
    rows = [row for row in _corpus(corpus).parallel(langs) if int(row["ref"].split(":")[0]) not in excluded]
    by_section: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_section[canon_section(int(row["ref"].split(":")[0]))].append(row)
    generator = random.Random(seed)
    splits: dict[str, dict[str, list[ClassificationExample]]] = {
        part: {lang: [] for lang in langs} for part in ("train", "valid", "test")}
    for label, name in enumerate(SECTION_NAMES):
        section = list(by_section.get(name, []))
        generator.shuffle(section)
        if max_verses_per_section is not None:
            section = section[:max_verses_per_section]
        num_test = round(len(section) * test_fraction)
        num_valid = round(len(section) * valid_fraction)
        parts = {"test": section[:num_test], "valid": section[num_test:num_test + num_valid],
                 "train": section[num_test + num_valid:]}
        for part, part_rows in parts.items():
            for row in part_rows:
                for lang in langs:
                    splits[part][lang].append(ClassificationExample(row[lang], label))
    return {part: {lang: ClassificationData(examples, list(SECTION_NAMES)) for lang, examples in per_lang.items()}
            for part, per_lang in splits.items()}


def best_layers(results: dict[str, dict[Optional[int], float]]) -> dict[str, tuple[Optional[int], float]]:
    """The best layer and its accuracy per language."""
    return {lang: max(scores.items(), key=lambda item: item[1]) for lang, scores in results.items()}


def mean_over_languages(results: dict[str, dict[Optional[int], float]]) -> dict[Optional[int], float]:
    """Per layer, the accuracy averaged over languages."""
    layers = next(iter(results.values())).keys()
    return {layer: float(torch.tensor([results[lang][layer] for lang in results]).mean()) for layer in layers}
