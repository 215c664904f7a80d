"""Each task example's language, read from a data column: every task reader finds it the same way.

Turning languages into the routes a PolyModel call needs is `core/example_routes.py`."""
from __future__ import annotations

from .records import Record


def language_from_column(record: Record, column: str) -> str:
    """The code in `column`: a string, or a per-token list (WikiANN's `langs`) whose items must all agree."""
    value = record.data[column]
    codes = value if isinstance(value, list) else [value]
    if not codes or not all(isinstance(code, str) and code for code in codes):
        raise record.fail(f"language column {column!r} must hold a code or a non-empty list of codes, got {value!r}")
    distinct = sorted(set(codes))
    if len(distinct) > 1:
        raise record.fail(f"language column {column!r} disagrees within the example: {distinct}; "
                          "every item of one example must name the same language")
    return distinct[0]
