"""Atomic file writes: a reader never sees half a file, and a crash never leaves one behind.

Everything polypeft writes (configs, weights, checkpoints, results) goes through these.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` then move the result over `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, ensure_ascii=False)
            handle.write("\n")

    return atomic_write(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write)


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None
) -> Path:
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write(path, lambda temporary: save_file(contiguous, temporary, metadata=metadata))


def write_torch(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


def write_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> Path:
    """A whole model's weights; tied tensors (shared embeddings) are stored once."""
    from safetensors.torch import save_model

    return atomic_write(path, lambda temporary: save_model(model, temporary))


def append_line(path: str | os.PathLike, line: str) -> Path:
    """Append one line and push it to the disk (flush + fsync): a log a crash can at worst leave with a torn
    last line, never with lines lost that were reported written."""
    path = Path(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path
