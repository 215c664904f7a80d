"""Lines of a text data file as they are on disk: only a newline ends a line, a leading BOM is dropped.

Every reader goes through here so that invalid UTF-8 is reported by file and line and may be skipped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

UTF8_BOM = b"\xef\xbb\xbf"


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """`(line number, bytes)` without the line end (`\\n` or `\\r\\n`); a bare `\\r` stays inside its line,
    as TSV fields may hold one, so line numbers match what an editor shows."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            yield number, raw[:-1] if raw.endswith(b"\r") else raw


def decode_line(raw: bytes, where: str, error: type[Exception] = ValueError) -> str:
    """The line as text; invalid UTF-8 raises `error` naming `where`, the byte and its column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as problem:
        raise error(f"{where}: not valid UTF-8 (byte 0x{raw[problem.start]:02x} at column {problem.start + 1}); "
                    "save the file as UTF-8") from None


def read_text(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """A whole file as text without a leading BOM; invalid UTF-8 raises `error` naming file and line."""
    data = Path(path).read_bytes()
    data = data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line = data.count(b"\n", 0, problem.start) + 1
        column = problem.start - (data.rfind(b"\n", 0, problem.start) + 1) + 1
        raise error(f"{path} line {line}: not valid UTF-8 (byte 0x{data[problem.start]:02x} at column {column}); "
                    "save the file as UTF-8") from None


def json_object(line: str, where: str, error: type[Exception] = ValueError) -> dict:
    """One line of a JSONL file as a JSON object; anything else is `error` naming `where` (file and line)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as problem:
        raise error(f"{where}: not valid JSON ({problem.msg} at column {problem.colno})") from None
    if not isinstance(row, dict):
        raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row
