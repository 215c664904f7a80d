"""The one set of optimisation settings every polypeft trainer hands the training loop.

Checked on construction by the one typed validator, so a bad value stops a run before any step is taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, Mapping, Optional, get_args

from ..core.config import (ConfigError, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range,
                           TypedConfig)
from .schedules import Schedule

MixedPrecision = Literal["no", "bf16", "fp16"]
MIXED_PRECISIONS = get_args(MixedPrecision)
Beta = Annotated[float, Range(0, 1, high_open=True)]


@dataclass
class TrainSettings(TypedConfig):
    """AdamW for `steps` optimiser steps of `accumulation` micro-batches each (defaults: the LMS paper's recipe).

    `schedule` shapes the rate after `warmup` linear warm-up steps (null: a tenth of `steps`, at least one, so a
    recipe that changes `steps` keeps its warm-up in proportion): "inverse_sqrt" (fairseq), "linear" decay to
    zero at `steps`, or "constant". `mixed_precision` goes to accelerate: parameters stay float32 and the
    forward pass autocasts. `seed` None leaves the global generators as the caller set them. `clip_norm` 0
    does not clip; `checkpoint_every`, `valid_every` (0: never) and `log_every` count optimiser steps.
    """

    # FLARE's stage blocks once said learning_rate and max_grad_norm.
    moved_keys: ClassVar[Mapping[str, str]] = {"learning_rate": "lr", "max_grad_norm": "clip_norm"}
    steps: PositiveInt = 1000
    lr: PositiveFloat = 5e-4
    warmup: Optional[NonNegativeInt] = 200
    schedule: Schedule = "inverse_sqrt"
    betas: tuple[Beta, Beta] = (0.9, 0.98)
    weight_decay: NonNegativeFloat = 0.0
    accumulation: PositiveInt = 1
    clip_norm: NonNegativeFloat = 1.0
    checkpoint_every: PositiveInt = 200
    valid_every: NonNegativeInt = 0
    log_every: PositiveInt = 10
    seed: Optional[NonNegativeInt] = 0
    mixed_precision: MixedPrecision = "no"
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.betas) != 2:
            raise ConfigError(f"TrainSettings.betas={self.betas!r} must be two numbers in [0, 1)")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    @property
    def warmup_steps(self) -> int:
        """The warm-up the schedule runs: `warmup`, or a tenth of `steps` (at least one) when it is null."""
        return self.warmup if self.warmup is not None else max(1, self.steps // 10)
