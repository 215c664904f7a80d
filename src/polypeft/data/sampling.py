"""Temperature sampling over translation directions: p_i ∝ (n_i / N)^(1/T), seeded.

T = 1 follows the data sizes, larger T flattens towards uniform (the papers use T = 2 and T = 5).
"""
from __future__ import annotations

import math
import random
from itertools import accumulate
from typing import Hashable, Iterator, Mapping, TypeVar

Key = TypeVar("Key", bound=Hashable)


def temperature_probabilities(sizes: Mapping[Key, int], temperature: float) -> dict[Key, float]:
    """Probability of each key given its data size; `temperature=math.inf` is uniform over non-empty keys."""
    if not sizes:
        raise ValueError("temperature_probabilities: no directions were given")
    if not temperature > 0:  # also refuses NaN
        raise ValueError(f"temperature must be > 0 (1 = proportional, inf = uniform), got {temperature!r}")
    negative = {key: size for key, size in sizes.items() if size < 0}
    if negative:
        raise ValueError(f"data sizes must be >= 0, got {negative}")
    total = sum(sizes.values())
    if total == 0:
        raise ValueError(f"every direction is empty: {dict(sizes)}")
    exponent = 0.0 if math.isinf(temperature) else 1.0 / temperature
    # An empty direction keeps probability 0 whatever the temperature (0 ** 0 would give it 1).
    weights = {key: (size / total) ** exponent if size > 0 else 0.0 for key, size in sizes.items()}
    norm = sum(weights.values())
    return {key: weight / norm for key, weight in weights.items()}


class TemperatureSampler:
    """An endless, seeded stream of keys drawn with temperature probabilities."""

    def __init__(self, sizes: Mapping[Key, int], temperature: float = 5.0, seed: int = 0):
        self.probabilities = temperature_probabilities(sizes, temperature)
        self.temperature = temperature
        self._keys = list(self.probabilities)
        self._cumulative = list(accumulate(self.probabilities[key] for key in self._keys))
        # random.Random gives the same stream on every platform and Python version for a seed.
        self._rng = random.Random(seed)

    def sample(self) -> Key:
        return self._rng.choices(self._keys, cum_weights=self._cumulative)[0]

    def __iter__(self) -> Iterator[Key]:
        while True:
            yield self.sample()

    def take(self, count: int) -> list[Key]:
        return [self.sample() for _ in range(count)]
