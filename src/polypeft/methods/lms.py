"""LMS: a linear whose weight is W + V[a] F[b] for the example's route, with low-rank V and F.

Runs of equal routes use plain matmuls; mixed batches gather factors (per route group or per example)
and use bmm, so no full (out x in) delta is ever built per example.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ..core.config import PositiveFloat, PositiveInt
from ..core.method_config import MethodConfig
from ..core.languages import RouteGroups, Routes
from ..core.routed import (LayerSite, RoutedLinear, added_factory, check_rank, language_key, layer_shape,
                           side_language)
from .registry import register_method


@dataclass
class LMSConfig(MethodConfig):
    """Language-specific Matrix Synthesis: each target linear W becomes W + V[src] F[tgt] (Xu et al. 2023).

    Attributes:
        languages (list[str]): Language codes, one route each, in this order (the order is part of a save).
        rank (int): Default 16. The low rank d of V (out x d) and F (d x in); at most min(out, in) of every
            target. A route adds d * (out + in) parameters per target linear.
        synthesis (str): Default "pair": (src, tgt) everywhere, V from the source and F from the target.
            "language": the encoder reads the source language twice, the decoder the target (one-language tasks).
        init_std (float): Default 0.01. V starts N(0, init_std) and F at zero, so training starts at the base.
        shared_route (bool): Default False. Adds the FD shared route `"shared"`, which serves every language and
            merges into a plain model (train it with `pp.fuse_distillation_step` or `PolyTrainer(fd=True)`).
        target_modules (str | list[str] | None): Default None: both FFN linears of every block. Module names or
            last name parts (`["fc1", "fc2"]`), or one regular expression over whole module names.
        freeze_base (bool): Default True: only the routes and `modules_to_save` train (peft's default).
        modules_to_save (list[str] | None): Default None. Base modules (task heads: `["classifier"]`) trained
            and saved with the routes.
        keep_base_dtype (bool): Default False: factors are float32 on half and quantized bases; True keeps
            the base's bf16/fp16.
    """

    method: ClassVar[str] = "lms"
    handles_conv1d: ClassVar[bool] = True
    rank: PositiveInt = 16
    synthesis: Literal["pair", "language"] = "pair"
    init_std: PositiveFloat = 0.01


class LMSLinear(RoutedLinear):
    """`y = W x + b + V[a] (F[b] x)`; (a, b) = (src, tgt) pair-wise, or the side's language twice."""

    def __init__(self, site: LayerSite, rank: int, synthesis: str, init_std: float):
        super().__init__(site)
        base_layer, name, num_routes = site.base_layer, site.name, site.registry.num_routes
        out_features, in_features = layer_shape(base_layer)
        check_rank("LMS", rank, base_layer, name)
        self.synthesis = synthesis
        factory = added_factory(base_layer, name, site.keep_base_dtype)
        # V starts random and F at zero, so the wrapped model starts exactly at the base model.
        self.lms_V = nn.Parameter(torch.randn(num_routes, out_features, rank, **factory) * init_std)
        self.lms_F = nn.Parameter(torch.zeros(num_routes, rank, in_features, **factory))

    def factor_ids(self, src, tgt):
        """Which V row and which F row an example uses (ints or id tensors alike)."""
        if self.synthesis == "pair":
            return src, tgt
        language = side_language(src, tgt, self.side)
        return language, language

    def low_rank(self, x: torch.Tensor, route: tuple[int, int]) -> torch.Tensor:
        v_id, f_id = self.factor_ids(*route)
        flat = self.lms_F[f_id].to(x.dtype)
        vertical = self.lms_V[v_id].to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, flat), vertical)

    @property
    def group_key(self) -> str:
        """Which route ids this layer's factors depend on (see Routes.groups)."""
        return "pair" if self.synthesis == "pair" else language_key(self.side)

    def routed_delta(self, x: torch.Tensor, routes: Routes, base_output: torch.Tensor) -> torch.Tensor:
        if routes.segments is not None:
            parts = [self.low_rank(x[start:stop], (s, t)) for start, stop, s, t in routes.segments]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        groups = routes.groups(self.group_key)
        if groups.padded_cheaper_than_per_example(rows.shape[1], self.lms_F.shape[1]):
            return self.grouped_delta(rows, groups).reshape(*x.shape[:-1], -1)
        return self.batched_delta(rows, routes.src, routes.tgt).reshape(*x.shape[:-1], -1)

    def compiled_delta(self, x: torch.Tensor, routes: Routes, base_output: torch.Tensor) -> torch.Tensor:
        """Gathered factors and bmm for every mix: one graph, the route ids a tensor input of it."""
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.batched_delta(rows, routes.src, routes.tgt).reshape(*x.shape[:-1], -1)

    def batched_delta(self, rows: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """(B, T, in) rows, each row-block with its own route: two bmm over gathered factors."""
        v_ids, f_ids = self.factor_ids(src, tgt)
        flat = self.lms_F.index_select(0, f_ids).to(rows.dtype)
        vertical = self.lms_V.index_select(0, v_ids).to(rows.dtype)
        return torch.bmm(torch.bmm(rows, flat.transpose(1, 2)), vertical.transpose(1, 2))

    def grouped_delta(self, rows: torch.Tensor, groups: RouteGroups) -> torch.Tensor:
        """Factors fetched once per route group; the examples move into padded group blocks and back."""
        _, tokens, width = rows.shape
        blocks = rows.index_select(0, groups.slots).reshape(groups.num_groups, groups.group_size * tokens, width)
        delta = self.batched_delta(blocks, groups.src, groups.tgt)
        return delta.reshape(groups.num_groups * groups.group_size, tokens, -1).index_select(0, groups.position)

    def lora_factors(self, route: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A = F[b], lora_B = V[a]: the route's delta V[a] F[b] is a LoRA with alpha = rank."""
        v_id, f_id = self.factor_ids(*route)
        return self.lms_F[f_id], self.lms_V[v_id]

    def delta_weight(self, route: tuple[int, int]) -> torch.Tensor:
        v_id, f_id = self.factor_ids(*route)
        return self.lms_V[v_id] @ self.lms_F[f_id]

    def route_parameter_count(self, num_routes: int = 1) -> int:
        rank = self.lms_V.shape[-1]
        return num_routes * rank * (self.out_features + self.in_features)


def build_lms_layer(config: LMSConfig, site: LayerSite) -> LMSLinear:
    return LMSLinear(site, config.rank, config.synthesis, config.init_std)


register_method("lms", LMSConfig, build_lms_layer)
