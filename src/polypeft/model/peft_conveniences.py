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


INSTEAD = {
    "set_adapter": "a PolyModel routes per call, not per active adapter: pass src_lang=/tgt_lang= (or lang=) to "
                   "forward/generate, or run inside `with model.routes(...)`",
    "load_adapter": "load a polypeft save with pp.PolyModel.from_pretrained(base_model, folder_or_repo_id); "
                    "for one exported route as a PEFT adapter use peft.PeftModel.from_pretrained",
    "add_adapter": "every language route already lives in this PolyModel; to add languages build a new config "
                   "listing them (pp.wrap(base_model, config)) and train",
}


def refuse(call: str) -> UnsupportedCallError:
    return UnsupportedCallError(f"PolyModel.{call}() is not supported: {INSTEAD[call]}")


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
