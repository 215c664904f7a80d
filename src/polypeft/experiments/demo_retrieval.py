"""The demo's verse-retrieval task (xx->en on John, e5-small), shared by its LRP2 and LENS parts.

Both parts score against the same plain-encoder baseline, so its embeddings are computed once and cached on disk.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..backbones.e5 import QUERY_PREFIX, embed
from ..core.fileio import write_safetensors
from ..core.config import ConfigError, PositiveInt, TypedConfig
from ..data.bible import BookNumber
from ..tasks.retrieval import correct_at_1
from .demo_store import settings_key

TEST_BOOK = 43  # John, the default test book: never used to choose anything
VALID_BOOKS = [45, 46, 47, 48, 49]  # Romans to Ephesians, RESULTS §5 "The protocol"


@dataclass(frozen=True)
class RetrievalSettings(TypedConfig):
    """Sizes of the retrieval task; the held-out books choose, John scores."""

    languages: tuple[str, ...] = ("fr", "ar", "ko")
    test_book: BookNumber = TEST_BOOK  # scored once; any book outside valid_books
    test_verses: PositiveInt = 150  # John verses, spread over the book: each language's queries and the candidates
    valid_books: tuple[BookNumber, ...] = tuple(VALID_BOOKS)
    valid_candidates: PositiveInt = 400  # English verses of the valid books, spread
    valid_queries: PositiveInt = 200  # per language, among those verses: enough for LRP2's search to tell layers apart
    train_sentences: PositiveInt = 64  # per language, from the other books: language vectors (LRP2), probe (LENS)
    max_length: PositiveInt = 64
    batch_size: PositiveInt = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_book in self.valid_books:
            raise ConfigError(f"RetrievalSettings.valid_books={list(self.valid_books)} holds the test book "
                              f"({self.test_book}); choose other books")
        if self.valid_queries > self.valid_candidates:
            raise ConfigError(f"RetrievalSettings.valid_queries={self.valid_queries} exceeds valid_candidates="
                              f"{self.valid_candidates}; the queries are drawn among the candidates")

    def as_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over the list (a fixed, seed-free subset)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(index * step)] for index in range(count)]


@dataclass
class RetrievalSet:
    """English candidates and, per language, query texts with the index of their English verse."""

    candidates: list[str]
    queries: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)


def retrieval_set(corpus, languages: list[str], books: list[int], candidates: int, queries: int) -> RetrievalSet:
    english = corpus.verses("en", books)
    verses = {language: corpus.verses(language, books) for language in languages}
    keys = spread([key for key in english if all(key in verses[language] for language in languages)], candidates)
    chosen = spread(list(range(len(keys))), queries)
    result = RetrievalSet([english[key] for key in keys])
    for language in languages:
        result.queries[language] = ([verses[language][keys[i]] for i in chosen], chosen)
    return result


def test_set(corpus, settings: RetrievalSettings) -> RetrievalSet:
    """John: every chosen verse is a query in each language and a candidate in English; KJV is 'en->en'."""
    languages = list(settings.languages)
    found = retrieval_set(corpus, [*languages, "kjv"], [settings.test_book], settings.test_verses,
                          settings.test_verses)
    found.queries["en"] = found.queries.pop("kjv")
    return found


def valid_set(corpus, settings: RetrievalSettings) -> RetrievalSet:
    return retrieval_set(corpus, list(settings.languages), list(settings.valid_books), settings.valid_candidates,
                         settings.valid_queries)


def training_rows(corpus, settings: RetrievalSettings, count: int) -> list[dict]:
    """`count` parallel verses (en and every language; dicts language -> text), spread over the books that
    are neither test nor valid."""
    held_out = {settings.test_book, *settings.valid_books}
    rows = [row for row in corpus.parallel(["en", *settings.languages])
            if int(row["ref"].split(":")[0]) not in held_out]
    return spread(rows, count)


def training_texts(corpus, settings: RetrievalSettings) -> dict[str, list[str]]:
    """`train_sentences` parallel verses per language (with English), prefixed for e5."""
    rows = training_rows(corpus, settings, settings.train_sentences)
    return {language: [QUERY_PREFIX + row[language] for row in rows] for language in ["en", *settings.languages]}


def encode(model, tokenizer, texts: list[str], settings: RetrievalSettings) -> torch.Tensor:
    return embed(model, tokenizer, texts, prefix=QUERY_PREFIX, batch_size=settings.batch_size,
                 max_length=settings.max_length, progress=len(texts) > 4 * settings.batch_size)


def accuracy_at_1(queries: torch.Tensor, candidates: torch.Tensor, gold: list[int]) -> float:
    """Accuracy@1 in %: the query's nearest candidate by cosine is its own verse."""
    return 100.0 * float(correct_at_1(queries, candidates, gold).mean())


def plain_embeddings(model, tokenizer, test: RetrievalSet, settings: RetrievalSettings,
                     cache_dir: Optional[Path]) -> dict[str, torch.Tensor]:
    """The plain encoder's embeddings of the John candidates ("candidates") and of each language's queries,
    cached under `cache_dir` by the settings, so the LRP2 and LENS parts compute them once."""
    name = f"retrieval-plain-{settings_key(settings.as_dict())}.safetensors"
    path = None if cache_dir is None else Path(cache_dir) / name
    if path is not None and path.exists():
        return load_file(str(path))  # tensors only: nothing in a cache file can run code
    embedded = {"candidates": encode(model, tokenizer, test.candidates, settings)}
    for language, (texts, _) in test.queries.items():
        embedded[language] = encode(model, tokenizer, texts, settings)
    if path is not None:
        write_safetensors(path, embedded)
    return embedded


def outcomes(embedded: dict[str, torch.Tensor], test: RetrievalSet) -> dict[str, list[int]]:
    """Per language, 1 where a query's nearest candidate is its own verse, else 0: what a gain's interval resamples."""
    return {language: correct_at_1(embedded[language], embedded["candidates"], gold).int().tolist()
            for language, (_, gold) in test.queries.items()}


def scores(embedded: dict[str, torch.Tensor], test: RetrievalSet) -> dict[str, float]:
    """Accuracy@1 per language from embeddings keyed like `plain_embeddings`."""
    return {language: accuracy_at_1(embedded[language], embedded["candidates"], gold)
            for language, (_, gold) in test.queries.items()}


def book_name(corpus, book: int) -> str:
    """The English name of a book of the corpus (43: "John")."""
    return corpus.books("en").get(book, f"book {book}")


def mean_over(values: dict[str, float], languages) -> float:
    return sum(values[language] for language in languages) / len(languages)
