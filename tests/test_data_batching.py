"""Temperature sampling and token-budget batching: budget, homogeneity, coverage, determinism, collation."""
import math
from collections import Counter

import pytest

from polypeft.data.batching import LABEL_PAD_ID, TokenBudgetBatcher, collate, pack_by_budget, token_lengths
from polypeft.data.parallel import ParallelExample
from polypeft.data.sampling import TemperatureSampler, temperature_probabilities

SIZES = {("en", "de"): 800, ("en", "ko"): 150, ("ko", "en"): 50}


def test_temperature_one_is_proportional_and_large_is_nearly_uniform():
    proportional = temperature_probabilities(SIZES, 1.0)
    assert proportional[("en", "de")] == pytest.approx(0.8)
    assert proportional[("ko", "en")] == pytest.approx(0.05)
    flat = temperature_probabilities(SIZES, 1000.0)
    assert max(flat.values()) - min(flat.values()) < 0.01
    assert temperature_probabilities(SIZES, math.inf) == pytest.approx({k: 1 / 3 for k in SIZES})
    # T = 5 (the paper's) lies in between and keeps the order of sizes.
    five = temperature_probabilities(SIZES, 5.0)
    assert proportional[("ko", "en")] < five[("ko", "en")] < 1 / 3
    assert sum(five.values()) == pytest.approx(1.0)


def test_temperature_refuses_bad_input_and_keeps_empty_directions_at_zero():
    with pytest.raises(ValueError, match="temperature must be > 0.*got 0"):
        temperature_probabilities(SIZES, 0)
    with pytest.raises(ValueError, match="every direction is empty"):
        temperature_probabilities({("en", "de"): 0}, 2.0)
    assert temperature_probabilities({"a": 0, "b": 5}, math.inf) == {"a": 0.0, "b": 1.0}


def test_sampler_is_seeded_and_follows_the_probabilities():
    draws = TemperatureSampler(SIZES, temperature=1.0, seed=3).take(20000)
    assert draws == TemperatureSampler(SIZES, temperature=1.0, seed=3).take(20000)
    assert draws != TemperatureSampler(SIZES, temperature=1.0, seed=4).take(20000)
    share = Counter(draws)[("en", "de")] / len(draws)
    assert share == pytest.approx(0.8, abs=0.02)


def make_dataset(seed_sizes=SIZES):
    directions, lengths = [], []
    for direction, size in seed_sizes.items():
        for i in range(size):
            directions.append(direction)
            lengths.append(1 + (i * 37) % 60)
    return lengths, directions


def test_pack_by_budget_counts_padded_tokens():
    # [2, 2] fits (2*2=4), adding 5 makes 3*5=15 > 10, so 5 starts a batch; then 2*5=10 fits.
    assert pack_by_budget([0, 1, 2, 3], [2, 2, 5, 1], max_tokens=10) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("mode", ["homogeneous", "mixed"])
def test_every_epoch_covers_each_example_once_within_budget(mode):
    lengths, directions = make_dataset()
    batcher = TokenBudgetBatcher(lengths, directions, max_tokens=256, mode=mode, temperature=5.0, seed=0)
    for epoch in range(3):
        batches = batcher.batches(epoch)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(lengths)))
        assert all(len(batch) * max(lengths[i] for i in batch) <= 256 for batch in batches)
        kinds = [{directions[i] for i in batch} for batch in batches]
        if mode == "homogeneous":
            assert all(len(kind) == 1 for kind in kinds)
        else:
            assert any(len(kind) > 1 for kind in kinds)
    # Length grouping keeps padding low: the packed batches use most of the budget.
    used = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert used / (len(batches) * 256) > 0.7


def test_batches_are_deterministic_by_seed_and_reshuffled_per_epoch():
    lengths, directions = make_dataset()
    first = TokenBudgetBatcher(lengths, directions, max_tokens=256, seed=7)
    again = TokenBudgetBatcher(lengths, directions, max_tokens=256, seed=7)
    other = TokenBudgetBatcher(lengths, directions, max_tokens=256, seed=8)
    assert first.batches(0) == again.batches(0)
    assert first.batches(0) != other.batches(0)
    assert first.batches(0) != first.batches(1)
    first.set_epoch(1)
    assert list(first) == again.batches(1) and len(first) == len(again.batches(1))


def test_homogeneous_epoch_order_follows_temperature():
    lengths, directions = make_dataset()

    def mean_position_of_smallest(temperature):
        batches = TokenBudgetBatcher(lengths, directions, max_tokens=256, temperature=temperature, seed=0).batches(0)
        positions = [i / len(batches) for i, b in enumerate(batches) if directions[b[0]] == ("ko", "en")]
        return sum(positions) / len(positions)

    # T=1 spreads the small direction over the epoch; a flat T front-loads it until it runs out.
    assert mean_position_of_smallest(1.0) > 0.4
    assert mean_position_of_smallest(math.inf) < 0.2


@pytest.mark.parametrize("mode", ["homogeneous", "mixed"])
def test_sampled_stream_upsamples_small_directions_as_temperature_grows(mode):
    lengths, directions = make_dataset()

    def share_of_smallest(temperature):
        batcher = TokenBudgetBatcher(lengths, directions, max_tokens=256, mode=mode, temperature=temperature, seed=1)
        stream = batcher.sampled_batches()
        # homogeneous: count batches (one direction each); mixed: count the examples of the batches
        picked = [directions[i] for _ in range(3000) for i in (next(stream)[:1] if mode == "homogeneous" else next(stream))]
        for batch in [next(stream) for _ in range(50)]:
            assert sum(lengths[i] for i in batch) <= 256 or len(batch) == 1
        return Counter(picked)[("ko", "en")] / len(picked)

    assert share_of_smallest(1.0) == pytest.approx(0.05, abs=0.02)
    assert share_of_smallest(math.inf) == pytest.approx(1 / 3, abs=0.03)


def test_batcher_refuses_examples_over_budget_and_bad_modes():
    with pytest.raises(ValueError, match=r"example 1 \(en->de\) has 300 tokens"):
        TokenBudgetBatcher([10, 300], [("en", "de")] * 2, max_tokens=256)
    with pytest.raises(ValueError, match="'sorted'.*'homogeneous', 'mixed'"):
        TokenBudgetBatcher([10], [("en", "de")], max_tokens=256, mode="sorted")


class WordTokenizer:
    """One id per word, for collation tests without SentencePiece."""

    pad_id, bos_id, eos_id = 0, 2, 3

    def __init__(self):
        self.ids = {"<2de>": 4, "<2en>": 5}

    def encode(self, text, lang_tag=None):
        ids = [self.ids.setdefault(word, len(self.ids) + 4) for word in text.split()]
        return ([self.ids[f"<2{lang_tag}>"]] if lang_tag else []) + ids + [self.eos_id]


def test_collate_pads_inputs_with_pad_and_labels_with_minus_100():
    examples = [
        ParallelExample("en", "de", "in the beginning was the word", "im anfang war das wort"),
        ParallelExample("de", "en", "gott", "god"),
    ]
    tokenizer = WordTokenizer()
    batch = collate(examples, tokenizer)
    assert batch["input_ids"].shape == (2, 8)  # tag + 6 words + eos
    assert batch["input_ids"][0, 0].item() == 4 and batch["input_ids"][1, 0].item() == 5
    assert batch["input_ids"][1, 3:].tolist() == [0] * 5
    assert batch["attention_mask"].sum(dim=1).tolist() == [8, 3]
    assert batch["labels"][1].tolist() == [batch["labels"][1, 0].item(), 3, LABEL_PAD_ID, LABEL_PAD_ID, LABEL_PAD_ID, LABEL_PAD_ID]
    assert batch["src_lang"] == ["en", "de"] and batch["tgt_lang"] == ["de", "en"]
    truncated = collate(examples, tokenizer, max_source_length=4)
    assert truncated["input_ids"][0].tolist()[-1] == tokenizer.eos_id and truncated["input_ids"].shape[1] == 4
    assert token_lengths(examples, tokenizer) == [8, 3]
