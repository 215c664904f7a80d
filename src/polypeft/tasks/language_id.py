"""A language identifier from character n-grams (multinomial naive Bayes in plain Python), trained on the Bible's
training books: it labels a model's continuations, to tell how often generation drifts into English.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..core.fileio import write_json
from ..data.bible import BibleCorpus, BibleSplit

__all__ = ["LanguageIdentifier", "bible_language_identifier", "identification_accuracy", "train_language_identifier"]

FORMAT_NAME = "polypeft.language_identifier"
NO_TEXT = "none"  # the label of a text without a single letter (an empty continuation)


def char_ngrams(text: str, orders: Sequence[int]) -> Counter:
    """Counts of the lower-cased text's character n-grams, words padded with one space on each side."""
    padded = " " + " ".join(text.lower().split()) + " "
    grams: Counter = Counter()
    for order in orders:
        grams.update(padded[start:start + order] for start in range(len(padded) - order + 1))
    return grams


@dataclass
class LanguageIdentifier:
    """Per language, smoothed log-probabilities of n-grams; uniform prior, so no language is favoured."""

    languages: list[str]
    orders: tuple[int, ...]
    alpha: float
    counts: dict[str, dict[str, int]]
    totals: dict[str, int] = field(default_factory=dict)
    vocabulary_size: int = 0

    def __post_init__(self) -> None:
        self.orders = tuple(self.orders)
        if not self.totals:
            self.totals = {code: sum(self.counts[code].values()) for code in self.languages}
        if not self.vocabulary_size:
            self.vocabulary_size = len({gram for code in self.languages for gram in self.counts[code]})
        self._denominators = {code: math.log(self.totals[code] + self.alpha * self.vocabulary_size)
                              for code in self.languages}

    def scores(self, text: str) -> dict[str, float]:
        """Log-likelihood of the text's n-grams under each language."""
        grams = char_ngrams(text, self.orders)
        scores = {}
        for code in self.languages:
            table, denominator = self.counts[code], self._denominators[code]
            scores[code] = sum(count * (math.log(table.get(gram, 0) + self.alpha) - denominator)
                               for gram, count in grams.items())
        return scores

    def predict(self, text: str) -> str:
        """The most likely language, or `NO_TEXT` when the text has no letter to judge by."""
        if not any(character.isalpha() for character in text):
            return NO_TEXT
        scores = self.scores(text)
        return max(scores, key=scores.get)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, {"format": FORMAT_NAME, "languages": self.languages, "orders": list(self.orders),
                                 "alpha": self.alpha, "counts": self.counts})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LanguageIdentifier":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a language identifier file (format {data.get('format')!r}, "
                             f"expected {FORMAT_NAME!r})")
        return cls(data["languages"], tuple(data["orders"]), data["alpha"], data["counts"])


def train_language_identifier(texts_by_language: Mapping[str, Sequence[str]], orders: Sequence[int] = (1, 2, 3),
                              alpha: float = 0.5) -> LanguageIdentifier:
    """Count the n-grams of each language's texts."""
    if len(texts_by_language) < 2:
        raise ValueError(f"a language identifier needs at least 2 languages, got {sorted(texts_by_language)}")
    empty = [code for code, texts in texts_by_language.items() if not texts]
    if empty:
        raise ValueError(f"languages {empty} have no training text")
    if alpha <= 0 or not orders or any(order < 1 for order in orders):
        raise ValueError(f"alpha={alpha} must be > 0 and orders={list(orders)} positive integers")
    counts = {}
    for code, texts in texts_by_language.items():
        grams: Counter = Counter()
        for text in texts:
            grams.update(char_ngrams(text, orders))
        counts[code] = dict(grams)
    return LanguageIdentifier(sorted(texts_by_language), tuple(orders), alpha, counts)


def bible_language_identifier(languages: Sequence[str], split: BibleSplit = BibleSplit(), verses_per_language: int = 2000,
                              seed: int = 0, corpus: Optional[BibleCorpus] = None) -> LanguageIdentifier:
    """An identifier trained on a seeded sample of each language's training-book verses."""
    corpus = corpus or BibleCorpus()
    train_books = split.books("train")
    texts = {}
    for code in languages:
        verses = list(corpus.verses(code, train_books).values())
        texts[code] = random.Random(f"{seed}/{code}").sample(verses, min(verses_per_language, len(verses)))
    return train_language_identifier(texts)


def identification_accuracy(identifier: LanguageIdentifier, texts_by_language: Mapping[str, Sequence[str]],
                            max_chars: Optional[int] = None) -> dict[str, float]:
    """Share of texts labelled with their own language, per language and `"mean"`; `max_chars` cuts each text
    first (continuations are short)."""
    empty = sorted(code for code, texts in texts_by_language.items() if not texts)
    if empty or not texts_by_language:
        raise ValueError(f"identification_accuracy: no texts for languages {empty or 'at all'}; give at least one each")
    accuracy = {}
    for code, texts in texts_by_language.items():
        cut = [text[:max_chars] if max_chars else text for text in texts]
        accuracy[code] = sum(identifier.predict(text) == code for text in cut) / len(cut)
    accuracy["mean"] = sum(accuracy.values()) / len(texts_by_language)
    return accuracy
