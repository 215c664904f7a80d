"""LMS: a linear whose weight is W + V[a] F[b] for the example's route, with low-rank V and F.

Homogeneous batches use one pair of matmuls; mixed batches gather per-example factors and use bmm,
so no full (out x in) delta is ever built per example.
"""
from __future__ import annotations

import torch
from torch import nn

from ..languages import Routes
from ..routing import RouteState
from .routed import RoutedLinear, check_rank


class LMSLinear(RoutedLinear):
    """`y = W x + b + V[a] (F[b] x)`; (a, b) = (src, tgt) pair-wise, or the side's language twice."""

    def __init__(
        self,
        base_layer: nn.Linear,
        name: str,
        side: str,
        route_state: RouteState,
        num_routes: int,
        rank: int,
        synthesis: str,
        init_std: float,
    ):
        super().__init__(base_layer, name, side, route_state)
        out_features, in_features = base_layer.weight.shape
        check_rank("LMS", rank, base_layer, name)
        self.synthesis = synthesis
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        # V starts random and F at zero, so the wrapped model starts exactly at the base model.
        self.lms_V = nn.Parameter(torch.randn(num_routes, out_features, rank, **factory) * init_std)
        self.lms_F = nn.Parameter(torch.zeros(num_routes, rank, in_features, **factory))

    def factor_ids(self, src, tgt):
        """Which V row and which F row an example uses (ints or id tensors alike)."""
        if self.synthesis == "pair":
            return src, tgt
        language = tgt if self.side == "decoder" else src
        return language, language

    def low_rank(self, x: torch.Tensor, route: tuple[int, int]) -> torch.Tensor:
        v_id, f_id = self.factor_ids(*route)
        flat = self.lms_F[f_id].to(x.dtype)
        vertical = self.lms_V[v_id].to(x.dtype)
        return nn.functional.linear(nn.functional.linear(x, flat), vertical)

    def routed_delta(self, x: torch.Tensor, routes: Routes) -> torch.Tensor:
        if routes.segments is not None:
            parts = [self.low_rank(x[start:stop], (s, t)) for start, stop, s, t in routes.segments]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        v_ids, f_ids = self.factor_ids(routes.src, routes.tgt)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        flat = self.lms_F.index_select(0, f_ids).to(x.dtype)
        vertical = self.lms_V.index_select(0, v_ids).to(x.dtype)
        low_rank = torch.bmm(rows, flat.transpose(1, 2))
        return torch.bmm(low_rank, vertical.transpose(1, 2)).reshape(*x.shape[:-1], -1)

    def delta_weight(self, route: tuple[int, int]) -> torch.Tensor:
        v_id, f_id = self.factor_ids(*route)
        return self.lms_V[v_id] @ self.lms_F[f_id]

    def route_parameter_count(self, num_routes: int = 1) -> int:
        rank = self.lms_V.shape[-1]
        return num_routes * rank * (self.out_features + self.in_features)
