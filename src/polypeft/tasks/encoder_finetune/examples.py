"""Examples encoded once for fine-tuning: token ids, or hidden states cached from frozen lower layers.

With a cache the frozen layers run once per example instead of once per step; LRP2's shift applies to it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ...core.config import ConfigError
from ..classification import ClassificationData


class PassThroughEmbeddings(nn.Module):
    """Stands in for a frozen embedding layer + lower layers whose output was cached: returns `inputs_embeds`."""

    def forward(self, input_ids=None, inputs_embeds=None, **_: Any) -> torch.Tensor:
        if inputs_embeds is None:
            raise ValueError("this encoder's lower layers were cut off; feed the cached states as inputs_embeds")
        return inputs_embeds


@dataclass
class EncodedExamples:
    """Examples tokenized once (token ids) or run once through the frozen lower layers (hidden states)."""

    items: list[torch.Tensor]  # per example: token ids (T,) or hidden states (T, H), no padding
    labels: torch.Tensor
    langs: list[str]
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def holds_states(self) -> bool:
        return bool(self.items) and self.items[0].dim() == 2

    def batch(self, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded model inputs and `labels` for the examples at `index`."""
        items = [self.items[i] for i in index]
        length = max(len(item) for item in items)
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for row, item in enumerate(items):
            mask[row, :len(item)] = 1
        labels = self.labels[list(index)]
        if self.holds_states:
            states = torch.zeros(len(items), length, items[0].shape[1])
            for row, item in enumerate(items):
                states[row, :len(item)] = item
            return {"inputs_embeds": states, "attention_mask": mask, "labels": labels}
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, :len(item)] = item
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def subset(self, langs: Sequence[str]) -> "EncodedExamples":
        keep = [i for i, lang in enumerate(self.langs) if lang in set(langs)]
        return EncodedExamples([self.items[i] for i in keep], self.labels[keep], [self.langs[i] for i in keep],
                               self.pad_id)


def encoder_body(model: nn.Module) -> nn.Module:
    """The transformer body (`bert`, `roberta`, ...) of a model with a task head, or the model itself."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def encode_examples(encoder: nn.Module, tokenizer, data: Mapping[str, ClassificationData], max_length: int,
                    frozen_layers: int = 0, prefix: str = "", batch_size: int = 64,
                    progress: bool = True) -> EncodedExamples:
    """Tokenize every language's examples; with `frozen_layers` > 0 also run them through the encoder's
    embeddings and lowest `frozen_layers` layers once, keeping the hidden states without padding."""
    from tqdm.auto import tqdm

    texts, labels, langs = [], [], []
    for lang, part in data.items():
        for example in part.examples:
            texts.append(prefix + example.text)
            labels.append(example.label)
            langs.append(lang)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    items: list[torch.Tensor] = [torch.tensor(row) for row in ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if frozen_layers > 0:
        num_layers = encoder_body(encoder).config.num_hidden_layers
        if frozen_layers > num_layers:
            raise ConfigError(f"frozen_layers={frozen_layers} but the encoder has {num_layers} layers")
        body = encoder_body(encoder)
        token_ids = EncodedExamples(items, torch.tensor(labels), langs, pad_id)
        order = sorted(range(len(items)), key=lambda i: len(items[i]), reverse=True)  # little padding
        states: list[Optional[torch.Tensor]] = [None] * len(items)
        was_training = body.training
        body.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=f"frozen layers 0-{frozen_layers - 1}",
                              disable=not progress, unit="batch"):
                index = order[start:start + batch_size]
                batch = token_ids.batch(index)
                hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              output_hidden_states=True).hidden_states[frozen_layers]
                for row, i in enumerate(index):
                    states[i] = hidden[row, :len(items[i])].float().clone()
        body.train(was_training)
        items = states  # type: ignore[assignment]
    return EncodedExamples(items, torch.tensor(labels), langs, pad_id)


def language_means(examples: EncodedExamples) -> dict[str, torch.Tensor]:
    """Per language, the mean over examples of each example's token-averaged cached state: LRP2's language
    vector (mean pooling) at the layer the cache stops at."""
    if not examples.holds_states:
        raise ValueError("language_means needs cached hidden states (encode_examples with frozen_layers > 0)")
    pooled = torch.stack([item.mean(0) for item in examples.items])
    langs = list(dict.fromkeys(examples.langs))
    return {lang: pooled[[i for i, l in enumerate(examples.langs) if l == lang]].mean(0) for lang in langs}


def lirp_shifted(examples: EncodedExamples, means: Mapping[str, torch.Tensor], pivot: str = "en") -> EncodedExamples:
    """LRP2's LIRP applied to cached states, at the input of the first trained layer: every token of an
    example moves by means[pivot] - means[its language], so the upper layers see it as if in the pivot."""
    missing = sorted({lang for lang in examples.langs if lang not in means} | ({pivot} - set(means)))
    if missing:
        raise ValueError(f"no language mean for {missing}; means exist for {sorted(means)}")
    items = [item + (means[pivot] - means[lang]) for item, lang in zip(examples.items, examples.langs)]
    return EncodedExamples(items, examples.labels, list(examples.langs), examples.pad_id)
