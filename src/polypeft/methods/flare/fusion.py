"""FLARE's fusion functions φ(s, t) in the LoRA bottleneck, and how source positions meet target ones.

Alignment is by position (k-th real source token with k-th real target token) or by attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

FUSIONS = ("add", "mul", "add_relu", "cross_attention")
ALIGNMENTS = ("position", "attention")


@dataclass
class FusionSource:
    """What one adapted linear fuses in one forward: its source hidden inputs and the two attention masks.

    `hidden` is (batch, source_len, in_features); masks are (batch, length) with 1 on real tokens.
    """

    hidden: torch.Tensor
    source_mask: Optional[torch.Tensor] = None
    target_mask: Optional[torch.Tensor] = None


def align_by_position(
    source: torch.Tensor, source_mask: Optional[torch.Tensor], target_mask: Optional[torch.Tensor], target_len: int
) -> torch.Tensor:
    """Source rows laid out on the target's positions: (batch, target_len, features).

    The k-th real source token goes where the k-th real target token is, so left or right padding on
    either side is respected; target tokens beyond the source's length (and target padding) get zeros,
    source tokens beyond the target's length are dropped.
    """
    batch, source_len, _ = source.shape
    device = source.device
    if source_mask is None:
        source_mask = torch.ones(batch, source_len, dtype=torch.long, device=device)
    if target_mask is None:
        target_mask = torch.ones(batch, target_len, dtype=torch.long, device=device)
    source_real, target_real = source_mask.bool(), target_mask.bool()
    positions = torch.arange(source_len, device=device).expand(batch, source_len)
    # Sorting real positions first (then padding) gives the source position of each rank.
    source_position_of_rank = torch.argsort(torch.where(source_real, positions, positions + source_len), dim=1)
    target_rank = target_real.long().cumsum(dim=1) - 1
    has_partner = target_real & (target_rank < source_real.sum(dim=1, keepdim=True))
    index = source_position_of_rank.gather(1, target_rank.clamp(0, source_len - 1))
    aligned = source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
    return aligned * has_partner.unsqueeze(-1).to(source.dtype)


def attend(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, source_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Scaled dot-product attention from target positions over real source positions."""
    scores = queries @ keys.transpose(1, 2) / math.sqrt(queries.shape[-1])
    if source_mask is not None:
        real = source_mask.bool().unsqueeze(1)
        scores = scores.masked_fill(~real, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    attended = weights @ values
    if source_mask is not None:
        # A row without any real source token fuses nothing rather than an average of padding.
        attended = attended * real.any(dim=-1, keepdim=True).to(attended.dtype)
    return attended


class Fusion(nn.Module):
    """φ(s, t): source bottleneck (batch, Ls, r) and target bottleneck (batch, Lt, r) to (batch, Lt, r)."""

    def __init__(self, alignment: str = "position"):
        super().__init__()
        if alignment not in ALIGNMENTS:
            raise ValueError(f"fusion alignment={alignment!r} is not allowed; choose one of {list(ALIGNMENTS)}")
        self.alignment = alignment

    def align(
        self, source: torch.Tensor, target: torch.Tensor,
        source_mask: Optional[torch.Tensor], target_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        if self.alignment == "attention":
            aligned = attend(target, source, source, source_mask)
            if target_mask is not None:
                aligned = aligned * target_mask.unsqueeze(-1).to(aligned.dtype)
            return aligned
        return align_by_position(source, source_mask, target_mask, target.shape[1])

    def forward(
        self, source: torch.Tensor, target: torch.Tensor,
        source_mask: Optional[torch.Tensor] = None, target_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return self.combine(self.align(source, target, source_mask, target_mask), target)

    def combine(self, aligned_source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AddFusion(Fusion):
    def combine(self, aligned_source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return aligned_source + target


class MulFusion(Fusion):
    def combine(self, aligned_source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return aligned_source * target


class AddReluFusion(Fusion):
    """relu(s) + relu(t): the paper's best."""

    def combine(self, aligned_source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.relu(aligned_source) + torch.relu(target)


class CrossAttentionFusion(Fusion):
    """t + attention(t → s) with learned r×r query, key and value maps: 3·r² extra parameters."""

    def __init__(self, rank: int):
        super().__init__(alignment="attention")
        self.query = nn.Linear(rank, rank, bias=False)
        self.key = nn.Linear(rank, rank, bias=False)
        self.value = nn.Linear(rank, rank, bias=False)
        # An identity value map starts it as "add the attended source", so every map gets gradients.
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(rank))

    def forward(
        self, source: torch.Tensor, target: torch.Tensor,
        source_mask: Optional[torch.Tensor] = None, target_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        attended = attend(self.query(target), self.key(source), self.value(source), source_mask)
        if target_mask is not None:
            attended = attended * target_mask.unsqueeze(-1).to(attended.dtype)
        return target + attended


def build_fusion(kind: str, rank: int, alignment: str = "position") -> Fusion:
    """The fusion module called `kind`, one of FUSIONS."""
    if kind == "cross_attention":
        return CrossAttentionFusion(rank)
    classes = {"add": AddFusion, "mul": MulFusion, "add_relu": AddReluFusion}
    if kind not in classes:
        raise ValueError(f"fusion={kind!r} is not allowed; choose one of {list(FUSIONS)}")
    return classes[kind](alignment)
