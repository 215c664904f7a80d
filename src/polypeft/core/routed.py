"""The base of every routed layer: a wrapped linear that reads the current routes and can merge one.

Subclasses say how a route changes the output (`routed_delta`) and the weight (`delta_weight`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import ConfigError
from .languages import LanguageError, Routes
from .routing import RouteState


class LinearProxy(nn.Module):
    """A module wrapping `self.base_layer` (an nn.Linear) that still answers like one: code that reads
    `.weight`, `.bias` or the feature sizes of a model's linears keeps working after injection."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias


def check_rank(method: str, rank: int, base_layer: nn.Linear, name: str) -> None:
    """A low-rank update cannot have a rank above min(out, in) of the linear it adapts."""
    out_features, in_features = base_layer.weight.shape
    if rank > min(out_features, in_features):
        raise ConfigError(
            f"{method} rank {rank} is larger than min(out, in) = {min(out_features, in_features)} of {name} "
            f"({out_features} x {in_features}); choose rank <= {min(out_features, in_features)}"
        )


def side_language(routes_src, routes_tgt, side: str):
    """LMS's language-wise rule: the encoder reads the source language, the decoder the target."""
    return routes_tgt if side == "decoder" else routes_src


def language_key(side: str) -> str:
    """The same rule as a grouping key for Routes.groups."""
    return side_language("src", "tgt", side)


class RoutedLinear(LinearProxy):
    """Keeps the base linear intact as `base_layer`, so merge, unmerge and unload are exact."""

    def __init__(self, base_layer: nn.Linear, name: str, side: str, route_state: RouteState):
        super().__init__()
        self.base_layer = base_layer
        self.layer_name = name
        self.side = side
        # A plain attribute, not a submodule: the state is shared by every layer of the model.
        self.__dict__["route_state"] = route_state
        self.merged_route: Optional[tuple[int, int]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(x)
        if self.merged_route is not None:
            return output
        routes = self.route_state.for_batch(x.shape[0], self.layer_name).to(x.device)
        return output + self.routed_delta(x, routes)

    def routed_delta(self, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, route: tuple[int, int]) -> torch.Tensor:
        """The (out, in) matrix this layer adds to W for one (src, tgt) route."""
        raise NotImplementedError

    def merge(self, route: tuple[int, int]) -> None:
        if self.merged_route is not None:
            raise LanguageError(f"{self.layer_name} already holds merged route {self.merged_route}; unmerge first")
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight(route).to(self.base_layer.weight.dtype)
        self.merged_route = route

    def unmerge(self) -> None:
        if self.merged_route is None:
            return
        with torch.no_grad():
            self.base_layer.weight -= self.delta_weight(self.merged_route).to(self.base_layer.weight.dtype)
        self.merged_route = None

    def route_parameter_count(self, num_routes: int = 1) -> int:
        """Parameters this layer adds for `num_routes` routes."""
        raise NotImplementedError
