"""Answer matching for extractive QA in many languages: MLQA-style normalisation, exact match and token F1.

SQuAD's English-only rules score 0 for «Paris» vs Paris or 北京大学 vs 北京大学医学部; these rules do not.
"""
from __future__ import annotations

import collections
import string
import unicodedata
from typing import Optional

# Articles dropped per language, after lower-casing and removing punctuation.
ARTICLES: dict[str, frozenset[str]] = {
    "en": frozenset({"a", "an", "the"}),
    "de": frozenset({"der", "die", "das", "den", "dem", "des", "ein", "eine", "einen", "einem", "einer", "eines"}),
    "es": frozenset({"el", "la", "los", "las", "un", "una", "unos", "unas"}),
    "fr": frozenset({"le", "la", "les", "l", "un", "une", "des"}),
    "it": frozenset({"il", "lo", "la", "i", "gli", "le", "l", "un", "uno", "una"}),
    "pt": frozenset({"o", "a", "os", "as", "um", "uma", "uns", "umas"}),
    "nl": frozenset({"de", "het", "een"}),
}
# Languages whose articles elide onto the next word ("l'Europe"): the apostrophe separates them first.
ELIDING = frozenset({"fr", "it"})
APOSTROPHES = "'’"
ARABIC_ARTICLE = "ال"
# Scripts written without spaces between words: each character is one token (MLQA does this for zh).
UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x2FA1F),  # CJK extensions B-F and compatibility supplement
)
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(char: str) -> bool:
    # Unicode punctuation (« » 「 」 ، ؟ ...) plus the ASCII symbols SQuAD also drops ($, +, <, ...).
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _unspaced(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in UNSPACED_RANGES)


def _split_unspaced(word: str) -> list[str]:
    """A word with its characters of unspaced scripts as tokens of their own: "北京abc" -> 北, 京, abc."""
    tokens, run = [], ""
    for char in word:
        if _unspaced(char):
            tokens += [run, char] if run else [char]
            run = ""
        else:
            run += char
    return tokens + [run] if run else tokens


def answer_tokens(text: str, lang: Optional[str] = "en") -> list[str]:
    """The tokens an answer is compared by: lower case, no punctuation, no articles of `lang`,
    characters of unspaced scripts (zh, ja, th, ...) one token each. `lang=None` drops English articles."""
    lang = (lang or "en").lower()
    text = text.lower()
    if lang in ELIDING:
        text = "".join(" " if char in APOSTROPHES else char for char in text)
    text = "".join(char for char in text if not _is_punctuation(char))
    articles = ARTICLES.get(lang, frozenset())
    words = [word for word in text.split() if word not in articles]
    if lang == "ar":
        words = [word[len(ARABIC_ARTICLE):] if word.startswith(ARABIC_ARTICLE) and len(word) > 3 else word
                 for word in words]
    return [token for word in words for token in _split_unspaced(word)]


def normalize_answer(text: str, lang: Optional[str] = "en") -> str:
    """The answer as compared for exact match (see `answer_tokens`), tokens joined by single spaces."""
    return " ".join(answer_tokens(text, lang))


def exact_match(prediction: str, gold: str, lang: Optional[str] = "en") -> float:
    return float(answer_tokens(prediction, lang) == answer_tokens(gold, lang))


def token_f1(prediction: str, gold: str, lang: Optional[str] = "en") -> float:
    predicted, expected = answer_tokens(prediction, lang), answer_tokens(gold, lang)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)
