"""Rows from local JSON lines / JSON / TSV files or Hugging Face `datasets` objects, each tagged with where it came from.

Task readers share it so that every bad row is reported by file and line (or dataset row).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..data.lines import decode_line, json_object, numbered_lines, read_text

Source = Union[str, os.PathLike, Iterable[dict]]


class TaskDataError(ValueError):
    """A task input file or dataset row that does not fit the task's format."""


@dataclass(frozen=True)
class Record:
    """One row and its origin: `origin` is a file path or a dataset description, `line` 1-based."""

    data: dict[str, Any]
    origin: str
    line: int

    @property
    def where(self) -> str:
        unit = "line" if self.origin_is_file else "row"
        return f"{self.origin} {unit} {self.line}"

    @property
    def origin_is_file(self) -> bool:
        return not self.origin.startswith("<")

    def fail(self, message: str) -> TaskDataError:
        return TaskDataError(f"{self.where}: {message}")


def is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _describe(source: Any) -> str:
    name = type(source).__name__
    split = getattr(source, "split", None)
    return f"<{name}{' ' + str(split) if split else ''}>"


def read_records(source: Source, required: Sequence[str] = (), file_format: Optional[str] = None,
                 tsv_columns: Optional[Sequence[str]] = None) -> list[Record]:
    """Read every row of `source` and check it has the `required` columns.

    `source` is a path (`.jsonl`, `.json` holding a list of objects, `.tsv`; `file_format` overrides
    the suffix) or anything iterable over dicts, such as a `datasets.Dataset`. A TSV file's header
    row names its columns unless `tsv_columns` gives them.
    """
    if is_path(source):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"task data file {path} does not exist")
        kind = file_format or path.suffix.lstrip(".").lower()
        readers = {"jsonl": _read_jsonl, "json": _read_json, "tsv": _read_tsv}
        if kind not in readers:
            raise TaskDataError(f"{path}: unknown format {kind!r}; allowed: {sorted(readers)} "
                                "(pass file_format= when the suffix says otherwise)")
        records = list(readers[kind](path, tsv_columns) if kind == "tsv" else readers[kind](path))
    else:
        origin = _describe(source)
        records = []
        for index, row in enumerate(source):
            if not isinstance(row, dict):
                raise TaskDataError(f"{origin} row {index + 1}: expected a dict of columns, got {type(row).__name__}")
            records.append(Record(dict(row), origin, index + 1))
    for record in records:
        missing = [column for column in required if column not in record.data]
        if missing:
            raise record.fail(f"missing column(s) {missing}; the row has {sorted(record.data)}, "
                              f"this task needs {list(required)}")
    return records


def _read_jsonl(path: Path) -> Iterator[Record]:
    for number, raw in numbered_lines(path):
        line = decode_line(raw, f"{path} line {number}", TaskDataError)
        if not line.strip():
            continue
        yield Record(json_object(line, f"{path} line {number}", TaskDataError), str(path), number)


def _read_json(path: Path) -> Iterator[Record]:
    text = read_text(path, TaskDataError)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise TaskDataError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(rows, list):
        raise TaskDataError(f"{path}: expected a JSON list of objects (or use .jsonl), got {type(rows).__name__}")
    # json keeps no positions; the n-th top-level object is reported as 'line' of its first '{'.
    starts = _object_start_lines(text)
    for index, row in enumerate(rows):
        line = starts[index] if index < len(starts) else index + 1
        if not isinstance(row, dict):
            raise TaskDataError(f"{path} line {line}: expected a JSON object, got {type(row).__name__}")
        yield Record(row, str(path), line)


def _object_start_lines(text: str) -> list[int]:
    lines, depth, line, in_string, escaped = [], 0, 1, False, False
    for char in text:
        if char == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            if depth == 1 and char == "{":
                lines.append(line)
            depth += 1
        elif char in "]}":
            depth -= 1
    return lines


def _read_tsv(path: Path, columns: Optional[Sequence[str]]) -> Iterator[Record]:
    # No quoting: a field is whatever lies between tabs, a bare '\r' included (only '\n' ends a line).
    header = list(columns) if columns else None
    for number, raw in numbered_lines(path):
        fields = decode_line(raw, f"{path} line {number}", TaskDataError).split("\t")
        if all(not f.strip() for f in fields):
            continue
        if header is None:
            header = fields
            continue
        if len(fields) != len(header):
            raise TaskDataError(f"{path} line {number}: {len(fields)} tab-separated fields, expected "
                                f"{len(header)} ({header})")
        yield Record(dict(zip(header, fields)), str(path), number)
