"""The one recipe mechanism of every `polypeft` command: read the YAML file, apply `--set`, check it all.

It also turns a user error into the one-line message the command prints (exit 2), before any data is read.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

from ..core.config import ConfigError, as_error_type
from ..core.yaml_files import recipe_from_yaml, yaml_error_place

Recipe = TypeVar("Recipe")


def parse_overrides(pairs: Optional[Sequence[str]]) -> tuple[dict[str, Any], dict[str, str]]:
    """`key=value` strings, values read as YAML (numbers, lists, mappings): (values, each pair's text)."""
    import yaml

    values: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {pair}: the value is not valid YAML{yaml_error_place(error)}") from None
        texts[key] = pair
    return values, texts


def add_recipe_arguments(parser: argparse.ArgumentParser, help_text: str = "YAML recipe (see configs/)") -> None:
    parser.add_argument("config", help=help_text)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys")


def load_recipe(cls: type[Recipe], path: str, pairs: Optional[Sequence[str]] = None,
                extra: Optional[dict[str, Any]] = None, error_type: Optional[type] = None) -> Recipe:
    """The recipe `cls` from YAML file `path` with `--set` pairs (and `extra` command-line values) on top,
    every key and type checked; a recipe with `check_paths()` has its files and folders checked too."""
    values, texts = parse_overrides(pairs)
    for key, value in (extra or {}).items():
        values[key], texts[key] = value, f"{key}={value!r} (command line)"
    try:
        recipe = recipe_from_yaml(cls, path, values, texts)
        if hasattr(recipe, "check_paths"):
            recipe.check_paths()
        if hasattr(recipe, "output_paths"):
            inputs = {"the recipe": path, **(recipe.input_paths() if hasattr(recipe, "input_paths") else {})}
            check_outputs_apart(inputs, recipe.output_paths())
    except ConfigError as error:
        raise as_error_type(error, error_type or ConfigError) from None
    return recipe


def check_outputs_apart(inputs: Mapping[str, Any], outputs: Mapping[str, tuple[Any, str]]) -> None:
    """Refuse, before any work, an output that would destroy an input: the same file (links followed), a place
    inside an input folder, or an output folder that holds an input (its files are written or cleared).
    `inputs` maps a label to a path; `outputs` a label to (path, "file" or "folder")."""
    for out_label, (out_path, kind) in outputs.items():
        written = Path(out_path).resolve()
        for in_label, in_path in inputs.items():
            if in_path is None or not os.path.exists(in_path):
                continue
            read = Path(in_path).resolve()
            if written == read:
                problem = "is the same file or folder as"
            elif read.is_dir() and read in written.parents:
                problem = "lies inside the input folder"
            elif kind == "folder" and written in read.parents:
                problem = "is a folder holding the input"
            else:
                continue
            raise ConfigError(f"{out_label}={str(out_path)!r} {problem} {in_label}={str(in_path)!r}: the command "
                              "would write over its own input; choose an output elsewhere")


def check_input_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        problem = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"{what}: {path!r} {problem}; give a readable file")


def check_output_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output folder that is a file or lies below one."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                below = "" if folder == Path(path) else f" (it lies below {str(folder)!r})"
                raise ConfigError(f"{what}={str(path)!r} cannot be a folder: {str(folder)!r} is a file{below}")
            return


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse a missing or corrupt safetensors file by name before anything is loaded from it."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as error:  # safetensors raises its own error type for every kind of corruption
        raise ConfigError(f"{path}: not a readable safetensors file ({error})") from None


def user_error_message(error: BaseException) -> Optional[str]:
    """The message for an error a user caused (bad value, file, folder), or None for a bug."""
    if isinstance(error, ValueError):  # ConfigError and every other polypeft error are ValueErrors
        return str(error)
    if isinstance(error, OSError):
        names = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{names}: {error.strerror or error}" if names else str(error)
    if type(error).__name__ in ("YAMLError", "SafetensorError") or type(error).__module__.startswith("yaml"):
        return f"{type(error).__name__}: {error}"
    return None
