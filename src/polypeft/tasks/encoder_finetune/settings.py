"""What one encoder fine-tuning run is: the method, its size and its optimisation, checked on construction.

Also names the variants each method is scored as.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from ...core.config import ConfigError
from ...training.loop import TrainSettings

METHODS = ("naive", "lms", "lms_fd")
# What each method is scored as: naive and LMS on their own weights, LMS+FD on each route separately.
EVAL_ROUTES = {"naive": ("none",), "lms": ("language",), "lms_fd": ("shared", "language")}
VARIANT_NAMES = {("naive", "none"): "naive", ("lms", "language"): "lms",
                 ("lms_fd", "shared"): "lms_fd_share", ("lms_fd", "language"): "lms_fd_ls"}


@dataclass
class FinetuneSettings:
    """One fine-tuning recipe. `frozen_layers` > 0 freezes the embeddings and the lowest layers and runs
    them once per example (a cache), so only the upper layers, their LMS routes and the head train."""

    method: str = "lms"
    rank: int = 8
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    route_lr: Optional[float] = None  # LMS routes' learning rate; default `lr`
    warmup: int = 20
    max_length: int = 64
    frozen_layers: int = 0
    freeze_embeddings: bool = True
    kl_weight: float = 1.0
    init_std: float = 0.01
    seed: int = 0
    prefix: str = ""
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"FinetuneSettings.method={self.method!r}; allowed: {list(METHODS)}")
        for name in ("rank", "steps", "batch_size", "max_length", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"FinetuneSettings.{name}={value!r}; must be a positive integer")
        if self.frozen_layers < 0 or self.warmup < 0:
            raise ConfigError(f"FinetuneSettings: frozen_layers={self.frozen_layers}, warmup={self.warmup}; "
                              "both must be >= 0")
        if self.lr <= 0 or (self.route_lr is not None and self.route_lr <= 0):
            raise ConfigError(f"FinetuneSettings: lr={self.lr}, route_lr={self.route_lr}; learning rates must be > 0")

    def replaced(self, **changes: Any) -> "FinetuneSettings":
        return FinetuneSettings(**{**asdict(self), **changes})

    def loop_settings(self, steps: Optional[int] = None, progress: bool = True) -> TrainSettings:
        """The training loop's settings: AdamW with linear warm-up and decay, gradients clipped at 1."""
        return TrainSettings(steps=steps or self.steps, lr=self.lr, warmup=self.warmup, schedule="linear",
                             betas=(0.9, 0.999), clip_norm=1.0, seed=None, progress=progress)
