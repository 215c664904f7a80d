"""Bitext retrieval: find each sentence's translation among all candidates by cosine of pooled embeddings.

accuracy@1 at any layer of any HF encoder (mean pooling), as in Tatoeba/BUCC-style evaluations.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from ..core.languages import LanguageError
from ..backbones.e5 import embed_layers
from ..model.example_routes import routed_model
from .records import Source, read_records


def read_bitext(source: Source, source_column: str = "source", target_column: str = "target",
                file_format: Optional[str] = None) -> tuple[list[str], list[str]]:
    """Aligned `(sources, targets)` from a JSONL/JSON/TSV file (header row names columns) or a dataset."""
    sources, targets = [], []
    for record in read_records(source, [source_column, target_column], file_format=file_format):
        pair = record.data[source_column], record.data[target_column]
        if not all(isinstance(text, str) and text.strip() for text in pair):
            raise record.fail(f"columns {source_column!r} and {target_column!r} must be non-empty text, got {pair!r}")
        sources.append(pair[0])
        targets.append(pair[1])
    return sources, targets


def correct_at_1(queries: torch.Tensor, candidates: torch.Tensor,
                 gold: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """1.0 where a query's nearest candidate (dot product of normalised embeddings) is its gold one, else 0.0:
    per-query outcomes, which an accuracy averages and the LRP2 layer search pairs to measure its noise."""
    nearest = (queries @ candidates.T).argmax(1)
    return (nearest == torch.as_tensor(gold, device=nearest.device)).float()


def retrieval_accuracy(source_embeddings: torch.Tensor, target_embeddings: torch.Tensor) -> float:
    """Fraction of rows i whose nearest target (cosine) is target i."""
    if source_embeddings.shape != target_embeddings.shape:
        raise ValueError(f"source embeddings {tuple(source_embeddings.shape)} and target embeddings "
                         f"{tuple(target_embeddings.shape)} must align row by row")
    if len(source_embeddings) == 0:
        raise ValueError("retrieval accuracy of zero pairs is undefined")
    sources = torch.nn.functional.normalize(source_embeddings.float(), dim=-1)
    targets = torch.nn.functional.normalize(target_embeddings.float(), dim=-1)
    nearest = (sources @ targets.T).argmax(dim=1)
    return (nearest == torch.arange(len(sources))).float().mean().item()


def bitext_retrieval(model: torch.nn.Module, tokenizer, sources: Sequence[str], targets: Sequence[str],
                     layers: Sequence[Optional[int]] = (None,), prefix: str = "", pooling: str = "mean",
                     batch_size: int = 32, target_embeddings: Optional[dict] = None,
                     source_lang: Optional[str] = None, target_lang: Optional[str] = None,
                     route: Optional[str] = None) -> dict[Optional[int], float]:
    """accuracy@1 of retrieving `targets[i]` for `sources[i]`, per layer (None = last).

    `target_embeddings` (as returned by `embed_layers`) skips re-encoding a shared target side,
    e.g. English when scoring many languages against it. A PolyModel embeds each side on its
    language's route (`source_lang`, `target_lang`), or both on `route` when given.
    """
    if len(sources) != len(targets):
        raise ValueError(f"{len(sources)} sources for {len(targets)} targets; bitext must align")
    if routed_model(model) is not None and route is None:
        unset = [name for name, code in (("source_lang", source_lang), ("target_lang", target_lang))
                 if code is None and (name == "source_lang" or target_embeddings is None)]
        if unset:
            raise LanguageError(f"{' and '.join(unset)} missing: the PolyModel routes each side by its "
                                "language; pass its code, or route= for one route for both sides")
    layers = list(layers)
    source_side = embed_layers(model, tokenizer, sources, layers, prefix=prefix, pooling=pooling,
                               batch_size=batch_size, lang=source_lang, route=route)
    if target_embeddings is None:
        target_embeddings = embed_layers(model, tokenizer, targets, layers, prefix=prefix, pooling=pooling,
                                         batch_size=batch_size, lang=target_lang, route=route)
    return {layer: retrieval_accuracy(source_side[layer], target_embeddings[layer]) for layer in layers}
