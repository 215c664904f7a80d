"""Learning-rate schedules as multipliers of the peak rate per optimiser step (for torch's LambdaLR).

Every schedule warms up linearly over `warmup` steps; they differ in what follows.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, get_args

Schedule = Literal["inverse_sqrt", "linear", "constant", "wsd"]
SCHEDULES = get_args(Schedule)
WSD_DECAY_FRACTION = 0.2  # the share of `steps` over which "wsd" decays to zero


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


def wsd_decay_steps(steps: int) -> int:
    """How many final steps "wsd" decays over: a fifth of `steps`, at least one."""
    return max(1, round(steps * WSD_DECAY_FRACTION))


def warmup_stable_decay(warmup: int, steps: int) -> Callable[[int], float]:
    """Linear warm-up, the peak, then linear decay to zero over the last fifth of `steps`: a long constant run
    that still ends annealed, which a short budget needs (a fully linear decay halves the mean rate). Where warm-up
    and decay overlap (warmup beyond four fifths of `steps`) the lower rate wins; transformers' warms up first."""
    warmup, decay = max(1, warmup), wsd_decay_steps(steps)
    return lambda step: min((step + 1) / warmup, 1.0, max(0.0, (steps - step) / decay))


def schedule(name: str, warmup: int, steps: int) -> Callable[[int], float]:
    """The multiplier function of schedule `name` (one of SCHEDULES)."""
    if name == "inverse_sqrt":
        return inverse_sqrt(warmup)
    if name == "linear":
        return linear(warmup, steps)
    if name == "constant":
        return constant(warmup)
    if name == "wsd":
        return warmup_stable_decay(warmup, steps)
    raise ValueError(f"schedule={name!r} is not allowed; choose one of {list(SCHEDULES)}")
