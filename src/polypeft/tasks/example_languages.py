"""Each task example's language: read from a data column, then turned into the routes a PolyModel call needs.

Every task reader and predictor goes through here, so all route their examples the same way.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch

from ..core.languages import LanguageError
from ..core.model import PolyModel
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


def routed_model(model: torch.nn.Module) -> Optional[PolyModel]:
    """The PolyModel inside `model` (also under a DDP-style `.module`) when its layers read routes, else None."""
    poly = model if isinstance(model, PolyModel) else getattr(model, "module", None)
    if not isinstance(poly, PolyModel) or getattr(poly.poly_config, "language_agnostic", False):
        return None
    return poly


READER_REMEDY = "pass language= to the reader (or language_column= where the data names it)"


def example_routes(model: torch.nn.Module, languages: Sequence[Optional[str]], route: Optional[str] = None,
                   remedy: str = READER_REMEDY) -> Optional[list[str]]:
    """One route per example: `route` for all when given, else the example's language; None for a plain model.

    Plain (and language-agnostic) models ignore languages; a PolyModel needs every example's language.
    """
    if routed_model(model) is None:
        if route is not None:
            raise LanguageError(f"route={route!r} was given but {type(model).__name__} has no language routes; "
                                "pass route= only with a PolyModel")
        return None
    if route is not None:
        return [route] * len(languages)
    missing = [i for i, language in enumerate(languages) if language is None]
    if missing:
        raise LanguageError(f"example {missing[0]} has no language ({len(missing)} of {len(languages)} examples "
                            f"lack one) but the PolyModel routes by language: {remedy}, or route= for one "
                            "route for all")
    return list(languages)  # type: ignore[arg-type]


def route_arguments(routes: Optional[Sequence[str]], index: Iterable[int]) -> dict[str, list[str]]:
    """The `lang=` keyword for a model call on the examples at `index` ({} for a plain model)."""
    return {} if routes is None else {"lang": [routes[i] for i in index]}
