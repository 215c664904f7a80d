"""Hub repo ids next to local paths: which a name is, and the errors huggingface_hub raises when a file is not there.

A local path always wins over a Hub id of the same spelling; downloads go through huggingface_hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def hub_errors() -> tuple[type, ...]:
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError, errors.HFValidationError)


def is_repo_id(name_or_path: str) -> bool:
    parts = str(name_or_path).split("/")
    return len(parts) in (1, 2) and all(parts) and not str(name_or_path).startswith((".", "~"))


def local_or_hub_file(name_or_path: Any, file_name: str, revision: Optional[str] = None, **options: Any) -> Path:
    """`file_name` in a local folder, a local file itself, or `file_name` of a Hub repo (downloaded or cached)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path / file_name
    if path.is_file():
        return path
    if not is_repo_id(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} is neither a local folder or file nor a Hub repo id like 'org/name'")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(name_or_path), file_name, revision=revision, **options))
    except hub_errors() as error:
        raise FileNotFoundError(f"no {file_name} at {name_or_path!r} (revision {revision or 'main'}): not a local "
                                f"folder, and the Hub gave {type(error).__name__}: {error}") from None
