"""Hugging Face Hub ids for polypeft saves: download a save by repo id, push one without base weights.

A local folder always wins over a Hub id of the same spelling; downloads go through huggingface_hub.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from ..core.config import ConfigError
from ..core.hub_files import hub_errors, is_repo_id
from ..core.json_files import read_json_file
from ..core.method_config import MethodConfig
from ..methods.registry import config_from_dict, load_config_file
from .routed_model import RoutedModel
from .savefiles import CONFIG_NAME, SAVE_FILES, TRAINER_WEIGHTS_NAME, write_save


def resolve_save(name_or_path: str | Path, revision: Optional[str] = None, **download_options: Any) -> Path:
    """A local save folder as is, or the folder of a Hub repo's save files after download (or from cache)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if not is_repo_id(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} is neither a save folder nor a Hub repo id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        files = [*SAVE_FILES, TRAINER_WEIGHTS_NAME]  # a plain Trainer's checkpoint too (loaded with config=)
        folder = snapshot_download(str(name_or_path), revision=revision, allow_patterns=files, **download_options)
    except hub_errors() as error:
        raise FileNotFoundError(
            f"no polypeft save at {name_or_path!r} (revision {revision or 'main'}): not a local folder, and the "
            f"Hub gave {type(error).__name__}: {error}"
        ) from None
    return Path(folder)


def read_save_config(directory: Path, need_base: bool = True) -> dict[str, Any]:
    """The saved polypeft_config.json, with its keys checked; `need_base` False also takes a config saved alone
    (`config.save_pretrained`), which has no base_model record."""
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {directory} a polypeft save directory?")
    saved = read_json_file(config_path)
    expected = "a JSON object with keys config (the method config), base_model and polypeft_version"
    if not isinstance(saved, dict):
        raise ConfigError(f"{config_path}: expected {expected}, got {type(saved).__name__} {saved!r}")
    unknown = sorted(set(saved) - {"polypeft_version", "config", "base_model"})
    if unknown:
        raise ConfigError(f"{config_path}: unknown keys {unknown}; allowed: config, base_model, polypeft_version")
    if need_base and isinstance(saved.get("config"), dict) and "base_model" not in saved:
        raise ConfigError(f"{config_path} holds a config alone (config.save_pretrained), no routes to load: wrap a "
                          f"base with it, pp.wrap(base_model, pp.load_config({str(directory)!r})), and train")
    for key in ("config", "base_model") if need_base or "base_model" in saved else ("config",):
        if not isinstance(saved.get(key), dict):
            raise ConfigError(f"{config_path}: '{key}' holds {saved.get(key)!r}; expected a JSON object there "
                              f"(the file holds {expected})")
    return saved


def load_config(name_or_path: str | Path, revision: Optional[str] = None, **download_options: Any) -> MethodConfig:
    """The method config of a save folder, a Hub repo id, or a config JSON file."""
    path = Path(name_or_path)
    if path.is_file():
        if path.name == CONFIG_NAME:
            return config_from_dict(read_save_config(path.parent, need_base=False)["config"], where=str(path))
        return load_config_file(str(path))
    directory = resolve_save(name_or_path, revision, **download_options)
    return config_from_dict(read_save_config(directory, need_base=False)["config"], where=str(directory / CONFIG_NAME))


def push_to_hub(
    poly: RoutedModel,
    repo_id: str,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    commit_message: str = "Upload polypeft routes",
    results: Optional[dict[str, Any]] = None,
) -> Any:
    """Upload the adapter files and the model card only (never the base weights); returns the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        write_save(poly, Path(folder), results)
        files = sorted(p.name for p in Path(folder).iterdir() if p.name in SAVE_FILES)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message, allow_patterns=files)
