"""Token-budget batches of translation examples, one direction per batch or mixed, and their collation.

Batches are lists of example indices: batch size × longest example (src or tgt) never exceeds the budget.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .parallel import ParallelExample
from .sampling import temperature_probabilities

Direction = tuple[str, str]
BATCHING_MODES = ("homogeneous", "mixed")
LABEL_PAD_ID = -100  # ignored by torch's cross-entropy


class Seq2SeqTokenizer(Protocol):
    """What collation needs from a tokenizer (SpmTokenizer has it)."""

    pad_id: int
    eos_id: int

    def encode(self, text: str, lang_tag: Optional[str] = None) -> list[int]: ...


def pack_by_budget(order: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Cut `order` greedily into consecutive batches with len(batch) * max(length) <= max_tokens."""
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in order:
        length = lengths[index]
        if batch and (len(batch) + 1) * max(longest, length) > max_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(index)
        longest = max(longest, length)
    if batch:
        batches.append(batch)
    return batches


class TokenBudgetBatcher:
    """Seeded token-budget batches over examples of many directions, reshuffled every epoch.

    `homogeneous` (the papers' way) puts one direction in a batch and orders an epoch's batches by
    temperature sampling over the directions that still have batches; `mixed` pools all directions
    (an epoch holds every example once; the endless training stream draws examples by temperature).
    Either way an epoch holds every example exactly once. `sampled_batches()` is the endless variant
    where directions are drawn with replacement, so small directions are upsampled as T grows.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        directions: Sequence[Direction],
        max_tokens: int,
        mode: str = "homogeneous",
        temperature: float = 5.0,
        seed: int = 0,
        sort_window: Optional[int] = None,
    ):
        if mode not in BATCHING_MODES:
            raise ValueError(f"batching mode {mode!r} is unknown; choose one of {BATCHING_MODES}")
        if len(lengths) != len(directions):
            raise ValueError(f"got {len(lengths)} lengths but {len(directions)} directions; one each per example")
        if not lengths:
            raise ValueError("TokenBudgetBatcher needs at least one example")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if sort_window is not None and sort_window < 1:
            raise ValueError(f"sort_window must be >= 1 or None (sort the whole pool), got {sort_window}")
        for index, length in enumerate(lengths):
            if not 1 <= length <= max_tokens:
                raise ValueError(
                    f"example {index} ({directions[index][0]}->{directions[index][1]}) has {length} tokens; "
                    f"each example needs 1..max_tokens={max_tokens} tokens: raise max_tokens or truncate"
                )
        self.lengths = list(lengths)
        self.directions = [tuple(d) for d in directions]
        self.max_tokens = max_tokens
        self.mode = mode
        self.temperature = temperature
        self.seed = seed
        self.sort_window = sort_window
        self.epoch = 0
        self._last_epoch: Optional[tuple[int, list[list[int]]]] = None  # len() then iter() builds once
        self.by_direction: dict[Direction, list[int]] = {}
        for index, direction in enumerate(self.directions):
            self.by_direction.setdefault(direction, []).append(index)
        self.probabilities = temperature_probabilities(
            {d: len(ix) for d, ix in self.by_direction.items()}, temperature
        )

    def _rng(self, epoch: int, stream: int = 0) -> random.Random:
        return random.Random(f"{self.seed}/{epoch}/{stream}")

    def _pool_batches(self, pool: Sequence[int], rng: random.Random) -> list[list[int]]:
        """Shuffle, sort by length inside windows (less padding), pack, then shuffle the batches."""
        order = list(pool)
        rng.shuffle(order)
        window = self.sort_window or len(order)
        grouped: list[int] = []
        for start in range(0, len(order), window):
            grouped.extend(sorted(order[start:start + window], key=self.lengths.__getitem__))
        batches = pack_by_budget(grouped, self.lengths, self.max_tokens)
        rng.shuffle(batches)
        return batches

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch; the same seed and epoch give the same batches."""
        if self._last_epoch is not None and self._last_epoch[0] == epoch:
            return [list(batch) for batch in self._last_epoch[1]]
        batches = self._build_epoch(epoch)
        self._last_epoch = (epoch, batches)
        return [list(batch) for batch in batches]

    def _build_epoch(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        if self.mode == "mixed":
            return self._pool_batches(range(len(self.lengths)), rng)
        queues = {d: self._pool_batches(ix, rng) for d, ix in self.by_direction.items()}
        ordered: list[list[int]] = []
        while queues:
            remaining = list(queues)
            direction = rng.choices(remaining, weights=[self.probabilities[d] for d in remaining])[0]
            ordered.append(queues[direction].pop())
            if not queues[direction]:
                del queues[direction]
        return ordered

    def temperature_pool(self, pass_number: int) -> list[int]:
        """As many example indices as the data holds, their directions drawn with the temperature
        probabilities; each direction's examples come in shuffled order, cycling when a small one runs out."""
        rng = self._rng(pass_number, stream=len(self.by_direction) + 1)
        directions = list(self.by_direction)
        drawn = rng.choices(directions, weights=[self.probabilities[d] for d in directions], k=len(self.lengths))
        counts = {d: 0 for d in directions}
        for direction in drawn:
            counts[direction] += 1
        pool: list[int] = []
        for direction in directions:
            members = list(self.by_direction[direction])
            rng.shuffle(members)
            wanted = counts[direction]
            pool.extend((members * (wanted // len(members) + 1))[:wanted])
        return pool

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def sampled_batches(self) -> Iterator[list[int]]:
        """Endless batches drawn with temperature probabilities: homogeneous mode draws each batch's direction,
        mixed mode each example's (see `temperature_pool`)."""
        if self.mode == "mixed":
            epoch = 0
            while True:
                yield from self._pool_batches(self.temperature_pool(epoch), self._rng(epoch))
                epoch += 1
        pick = self._rng(-1)
        directions = list(self.by_direction)
        weights = [self.probabilities[d] for d in directions]
        passes = {d: 0 for d in directions}
        queues: dict[Direction, list[list[int]]] = {d: [] for d in directions}
        while True:
            direction = pick.choices(directions, weights=weights)[0]
            if not queues[direction]:
                # Each direction reshuffles on its own when it runs out, so it is seen evenly over time.
                stream = directions.index(direction) + 1
                queues[direction] = self._pool_batches(
                    self.by_direction[direction], self._rng(passes[direction], stream)
                )
                passes[direction] += 1
            yield queues[direction].pop()


def token_lengths(
    examples: Sequence[ParallelExample], tokenizer: Seq2SeqTokenizer, add_lang_tag: bool = True
) -> list[int]:
    """max(source tokens, target tokens) per example, the length a token budget counts."""
    # Each text is encoded once; a tag adds a fixed number of tokens, measured on the empty text.
    text_lengths: dict[str, int] = {}
    tag_overheads: dict[str, int] = {}
    bare = len(tokenizer.encode(""))

    def count(text: str) -> int:
        if text not in text_lengths:
            text_lengths[text] = len(tokenizer.encode(text))
        return text_lengths[text]

    def overhead(lang: str) -> int:
        if lang not in tag_overheads:
            tag_overheads[lang] = len(tokenizer.encode("", lang_tag=lang)) - bare
        return tag_overheads[lang]

    progress = tqdm(examples, desc="measuring token lengths", disable=len(examples) < 50_000, leave=False)
    return [
        max(count(e.src) + (overhead(e.tgt_lang) if add_lang_tag else 0), count(e.tgt)) for e in progress
    ]


def _truncate(ids: list[int], max_length: Optional[int], eos_id: int) -> list[int]:
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[: max_length - 1] + [eos_id]  # keep the end-of-sentence so the model learns to stop


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def padded_inputs(rows: list[list[int]], pad_id: int, max_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask`, as a transformers tokenizer returns them, so the project's own
    tokenizers (SentencePiece, pruned) serve code written against that interface."""
    rows = [row[:max_length] for row in rows] if max_length else rows
    return {"input_ids": _pad(rows, pad_id), "attention_mask": _pad([[1] * len(row) for row in rows], 0)}


def collate(
    examples: Sequence[ParallelExample],
    tokenizer: Seq2SeqTokenizer,
    max_source_length: Optional[int] = None,
    max_target_length: Optional[int] = None,
    add_lang_tag: bool = True,
) -> dict:
    """Tensors for a seq2seq model plus the routes.

    input_ids: target-language tag, source tokens, eos; padded with `tokenizer.pad_id`.
    labels: target tokens and eos, padded with -100. src_lang/tgt_lang: one code per example.
    """
    if not examples:
        raise ValueError("collate got an empty batch")
    for limit_name, limit in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if limit is not None and limit < 2:
            raise ValueError(f"{limit_name} must be >= 2 (a token and eos) or None, got {limit}")
    sources = [
        _truncate(tokenizer.encode(e.src, lang_tag=e.tgt_lang if add_lang_tag else None), max_source_length, tokenizer.eos_id)
        for e in examples
    ]
    targets = [_truncate(tokenizer.encode(e.tgt), max_target_length, tokenizer.eos_id) for e in examples]
    input_ids = _pad(sources, tokenizer.pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sources):
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": _pad(targets, LABEL_PAD_ID),
        "src_lang": [e.src_lang for e in examples],
        "tgt_lang": [e.tgt_lang for e in examples],
    }
