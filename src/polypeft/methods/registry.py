"""The method registry: each method's name, config class and layer builder, filled by its module's one call.

It lives above the core, so the core never names a method; importing it imports every method of this package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from ..core.config import ConfigError, Source, build, source_of
from ..core.method_config import MethodConfig
from ..core.json_files import read_json_file


@dataclass(frozen=True)
class MethodEntry:
    config_class: type
    build_layer: Callable[..., Any]
    # For methods that declare `needs_source_pass`: `source_pass(model, source_batch, target_batch)` returns
    # each routed layer's per-call input (by layer name) for the target pass that follows.
    source_pass: Optional[Callable[..., Mapping[str, Any]]] = None


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_class: type, layer_builder: Callable[..., Any],
                    source_pass: Optional[Callable[..., Mapping[str, Any]]] = None) -> None:
    """Make method `name` known: its config class (saved configs say `method: name`), the function
    `layer_builder(config, site)` that wraps the target linear at `site` (a `core.routed.LayerSite`), and for
    a method whose config declares `needs_source_pass`, the `source_pass` its forward runs first."""
    if config_class.method != name:
        raise ConfigError(f"register_method({name!r}): {config_class.__name__}.method is {config_class.method!r}")
    if config_class.needs_source_pass != (source_pass is not None):
        raise ConfigError(f"register_method({name!r}): {config_class.__name__}.needs_source_pass is "
                          f"{config_class.needs_source_pass}, so source_pass must be "
                          f"{'given' if config_class.needs_source_pass else 'left out'}")
    if name in METHODS and METHODS[name].config_class is not config_class:
        raise ConfigError(f"method {name!r} is already registered by {METHODS[name].config_class.__name__}")
    METHODS[name] = MethodEntry(config_class, layer_builder, source_pass)


def registered_methods() -> dict[str, MethodEntry]:
    """Every method of `polypeft.methods` (importing this module ran their register calls)."""
    return METHODS


def method_entry(name: Any, where: str = "config") -> MethodEntry:
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"{where}: unknown method {name!r}; known methods are {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(data: Mapping[str, Any], where: Union[str, Source] = "config") -> MethodConfig:
    """Rebuild a config from its JSON form; unknown methods or keys, or a value that is no mapping, are refused
    by name."""
    place = source_of(where).where() or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{place}: expected a method config (a mapping with 'method' and its fields, e.g. "
                          f'{{"method": "lms", "languages": ["en", "de"]}}), got {type(data).__name__} {data!r}')
    data = dict(data)
    method = data.pop("method", None)
    return build(method_entry(method, place).config_class, data, where)


def load_config_file(path: str) -> MethodConfig:
    return config_from_dict(read_json_file(path), where=str(path))
