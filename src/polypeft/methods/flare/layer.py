"""FLARE's config and routed layer: a LoRA whose bottleneck fuses the English (source) pass into the target's.

Without a source the layer is plain LoRA, `W x + (alpha/r) B A x`, so it merges and exports as one.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from ...core.config import ConfigError, PositiveInt
from ...core.routed import LayerSite, added_factory, layer_shape
from ..lora import LoRAConfig, LoRARouteLinear
from .fusion import FusionSource, build_fusion


class FLAREError(ConfigError):
    """A FLARE configuration, batch or saved adapter that cannot be used."""


@dataclass
class FLAREConfig(LoRAConfig):
    """LoRA with FLARE's bottleneck fusion `h = W x_t + (alpha/r) B φ(A x_s, A x_t)`.

    fusion=None is plain LoRA (FLARE's stage 1 and the LoRA baselines). The source x_s is the input of the
    same linear `source_layer_offset` blocks ahead in the frozen English pass (source="model"), or a learned
    projection of an MT encoder's output (source="mt_encoder"). alignment defaults to "position"
    ("attention" for fusion="cross_attention"). `languages` only name what the model is used on. `rank`,
    `alpha`, `dropout` are LoRAConfig's; the shared fields MethodConfig's.

    Attributes:
        fusion (str | None): Default "add_relu" (the paper's best): `relu(s) + relu(t)`; also "add", "mul",
            "cross_attention"; None is plain LoRA.
        source_layer_offset (int): Default 1: x_s is read one block ahead in the English pass (paper: 1).
        source (str): Default "model": the frozen English pass of the model itself; "mt_encoder": FLARE-MT.
        alignment (str | None): Default None: "position" (by token position, padded), or "attention" for
            fusion="cross_attention".
        mt_hidden_size (int | None): Default None: the MT encoder's width, read from it when it is given.
    """

    method: ClassVar[str] = "flare"
    error_type: ClassVar[type] = FLAREError
    saves_as_peft: ClassVar[bool] = False  # a fusing adapter is no PEFT LoRA
    handles_conv1d: ClassVar[bool] = False
    needs_source_pass: ClassVar[bool] = True
    fusion: Optional[Literal["add", "mul", "add_relu", "cross_attention"]] = "add_relu"
    source_layer_offset: int = 1
    source: Literal["model", "mt_encoder"] = "model"
    alignment: Optional[Literal["position", "attention"]] = None
    mt_hidden_size: Optional[PositiveInt] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alignment is None:
            self.alignment = "attention" if self.fusion == "cross_attention" else "position"
        if self.fusion == "cross_attention" and self.alignment != "attention":
            raise FLAREError(f"FLAREConfig: fusion='cross_attention' aligns by attention; alignment="
                             f"{self.alignment!r} is not allowed with it (leave alignment unset)")


class FLARELinear(LoRARouteLinear):
    """A LoRA on one linear; with a source state set for the call, `B φ(A x_s, A x_t)` replaces `B A x_t`."""

    def __init__(self, site: LayerSite, config: FLAREConfig, projection_owner: Optional["FLARELinear"],
                 mt_hidden_size: Optional[int]):
        super().__init__(site, config.rank, config.alpha, config.dropout)
        factory = added_factory(site.base_layer, site.name, site.keep_base_dtype)
        in_features = layer_shape(site.base_layer)[1]
        self.fusion = None if config.fusion is None else build_fusion(config.fusion, config.rank, config.alignment)
        if self.fusion is not None:
            self.fusion.to(**factory)
        # FLARE-MT: one learned map from the MT encoder's width to each input width, owned by its first layer.
        self.source_projection: Optional[nn.Linear] = None
        if mt_hidden_size is not None and projection_owner is None:
            self.source_projection = nn.Linear(mt_hidden_size, in_features, **factory)
        self.__dict__["projection_owner"] = projection_owner or self
        self.source_name: Optional[str] = None  # the module the source pass reads, found on its first run

    def routed_delta(self, x: torch.Tensor, routes: None, base_output: torch.Tensor) -> torch.Tensor:
        bottleneck = nn.functional.linear(self.dropout(x), self.lora_A.to(x.dtype))
        source = self.route_state.layer_inputs.get(self.layer_name)
        if source is not None:
            bottleneck = self.fused_bottleneck(bottleneck, source)
        return self.scaling * nn.functional.linear(bottleneck, self.lora_B.to(x.dtype))

    def fused_bottleneck(self, target_bottleneck: torch.Tensor, source: FusionSource) -> torch.Tensor:
        if target_bottleneck.dim() != 3:
            raise FLAREError(f"{self.layer_name}: fusion needs (batch, length, features) inputs, got shape "
                             f"{tuple(target_bottleneck.shape)}")
        if source.hidden.shape[0] != target_bottleneck.shape[0]:
            raise FLAREError(f"{self.layer_name}: source batch size {source.hidden.shape[0]} != target batch size "
                             f"{target_bottleneck.shape[0]}; give one source row per target row")
        if source.hidden.shape[-1] != self.in_features:
            raise FLAREError(f"{self.layer_name}: source hidden width {source.hidden.shape[-1]} != in_features "
                             f"{self.in_features}; the source must be an input this linear could take")
        source_bottleneck = nn.functional.linear(self.dropout(source.hidden.to(target_bottleneck.dtype)),
                                                 self.lora_A.to(target_bottleneck.dtype))
        target_mask = source.target_mask
        if target_mask is not None and target_mask.shape[1] != target_bottleneck.shape[1]:
            # Incremental decoding (a KV cache) feeds fewer positions than the mask covers: attention
            # alignment needs no target positions, but positional alignment would pair the wrong tokens.
            if self.fusion.alignment != "attention":
                raise FLAREError(
                    f"{self.layer_name}: target input has {target_bottleneck.shape[1]} positions but its attention "
                    f"mask {target_mask.shape[1]}; positional alignment needs the whole target sequence (run "
                    "without a KV cache) or use alignment='attention'")
            target_mask = None
        return self.fusion(source_bottleneck, target_bottleneck, source.source_mask, target_mask)

    def project_source(self, encoder_states: torch.Tensor) -> torch.Tensor:
        """FLARE-MT: the MT encoder's states mapped to this linear's input width."""
        projection = self.projection_owner.source_projection
        return projection(encoder_states.to(projection.weight.dtype))

    def lora_factors(self, route: tuple[int, int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Plain LoRA (fusion=None) is one; a fusing layer needs its source pass, which no LoRA server runs."""
        return (self.lora_A, self.lora_B) if self.fusion is None else None

    def language_agnostic_parameter_count(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("base_layer."))


def build_flare_layer(config: FLAREConfig, site: LayerSite) -> FLARELinear:
    mt_hidden_size = None
    if config.fusion is not None and config.source == "mt_encoder":
        if config.mt_hidden_size is None:
            config.mt_hidden_size = encoder_hidden_size(site.source_encoder)
        mt_hidden_size = config.mt_hidden_size
    # One source projection per input width, shared by the model's layers of that width.
    owners = site.shared.setdefault("flare_projections", {})
    width = layer_shape(site.base_layer)[1]
    owner = owners[width]() if width in owners else None
    layer = FLARELinear(site, config, owner, mt_hidden_size)
    owners.setdefault(width, weakref.ref(layer))
    return layer


def encoder_hidden_size(encoder: Optional[nn.Module]) -> int:
    """The output width of an HF encoder (d_model for BART/Marian/T5, hidden_size for BERT-likes)."""
    if encoder is None:
        raise FLAREError("FLAREConfig.source='mt_encoder' needs the MT encoder: pp.wrap(model, config, "
                         "source_encoder=<HF encoder>), or give FLAREConfig(mt_hidden_size=...) to load a save")
    config = getattr(encoder, "config", None)
    for attribute in ("d_model", "hidden_size"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise FLAREError(f"cannot tell the output width of MT encoder {type(encoder).__name__}: its config has neither "
                     "d_model nor hidden_size; pass FLAREConfig(mt_hidden_size=...)")
