"""Keeps unmerge exact when route factors change while their route is merged into the base weights.

Unmerge subtracts delta_weight(route); computed from changed factors it would corrupt the base.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..core.routed import RoutedLinear


def subtracts_delta(layer: nn.Module) -> bool:
    """Layers that unmerge by subtracting their delta (others, like LS-FFN, restore a saved copy)."""
    return isinstance(layer, RoutedLinear) and type(layer).unmerge is RoutedLinear.unmerge


class MergeSnapshot:
    """The factors a route was merged with; unmerge runs on them, then the current values return."""

    def __init__(self, parameters: list[nn.Parameter]):
        self.saved = [(parameter, parameter.detach().clone()) for parameter in parameters]

    @staticmethod
    def take(layers: dict[str, nn.Module]) -> "MergeSnapshot":
        return MergeSnapshot([parameter for layer in layers.values() if subtracts_delta(layer)
                              for name, parameter in layer.named_parameters() if not name.startswith("base_layer.")])

    @contextmanager
    def factors_as_merged(self) -> Iterator[None]:
        changed = [(parameter, saved, parameter.detach().clone()) for parameter, saved in self.saved
                   if not torch.equal(parameter, saved.to(parameter.device))]
        with torch.no_grad():
            for parameter, saved, _ in changed:
                parameter.copy_(saved.to(parameter.device))
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, _, current in changed:
                    parameter.copy_(current)
