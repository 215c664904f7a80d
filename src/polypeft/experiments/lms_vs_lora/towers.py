"""The query tower each method trains: e5-small's blocks above the cache, wrapped by the method's config.

LoRA's ranks follow from LMS's parameters, so the comparison holds trainable or inference parameters equal.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ...core.anatomy import default_targets
from ...core.languages import SHARED
from ...core.model import PolyModel, wrap
from ...methods.lms import LMSConfig
from ...methods.lora import LoRAConfig
from ...tasks.encoder_finetune.examples import PassThroughEmbeddings
from .retrieval_data import KJV
from .settings import RetrievalTestbed

ENGLISH = "en"


@dataclass
class QueryTower:
    """A model from cached states to token states, and how a variant routes each query."""

    model: nn.Module
    method: str
    parameters: dict[str, int]

    def states(self, batch: dict[str, torch.Tensor], langs: list[str], route: Optional[str] = None) -> torch.Tensor:
        """Last-layer token states; a PolyModel runs each query on `route`, else on its language's route."""
        if not isinstance(self.model, PolyModel):
            return self.model(**batch).last_hidden_state
        codes = [route] * len(langs) if route else [ENGLISH if lang == KJV else lang for lang in langs]
        return self.model(**batch, lang=codes).last_hidden_state


def upper_blocks(encoder: nn.Module, cache_layer: int) -> nn.Module:
    """A copy of the encoder that starts at block `cache_layer` and reads cached states as `inputs_embeds`."""
    model = copy.deepcopy(encoder)
    model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[cache_layer:])
    model.config.num_hidden_layers = len(model.encoder.layer)
    model.embeddings = PassThroughEmbeddings()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lms_routes(testbed: RetrievalTestbed) -> int:
    """LMS's routes: one per query language and English (the English check's queries run on it)."""
    return len(testbed.languages) + 1


def lora_rank(method: str, testbed: RetrievalTestbed) -> int:
    """Equal trainable parameters: LMS's routes times its rank; equal inference parameters: FD-Share's one route."""
    return lms_routes(testbed) * testbed.rank if method == "lora_train" else testbed.rank


def build_tower(encoder: nn.Module, method: str, trained_layers: int, testbed: RetrievalTestbed,
                seed: int) -> QueryTower:
    """The method's tower with the FFNs (LoRA, LMS, FD) or the whole blocks (full) of the top `trained_layers`
    blocks trained, everything else frozen; exact parameter counts on the adapted blocks."""
    torch.manual_seed(seed)
    model = upper_blocks(encoder, testbed.cache_layer)
    depth = len(model.encoder.layer)
    trained = range(depth - trained_layers, depth)
    if method == "full":
        for index in trained:
            for parameter in model.encoder.layer[index].parameters():
                parameter.requires_grad_(True)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return QueryTower(model, method, {"trainable": count, "inference_extra": 0, "training_extra": 0})
    targets = default_targets(model, layers=trained)
    languages = [ENGLISH, *testbed.languages]
    if method in ("lora_train", "lora_infer"):
        rank = lora_rank(method, testbed)
        config = LoRAConfig(languages=languages, rank=rank, alpha=float(rank), target_modules=targets)
    else:
        config = LMSConfig(languages=languages, rank=testbed.rank, synthesis="language",
                           shared_route=method == "lms_fd", target_modules=targets)
    poly = wrap(model, config)
    counts = poly.parameter_counts().as_dict()
    trainable = sum(p.numel() for p in poly.parameters() if p.requires_grad)
    inference = (trainable if config.method == "lora" else counts["inference_extra_language_routes"])
    return QueryTower(poly, method, {"trainable": trainable, "training_extra": counts["training_extra"],
                                     "inference_extra": inference,
                                     "inference_extra_shared": counts["inference_extra_shared_route"]})


def merged_shared_route(tower: QueryTower) -> nn.Module:
    """FD-Share deployed: the shared route folded into the weights and the wrappers removed, a plain model."""
    poly = copy.deepcopy(tower.model)
    return poly.merge_and_unload(route=SHARED)
