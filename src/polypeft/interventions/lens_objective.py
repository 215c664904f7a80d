"""LENS's training objective for the one training loop: its three losses on pooled states as a loss function,
the parallel pairs as a seeded batch stream, and the frozen model's reference states computed once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .capture import InterventionError, iterate_pooled, layer_states, model_device, tokenize

Pair = tuple[str, str, str]  # (pivot text, target text, target language)


def text_pairs(parallel: Sequence[Mapping[str, str]], pivot: str, languages: Sequence[str]) -> list[Pair]:
    """(pivot text, target text, target language) for every target language present in each example."""
    pairs = []
    for index, example in enumerate(parallel):
        if not isinstance(example, Mapping):
            raise InterventionError(f"parallel_pairs[{index}] must be a dict language -> text, "
                                    f"got {type(example).__name__}")
        if not example.get(pivot):
            raise InterventionError(
                f"parallel_pairs[{index}] has no text for the pivot {pivot!r} (keys: {sorted(example)})"
            )
        pairs.extend((example[pivot], example[language], language) for language in languages if example.get(language))
    return pairs


def pair_batches(pairs: Sequence[Pair], batch_size: int, seed: int) -> Callable[[], Iterator[list[Pair]]]:
    """Batches of pairs in seeded random order, a fresh permutation whenever fewer than a batch are left."""

    def batches() -> Iterator[list[Pair]]:
        generator, order = torch.Generator().manual_seed(seed), []
        while True:
            if len(order) < batch_size:
                order.extend(torch.randperm(len(pairs), generator=generator).tolist())
            yield [pairs[index] for index in order[:batch_size]]
            del order[:batch_size]

    return batches


def _reference_states(model, tokenizer, texts, layer, stack, pooling, batch_size, max_length) -> torch.Tensor:
    states = [
        pooled[layer].float()
        for pooled in iterate_pooled(model, tokenizer, texts, [layer], stack, pooling, batch_size, max_length)
    ]
    return torch.cat(states)


@dataclass
class LensObjective:
    """weights . (align, separate, retain) on the pooled state of `layer` of a batch of pairs (see `lens.train`);
    every call's loss and parts are appended to `history`."""

    probe: Any  # the LensProbe whose subspaces and directions the losses use
    tokenizer: Any
    layer: int
    weights: tuple[float, float, float]
    max_length: int
    directions: dict[str, torch.Tensor]  # per target language: push strength x its direction
    pivot_reference: dict[str, torch.Tensor]  # pivot text -> the frozen model's pooled state
    target_reference: dict[str, torch.Tensor]  # target text -> the same
    history: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any, probe: Any, pairs: Sequence[Pair], layer: int,
              weights: tuple[float, float, float], strengths: Mapping[str, float], batch_size: int,
              max_length: int) -> "LensObjective":
        """The objective with the frozen model's states, once: this replaces the reference code's second model copy."""
        device = model_device(model)
        references = []
        for side in (0, 1):
            texts = sorted({pair[side] for pair in pairs})
            states = _reference_states(model, tokenizer, texts, layer, probe.stack, probe.pooling, batch_size,
                                       max_length).to(device)
            references.append(dict(zip(texts, states)))
        directions = {code: (strength * probe.direction(code, layer)).to(device)
                      for code, strength in strengths.items()}
        return cls(probe, tokenizer, layer, weights, max_length, directions, *references)

    def pooled(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        batch = tokenize(self.tokenizer, texts, self.max_length, model_device(model))
        return layer_states(model, batch, [self.layer], self.probe.stack, self.probe.pooling)[self.layer].float()

    def __call__(self, model: nn.Module, chosen: list[Pair]) -> tuple[torch.Tensor, int]:
        probe, layer = self.probe, self.layer
        pivot_states = self.pooled(model, [pair[0] for pair in chosen])
        target_states = self.pooled(model, [pair[1] for pair in chosen])
        pivot_ref = torch.stack([self.pivot_reference[pair[0]] for pair in chosen])
        target_ref = torch.stack([self.target_reference[pair[1]] for pair in chosen])
        wanted_shift = torch.stack([self.directions[pair[2]] for pair in chosen])
        align = nn.functional.mse_loss(probe.project_agnostic(target_states, layer),
                                       probe.project_agnostic(pivot_states, layer))
        separate = nn.functional.mse_loss(
            probe.project_specific(target_states, layer) - probe.project_specific(target_ref, layer), wanted_shift)
        retain = nn.functional.mse_loss(pivot_states, pivot_ref)
        w_align, w_separate, w_retain = self.weights
        loss = w_align * align + w_separate * separate + w_retain * retain
        self.history.append({"step": len(self.history), "loss": loss.item(), "align": align.item(),
                             "separate": separate.item(), "retain": retain.item()})
        return loss, len(chosen)
