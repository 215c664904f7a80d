"""Language codes in their one spelling: Unicode NFC, without whitespace or control characters.

'é' typed on two systems can be two strings that look alike (one code point, or 'e' and a combining accent);
they are one language, so every code is normalised to NFC where it enters polypeft. Needs no torch.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Optional, Sequence

EXAMPLE = "a language code is one word, such as 'de' or 'pt-BR'"


@dataclass(frozen=True)
class LanguageCodes:
    """Marks a list of language codes for the typed validator, `Annotated[list[str], LanguageCodes()]`: each
    checked and normalised to NFC by `checked_codes`, none listed twice in any spelling."""


def spelling_problem(code: Any) -> Optional[str]:
    """What makes `code` no language code (None when it is one): not a string, empty, whitespace or a control
    character anywhere (a code names routes, files and folders, and 'en\\n' would look like 'en')."""
    if not isinstance(code, str) or not code:
        return "is not a non-empty string"
    for char in code:
        if char.isspace():
            return f"holds whitespace ({char!r})"
        if unicodedata.category(char).startswith("C"):
            return f"holds the control or format character {char!r}"
    return None


def normalised(code: str) -> str:
    """The code in Unicode NFC: the composed spelling, so 'e' + U+0301 and U+00E9 are the same code."""
    return unicodedata.normalize("NFC", code)


def checked_codes(codes: Sequence[Any], where: str, error: type[Exception]) -> list[str]:
    """`codes` each checked and normalised to NFC; a code listed twice, in any spelling, is refused by name."""
    result = []
    for position, code in enumerate(codes):
        problem = spelling_problem(code)
        if problem:
            raise error(f"{where}[{position}]={code!r} {problem}; {EXAMPLE}")
        result.append(normalised(code))
    first: dict[str, int] = {}
    for position, code in enumerate(result):
        if code in first:
            spellings = "" if codes[first[code]] == codes[position] else (
                f" (as {ascii(codes[first[code]])} and {ascii(codes[position])}: two Unicode spellings of one code; "
                "codes are compared in NFC)")
            raise error(f"{where} lists [{code!r}] more than once{spellings}")
        first.setdefault(code, position)
    return result
