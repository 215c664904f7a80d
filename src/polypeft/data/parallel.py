"""Translation examples and the plain parallel-file formats (TSV, JSONL) they are read from and written to.

Bad lines are reported as `file:line: what was wrong`, then skipped and counted or raised, as asked.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable, Optional, Sequence

from ..core.fileio import write_text
from ..core.languages import LanguageError
from .lines import decode_line, json_object, numbered_lines

logger = logging.getLogger(__name__)

TSV_COLUMNS = ("src_lang", "tgt_lang", "src", "tgt")
JSONL_KEYS = ("src_lang", "tgt_lang", "src", "tgt")
ON_ERROR_CHOICES = ("skip", "raise")


class ParallelFormatError(ValueError):
    """A line of a parallel file that cannot be read; the message starts with `file:line:`."""


@dataclass(frozen=True)
class ParallelExample:
    """One translation pair; `ref` says where it came from (a verse "43:3:16" or "file:line")."""

    src_lang: str
    tgt_lang: str
    src: str
    tgt: str
    ref: str = ""

    @property
    def direction(self) -> tuple[str, str]:
        return (self.src_lang, self.tgt_lang)


@dataclass
class ParallelReadResult:
    """What a reader returns: the good examples, how many bad lines were skipped, and why."""

    examples: list[ParallelExample]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def english_centric(
    rows: Sequence[dict[str, str]], langs: Sequence[str], pivot: str = "en"
) -> list[ParallelExample]:
    """Turn multi-way rows into pivot->xx and xx->pivot examples for every xx in `langs`.

    Examples come grouped by direction (en->fr, fr->en, en->de, ...), rows in their given order.
    """
    others = [lang for lang in langs if lang != pivot]
    if not others:
        raise ValueError(f"english_centric: langs {list(langs)} has no language besides the pivot {pivot!r}")
    needed = [pivot, *others]
    for position, row in enumerate(rows):
        missing = [lang for lang in needed if lang not in row]
        if missing:
            raise KeyError(
                f"english_centric: row {position} (ref {row.get('ref', '?')!r}) has no text for {missing}; "
                f"it has {sorted(k for k in row if k != 'ref')}"
            )
    examples = []
    for lang in others:
        for src_lang, tgt_lang in ((pivot, lang), (lang, pivot)):
            examples.extend(
                ParallelExample(src_lang, tgt_lang, row[src_lang], row[tgt_lang], row.get("ref", ""))
                for row in rows
            )
    return examples


# --- reading --------------------------------------------------------------------------------------


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error={on_error!r}; choose one of {ON_ERROR_CHOICES}")


def _example_from_fields(
    values: dict[str, object], where: str, allowed_langs: Optional[Collection[str]]
) -> ParallelExample:
    """Check one record; raise ParallelFormatError if malformed, LanguageError for an unknown language."""
    for key in JSONL_KEYS:
        value = values.get(key)
        if not isinstance(value, str):
            raise ParallelFormatError(f"{where}: field {key!r} must be a string, got {value!r}")
        if not value.strip():
            raise ParallelFormatError(f"{where}: field {key!r} is empty")
    src_lang, tgt_lang = str(values["src_lang"]).strip(), str(values["tgt_lang"]).strip()
    if allowed_langs is not None:
        for key, code in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
            if code not in allowed_langs:
                # Not skippable: a wrong language set would otherwise silently drop a whole corpus.
                raise LanguageError(
                    f"{where}: unknown {key} {code!r}; allowed languages are {sorted(allowed_langs)}"
                )
    ref = values.get("ref")
    return ParallelExample(
        src_lang, tgt_lang, str(values["src"]).strip(), str(values["tgt"]).strip(),
        ref if isinstance(ref, str) and ref else where,
    )


def _read_lines(path: Path, parse_line, on_error: str) -> ParallelReadResult:
    _check_on_error(on_error)
    result = ParallelReadResult(examples=[])
    for number, raw in numbered_lines(path):
        where = f"{path}:{number}"
        try:
            line = decode_line(raw, where, ParallelFormatError)
            example = parse_line(line, where, number) if line.strip() else None
        except ParallelFormatError as problem:
            if on_error == "raise":
                raise
            result.skipped += 1
            result.problems.append(str(problem))
            logger.warning("skipped %s", problem)
            continue
        if example is not None:
            result.examples.append(example)
    return result


def read_tsv(
    path: str | os.PathLike,
    on_error: str = "raise",
    allowed_langs: Optional[Collection[str]] = None,
) -> ParallelReadResult:
    """Read `src_lang<TAB>tgt_lang<TAB>src<TAB>tgt` lines (UTF-8, no quoting).

    Exactly four columns: a tab inside a text makes a malformed line, so write such text as JSONL.
    A first line equal to the column names is a header and is skipped; blank lines are skipped silently.
    """
    path = Path(path)
    header = "\t".join(TSV_COLUMNS)

    def parse(line: str, where: str, number: int) -> Optional[ParallelExample]:
        if number == 1 and line == header:
            return None
        columns = line.split("\t")
        if len(columns) != len(TSV_COLUMNS):
            raise ParallelFormatError(
                f"{where}: expected {len(TSV_COLUMNS)} tab-separated columns {TSV_COLUMNS}, found "
                f"{len(columns)}; a tab inside a text breaks TSV, use JSONL for such text"
            )
        return _example_from_fields(dict(zip(TSV_COLUMNS, columns)), where, allowed_langs)

    return _read_lines(path, parse, on_error)


def read_jsonl(
    path: str | os.PathLike,
    on_error: str = "raise",
    allowed_langs: Optional[Collection[str]] = None,
) -> ParallelReadResult:
    """Read one JSON object per line with string keys src_lang, tgt_lang, src, tgt (and optional ref).

    Other keys are ignored; blank lines are skipped silently.
    """
    path = Path(path)

    def parse(line: str, where: str, number: int) -> ParallelExample:
        record = json_object(line, where, ParallelFormatError)
        missing = [key for key in JSONL_KEYS if key not in record]
        if missing:
            raise ParallelFormatError(f"{where}: missing keys {missing}; each line needs {list(JSONL_KEYS)}")
        return _example_from_fields(record, where, allowed_langs)

    return _read_lines(path, parse, on_error)


def read_parallel(
    path: str | os.PathLike,
    on_error: str = "raise",
    allowed_langs: Optional[Collection[str]] = None,
) -> ParallelReadResult:
    """Read a `.tsv` or `.jsonl` file, chosen by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".tsv":
        return read_tsv(path, on_error, allowed_langs)
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, on_error, allowed_langs)
    raise ValueError(f"{path}: unknown parallel file suffix {suffix!r}; use .tsv or .jsonl")


# --- writing --------------------------------------------------------------------------------------


def write_tsv(path: str | os.PathLike, examples: Iterable[ParallelExample], header: bool = False) -> Path:
    """Write examples as TSV atomically; refuses text with tabs or newlines (write JSONL instead)."""
    lines = ["\t".join(TSV_COLUMNS)] if header else []
    for position, example in enumerate(examples):
        fields = (example.src_lang, example.tgt_lang, example.src, example.tgt)
        bad = [name for name, value in zip(TSV_COLUMNS, fields) if any(c in value for c in "\t\n\r")]
        if bad:
            raise ValueError(
                f"example {position} (ref {example.ref!r}) has a tab or newline in {bad}; TSV cannot hold "
                f"it, use write_jsonl"
            )
        lines.append("\t".join(fields))
    return write_text(path, "".join(line + "\n" for line in lines))


def write_jsonl(path: str | os.PathLike, examples: Iterable[ParallelExample]) -> Path:
    """Write examples as JSONL atomically, one object per line, `ref` included."""
    lines = (
        json.dumps(
            {"src_lang": e.src_lang, "tgt_lang": e.tgt_lang, "src": e.src, "tgt": e.tgt, "ref": e.ref},
            ensure_ascii=False,
        )
        for e in examples
    )
    return write_text(path, "".join(line + "\n" for line in lines))
