"""The one set of optimisation settings every polypeft trainer hands the training loop.

Checked on construction, so a bad value stops a run before any data is prepared or any step is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..core.config import ConfigError, check_choice
from .schedules import SCHEDULES

MIXED_PRECISIONS = ("no", "bf16", "fp16")


def check_integer(owner: str, name: str, value: Any, least: int, error: type = ConfigError) -> None:
    """`value` is an int (a bool is not) of at least `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise error(f"{owner}.{name}={value!r}; must be an integer >= {least}")


def check_number(owner: str, name: str, value: Any, least: float, strict: bool, error: type = ConfigError) -> None:
    """`value` is a finite real number (a bool is not) above `least` (or at least `least` when not `strict`)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < least or (strict and value == least):
        raise error(f"{owner}.{name}={value!r}; must be a finite number {'>' if strict else '>='} {least}")


def check_bool(owner: str, name: str, value: Any, error: type = ConfigError) -> None:
    if not isinstance(value, bool):
        raise error(f"{owner}.{name}={value!r}; must be true or false (a bool, not {type(value).__name__})")


@dataclass
class TrainSettings:
    """AdamW for `steps` optimiser steps of `accumulation` micro-batches each (defaults: the LMS paper's recipe).

    `schedule` shapes the rate after `warmup` linear warm-up steps: "inverse_sqrt" (fairseq), "linear" decay
    to zero at `steps`, or "constant". `mixed_precision` goes to accelerate: parameters stay float32 and the
    forward pass autocasts. `seed` None leaves the global generators as the caller set them. `clip_norm` 0
    does not clip; `checkpoint_every`, `valid_every` (0: never) and `log_every` count optimiser steps.
    """

    steps: int = 1000
    lr: float = 5e-4
    warmup: int = 200
    schedule: str = "inverse_sqrt"
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    accumulation: int = 1
    clip_norm: float = 1.0
    checkpoint_every: int = 200
    valid_every: int = 0
    log_every: int = 10
    seed: Optional[int] = 0
    mixed_precision: str = "no"
    progress: bool = True

    def __post_init__(self) -> None:
        owner = "TrainSettings"
        for name, least in (("steps", 1), ("warmup", 0), ("accumulation", 1), ("checkpoint_every", 1),
                            ("valid_every", 0), ("log_every", 1)):
            check_integer(owner, name, getattr(self, name), least)
        if self.seed is not None:
            check_integer(owner, "seed", self.seed, 0)
        check_number(owner, "lr", self.lr, 0, strict=True)
        check_number(owner, "weight_decay", self.weight_decay, 0, strict=False)
        check_number(owner, "clip_norm", self.clip_norm, 0, strict=False)
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                      for b in betas):
            raise ConfigError(f"{owner}.betas={self.betas!r}; must be two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        check_choice(owner, "schedule", self.schedule, SCHEDULES)
        check_choice(owner, "mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_bool(owner, "progress", self.progress)
