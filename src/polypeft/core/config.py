"""Method configurations: dataclasses validated on construction, serialised as JSON.

Every method registers its config class under a name so a saved directory says how to rebuild it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

from .languages import SHARED

CONFIG_CLASSES: dict[str, type] = {}


class ConfigError(ValueError):
    """A configuration value or file that polypeft cannot use."""


def register_config(cls: type) -> type:
    CONFIG_CLASSES[cls.method] = cls
    return cls


def config_from_dict(data: dict, where: str = "config") -> "MethodConfig":
    """Rebuild a config from its JSON form; unknown methods or keys are refused by name."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in CONFIG_CLASSES:
        raise ConfigError(f"{where}: unknown method {method!r}; known methods are {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[method]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} for method {method!r}; allowed keys are {sorted(allowed)}")
    return cls(**data)


def recipe_from_dict(cls: type, data: dict, where: str = "recipe"):
    """Build dataclass `cls` from `data`, refusing unknown keys by name (recipes of the CLI commands)."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed keys are {sorted(allowed)}")
    return cls(**data)


def recipe_from_yaml(cls: type, path, overrides: Optional[dict] = None):
    """`recipe_from_dict` over a YAML file's top-level mapping, with command-line `overrides` on top."""
    import yaml

    source = Path(path)
    if not source.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of recipe keys, got {type(data).__name__}")
    return recipe_from_dict(cls, {**data, **(overrides or {})}, where=str(path))


def load_config_file(path: str) -> "MethodConfig":
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
    return config_from_dict(data, where=str(path))


@dataclass
class MethodConfig:
    """Fields every routed method shares: the languages and which linears to wrap."""

    method: ClassVar[str] = ""
    # FD's KL: symmetric between the routes, or one-way from the language route (full-rank LS-FFN).
    fd_one_way: ClassVar[bool] = False
    languages: Sequence[str] = ()
    target_modules: Optional[Union[str, list[str]]] = None
    shared_route: bool = False
    freeze_base: bool = False

    def __post_init__(self) -> None:
        self.languages = list(self.languages)
        if not self.languages:
            raise ConfigError(f"{type(self).__name__}.languages is empty: give at least one language code")
        for code in self.languages:
            if not isinstance(code, str) or not code:
                raise ConfigError(f"{type(self).__name__}.languages: {code!r} is not a non-empty string")
        if SHARED in self.languages:
            raise ConfigError(f"'{SHARED}' is reserved for the FD route; use shared_route=True instead")
        duplicated = sorted({c for c in self.languages if self.languages.count(c) > 1})
        if duplicated:
            raise ConfigError(f"{type(self).__name__}.languages lists {duplicated} more than once")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise ConfigError("target_modules is an empty list: leave it None for the FFN defaults")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_positive(owner: str, name: str, value: Any, kind: type = int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{owner}.{name}={value!r} must be a positive {kind.__name__}")


@register_config
@dataclass
class LMSConfig(MethodConfig):
    """Language-specific Matrix Synthesis: each target linear W becomes W + V[src] F[tgt].

    synthesis="pair" uses (src, tgt) everywhere; "language" uses src in the encoder, tgt in the decoder.
    """

    method: ClassVar[str] = "lms"
    rank: int = 16
    synthesis: str = "pair"
    init_std: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("LMSConfig", "rank", self.rank)
        check_choice("LMSConfig", "synthesis", self.synthesis, ("pair", "language"))
        check_positive("LMSConfig", "init_std", float(self.init_std), float)
