"""How the routes of the current forward pass reach the routed layers, per thread and through recomputation.

A PolyModel owns one RouteState; its layers read it (and any per-call inputs a method's layers need, such as
FLARE's source states). Nothing else in the model knows about languages.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional

from torch import nn

from .languages import LanguageError, Routes


class RouteState:
    """The routes of the forward pass in progress, set by a context and read by every routed layer.

    Each thread sees its own routes, so one model can serve several requests at once (a server)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __getstate__(self) -> dict:  # a copied or pickled model starts with no routes in flight
        return {}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    @property
    def current(self) -> Optional[Routes]:
        return getattr(self._local, "routes", None)


    @contextmanager
    def use(self, routes: Optional[Routes]) -> Iterator[Optional[Routes]]:
        previous, self._local.routes = self.current, routes
        try:
            yield routes
        finally:
            self._local.routes = previous

    @property
    def layer_inputs(self) -> Mapping[str, Any]:
        """Per-call inputs of the layers by layer name (FLARE: each layer's source state); empty by default."""
        return getattr(self._local, "layer_inputs", {})

    @contextmanager
    def use_layer_inputs(self, inputs: Mapping[str, Any]) -> Iterator[None]:
        previous, self._local.layer_inputs = self.layer_inputs, inputs
        try:
            yield
        finally:
            self._local.layer_inputs = previous

    @property
    def bypassed(self) -> bool:
        return getattr(self._local, "bypassed", False)

    @contextmanager
    def bypass(self) -> Iterator[None]:
        """Every routed layer gives its base layer's output for the block, in this thread only: a frozen pass
        through the base model (FLARE's source pass) while other threads keep their routes."""
        previous, self._local.bypassed = self.bypassed, True
        try:
            yield
        finally:
            self._local.bypassed = previous

    def for_batch(self, batch_size: int, layer_name: str) -> Routes:
        """The routes to apply to a batch of `batch_size` rows in layer `layer_name`."""
        if self.current is None:
            raise LanguageError(
                f"layer {layer_name!r} ran without routes: call the PolyModel with src_lang=/tgt_lang= "
                "(or lang=), or run the base model inside `with poly_model.routes(...)`"
            )
        return self.current.expanded_to(batch_size)


class ConcurrentUseError(LanguageError):
    """A change to a model's weights for every thread (merge, unmerge, unload) while another thread runs it."""


class CallsInFlight:
    """Counts one model's calls in progress per thread, so a change that every thread would see half-done
    (merge folds a route into the weights layer by layer) refuses to start while another thread runs the model,
    and a call refuses to start while such a change runs: never a silently wrong output."""

    def __init__(self) -> None:
        self._lock, self._calls, self._change = threading.Lock(), {}, None

    def __getstate__(self) -> dict:  # a copied or pickled model has no calls in flight
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @contextmanager
    def running(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            if self._change is not None and self._change[0] != me:
                raise ConcurrentUseError(f"this model is being changed by {self._change[1]}() in another thread; "
                                         "wait for it to return, or give each thread its own copy of the model")
            self._calls[me] = self._calls.get(me, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._calls[me] -= 1
                if not self._calls[me]:
                    del self._calls[me]

    @contextmanager
    def alone(self, action: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            others = sum(count for thread, count in self._calls.items() if thread != me)
            if others or (self._change is not None and self._change[0] != me):
                running = f"{others} call(s) of this model are running" if others else "another change is running"
                raise ConcurrentUseError(f"{action}() changes the weights every thread uses, but {running} in other "
                                         f"threads; {action}() when no other thread uses the model, or give each "
                                         "thread its own copy")
            self._change = (me, action)
        try:
            yield
        finally:
            with self._lock:
                self._change = None


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of a transformers model that may checkpoint their forward (they carry the flag)."""
    return [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]


def carry_routes_into_checkpoints(modules: list[nn.Module], route_state: RouteState) -> None:
    """Wrap each module's checkpoint function so its recomputation, which runs during backward after the
    routes' context closed, runs on the routes of the forward that saved it (any `use_reentrant`)."""
    for module in modules:
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is None or getattr(checkpoint, "carries_routes", False):
            continue
        module._gradient_checkpointing_func = _routed_checkpoint(checkpoint, route_state)


def _routed_checkpoint(checkpoint: Callable, route_state: RouteState) -> Callable:
    def run(function: Callable, *args: Any, **kwargs: Any) -> Any:
        # Captured at forward time, re-entered at recomputation.
        routes, inputs, bypassed = route_state.current, route_state.layer_inputs, route_state.bypassed

        def function_on_routes(*inner_args: Any, **inner_kwargs: Any) -> Any:
            with route_state.use(routes), route_state.use_layer_inputs(inputs):
                if not bypassed:
                    return function(*inner_args, **inner_kwargs)
                with route_state.bypass():
                    return function(*inner_args, **inner_kwargs)

        return checkpoint(function_on_routes, *args, **kwargs)

    run.carries_routes = True
    return run
