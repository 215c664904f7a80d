"""polypeft's own LoRA layer: a base linear kept intact plus a low-rank update B·A, mergeable exactly.

It also fuses a source (English) representation inside the bottleneck, FLARE's `B φ(A x_s, A x_t)`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .fusion import Fusion
from ...core.routed import LinearProxy


class LoRAError(ValueError):
    """A LoRA layer asked to do something its state does not allow (fuse while merged, bad shapes)."""


@dataclass
class FusionSource:
    """What the bottleneck fuses for one forward: source hidden inputs and the two attention masks.

    `hidden` is (batch, source_len, in_features); masks are (batch, length) with 1 on real tokens.
    """

    hidden: torch.Tensor
    source_mask: Optional[torch.Tensor] = None
    target_mask: Optional[torch.Tensor] = None


class LoRALinear(LinearProxy):
    """`h = W x + (alpha/r) B dropout(A x)`; with a source set, `h = W x_t + (alpha/r) B φ(A x_s, A x_t)`."""

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        fusion: Optional[Fusion] = None,
        name: str = "",
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise LoRAError(f"LoRALinear wraps an nn.Linear; {name or 'the layer'} is {type(base_layer).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise LoRAError(f"LoRA rank={rank!r} for {name or 'a layer'} must be a positive int")
        self.base_layer = base_layer
        self.layer_name = name
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base_layer.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, rank, dtype=weight.dtype, device=weight.device))
        # Kaiming-uniform A and zero B: the update starts at exactly zero but A already spreads inputs.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fusion = fusion
        self.merged = False
        self.adapter_enabled = True
        self.source: Optional[FusionSource] = None

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) matrix plain LoRA adds to W."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(x)
        if not self.adapter_enabled or self.merged:
            if self.source is not None and self.merged:
                raise LoRAError(f"{self.layer_name}: cannot fuse a source into a merged LoRA; unmerge first")
            return output
        target_bottleneck = self.dropout(x) @ self.lora_A.t()
        if self.source is not None:
            target_bottleneck = self.fused_bottleneck(target_bottleneck)
        return output + self.scaling * (target_bottleneck @ self.lora_B.t())

    def fused_bottleneck(self, target_bottleneck: torch.Tensor) -> torch.Tensor:
        if self.fusion is None:
            raise LoRAError(f"{self.layer_name}: a source was set but this LoRA layer has no fusion function")
        if target_bottleneck.dim() != 3:
            raise LoRAError(
                f"{self.layer_name}: fusion needs (batch, length, features) inputs, got shape "
                f"{tuple(target_bottleneck.shape)}"
            )
        source = self.source
        if source.hidden.shape[0] != target_bottleneck.shape[0]:
            raise LoRAError(
                f"{self.layer_name}: source batch size {source.hidden.shape[0]} != target batch size "
                f"{target_bottleneck.shape[0]}; give one source row per target row"
            )
        if source.hidden.shape[-1] != self.in_features:
            raise LoRAError(
                f"{self.layer_name}: source hidden width {source.hidden.shape[-1]} != in_features "
                f"{self.in_features}; the source must be an input this linear could take"
            )
        source_bottleneck = self.dropout(source.hidden.to(self.lora_A.dtype)) @ self.lora_A.t()
        target_mask = source.target_mask
        if target_mask is not None and target_mask.shape[1] != target_bottleneck.shape[1]:
            # Incremental decoding (a KV cache) feeds fewer positions than the mask covers: attention
            # alignment needs no target positions, but positional alignment would pair the wrong tokens.
            if self.fusion.alignment != "attention":
                raise LoRAError(
                    f"{self.layer_name}: target input has {target_bottleneck.shape[1]} positions but its attention "
                    f"mask {target_mask.shape[1]}; positional alignment needs the whole target sequence (run "
                    "without a KV cache) or use alignment='attention'"
                )
            target_mask = None
        return self.fusion(source_bottleneck, target_bottleneck, source.source_mask, target_mask)

    @contextmanager
    def fused_with(self, source: FusionSource) -> Iterator[None]:
        """Fuse `source` into every forward inside the block; plain LoRA again afterwards."""
        previous, self.source = self.source, source
        try:
            yield
        finally:
            self.source = previous

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The bare base layer inside the block (FLARE's frozen source pass)."""
        previous, self.adapter_enabled = self.adapter_enabled, False
        try:
            yield
        finally:
            self.adapter_enabled = previous

    def merge(self) -> None:
        """Add the LoRA update into W; outputs are unchanged up to float rounding."""
        if self.merged:
            raise LoRAError(f"{self.layer_name}: LoRA is already merged; unmerge first")
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Take the LoRA update back out of W."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        fusion = type(self.fusion).__name__ if self.fusion is not None else None
        return f"rank={self.rank}, alpha={self.alpha}, fusion={fusion}, merged={self.merged}"
