"""Reading a YAML recipe: its top-level mapping, the line of every key path, and the typed recipe it builds.

Every message names the file and line (or the `--set key=value` a value came from).
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, Optional

from .config import ConfigError, Source, build


def read_yaml_mapping(path: Any, what: str = "recipe") -> tuple[dict[str, Any], Source]:
    """A YAML file's top-level mapping and the line of every key path in it; bad YAML is named by line."""
    import yaml

    text = read_text_file(path, what)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML{yaml_error_place(error)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what} keys, got {type(data).__name__}")
    lines: dict[str, int] = {}
    key_lines(node, "", lines)
    return data, Source(str(path), lines)


def read_text_file(path: Any, what: str = "config") -> str:
    """A config file's text; a missing or undecodable file is a ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None


def yaml_error_place(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    return f" (line {mark.line + 1}, column {mark.column + 1}: {problem})" if mark is not None else f" ({problem})"


def key_lines(node: Any, prefix: str, lines: dict[str, int]) -> None:
    for key_node, value_node in getattr(node, "value", ()) if node is not None and node.id == "mapping" else ():
        path = f"{prefix}{key_node.value}"
        lines[path] = key_node.start_mark.line + 1
        key_lines(value_node, f"{path}.", lines)


def recipe_from_yaml(cls: type, path: Any, overrides: Optional[Mapping[str, Any]] = None,
                     override_text: Optional[Mapping[str, str]] = None) -> Any:
    """`cls` from a YAML file's top-level mapping with `overrides` on top; each value checked, each message
    naming the file and line (or the `--set key=value` it came from)."""
    data, source = read_yaml_mapping(path)
    overrides = dict(overrides or {})
    texts = {key: (override_text or {}).get(key, f"{key}={value!r}") for key, value in overrides.items()}
    # `--set steps=2` on a file whose steps sit in a block: the override changes that block's key.
    for old, new in getattr(cls, "moved_keys", {}).items():
        block, _, key = new.rpartition(".")
        if old in overrides and block and isinstance(data.get(block), Mapping):
            data[block] = {**data[block], key: overrides.pop(old)}
            texts[new] = texts.pop(old)
    for dotted in [key for key in overrides if "." in key]:  # `--set training.steps=200`: one key inside a block
        data = with_block_key(cls, data, dotted.split("."), overrides.pop(dotted), texts[dotted])
    return build(cls, {**data, **overrides}, dataclasses.replace(source, overrides=texts))


def with_block_key(cls: Any, data: Mapping[str, Any], path: list[str], value: Any, text: str) -> dict[str, Any]:
    """`data` with `path` set to `value`, the blocks on the way kept (taken from the recipe's defaults when the file
    has none), so one `--set` changes one key and never resets the rest of its block."""
    head, rest = path[0], path[1:]
    if not rest:
        return {**data, head: value}
    field = {f.name: f for f in dataclasses.fields(cls)}.get(head) if dataclasses.is_dataclass(cls) else None
    block = data.get(head)
    if block is None and field is not None and callable(field.default_factory):
        default = field.default_factory()
        block = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        flat = {new.partition(".")[2] for old, new in getattr(cls, "moved_keys", {}).items() if old in data}
        block = {key: item for key, item in block.items() if key not in flat} if isinstance(block, Mapping) else block
    elif block is None and field is not None and field.default is not dataclasses.MISSING:
        block = field.default
    if block is None:
        block = {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"--set {text}: {head!r} is not a block of keys (it holds {block!r}); set it whole")
    inner = typing.get_type_hints(cls).get(head) if field is not None else None
    return {**data, head: with_block_key(inner, block, rest, value, text)}
