"""The Switch Transformer baseline: top-1 routed FFN experts on every `every`-th layer, with load balancing.

Built from linear wrappers: the FFN's input linear routes each token, its output linear applies the gate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from ..core.anatomy import block_of, closes_ffn
from ..core.config import ConfigError, Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from ..core.method_config import MethodConfig
from ..core.routed import LayerSite, RoutedLinear, require_float_weight
from .registry import register_method

# Small router weights: every expert starts with nearly equal probability.
ROUTER_INIT_STD = 0.02


class RowGroups:
    """Rows of a batch sorted by a group id computed on the device (Switch's experts), so each group
    runs as one plain matmul. One host sync (the group sizes) per batch; route groups need none."""

    def __init__(self, group_ids: torch.Tensor, num_groups: int):
        self.order = torch.argsort(group_ids, stable=True)
        self.inverse = torch.argsort(self.order)
        self.sizes: list[int] = torch.bincount(group_ids, minlength=num_groups).tolist()

    def apply(self, compute: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        """`compute(group, *rows_of_group)` for each non-empty group (the same rows of every tensor), results
        back in the original order."""
        chunks = list(zip(*(torch.split(t.index_select(0, self.order), self.sizes) for t in tensors)))
        # An empty batch still runs group 0 once, on no rows, so the output keeps its width.
        parts = [compute(group, *chunk) for group, chunk in enumerate(chunks) if chunk[0].shape[0]]
        return torch.cat(parts or [compute(0, *tensors)], dim=0).index_select(0, self.inverse)


@dataclass
class SwitchConfig(MethodConfig):
    """Top-1 experts on the FFN of layers every, 2*every, ... (1-based, per stack: GShard's/Switch's
    "every other layer" is layers 2, 4, ...): the base FFN is expert 0, the others start as copies of it
    plus noise (freeze_base=True freezes expert 0).

    capacity_factor=None keeps every token; a number drops tokens beyond ceil(factor * tokens / experts)
    per expert (their FFN output is zero, the residual carries them). Routes are ignored.

    Attributes:
        num_experts (int): Default 4. Experts per switched FFN, the base FFN among them.
        every (int): Default 2. Switch the FFN of every `every`-th layer of each stack.
        load_balance_weight (float): Default 0.01. Weight of Switch's load-balancing loss (`auxiliary_loss()`).
        capacity_factor (float | None): Default None: no token is dropped.
        expert_init_std (float): Default 0.001. Noise added to the copies that start the new experts.
        router_jitter (float): Default 0.0. Multiplicative jitter on the router input while training, in [0, 1).
    """

    method: ClassVar[str] = "switch"
    # No parameter depends on the language: runs and merges without a route (see PolyModel).
    language_agnostic: ClassVar[bool] = True
    num_experts: PositiveInt = 4
    every: PositiveInt = 2
    load_balance_weight: NonNegativeFloat = 0.01
    capacity_factor: Optional[PositiveFloat] = None
    expert_init_std: NonNegativeFloat = 1e-3
    router_jitter: Fraction = 0.0


@dataclass
class Dispatch:
    """One forward's routing decision for the tokens of one FFN, shared by its input and output linears."""

    groups: RowGroups
    gate: torch.Tensor  # (tokens,) probability of the chosen expert, zero for dropped tokens
    expert_ids: torch.Tensor  # (tokens,)


class SwitchFFNState:
    """What the linears of one switched FFN share: the router (owned by the first input linear) and the
    current dispatch. A plain object, so the router's parameters are registered once."""

    def __init__(self, key: str):
        self.key = key
        self.router: Optional[nn.Linear] = None
        self.dispatch: Optional[Dispatch] = None


class ExpertLinear(RoutedLinear):
    """One linear of a switched FFN with `num_experts` experts; each token uses its expert's weights.

    Expert 0 is the base linear itself, so the layer adds num_experts - 1 copies and no weight lies idle.
    """

    def __init__(self, site: LayerSite, ffn_state: SwitchFFNState, config: SwitchConfig, closes_ffn: bool):
        super().__init__(site)
        base_layer, name = site.base_layer, site.name
        require_float_weight("switch", base_layer, name)
        self.__dict__["ffn_state"] = ffn_state
        self.closes_ffn = closes_ffn
        self.num_experts = config.num_experts
        weight = base_layer.weight.detach()
        copies = config.num_experts - 1
        experts = weight.unsqueeze(0).repeat(copies, 1, 1)
        # Noise breaks the symmetry between the copies, or the experts would stay identical.
        self.expert_weight = nn.Parameter(experts + torch.randn_like(experts) * config.expert_init_std)
        bias = base_layer.bias
        self.expert_bias = (
            nn.Parameter(bias.detach().unsqueeze(0).repeat(copies, 1).clone()) if bias is not None else None
        )
        self.router: Optional[nn.Linear] = None
        if not closes_ffn and ffn_state.router is None:
            self.router = nn.Linear(base_layer.in_features, config.num_experts, bias=False,
                                    device=weight.device, dtype=weight.dtype)
            nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
            ffn_state.router = self.router
        self.load_balance_weight = float(config.load_balance_weight)
        self.capacity_factor = config.capacity_factor
        self.router_jitter = float(config.router_jitter)
        self._auxiliary_loss: Optional[torch.Tensor] = None

    reads_routes = False  # experts are chosen per token by the router, never by language
    cannot_merge_because = "Switch experts are chosen per token, so no route folds into one weight"

    def run_expert(self, expert: int, rows: torch.Tensor, base_rows: torch.Tensor) -> torch.Tensor:
        if expert == 0:  # the base linear itself, whose output the layer has already
            return base_rows
        bias = None if self.expert_bias is None else self.expert_bias[expert - 1].to(rows.dtype)
        return nn.functional.linear(rows, self.expert_weight[expert - 1].to(rows.dtype), bias)

    def routed_delta(self, x: torch.Tensor, routes: None, base_output: torch.Tensor) -> torch.Tensor:
        """Each token's expert output (gated where the FFN closes) in place of the base output."""
        rows, base_rows = x.reshape(-1, x.shape[-1]), base_output.reshape(-1, base_output.shape[-1])
        if self.router is not None:
            self.ffn_state.dispatch = self.route_tokens(rows)
        dispatch = self.ffn_state.dispatch
        if dispatch is None or dispatch.gate.shape[0] != rows.shape[0]:
            raise RuntimeError(
                f"{self.layer_name} ran before the routing linear of its FFN ({self.ffn_state.key}); "
                "the router lives in the FFN's first input linear, which must run first"
            )
        output = dispatch.groups.apply(self.run_expert, rows, base_rows)
        if self.closes_ffn:
            output = output * dispatch.gate.unsqueeze(-1).to(output.dtype)
            self.ffn_state.dispatch = None  # consumed: the next forward routes afresh
        return (output - base_rows).reshape(base_output.shape)

    def route_tokens(self, rows: torch.Tensor) -> Dispatch:
        """Top-1 expert per token, the capacity limit, and the load-balancing loss (Switch eq. 4-6)."""
        router_input = rows
        if self.training and self.router_jitter > 0:
            router_input = rows * torch.empty_like(rows).uniform_(1 - self.router_jitter, 1 + self.router_jitter)
        # Softmax in at least float32: half-precision routers are unstable (Switch paper §2.4).
        compute_dtype = torch.promote_types(rows.dtype, torch.float32)
        logits = nn.functional.linear(router_input.to(compute_dtype), self.router.weight.to(compute_dtype))
        probabilities = logits.softmax(dim=-1)
        gate, expert_ids = probabilities.max(dim=-1)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * rows.shape[0] / self.num_experts)
            one_hot = nn.functional.one_hot(expert_ids, self.num_experts)
            position_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
            gate = gate * (position_in_expert < capacity).to(gate.dtype)
        if self.training and torch.is_grad_enabled() and rows.shape[0]:  # no tokens, nothing to balance
            token_fraction = torch.bincount(expert_ids, minlength=self.num_experts).to(compute_dtype) / rows.shape[0]
            mean_probability = probabilities.mean(dim=0)
            # Only the last forward's term is kept, so an unread loss never holds old graphs alive.
            self._auxiliary_loss = self.num_experts * (token_fraction * mean_probability).sum()
        return Dispatch(RowGroups(expert_ids, self.num_experts), gate, expert_ids)

    def pop_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """load_balance_weight * E * sum_i f_i P_i of the last training forward, then forget it."""
        loss, self._auxiliary_loss = self._auxiliary_loss, None
        return None if loss is None else self.load_balance_weight * loss

    def route_parameter_count(self, num_routes: int = 1) -> int:
        """Zero: no parameter belongs to a language."""
        return 0

    def language_agnostic_parameter_count(self) -> int:
        count = self.expert_weight.numel() + (self.expert_bias.numel() if self.expert_bias is not None else 0)
        return count + (self.router.weight.numel() if self.router is not None else 0)


class DenseLinear(RoutedLinear):
    """An FFN linear of a layer the schedule leaves dense: the base linear, nothing added."""

    reads_routes = False
    cannot_merge_because = ExpertLinear.cannot_merge_because

    def routed_delta(self, x: torch.Tensor, routes: None, base_output: torch.Tensor) -> torch.Tensor:
        return base_output.new_zeros(())

    def route_parameter_count(self, num_routes: int = 1) -> int:
        return 0

    def language_agnostic_parameter_count(self) -> int:
        return 0


def ffn_position(name: str) -> tuple[str, int, str]:
    """(block list, block index, FFN key) of an FFN linear, from the anatomy table's block rule
    ("model.encoder.layers.3.fc1" -> block 3 of "model.encoder.layers", FFN "model.encoder.layers.3")."""
    position = block_of(name)
    if position is None:
        raise ConfigError(
            f"switch: cannot tell which layer {name!r} belongs to (no layer index in its name); "
            "target FFN linears inside numbered layers"
        )
    block = f"{position.blocks}.{position.index}" if position.blocks else str(position.index)
    return position.blocks, position.index, block


def build_switch_layer(config: SwitchConfig, site: LayerSite) -> RoutedLinear:
    _, layer_index, ffn_key = ffn_position(site.name)
    if (layer_index + 1) % config.every:
        return DenseLinear(site)
    # The model's FFN states, found again by each FFN's other linears.
    states = site.shared.setdefault("switch_ffn_states", {})
    ffn_state = states.setdefault(ffn_key, SwitchFFNState(ffn_key))
    return ExpertLinear(site, ffn_state, config, closes_ffn(site.name))


register_method("switch", SwitchConfig, build_switch_layer)
