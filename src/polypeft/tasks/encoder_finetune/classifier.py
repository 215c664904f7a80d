"""The classifier a fine-tuning run trains: the encoder under a fresh head, wrapped with LMS unless naive.

Frozen lower layers are cut off, their cached output fed as `inputs_embeds`.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...core.anatomy import anatomy_of, blocks, default_targets, embeddings_of
from ...core.inject import get_parent
from ...core.config import ConfigError
from ...methods.lms import LMSConfig
from ...model.poly_model import PolyModel, wrap
from ..classification import classification_model
from .examples import PassThroughEmbeddings, encoder_body
from .settings import FinetuneSettings


@dataclass
class Classifier:
    """A classification model ready to train, with its exact parameter counts on the full encoder."""

    model: nn.Module
    method: str
    parameter_counts: dict[str, int]
    trainable: int = 0

    def logits(self, batch: Mapping[str, torch.Tensor], langs: Sequence[str]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if isinstance(self.model, PolyModel):
            return self.model(**inputs, lang=list(langs)).logits
        return self.model(**inputs).logits


def build_classifier(encoder: nn.Module, label_names: Sequence[str], languages: Sequence[str],
                     settings: FinetuneSettings) -> Classifier:
    """A copy of `encoder` under a fresh classification head, wrapped with LMS (routes on the FFNs of the
    trained layers, plus a shared route for FD) unless the method is naive. Frozen lower layers are cut
    off: their cached output is fed as `inputs_embeds`."""
    torch.manual_seed(settings.seed)
    model = classification_model(copy.deepcopy(encoder), label_names)
    body = encoder_body(model)
    num_layers = body.config.num_hidden_layers
    if settings.frozen_layers > num_layers:
        raise ConfigError(f"frozen_layers={settings.frozen_layers} but the encoder has {num_layers} layers")
    if settings.method != "naive":
        if settings.frozen_layers == num_layers:
            raise ConfigError("LMS needs at least one trained layer; lower frozen_layers")
        config = LMSConfig(languages=list(languages), rank=settings.rank, synthesis="language",
                           shared_route=settings.method == "lms_fd", init_std=settings.init_std, freeze_base=False,
                           target_modules=default_targets(model, layers=range(settings.frozen_layers, num_layers)))
        model = wrap(model, config)
        counts = model.parameter_counts().as_dict()
    else:
        total = sum(p.numel() for p in model.parameters())
        counts = {"base": total, "language_specific": 0, "shared_route": 0, "training_extra": 0,
                  "inference_extra_language_routes": 0, "inference_extra_shared_route": 0,
                  "inference_extra_merged": 0}
    if settings.freeze_embeddings or settings.frozen_layers > 0:
        embeddings_of(model).requires_grad_(False)
    stack = blocks(model)["encoder"]
    for layer in stack.blocks[:settings.frozen_layers]:
        layer.requires_grad_(False)
    if settings.frozen_layers > 0:  # the cached states of the frozen layers come in as inputs_embeds
        parent, name = get_parent(model, stack.path)
        setattr(parent, name, nn.ModuleList(list(stack.blocks)[settings.frozen_layers:]))
        body.config.num_hidden_layers = num_layers - settings.frozen_layers
        parent, name = get_parent(body, anatomy_of(model).embeddings)
        setattr(parent, name, PassThroughEmbeddings())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Classifier(model, settings.method, counts, trainable)
