"""Contrastive training of a sentence embedder on routes: in-batch softmax over candidate passages.

A query embeds on its language's route; the FD form scores the batch on both routes and distils between them.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..methods.fd import FuseDistillationLoss, fuse_distillation_loss


def mean_pooled(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the non-padding token states (e5's pooling), in float32."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def similarity_logits(queries: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine similarity of every normalised query to every candidate, divided by the temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r}; must be positive")
    return queries @ candidates.T / temperature


def contrastive_loss(queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """InfoNCE: cross-entropy of each query's positive candidate (`positives[i]`) against all candidates."""
    return F.cross_entropy(similarity_logits(queries, candidates, temperature), positives)


def contrastive_distillation_loss(language_queries: torch.Tensor, shared_queries: torch.Tensor,
                                  candidates: torch.Tensor, positives: torch.Tensor, temperature: float,
                                  kl_weight: float = 1.0) -> FuseDistillationLoss:
    """FD over retrieval: ½ (InfoNCE on the language routes + on the shared route) + λ · symmetric KL between the
    two routes' distributions over the candidates (the FD objective with candidates in place of a vocabulary)."""
    return fuse_distillation_loss(similarity_logits(language_queries, candidates, temperature),
                                  similarity_logits(shared_queries, candidates, temperature), positives, kl_weight)
