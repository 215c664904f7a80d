"""The method registry: each method's name, config class and layer builder, filled by its module's one call.

It lives above the core, so the core never names a method; importing it imports every method of this package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from ..core.config import ConfigError, MethodConfig, Source, build, source_of


@dataclass(frozen=True)
class MethodEntry:
    config_class: type
    build_layer: Callable[..., Any]


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_class: type, layer_builder: Callable[..., Any]) -> None:
    """Make method `name` known: its config class (saved configs say `method: name`) and the function
    `layer_builder(config, site)` that wraps the target linear at `site` (a `core.routed.LayerSite`)."""
    if config_class.method != name:
        raise ConfigError(f"register_method({name!r}): {config_class.__name__}.method is {config_class.method!r}")
    if name in METHODS and METHODS[name].config_class is not config_class:
        raise ConfigError(f"method {name!r} is already registered by {METHODS[name].config_class.__name__}")
    METHODS[name] = MethodEntry(config_class, layer_builder)


def registered_methods() -> dict[str, MethodEntry]:
    """Every method of `polypeft.methods` (importing this module ran their register calls)."""
    return METHODS


def method_entry(name: Any, where: str = "config") -> MethodEntry:
    if name not in METHODS:
        raise ConfigError(f"{where}: unknown method {name!r}; known methods are {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(data: Mapping[str, Any], where: Union[str, Source] = "config") -> MethodConfig:
    """Rebuild a config from its JSON form; unknown methods or keys are refused by name."""
    data = dict(data)
    method = data.pop("method", None)
    return build(method_entry(method, source_of(where).where() or "config").config_class, data, where)


def load_config_file(path: str) -> MethodConfig:
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
    return config_from_dict(data, where=str(path))
