"""CLSR (Zhang et al. 2021): after each sublayer a per-token gate mixes a shared and a language-specific
projection, with a budget on the fraction of tokens sent the language-specific way.

Wraps the sublayer's output linear: z = base(x); y = g W_lang[l] z + (1 - g) W_shared z.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from ..core.config import ConfigError, NonNegativeFloat, PositiveInt, UnitInterval
from ..core.method_config import MethodConfig
from ..core.languages import Routes
from ..core.routed import LayerSite, RoutedLinear, added_factory, per_language
from .registry import register_method

@dataclass
class CLSRConfig(MethodConfig):
    """Conditional language-specific routing after every attention and FFN sublayer (defaults).

    language_weights="per_stack" is CLSR as in Zhang et al.'s code: one W_lang per language shared by all
    sublayers of the encoder (and one of the decoder); "per_sublayer" (CLSR*) gives each sublayer its own.
    Gates are always per sublayer, as in the paper. The gate reads the sublayer output z (the paper reads
    the sublayer input, which a wrapped output linear does not see). Training adds Gaussian noise of
    std `gate_noise_std` to the gate logit (the paper anneals it from 0 to 5: set `layer.gate_noise_std`);
    inference uses the hard gate 1[logit >= 0] unless hard_gate_at_inference=False.

    Attributes:
        budget (float): Default 0.3. The share p of gates that may open (language-specific), in [0, 1].
        budget_weight (float): Default 1.0. Weight of the budget loss (`auxiliary_loss()`).
        language_weights (str): Default "per_stack" (CLSR); "per_sublayer" is CLSR*.
        gate_hidden_size (int): Default 128. Width of each gate's hidden layer.
        gate_noise_std (float): Default 1.0. Gaussian noise on the gate logit while training.
        hard_gate_at_inference (bool): Default True: a 0/1 gate at inference, the soft gate otherwise.
    """

    method: ClassVar[str] = "clsr"
    targets_by_default: ClassVar[str] = "sublayer_outputs"
    budget: UnitInterval = 0.3
    budget_weight: NonNegativeFloat = 1.0
    language_weights: Literal["per_stack", "per_sublayer"] = "per_stack"
    gate_hidden_size: PositiveInt = 128
    gate_noise_std: NonNegativeFloat = 1.0
    hard_gate_at_inference: bool = True


class BudgetTracker:
    """Sum and count of the gates of the forward in progress across all CLSR layers of one model.

    A forward is recognised by its Routes object, so a new forward restarts the sums and an unread
    budget never keeps old graphs alive.
    """

    def __init__(self, budget: float, weight: float):
        self.budget = budget
        self.weight = weight
        self.routes: Optional[Routes] = None
        self.gate_sum: Optional[torch.Tensor] = None
        self.gate_count = 0

    def record(self, routes: Routes, gate: torch.Tensor) -> None:
        if routes is not self.routes:
            self.routes, self.gate_sum, self.gate_count = routes, None, 0
        total = gate.sum()
        self.gate_sum = total if self.gate_sum is None else self.gate_sum + total
        self.gate_count += gate.numel()

    def pop(self) -> Optional[torch.Tensor]:
        """weight * |mean gate - budget| over every gate of the last training forward, then forget it."""
        if self.gate_sum is None:
            return None
        loss = self.weight * (self.gate_sum / self.gate_count - self.budget).abs() if self.gate_count else None
        self.routes, self.gate_sum, self.gate_count = None, None, 0
        return loss  # None after an empty batch: no gate to hold to the budget


class CLSRLinear(RoutedLinear):
    """A sublayer's output linear followed by CLSR's gated mix of a shared and a language projection."""

    def __init__(self, site: LayerSite, config: CLSRConfig, language_owner: Optional["CLSRLinear"],
                 budget: BudgetTracker):
        super().__init__(site)
        base_layer, name, registry = site.base_layer, site.name, site.registry
        width = base_layer.out_features
        factory = added_factory(base_layer, name, keep_base_dtype=True)  # it projects the sublayer's output
        identity = torch.eye(width, **factory)
        # Identity projections: both paths return z, so training starts exactly at the base model.
        self.shared_projection = nn.Linear(width, width, **factory)
        with torch.no_grad():
            self.shared_projection.weight.copy_(identity)
            self.shared_projection.bias.zero_()
        self.gate_hidden = nn.Linear(width, config.gate_hidden_size, **factory)
        self.gate_output = nn.Linear(config.gate_hidden_size, 1, **factory)
        if language_owner is None:
            self.language_weight = nn.Parameter(identity.unsqueeze(0).repeat(len(registry.languages), 1, 1))
            language_owner = self
        else:
            self.language_weight = None
        # A plain attribute: sublayers sharing W_lang read it from its one owner (registered once).
        self.__dict__["language_owner"] = language_owner
        self.__dict__["budget"] = budget
        self.shared_id: Optional[int] = registry.shared_id if registry.shared_route else None
        self.gate_noise_std = float(config.gate_noise_std)
        self.hard_gate_at_inference = config.hard_gate_at_inference

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """Per-token g in [0, 1] (training: noisy sigmoid; inference: hard 0/1 by default)."""
        logit = self.gate_output(torch.relu(self.gate_hidden(z)))
        if self.training:
            if self.gate_noise_std > 0:
                logit = logit + torch.randn_like(logit) * self.gate_noise_std
            return torch.sigmoid(logit)
        if self.hard_gate_at_inference:
            return (logit >= 0).to(z.dtype)
        return torch.sigmoid(logit)

    def language_projection(self, language: int, z: torch.Tensor) -> torch.Tensor:
        if language == self.shared_id:  # the FD shared route takes the shared path only
            return self.shared_projection(z)
        return nn.functional.linear(z, self.language_owner.language_weight[language].to(z.dtype))

    def language_path(self, z: torch.Tensor, routes: Routes) -> torch.Tensor:
        return per_language(z, routes, self.side, self.language_projection, self.num_routes)

    cannot_merge_because = "CLSR gates each token, so no route folds into one weight"

    def routed_delta(self, x: torch.Tensor, routes: Routes, base_output: torch.Tensor) -> torch.Tensor:
        """g W_lang[l] z + (1 - g) W_shared z - z, where z is the sublayer output (the base output)."""
        z = base_output
        shared = self.shared_projection(z)
        language = self.language_path(z, routes)
        gate = self.gate(z)
        if self.training and torch.is_grad_enabled():
            self.budget.record(self.route_state.current, gate)
        return shared + gate * (language - shared) - z

    def pop_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The model-wide budget term; the first layer asked takes it, the others get None, so
        PolyModel.auxiliary_loss counts it once."""
        return self.budget.pop()

    def route_parameter_count(self, num_routes: int = 1) -> int:
        """num_routes * d * d for the layer that owns W_lang; zero for sublayers that share it."""
        if self.language_weight is None:
            return 0
        return num_routes * self.out_features * self.out_features

    def shared_route_parameter_count(self) -> int:
        """The shared projection: what the FD shared route runs on besides the base."""
        return sum(p.numel() for p in self.shared_projection.parameters())

    def shared_route_only_parameter_count(self) -> int:
        """Zero: the language routes run the shared projection too (the gate mixes both)."""
        return 0

    def language_agnostic_parameter_count(self) -> int:
        modules = (self.shared_projection, self.gate_hidden, self.gate_output)
        return sum(p.numel() for module in modules for p in module.parameters())


@dataclass
class _CLSRBuild:
    budget: BudgetTracker
    owners: dict  # side -> weak reference to the layer owning that stack's W_lang (no cycle to the key)


def build_clsr_layer(config: CLSRConfig, site: LayerSite) -> CLSRLinear:
    # The model's shared pieces: its budget tracker and the W_lang owner per stack, kept in the site's `shared`.
    build = site.shared.get("clsr")
    if build is None:
        build = site.shared["clsr"] = _CLSRBuild(BudgetTracker(float(config.budget), float(config.budget_weight)), {})
    name, linear, side = site.name, site.base_layer, site.side
    owner_ref = build.owners.get(side) if config.language_weights == "per_stack" else None
    owner = owner_ref() if owner_ref is not None else None
    if owner is not None and owner.out_features != linear.out_features:
        raise ConfigError(
            f"clsr: {name} outputs {linear.out_features} features but the {side}'s shared W_lang is "
            f"{owner.out_features} x {owner.out_features}; use language_weights='per_sublayer'"
        )
    layer = CLSRLinear(site, config, owner, build.budget)
    build.owners.setdefault(side, weakref.ref(layer))
    return layer


register_method("clsr", CLSRConfig, build_clsr_layer)
