"""The decoder testbed: language adaptation of the English-centric causal LM, scored by perplexity per verse.

Training windows come from one language each (its training books packed end to end), mixed in every batch.
"""
from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import nn

from ...backbones.causal_lm import CausalLmSettings, CausalLmTokenizer, lm_schedule
from ...data.bible import NUM_BOOKS, BibleCorpus
from ...methods.fd import fuse_distillation_step
from ...tasks.language_model import token_losses
from ..demo_retrieval import spread
from .settings import LanguageModelTestbed
from .towers import ENGLISH, Tower, adapt


def base_lm_settings(testbed: LanguageModelTestbed) -> CausalLmSettings:
    """The English-centric LM with every language of the testbed (90 % English tokens), held-out books kept out."""
    return CausalLmSettings(languages=(ENGLISH, *testbed.languages), training=lm_schedule(steps=testbed.lm_steps),
                            test_books=(testbed.test_book,), valid_books=tuple(testbed.valid_books))


class LanguageModelBed:
    """Continued training of a causal LM on the non-English languages: what the protocol builds, trains, scores."""

    metric = "perplexity"
    statistic = "perplexity"
    higher_is_better = False
    english = ENGLISH

    def __init__(self, model: nn.Module, tokenizer: CausalLmTokenizer, settings: LanguageModelTestbed,
                 corpus: Optional[BibleCorpus] = None):
        corpus = corpus or BibleCorpus()
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        held_out = {settings.test_book, *settings.valid_books}
        train_books = [b for b in range(1, NUM_BOOKS + 1) if b not in held_out]
        self.streams = {lang: torch.tensor([piece for text in corpus.verses(lang, train_books).values()
                                            for piece in tokenizer.encode(text, eos=True)])
                        for lang in settings.languages}
        too_short = [lang for lang, stream in self.streams.items() if len(stream) <= settings.seq_len]
        if too_short:
            raise ValueError(f"languages {too_short} have at most seq_len={settings.seq_len} training tokens")
        self.texts = {"valid": {lang: spread(list(corpus.verses(lang, settings.valid_books).values()),
                                             settings.valid_verses) for lang in settings.languages}}
        test = {lang: list(corpus.verses(lang, [settings.test_book]).values())
                for lang in [*settings.languages, ENGLISH]}
        self.texts["test"] = {lang: spread(texts, settings.test_verses) if settings.test_verses else texts
                              for lang, texts in test.items()}

    def build(self, method: str, trained_layers: int, seed: int) -> Tower:
        return adapt(copy.deepcopy(self.model), method, trained_layers, self.settings, seed)

    def plain(self) -> Tower:
        return Tower(copy.deepcopy(self.model), "base", {"trainable": 0})

    def batches(self, seed: int) -> Iterator[dict]:
        """Endless seeded batches of windows, each cut at a random place of one random language's stream."""
        generator = torch.Generator().manual_seed(seed)
        languages, length = sorted(self.streams), self.settings.seq_len
        while True:
            picks = torch.randint(len(languages), (self.settings.batch_size,), generator=generator).tolist()
            rows, langs = [], []
            for pick in picks:
                stream = self.streams[languages[pick]]
                start = int(torch.randint(len(stream) - length, (1,), generator=generator))
                rows.append(stream[start:start + length])
                langs.append(languages[pick])
            yield {"input_ids": torch.stack(rows), "langs": langs}

    def forward_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"]}

    def loss_function(self, tower: Tower) -> Callable:
        """Next-token cross-entropy on each window's route; for LMS+FD both routes in one pass (the FD objective)."""
        kl_weight = self.settings.kl_weight

        def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
            ids = batch["input_ids"]
            if tower.method == "lms_fd":
                loss = fuse_distillation_step(model, {"input_ids": ids, "labels": ids}, batch["langs"],
                                              batch["langs"], kl_weight).loss
            else:
                loss = model(input_ids=ids, labels=ids, **tower.route_arguments(batch["langs"])).loss
            return loss, ids.numel()

        return loss_fn

    def scores(self, tower: Tower, part: str, route: Optional[str] = None) -> dict[str, list[list[float]]]:
        """Per language, each verse's [summed token NLL, predicted tokens], on its language's route or on `route`."""
        result = {}
        for lang, texts in self.texts[part].items():
            routed = hasattr(tower.model, "routed_layers")
            # Inside a routes block the bare base model runs on that route.
            with tower.model.routes(lang=route or lang) if routed else nullcontext():
                model = tower.model.base_model if routed else tower.model
                losses = token_losses(model, self.tokenizer, texts, max_length=self.settings.seq_len)
            result[lang] = [[round(float(loss.sum()), 5), int(loss.numel())] for loss in losses]
        return result

    @staticmethod
    def summary(per_language: dict[str, list[list[float]]]) -> float:
        """Mean over languages of each language's perplexity (exp of its mean token NLL)."""
        return statistics.fmean(math.exp(sum(v[0] for v in values) / sum(v[1] for v in values))
                                for values in per_language.values())
