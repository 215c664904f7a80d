"""PEFT's everyday calls on a PolyModel, under PEFT's names where the meaning is the same.

Calls that would mean something else here raise an error saying what to do instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from ..core.inject import restore_base_layers
from ..core.languages import LanguageError
from .routed_model import RoutedModel


class UnsupportedCallError(TypeError):
    """A PEFT or transformers adapter call that PolyModel answers differently."""


TASKS = ("another task's save goes on the same base object with `base = model.unload()` then "
         "`pp.PolyModel.from_pretrained(base, folder_or_repo_id)` (only the added weights move; see the guide "
         "'Several tasks on one base')")
INSTEAD = {
    "set_adapter": "a PolyModel routes per call, not per active adapter: pass src_lang=/tgt_lang= (or lang=) to "
                   "forward/generate, or run inside `with model.routes(...)`; " + TASKS,
    "load_adapter": "load a polypeft save with pp.PolyModel.from_pretrained(base_model, folder_or_repo_id); "
                    "for one exported route as a PEFT adapter use peft.PeftModel.from_pretrained; " + TASKS,
    "add_adapter": "every language route already lives in this PolyModel; to add languages build a new config "
                   "listing them (pp.wrap(base_model, config)) and train",
}
# PEFT's and transformers' adapter names a PolyModel does not have: answered here, never by transformers' own
# adapter code (which the base model inherits and which would speak of PEFT versions).
ROUTES_PER_CALL = ("a PolyModel has no active adapter: every call names its routes (lang= or src_lang=/tgt_lang=, "
                   "one per example), and `model.registry.allowed()` lists them")
MISSING_NAMES = {
    "peft_config": "its one method config is `model.poly_config` (saved as polypeft_config.json; "
                   "pp.load_config(folder) reads it)",
    "active_adapter": ROUTES_PER_CALL,
    "active_adapters": ROUTES_PER_CALL,
    "delete_adapter": "a PolyModel holds one save's routes, so there is nothing to delete by name; " + TASKS,
    "add_weighted_adapter": "routes are not mixed by weight; train a shared route instead (`shared_route=True`, FD)",
    "merge_adapter": "fold one route into the base weights with `model.merge(route=...)` (or src=/tgt=)",
    "unmerge_adapter": "take the merged route out with `model.unmerge()`",
    "enable_adapters": "the routes are on unless inside `with model.disable_adapter():`",
    "disable_adapters": "use `with model.disable_adapter():` (this thread only)",
    "enable_adapter_layers": "the routes are on unless inside `with model.disable_adapter():`",
    "disable_adapter_layers": "use `with model.disable_adapter():` (this thread only)",
    "get_adapter_state_dict": "the added weights are `model.added_state_dict()`",
    "get_layer_status": "the routed layers are `model.routed_layers` and their counts `model.parameter_counts()`",
    "get_model_status": "the routed layers are `model.routed_layers` and their counts `model.parameter_counts()`",
}


def refuse(call: str) -> UnsupportedCallError:
    return UnsupportedCallError(f"PolyModel.{call}() is not supported: {INSTEAD[call]}")


def missing_name(name: str) -> AttributeError:
    """An AttributeError (so `hasattr` stays False for tools that probe for PEFT) saying polypeft's way."""
    return AttributeError(f"'PolyModel' object has no attribute {name!r}, a PEFT adapter name: {MISSING_NAMES[name]}")


@contextmanager
def adapters_disabled(poly: RoutedModel) -> Iterator[None]:
    """The plain base layers' outputs for the block, on this thread only: other threads that share the model keep
    their routes meanwhile (a server answering other requests)."""
    poly.check_not_spent("disable the adapters")
    if poly.merged_route is not None:
        raise LanguageError(
            f"route {poly.merged_route_codes} is merged into the base weights, so the base model's outputs are "
            "not available; call unmerge() before disable_adapter()"
        )
    with poly.route_state.bypass():
        yield


def unload(poly: RoutedModel) -> nn.Module:
    """The base model with its original layers and weights (any merged route taken out first)."""
    poly.check_not_spent("unload")
    poly.unmerge()
    restore_base_layers(poly.base_model, poly.routed_layers)
    poly.routed_layers = {}
    return poly.base_model


def trainable_parameter_counts(poly: RoutedModel) -> tuple[int, int]:
    """(trainable, all) parameters, as PEFT's get_nb_trainable_parameters counts them."""
    parameters = list(poly.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)
