"""What LENS trains and how, as one typed settings class (the YAML `lens:` block and `lens.train`'s argument).

Free of torch, so the command line can check a recipe before any model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Optional, Union

from ..core.config import ConfigError, NonNegativeFloat, NonNegativeInt, PositiveInt, TypedConfig
from ..training.settings import TrainSettings


def lens_schedule(**changes) -> TrainSettings:
    """LENS's optimisation: AdamW at a constant 1e-5 for 100 steps, no warm-up, no clipping."""
    return TrainSettings(**{"steps": 100, "lr": 1e-5, "warmup": 0, "schedule": "constant", "betas": (0.9, 0.999),
                            "clip_norm": 0.0, "seed": None, **changes})


@dataclass
class LensTrainSettings(TypedConfig):
    """What LENS trains: the top `top_k_layers` blocks with the losses weighted (align, separate, retain) on the
    pooled state of `layer` (default: the last probed), for `languages` (default: every probed non-pivot one),
    each pushed by `push_strength` (one number or one per language); batches drawn in an order fixed by `seed`."""

    moved_keys: ClassVar[Mapping[str, str]] = {"steps": "training.steps", "lr": "training.lr"}
    top_k_layers: PositiveInt = 2
    weights: list[NonNegativeFloat] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    languages: Optional[list[str]] = None
    push_strength: Union[float, dict[str, float]] = 1.0
    layer: Optional[NonNegativeInt] = None
    batch_size: PositiveInt = 8
    max_length: Optional[PositiveInt] = None  # None: 128, or the model's positions where it has fewer
    seed: NonNegativeInt = 0
    training: TrainSettings = field(default_factory=lens_schedule)

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.weights) != 3:
            raise ConfigError(f"LensTrainSettings.weights={self.weights!r} must be three non-negative numbers "
                                    "(align, separate, retain)")
