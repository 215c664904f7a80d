"""Training a query tower with the one loop (InfoNCE, or FD over both routes) and scoring it per query.

Batches mix every language, one verse id at most once, each query on its language's route.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, Optional

import torch

from ...core.languages import SHARED
from ...tasks.contrastive import contrastive_distillation_loss, contrastive_loss, mean_pooled
from ...tasks.retrieval import correct_at_1
from ...training.loop import TrainSettings, train
from .retrieval_data import Split
from .settings import RetrievalTestbed
from .towers import QueryTower


def batches(split: Split, testbed: RetrievalTestbed, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless seeded batches: distinct verses, each in a random language (so every batch mixes languages), and
    the candidate rows: the batch's own English verses, then `extra_negatives` other training verses."""
    generator = torch.Generator().manual_seed(seed)
    languages = sorted(set(split.queries.langs))
    by_language = {lang: split.queries.of_language(lang) for lang in languages}
    verses = len(split.passages)
    while True:
        chosen = torch.randperm(verses, generator=generator)
        own = chosen[:testbed.batch_size]
        extra = chosen[testbed.batch_size:testbed.batch_size + testbed.extra_negatives]
        picks = torch.randint(len(languages), (len(own),), generator=generator).tolist()
        # Every language lists the training verses in the same order, so verse v is row v of its language.
        index = [by_language[languages[pick]][int(verse)] for pick, verse in zip(picks, own)]
        yield {"index": torch.tensor(index), "candidates": torch.cat([own, extra])}


def loss_function(tower: QueryTower, split: Split, testbed: RetrievalTestbed) -> Callable:
    """InfoNCE on each query's route; for LMS+FD the batch on both routes in one pass under the FD objective."""
    queries = split.queries

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        index = batch["index"].tolist()
        inputs = queries.batch(index)
        langs = [queries.langs[i] for i in index]
        candidates = split.passages[batch["candidates"]]
        positives = torch.arange(len(index))
        if tower.method == "lms_fd":
            doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
            routes = langs + [SHARED] * len(langs)
            pooled = mean_pooled(model(**doubled, lang=routes).last_hidden_state, doubled["attention_mask"])
            loss = contrastive_distillation_loss(pooled[:len(index)], pooled[len(index):], candidates, positives,
                                                 testbed.temperature, testbed.kl_weight).loss
        else:
            pooled = mean_pooled(QueryTower(model, tower.method, {}).states(inputs, langs), inputs["attention_mask"])
            loss = contrastive_loss(pooled, candidates, positives, testbed.temperature)
        return loss, len(index)

    return loss_fn


def loop_settings(testbed: RetrievalTestbed, lr: float, steps: int, seed: int) -> TrainSettings:
    """AdamW at a constant rate after warm-up, so stopping at a checkpoint is the same as a shorter run."""
    return TrainSettings(steps=steps, lr=lr, warmup=testbed.warmup, schedule="constant", betas=(0.9, 0.999),
                         clip_norm=1.0, seed=seed, valid_every=testbed.check_every, checkpoint_every=steps,
                         progress=False)


def train_tower(tower: QueryTower, split: Split, testbed: RetrievalTestbed, lr: float, steps: int, seed: int,
                on_check: Optional[Callable[[QueryTower, int], float]] = None) -> list[float]:
    """Train `steps` steps; `on_check(tower, step)` runs every `check_every` steps (its value is logged as the
    loop's valid figure). Returns each step's loss."""
    step_counter = {"done": 0}

    def valid_fn(model: torch.nn.Module) -> float:
        step_counter["done"] += testbed.check_every
        return on_check(tower, step_counter["done"]) if on_check else 0.0

    trainable = [p for p in tower.model.parameters() if p.requires_grad]
    result = train(tower.model, lambda: batches(split, testbed, seed), loss_function(tower, split, testbed),
                   loop_settings(testbed, lr, steps, seed), valid_fn=valid_fn if on_check else None,
                   parameters=trainable, device_placement=False, description=f"train {tower.method}")
    tower.model.eval()
    return [record["loss"] for record in result["history"]]


def embed_queries(tower: QueryTower, split: Split, route: Optional[str] = None,
                  batch_size: int = 128) -> torch.Tensor:
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
            states = tower.states(inputs, [queries.langs[i] for i in index], route)
            pooled[index] = mean_pooled(states, inputs["attention_mask"])
    tower.model.train(was_training)
    return pooled


def outcomes(tower: QueryTower, split: Split, route: Optional[str] = None) -> dict[str, list[int]]:
    """Per language, 1 where a query's nearest English passage is its own verse, else 0 (query order kept)."""
    correct = correct_at_1(embed_queries(tower, split, route), split.passages, split.queries.gold)
    per_language: dict[str, list[int]] = {}
    for lang, hit in zip(split.queries.langs, correct.tolist()):
        per_language.setdefault(lang, []).append(int(hit))
    return per_language


def variant_route(variant: str) -> Optional[str]:
    """FD-Share runs every query on the shared route; every other variant on each query's own route."""
    return SHARED if variant == "fd_share" else None
