"""The full-rank language-specific FFN baseline ("language-level MoE", no gate) of the LMS/FD paper.

Each language gets its own copy of every FFN linear; the shared route (FD) is the base layer itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import nn

from ..core.method_config import MethodConfig
from ..core.languages import Routes
from ..core.routed import LayerSite, RoutedLinear, per_language, require_float_weight, side_language
from .registry import register_method


@dataclass
class LSFFNConfig(MethodConfig):
    """One full copy of each FFN linear per language (encoder: src, decoder: tgt), initialised from the base.

    With shared_route=True the route "shared" runs the base layer: the FD shared module. It has no fields of its
    own: `languages`, `target_modules`, `shared_route`, `freeze_base`, `modules_to_save` and `keep_base_dtype`
    are MethodConfig's.
    """

    method: ClassVar[str] = "ls_ffn"
    fd_one_way: ClassVar[bool] = True  # a full-rank language FFN distils into the shared one, not both ways


class LanguageSpecificLinear(RoutedLinear):
    """`y = W[l] x + b[l]` for the example's language l; the shared route is the base `W x + b`.

    Without a shared route nothing reads the base linear: it is frozen and not counted as added.
    """

    def __init__(self, site: LayerSite):
        super().__init__(site)
        base_layer, name, registry = site.base_layer, site.name, site.registry
        require_float_weight("ls_ffn", base_layer, name)
        num_languages = len(registry.languages)
        self.shared_id: Optional[int] = registry.shared_id if registry.shared_route else None
        # Copies of the base layer, so training starts exactly at the base model.
        weight = base_layer.weight.detach()
        self.language_weight = nn.Parameter(weight.unsqueeze(0).repeat(num_languages, 1, 1).clone())
        bias = base_layer.bias
        self.language_bias = (
            nn.Parameter(bias.detach().unsqueeze(0).repeat(num_languages, 1).clone()) if bias is not None else None
        )
        self._unmerged: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        if self.shared_id is None:  # idle weights would also stall DDP, which waits for every gradient
            base_layer.requires_grad_(False)

    def run_language(self, language: int, x: torch.Tensor) -> torch.Tensor:
        if language == self.shared_id:
            return self.base_layer(x)
        bias = None if self.language_bias is None else self.language_bias[language].to(x.dtype)
        return nn.functional.linear(x, self.language_weight[language].to(x.dtype), bias)

    def routed_delta(self, x: torch.Tensor, routes: Routes, base_output: torch.Tensor) -> torch.Tensor:
        """The language's own linear in place of the base one."""
        return per_language(x, routes, self.side, self.run_language, self.num_routes) - base_output

    def language_of(self, route: tuple[int, int]) -> int:
        return side_language(route[0], route[1], self.side)

    def delta_weight(self, route: tuple[int, int]) -> torch.Tensor:
        language = self.language_of(route)
        if language == self.shared_id:
            return torch.zeros_like(self.base_layer.weight)
        return self.language_weight[language] - self.base_layer.weight

    def merge(self, route: tuple[int, int]) -> None:
        """Copy the language's weight and bias into the base layer; unmerge restores the saved originals."""
        if self.merged_route is not None:
            super().merge(route)  # raises the shared "unmerge first" error
        language = self.language_of(route)
        base = self.base_layer
        with torch.no_grad():
            self._unmerged = (base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone())
            if language != self.shared_id:
                base.weight.copy_(self.language_weight[language])
                if base.bias is not None:
                    base.bias.copy_(self.language_bias[language])
        self.merged_route = route

    def unmerge(self) -> None:
        if self.merged_route is None:
            return
        weight, bias = self._unmerged
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)
            if bias is not None:
                self.base_layer.bias.copy_(bias)
        self._unmerged = None
        self.merged_route = None

    def route_parameter_count(self, num_routes: int = 1) -> int:
        """A full weight (and bias) per language: num_routes * (out * in + out)."""
        bias = self.out_features if self.language_bias is not None else 0
        per_language = self.out_features * self.in_features + bias
        return num_routes * per_language

    def replaced_base_parameter_count(self) -> int:
        """The base linear's parameters when the language copies replace it (no shared route)."""
        return 0 if self.shared_id is not None else sum(p.numel() for p in self.base_layer.parameters())

    def shared_route_parameter_count(self) -> int:
        """Zero: the shared route is the base layer, which the base model already counts."""
        return 0

    def shared_route_only_parameter_count(self) -> int:
        return 0


def build_language_specific_layer(config: LSFFNConfig, site: LayerSite) -> LanguageSpecificLinear:
    return LanguageSpecificLinear(site)


register_method("ls_ffn", LSFFNConfig, build_language_specific_layer)
