"""The plain LoRA baseline as a polypeft method: one language-agnostic low-rank route per linear.

It ignores the routes, so it compares with LMS on the same targets, save/load and merge machinery.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import Fraction, PositiveFloat, PositiveInt
from ..core.method_config import MethodConfig
from ..core.routed import LayerSite, RoutedLinear, added_factory, check_rank, layer_shape
from .registry import register_method


@dataclass
class LoRAConfig(MethodConfig):
    """`y = W x + b + (alpha / rank) B A x` on every target (FFN linears by default), for all languages alike.

    `languages` only name what the model is used on; the base is frozen (every method's default). The shared
    fields (`target_modules`, `freeze_base`, `modules_to_save`, `keep_base_dtype`) are MethodConfig's.

    Attributes:
        rank (int): Default 8. The rank r of A (r x in) and B (out x r).
        alpha (float): Default 16.0. The update is scaled by alpha / rank, as in peft.
        dropout (float): Default 0.0. Dropout on the LoRA branch's input, in [0, 1).
    """

    method: ClassVar[str] = "lora"
    # No parameter depends on the language: runs and merges without a route (see PolyModel).
    language_agnostic: ClassVar[bool] = True
    # A plain LoRA: saved as PEFT's adapter files, so peft.PeftModel.from_pretrained loads the save as is.
    saves_as_peft: ClassVar[bool] = True
    handles_conv1d: ClassVar[bool] = True
    rank: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Fraction = 0.0


class LoRARouteLinear(RoutedLinear):
    """A base linear plus one low-rank update B·A shared by every language; B starts at zero."""

    def __init__(self, site: LayerSite, rank: int, alpha: float, dropout: float):
        super().__init__(site)
        base_layer, name = site.base_layer, site.name
        out_features, in_features = layer_shape(base_layer)
        check_rank("LoRA", rank, base_layer, name)
        factory = added_factory(base_layer, name, site.keep_base_dtype)
        self.scaling = float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        # Random A and zero B: the update is exactly zero at the start, yet B gets gradients at once.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    reads_routes = False  # one update for every language: the model runs with or without src_lang/tgt_lang

    def routed_delta(self, x: torch.Tensor, routes: None, base_output: torch.Tensor) -> torch.Tensor:
        low_rank = nn.functional.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return self.scaling * nn.functional.linear(low_rank, self.lora_B.to(x.dtype))

    def lora_factors(self, route: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The same factors for every route."""
        return self.lora_A, self.lora_B

    def delta_weight(self, route: tuple[int, int]) -> torch.Tensor:
        """The same (out, in) update for every route."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def route_parameter_count(self, num_routes: int = 1) -> int:
        """Zero: no parameter belongs to a language; the rank * (in + out) update is language-agnostic."""
        return 0

    def language_agnostic_parameter_count(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()


def build_lora_route_layer(config: LoRAConfig, site: LayerSite) -> LoRARouteLinear:
    return LoRARouteLinear(site, config.rank, config.alpha, config.dropout)


register_method("lora", LoRAConfig, build_lora_route_layer)
