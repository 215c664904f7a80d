"""The retrieval testbed's runs: query towers from cached states, InfoNCE (or FD) batches, per-query outcomes.

Batches mix every language, one verse id at most once, each query on its language's route.
"""
from __future__ import annotations

import copy
import statistics
from collections.abc import Iterator
from typing import Callable, Optional

import torch
from torch import nn

from ...core.languages import SHARED
from ...tasks.contrastive import contrastive_distillation_loss, contrastive_loss, mean_pooled
from ...tasks.encoder_finetune.examples import PassThroughEmbeddings
from ...tasks.retrieval import correct_at_1
from .retrieval_data import KJV, Split, TestbedData
from .settings import RetrievalTestbed
from .towers import ENGLISH, Tower, adapt


def upper_blocks(encoder: nn.Module, cache_layer: int) -> nn.Module:
    """A copy of the encoder that starts at block `cache_layer` and reads cached states as `inputs_embeds`."""
    model = copy.deepcopy(encoder)
    model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[cache_layer:])
    model.config.num_hidden_layers = len(model.encoder.layer)
    model.embeddings = PassThroughEmbeddings()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def route_codes(langs: list[str]) -> list[str]:
    """English queries of the English check (KJV) run on the English route."""
    return [ENGLISH if lang == KJV else lang for lang in langs]


class RetrievalBed:
    """xx->en retrieval on e5-small: what the protocol builds, trains and scores (see `protocol`)."""

    metric = "acc@1 %"
    statistic = "accuracy"
    higher_is_better = True
    english = KJV

    def __init__(self, encoder: nn.Module, data: TestbedData, settings: RetrievalTestbed):
        self.encoder, self.data, self.settings = encoder, data, settings

    def build(self, method: str, trained_layers: int, seed: int) -> Tower:
        return adapt(upper_blocks(self.encoder, self.settings.cache_layer), method, trained_layers, self.settings, seed)

    def plain(self) -> Tower:
        return Tower(upper_blocks(self.encoder, self.settings.cache_layer), "base", {"trainable": 0})

    def batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless seeded batches: distinct verses, each in a random language (so every batch mixes languages),
        and the candidate rows: the batch's own English verses, then `extra_negatives` other training verses."""
        split, settings = self.data.train, self.settings
        generator = torch.Generator().manual_seed(seed)
        languages = sorted(set(split.queries.langs))
        by_language = {lang: split.queries.of_language(lang) for lang in languages}
        while True:
            chosen = torch.randperm(len(split.passages), generator=generator)
            own = chosen[:settings.batch_size]
            extra = chosen[settings.batch_size:settings.batch_size + settings.extra_negatives]
            picks = torch.randint(len(languages), (len(own),), generator=generator).tolist()
            # Every language lists the training verses in the same order, so verse v is row v of its language.
            index = [by_language[languages[pick]][int(verse)] for pick, verse in zip(picks, own)]
            yield {"index": torch.tensor(index), "candidates": torch.cat([own, extra])}

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch's model inputs, for timing a forward pass."""
        return self.data.train.queries.batch(batch["index"].tolist())

    def loss_function(self, tower: Tower) -> Callable:
        """InfoNCE on each query's route; for LMS+FD the batch on both routes in one pass under the FD objective."""
        split, settings = self.data.train, self.settings

        def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
            index = batch["index"].tolist()
            inputs = split.queries.batch(index)
            langs = [split.queries.langs[i] for i in index]
            candidates = split.passages[batch["candidates"]]
            positives = torch.arange(len(index))
            if tower.method == "lms_fd":
                doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
                states = model(**doubled, lang=langs + [SHARED] * len(langs)).last_hidden_state
                pooled = mean_pooled(states, doubled["attention_mask"])
                loss = contrastive_distillation_loss(pooled[:len(index)], pooled[len(index):], candidates, positives,
                                                     settings.temperature, settings.kl_weight).loss
            else:
                states = model(**inputs, **tower.route_arguments(langs)).last_hidden_state
                loss = contrastive_loss(mean_pooled(states, inputs["attention_mask"]), candidates, positives,
                                        settings.temperature)
            return loss, len(index)

        return loss_fn

    def embeddings(self, tower: Tower, split: Split, route: Optional[str] = None, batch_size: int = 128) -> torch.Tensor:
        """Every query of the split through the tower (on its language's route, or on `route`), pooled and normed."""
        queries = split.queries
        order = sorted(range(len(queries)), key=lambda i: len(queries.states[i]))
        pooled = torch.empty(len(queries), split.passages.shape[1])
        was_training = tower.model.training
        tower.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                inputs = queries.batch(index)
                langs = route_codes([queries.langs[i] for i in index])
                states = tower.model(**inputs, **tower.route_arguments(langs, route)).last_hidden_state
                pooled[index] = mean_pooled(states, inputs["attention_mask"])
        tower.model.train(was_training)
        return pooled

    def scores(self, tower: Tower, part: str, route: Optional[str] = None) -> dict[str, list[int]]:
        """Per language, 1 where a query's nearest English passage is its own verse, else 0 (query order kept)."""
        split = getattr(self.data, part)
        correct = correct_at_1(self.embeddings(tower, split, route), split.passages, split.queries.gold)
        per_language: dict[str, list[int]] = {}
        for lang, hit in zip(split.queries.langs, correct.tolist()):
            per_language.setdefault(lang, []).append(int(hit))
        return per_language

    @staticmethod
    def summary(per_language: dict[str, list]) -> float:
        """Mean over languages of the per-language accuracy, in %."""
        return 100.0 * statistics.fmean(sum(v) / len(v) for v in per_language.values())
