"""The routes a PolyModel call needs for a batch of task examples, one per example from its language.

Every task predictor and the e5 embedder route their examples through here, so all do it the same way.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional

import torch

from ..core.languages import LanguageError
from .routed_model import RoutedModel


def routed_model(model: torch.nn.Module) -> Optional[RoutedModel]:
    """The PolyModel inside `model` (also under a DDP-style `.module`) when its layers read routes, else None."""
    poly = model if isinstance(model, RoutedModel) else getattr(model, "module", None)
    if not isinstance(poly, RoutedModel) or poly.poly_config.language_agnostic:
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
