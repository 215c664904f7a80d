"""How the routes of the current forward pass reach the routed layers.

A PolyModel owns one RouteState; its layers read it. Nothing else in the model knows about languages.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from .languages import LanguageError, Routes


class RouteState:
    """The routes of the forward pass in progress, set by a context and read by every routed layer."""

    def __init__(self) -> None:
        self.current: Optional[Routes] = None

    @contextmanager
    def use(self, routes: Routes) -> Iterator[Routes]:
        previous, self.current = self.current, routes
        try:
            yield routes
        finally:
            self.current = previous

    def for_batch(self, batch_size: int, layer_name: str) -> Routes:
        """The routes to apply to a batch of `batch_size` rows in layer `layer_name`."""
        if self.current is None:
            raise LanguageError(
                f"layer {layer_name!r} ran without routes: call the PolyModel with src_lang=/tgt_lang= "
                "(or lang=), or run the base model inside `with poly_model.routes(...)`"
            )
        return self.current.expanded_to(batch_size)
