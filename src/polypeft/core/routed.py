"""The base of every routed layer: a wrapped linear that reads the current routes and can merge one.

Subclasses say how a route changes the output (`routed_delta`) and the weight (`delta_weight`).
"""
from __future__ import annotations

from typing import Callable, Optional

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


def per_language(rows: torch.Tensor, routes: Routes, side: str,
                 run: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`run(language, rows_of_that_language)` over a batch, language chosen by the side's rule: the one
    dispatch every language-wise layer (LS-FFN, CLSR) shares, by runs of equal routes or by groups."""
    if routes.segments is not None:
        parts = [run(side_language(s, t, side), rows[start:stop]) for start, stop, s, t in routes.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    groups = routes.groups(language_key(side))
    return groups.apply(rows, lambda s, t, group_rows: run(side_language(s, t, side), group_rows))


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

    # Defaults that methods override where they differ (no caller probes a layer with hasattr).
    def shared_route_parameter_count(self) -> int:
        """Parameters that serving the FD shared route alone keeps in this layer: one route by default."""
        return self.route_parameter_count(1)

    def shared_route_only_parameter_count(self) -> int:
        """Parameters only the shared route uses, which serving the language routes can drop."""
        return self.route_parameter_count(1)

    def replaced_base_parameter_count(self) -> int:
        """Base parameters the added ones replace (full-rank copies without a shared route)."""
        return 0

    def language_agnostic_parameter_count(self) -> int:
        """Added parameters that belong to no language (LoRA's update, Switch experts, CLSR gates)."""
        return 0

    def pop_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The extra training loss of the last forward (MoE balance, CLSR budget), consumed by the call."""
        return None
