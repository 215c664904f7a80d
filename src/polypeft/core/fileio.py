"""Atomic file writes: a reader never sees half a file, and a killed writer's leftovers are cleaned up.

Everything polypeft writes (configs, weights, checkpoints, results) goes through these; so do path names.
Saved tensors are copied back into a model's own through `copy_matching`, which checks every name and shape.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file

from .config import ConfigError
from .finite import check_finite


class PathNameError(ValueError):
    """A name that becomes part of a path (a run name, a split) but is not one plain file or folder name."""


CACHE_ENV = "POLYPEFT_CACHE"


def cache_root() -> Path:
    """Where polypeft caches what it builds once (converted e5 weights, tokenizers): `$POLYPEFT_CACHE`, else
    `~/.cache/polypeft`. The one place that reads the variable."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "polypeft")

def single_path_component(value: Any, field: str, where: str = "recipe") -> str:
    """`value` if it names one file or folder inside its parent; anything that could leave it is refused."""
    if (not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0")
            or os.path.isabs(value) or any(unicodedata.category(c) == "Cc" for c in value)):
        raise PathNameError(
            f"{where}: {field}={value!r} must be a single file or folder name (it becomes part of a path): not empty, "
            "not '.' or '..', no '/' or '\\', no control characters such as a newline, not absolute; e.g. 'lms-pair'"
        )
    return value


def temporary_prefix(name: str) -> str:
    """The prefix of a writer's temporary files: hidden, and with the writer's pid, so a later start can
    tell a live writer's file from a killed one's (see `remove_stale_temporaries`)."""
    return f".{name}.{os.getpid()}."


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (changing it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no way to read it without setting it elsewhere: put it straight back
    os.umask(mask)
    return mask


def creation_mode() -> int:
    """The mode `open()` gives a new file under the current umask (mkstemp's files are 0600 whatever it is)."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(temporary_path)` then move the result over `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, creation_mode())
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
    """`tensors` in one safetensors file, written atomically; a NaN or inf among them is refused by name."""
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    check_finite(contiguous, f"{path} not written")
    return atomic_write(path, lambda temporary: save_file(contiguous, temporary, metadata=metadata))


def write_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> Path:
    """A whole model's weights; tied tensors (shared embeddings) are stored once; non-finite ones are refused."""
    from safetensors.torch import save_model

    from .quantized import standard_4bit_layouts

    check_finite(standard_4bit_layouts(model).state_dict(), f"{path} not written")
    return atomic_write(path, lambda temporary: save_model(model, temporary))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# What atomic_write leaves when its process is killed between mkstemp and the rename.
ATOMIC_TEMPORARIES = (".*.tmp",)
_WRITER_PID = re.compile(r"[.-](\d+)\.[A-Za-z0-9_]+(?:\.tmp)?$")


def process_start_time() -> float:
    """When this process started (epoch seconds); where /proc is missing, when this module was imported."""
    try:
        with open("/proc/self/stat", encoding="ascii") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def is_stale(entry: Path, started: float) -> bool:
    """A leftover no one is writing: its writer's pid (in its name) is dead, or it names no other process and is
    older than this one (a file of this process's own pid and newer than it may be another thread's)."""
    found = _WRITER_PID.search(entry.name)
    pid = int(found.group(1)) if found else None
    if pid is None or pid == os.getpid():
        return entry.lstat().st_mtime < started
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or a number no pid can be
        return True
    except OSError:  # alive, but another user's
        return False
    return False


def is_temporary(name: str, patterns: Iterable[str] = ATOMIC_TEMPORARIES) -> bool:
    """Whether a file name is a writer's temporary (by default atomic_write's), not a finished file."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def remove_stale_temporaries(directory: str | os.PathLike, patterns: Iterable[str] = ATOMIC_TEMPORARIES) -> list[Path]:
    """Delete entries of `directory` matching `patterns` that a killed writer left (see `is_stale`); a live
    writer's are kept. Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    started, removed = process_start_time(), []
    patterns = tuple(patterns)
    for entry in directory.iterdir():
        if not is_temporary(entry.name, patterns):
            continue
        try:
            stale = is_stale(entry, started)
            if stale and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif stale:
                entry.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it first
        if stale:
            removed.append(entry)
    return removed


def append_line(path: str | os.PathLike, line: str) -> Path:
    """Append one line and push it to the disk (flush + fsync): a log a crash can at worst leave with a torn
    last line, never with lines lost that were reported written."""
    path = Path(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return path


def copy_matching(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str,
                  error: type[Exception] = ConfigError) -> None:
    """Copy saved tensors into a model's own (`expected`): names, shapes and kinds (integer or floating point)
    must match and every value be finite, else `error` names `where` and what differs."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise error(f"{where}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for key, parameter in expected.items():
        if parameter.shape != tensors[key].shape:
            raise error(f"{where}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                        f"{tuple(parameter.shape)}")
        if parameter.is_floating_point() != tensors[key].is_floating_point():
            raise error(f"{where}: {key} is stored as {tensors[key].dtype}, the model's is {parameter.dtype}; a "
                        "weight is never cast between integer and floating point: the file was not written by "
                        "polypeft for this model")
    check_finite(tensors, f"{where}: refused")
    with torch.no_grad():
        for key, parameter in expected.items():
            parameter.copy_(tensors[key].to(parameter.dtype))
