"""The one set of optimisation settings every polypeft trainer hands the training loop.

Checked on construction by the one typed validator, so a bad value stops a run before any step is taken.
"""
from __future__ import annotations

from dataclasses import FrozenInstanceError, dataclass, fields
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, get_args

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
    zero at `steps`, "constant", or "wsd" (constant, then linear decay to zero over the last fifth of `steps`, so
    more steps on resume move the decay). `mixed_precision` goes to accelerate: parameters stay float32 and the
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


class FrozenTrainSettings(TrainSettings):
    """TrainSettings that refuse every change once built, and hash: the block of a frozen settings class, whose
    cache key is read from it and must not move under it. Equal to a TrainSettings of the same values."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_frozen", True)

    @classmethod
    def of(cls, settings: TrainSettings) -> "FrozenTrainSettings":
        """A frozen copy of `settings` (the same values; later changes to `settings` do not reach it)."""
        return settings if isinstance(settings, cls) else cls(**values_of(settings))

    def thawed(self) -> TrainSettings:
        """A plain, changeable copy: what a caller that adjusts the settings gets."""
        return TrainSettings(**values_of(self))

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise FrozenInstanceError(f"cannot set {name}={value!r}: these training settings are frozen (they belong "
                                      "to a frozen settings object); build new ones with dataclasses.replace")
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete {name!r}: these training settings are frozen")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainSettings):
            return NotImplemented
        return values_of(self) == values_of(other)

    def __hash__(self) -> int:
        return hash(tuple(values_of(self).items()))


def values_of(settings: TrainSettings) -> dict[str, Any]:
    return {field.name: getattr(settings, field.name) for field in fields(TrainSettings)}
