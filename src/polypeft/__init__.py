"""polypeft: language-specific parameter-efficient modules for multilingual transformers.

The public API lives here; everything else may change.
"""
__version__ = "0.1.0"

from .config import ConfigError, LMSConfig, MethodConfig, config_from_dict, load_config_file
from .inject import DEFAULT_FFN_TARGETS, TargetError
from .languages import SHARED, LanguageError, LanguageRegistry, Routes
from .losses import (
    FuseDistillationLoss,
    fuse_distillation_loss,
    fuse_distillation_step,
    one_way_kl,
    symmetric_kl,
    token_cross_entropy,
)
from .model import ParameterCounts, PolyModel, wrap

__all__ = [
    "ConfigError",
    "DEFAULT_FFN_TARGETS",
    "FuseDistillationLoss",
    "LMSConfig",
    "LanguageError",
    "LanguageRegistry",
    "MethodConfig",
    "ParameterCounts",
    "PolyModel",
    "Routes",
    "SHARED",
    "TargetError",
    "config_from_dict",
    "fuse_distillation_loss",
    "fuse_distillation_step",
    "load_config_file",
    "one_way_kl",
    "symmetric_kl",
    "token_cross_entropy",
    "wrap",
]
