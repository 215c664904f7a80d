"""The base of every routed layer: a wrapped linear that reads the current routes and can merge one.

Subclasses say how a route changes the output (`routed_delta`) and the weight (`delta_weight`), and declare
their traits (`reads_routes`, `cannot_merge_because`); the one `forward` here serves every method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .anatomy import in_moe_expert
from .config import ConfigError
from .languages import LanguageError, LanguageRegistry, Routes
from .quantized import fold_into_quantized, quantization_of, restore_quantized
from .routing import RouteState


@dataclass
class LayerSite:
    """Where a routed layer goes: the linear it wraps, its name and side, and what the model's layers share
    (the routes of the call in flight, the languages, and `shared`: one method's per-model build state)."""

    base_layer: nn.Module
    name: str
    side: str
    route_state: RouteState
    registry: LanguageRegistry
    shared: dict = field(default_factory=dict)
    keep_base_dtype: bool = False  # added weights in the base's half dtype instead of float32
    source_encoder: Optional[nn.Module] = None  # a frozen encoder a source pass reads (FLARE-MT)


class LinearProxy(nn.Module):
    """A module wrapping `self.base_layer` (an nn.Linear or Conv1D) that still answers like one: code that
    reads `.weight`, `.bias` or the feature sizes of a model's linears keeps working after injection."""

    @property
    def in_features(self) -> int:
        return layer_shape(self.base_layer)[1]

    @property
    def out_features(self) -> int:
        return layer_shape(self.base_layer)[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias


FULL_PRECISION = (torch.float32, torch.float64)


def is_transposed_linear(layer: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, mGPT): a linear whose weight is stored (in, out)."""
    return isinstance(layer, Conv1D)


def layer_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(out, in) from the layer's own sizes: a quantized weight is packed (4-bit: (n, 1)), so its shape lies."""
    if is_transposed_linear(base_layer):
        return base_layer.nf, base_layer.nx
    return base_layer.out_features, base_layer.in_features


def in_weight_layout(base_layer: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """An (out, in) delta laid out as the base layer stores its weight (Conv1D: transposed)."""
    return delta.T if is_transposed_linear(base_layer) else delta


def added_factory(base_layer: nn.Module, name: str, keep_base_dtype: bool = False) -> dict:
    """Device and dtype for a layer's added weights: where the base computes, and float32 unless the base is
    already full precision (half or quantized factors lose small updates; keep_base_dtype=True keeps fp16/bf16)."""
    weight = base_layer.weight
    device = weight.device
    if device.type == "meta":  # offloaded by accelerate: the hook knows where the layer computes
        device = getattr(getattr(base_layer, "_hf_hook", None), "execution_device", None)
        if device is None:
            raise ConfigError(f"{name} has its weight on the meta device and no execution device: load the model "
                              "(or give it a device_map) before wrapping it")
    floating = weight.is_floating_point()
    dtype = weight.dtype if weight.dtype in FULL_PRECISION or (keep_base_dtype and floating) else torch.float32
    return {"device": torch.device(device), "dtype": dtype}


def require_float_weight(method: str, base_layer: nn.Module, name: str) -> None:
    """Methods that copy the base weight cannot copy a quantized one."""
    if not base_layer.weight.is_floating_point():
        raise ConfigError(f"{method} copies the weight of {name}, which is quantized ({type(base_layer).__name__}, "
                          f"{base_layer.weight.dtype}); use a low-rank method on a quantized base")


def check_rank(method: str, rank: int, base_layer: nn.Linear, name: str) -> None:
    """A low-rank update cannot have a rank above min(out, in) of the linear it adapts."""
    out_features, in_features = layer_shape(base_layer)
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
                 run: Callable[[int, torch.Tensor], torch.Tensor], num_routes: int) -> torch.Tensor:
    """`run(language, rows_of_that_language)` over a batch, language chosen by the side's rule: the one
    dispatch every language-wise layer (LS-FFN, CLSR) shares, by runs of equal routes or by groups."""
    if torch.compiler.is_compiling():
        # Every route over every row, each row keeping its own: the graph reads only the id tensors (host-side
        # runs would become guards and recompile per route mix), at num_routes times the compute.
        every = torch.stack([run(route, rows) for route in range(num_routes)])
        return every[side_language(routes.src, routes.tgt, side), torch.arange(rows.shape[0], device=rows.device)]
    if routes.segments is not None:
        parts = [run(side_language(s, t, side), rows[start:stop]) for start, stop, s, t in routes.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    groups = routes.groups(language_key(side))
    return groups.apply(rows, lambda s, t, group_rows: run(side_language(s, t, side), group_rows))


def mark_moe_experts(model: nn.Module, layers: dict[str, "RoutedLinear"]) -> None:
    """Flag the routed layers the anatomy table places inside an MoE expert."""
    for name, layer in layers.items():
        layer.in_moe_expert = in_moe_expert(model, name)


class RoutedLinear(LinearProxy):
    """Keeps the base linear intact as `base_layer`, so merge, unmerge and unload are exact."""

    def __init__(self, site: "LayerSite"):
        super().__init__()
        self.base_layer = site.base_layer
        self.layer_name = site.name
        self.side = site.side
        # A plain attribute, not a submodule: the state is shared by every layer of the model.
        self.__dict__["route_state"] = site.route_state
        self.merged_route: Optional[tuple[int, int]] = None
        self.num_routes = site.registry.num_routes  # languages, plus the FD shared route when there is one
        # Inside an MoE expert (set from the anatomy table by `mark_moe_experts`): rows are not examples.
        self.in_moe_expert = False

    # Which route ids the layer's weights depend on (see Routes.groups); language-wise layers narrow it.
    group_key = "pair"
    # Declared traits, read instead of lists of method names. False: the layer ignores routes, so the model
    # runs with none set (LoRA, Switch, FLARE).
    reads_routes: ClassVar[bool] = True
    # Why no route of this layer folds into one weight (experts or gates chosen per token); None: mergeable.
    cannot_merge_because: ClassVar[Optional[str]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(x)
        if self.merged_route is not None or self.route_state.bypassed:
            return output
        if not self.reads_routes:
            return output + self.routed_delta(x, None, output)
        if self.in_moe_expert:
            return output + self.routed_delta(x, self.expert_routes(x), output)
        routes = self.route_state.for_batch(x.shape[0], self.layer_name).to(x.device)
        if torch.compiler.is_compiling():
            # Only the id tensors reach the graph: no host-side runs or groups, whose ints would become
            # guards and recompile the model for every new route mix.
            return output + self.compiled_delta(x, routes, output)
        return output + self.routed_delta(x, routes, output)

    def expert_routes(self, x: torch.Tensor) -> Routes:
        """The batch's one route for every row an expert got: its router picked and reordered the token rows,
        so which example a row came from is unknown here, and a mixed batch cannot be routed."""
        routes = self.route_state.current
        if routes is None:  # the state's own error, which says how to pass routes
            self.route_state.for_batch(x.shape[0], self.layer_name)
        groups = routes.groups(self.group_key)
        if groups.num_groups > 1:
            raise LanguageError(
                f"{self.layer_name} sits inside an MoE expert, whose router reorders the token rows, so it cannot "
                f"give each example its own route; this batch mixes {groups.num_groups} routes "
                f"(src ids {list(groups.src_ids)}, tgt ids {list(groups.tgt_ids)}): run one route per batch, or "
                "leave the expert linears out of target_modules"
            )
        return Routes.from_ids([groups.src_ids[0]] * x.shape[0], [groups.tgt_ids[0]] * x.shape[0], x.device)

    def routed_delta(self, x: torch.Tensor, routes: Optional[Routes], base_output: torch.Tensor) -> torch.Tensor:
        """What this layer adds to the base layer's output `base_output` (= W x + b) for the rows' `routes`
        (None for a layer that does not read routes). Layers that transform the base output (CLSR's gate,
        Switch's experts) read `base_output` instead of computing it again."""
        raise NotImplementedError

    def compiled_delta(self, x: torch.Tensor, routes: Routes, base_output: torch.Tensor) -> torch.Tensor:
        """The delta under torch.compile, reading only `routes.src`/`routes.tgt` (LMS); a method that keeps
        the host-side path here recompiles for each new route mix."""
        return self.routed_delta(x, routes, base_output)

    def delta_weight(self, route: tuple[int, int]) -> torch.Tensor:
        """The (out, in) matrix this layer adds to W for one (src, tgt) route."""
        raise NotImplementedError

    def merge(self, route: tuple[int, int]) -> None:
        if self.cannot_merge_because is not None:
            raise LanguageError(f"{self.layer_name}: {self.cannot_merge_because}")
        if self.merged_route is not None:
            raise LanguageError(f"{self.layer_name} already holds merged route {self.merged_route}; unmerge first")
        weight = self.base_layer.weight
        if quantization_of(weight) is not None:
            # peft's way on the same base: dequantize, add, quantize again (rounds once more: see the docs).
            with torch.no_grad():
                self.quantized_original = fold_into_quantized(self.base_layer, self.delta_weight(route).detach())
        elif not weight.is_floating_point():
            raise ConfigError(
                f"{self.layer_name}: cannot fold a route into a {weight.dtype} weight ({type(self.base_layer).__name__}); "
                "serve the route unmerged, or load the base in full precision and merge there"
            )
        else:
            with torch.no_grad():
                weight += in_weight_layout(self.base_layer, self.delta_weight(route)).to(weight.dtype)
        self.merged_route = route

    def unmerge(self) -> None:
        if self.merged_route is None:
            return
        if self.quantized_original is not None:
            restore_quantized(self.base_layer, self.quantized_original)
            self.quantized_original = None
        else:
            with torch.no_grad():
                self.base_layer.weight -= in_weight_layout(self.base_layer, self.delta_weight(self.merged_route)).to(
                    self.base_layer.weight.dtype)
        self.merged_route = None

    quantized_original: Optional[tuple] = None  # what a merge into a quantized weight replaced (see core/quantized)

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

    def lora_factors(self, route: tuple[int, int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(lora_A, lora_B) that make this route a LoRA (PEFT export), or None for methods that are not low-rank."""
        return None

    def pop_auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The extra training loss of the last forward (MoE balance, CLSR budget), consumed by the call."""
        return None
