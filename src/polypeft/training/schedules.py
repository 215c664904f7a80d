"""Learning-rate schedules as multipliers of the peak rate per optimiser step (for torch's LambdaLR).

Every schedule warms up linearly over `warmup` steps; they differ in what follows.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, get_args

Schedule = Literal["inverse_sqrt", "linear", "constant"]
SCHEDULES = get_args(Schedule)


def inverse_sqrt(warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then decay with 1/sqrt(step) (the fairseq schedule)."""
    warmup = max(1, warmup)
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


def linear(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to zero at `steps` (the BERT fine-tuning schedule)."""
    warmup = max(1, warmup)
    return lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))


def constant(warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then the peak."""
    warmup = max(1, warmup)
    return lambda step: min(1.0, (step + 1) / warmup)


def schedule(name: str, warmup: int, steps: int) -> Callable[[int], float]:
    """The multiplier function of schedule `name` (one of SCHEDULES)."""
    if name == "inverse_sqrt":
        return inverse_sqrt(warmup)
    if name == "linear":
        return linear(warmup, steps)
    if name == "constant":
        return constant(warmup)
    raise ValueError(f"schedule={name!r} is not allowed; choose one of {list(SCHEDULES)}")
