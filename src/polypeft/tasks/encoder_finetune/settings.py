"""What one encoder fine-tuning run is: the method, its size and its optimisation, checked on construction.

Also names the variants each method is scored as.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal, Mapping, Optional, get_args

from ...core.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, TypedConfig
from ...training.loop import TrainSettings

Method = Literal["naive", "lms", "lms_fd"]
METHODS = get_args(Method)
# What each method is scored as: naive and LMS on their own weights, LMS+FD on each route separately.
EVAL_ROUTES = {"naive": ("none",), "lms": ("language",), "lms_fd": ("shared", "language")}
VARIANT_NAMES = {("naive", "none"): "naive", ("lms", "language"): "lms",
                 ("lms_fd", "shared"): "lms_fd_share", ("lms_fd", "language"): "lms_fd_ls"}


@dataclass
class FinetuneSettings(TypedConfig):
    """One fine-tuning recipe. `frozen_layers` > 0 freezes the embeddings and the lowest layers and runs
    them once per example (a cache), so only the upper layers, their LMS routes and the head train."""

    moved_keys: ClassVar[Mapping[str, str]] = {"steps": "training.steps", "lr": "training.lr",
                                               "warmup": "training.warmup"}
    method: Method = "lms"
    rank: PositiveInt = 8
    # AdamW with linear warm-up and decay, gradients clipped at 1; `seed` below seeds the model and the batches.
    training: TrainSettings = field(default_factory=lambda: TrainSettings(
        steps=200, lr=5e-5, warmup=20, schedule="linear", betas=(0.9, 0.999), clip_norm=1.0, seed=None))
    batch_size: PositiveInt = 32
    route_lr: Optional[PositiveFloat] = None  # LMS routes' learning rate; default `training.lr`
    max_length: PositiveInt = 64
    frozen_layers: NonNegativeInt = 0
    freeze_embeddings: bool = True
    kl_weight: NonNegativeFloat = 1.0
    init_std: PositiveFloat = 0.01
    seed: NonNegativeInt = 0
    prefix: str = ""
    eval_batch_size: PositiveInt = 64

    def replaced(self, **changes: Any) -> "FinetuneSettings":
        return FinetuneSettings(**{**asdict(self), **changes})

    def loop_settings(self, steps: Optional[int] = None, progress: bool = True) -> TrainSettings:
        """The training loop's settings (`steps` for a shorter run, as the throughput measurement takes)."""
        return replace(self.training, steps=steps or self.training.steps, progress=progress)
