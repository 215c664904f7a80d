"""What each compared method trains on a model: LoRA at two sizes, LMS, LMS+FD, or whole blocks.

LoRA's ranks follow from LMS's parameters, so the comparison holds trainable or inference parameters equal.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...core.anatomy import blocks, default_targets
from ...core.languages import SHARED
from ...model.poly_model import PolyModel, wrap
from ...methods.lms import LMSConfig
from ...methods.lora import LoRAConfig
from .settings import ComparisonSettings

ENGLISH = "en"


@dataclass
class Tower:
    """A model one method trains, with its exact added (or, for full fine-tuning, trained) parameter counts."""

    model: nn.Module
    method: str
    parameters: dict[str, int]

    def route_arguments(self, langs: Sequence[str], route: str | None = None) -> dict:
        """The routing keywords of a forward: each example on `route`, else on its language's route."""
        if not isinstance(self.model, PolyModel):
            return {}
        return {"lang": [route] * len(langs) if route else list(langs)}


def lms_routes(settings: ComparisonSettings) -> int:
    """LMS's routes: one per adapted language and English (the English check runs on it)."""
    return len(settings.languages) + 1


def lora_rank(method: str, settings: ComparisonSettings) -> int:
    """Equal trainable parameters: LMS's routes times its rank; equal inference parameters: FD-Share's one route."""
    return lms_routes(settings) * settings.rank if method == "lora_train" else settings.rank


def top_blocks(model: nn.Module, count: int) -> list[int]:
    """Indices of the top `count` blocks of the model's (one) block stack, from the anatomy table."""
    depth = len(next(iter(blocks(model).values())).blocks)
    return list(range(depth - count, depth))


def adapt(model: nn.Module, method: str, trained_layers: int, settings: ComparisonSettings, seed: int) -> Tower:
    """The method on the FFN linears (LoRA, LMS, FD) or the whole blocks (full) of the top `trained_layers`
    blocks, every other weight frozen."""
    torch.manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = top_blocks(model, trained_layers)
    if method == "full":
        stack = next(iter(blocks(model).values())).blocks
        for index in trained:
            for parameter in stack[index].parameters():
                parameter.requires_grad_(True)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return Tower(model, method, {"trainable": count, "training_extra": 0, "inference_extra": 0})
    targets = default_targets(model, layers=trained)
    languages = [ENGLISH, *settings.languages]
    if method in ("lora_train", "lora_infer"):
        rank = lora_rank(method, settings)
        config = LoRAConfig(languages=languages, rank=rank, alpha=float(rank), target_modules=targets)
    else:
        config = LMSConfig(languages=languages, rank=settings.rank, synthesis="language",
                           shared_route=method == "lms_fd", target_modules=targets)
    poly = wrap(model, config)
    counts = poly.parameter_counts().as_dict()
    trainable = sum(p.numel() for p in poly.parameters() if p.requires_grad)
    inference = trainable if config.method == "lora" else counts["inference_extra_language_routes"]
    return Tower(poly, method, {"trainable": trainable, "training_extra": counts["training_extra"],
                                "inference_extra": inference,
                                "inference_extra_shared": counts["inference_extra_shared_route"]})


def merged_shared_route(tower: Tower) -> nn.Module:
    """FD-Share deployed: the shared route folded into the weights and the wrappers removed, a plain model."""
    return copy.deepcopy(tower.model).merge_and_unload(route=SHARED)
