"""The encoder of a trained polypeft translation run, frozen, over English input: what FLARE-MT reads.

A routed run's encoder is fixed to one route (the shared one where FD trained it), so callers pass no routes.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ...core.config import ConfigError
from ...model.poly_model import PolyModel
from .run import load_translation_model


class RoutedEncoder(torch.nn.Module):
    """The encoder of a routed translation model, run on one fixed route, so callers need no routes."""

    def __init__(self, model: PolyModel, src_lang: str, tgt_lang: str):
        super().__init__()
        self.model, self.src_lang, self.tgt_lang = model, src_lang, tgt_lang
        self.config = model.config

    def forward(self, **inputs):
        with self.model.routes(src_lang=self.src_lang, tgt_lang=self.tgt_lang):
            return self.model.get_encoder()(**inputs)


def translation_encoder(run_dir: str | Path, target_lang: str) -> tuple[torch.nn.Module, Any]:
    """The frozen encoder of a polypeft translation run over English input, and its tokenizer, for FLARE-MT.

    Inputs get the `<2target>` tag the model was trained with; LMS runs use their shared route when they
    have one (FD), else the English -> target route.
    """
    recipe, tokenizer, model = load_translation_model(run_dir)
    for code, role in ((recipe.pivot, "source (the pivot)"), (target_lang, "target")):
        if code not in recipe.languages:
            raise ConfigError(f"{run_dir}: the {role} language {code!r} is not among the run's {recipe.languages}")
    encoder = model.get_encoder()
    if isinstance(model, PolyModel):
        shared = model.registry.shared_route
        encoder = RoutedEncoder(model, "shared" if shared else recipe.pivot, "shared" if shared else target_lang)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return encoder.eval(), functools.partial(tokenizer, lang_tag=target_lang)
