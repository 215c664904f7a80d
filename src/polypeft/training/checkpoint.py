"""Training checkpoints as one safetensors file: every tensor in its body, everything else as JSON in its header.

Nothing is unpickled on resume, so a crafted file in a run folder cannot run code; one file is one atomic write.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..core.fileio import write_safetensors

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "polypeft.checkpoint"
# Older polypeft versions pickled checkpoints here; they are never read.
PICKLED_CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch generators' states (CUDA's too where there is one)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the CUDA generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, its tensors and arrays moved to `tensors` under `name`-based keys (tagged in place)."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().clone()  # a copy: tied weights must not share storage in the file
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        tensors[name] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iu" else value.copy())
        return {"__array__": name, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {"__dict__": {key: _encode(item, f"{name}.{key}", tensors) for key, item in value.items()}}
        if all(isinstance(key, int) for key in value):  # the optimiser's per-parameter state
            return {"__int_dict__": {str(key): _encode(item, f"{name}.{key}", tensors) for key, item in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold {type(value).__name__} at {name!r}")


def _decode(value: Any, tensors: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors.get_tensor(value["__tensor__"])
    if "__array__" in value:
        return tensors.get_tensor(value["__array__"]).numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(item, tensors) for item in value["__tuple__"])
    if "__int_dict__" in value:
        return {int(key): _decode(item, tensors) for key, item in value["__int_dict__"].items()}
    return {key: _decode(item, tensors) for key, item in value["__dict__"].items()}


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` (nested dicts, lists, tuples, numbers, strings, tensors, arrays) atomically to `path`."""
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_encode(state, "state", tensors))
    return write_safetensors(path, tensors, metadata={"format": CHECKPOINT_FORMAT, "state": header})


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state `save_checkpoint` wrote; anything else at `path` is refused by name, never unpickled."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as tensors:
            metadata = tensors.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{path} is not a polypeft checkpoint (format {metadata.get('format')!r}, "
                                 f"expected {CHECKPOINT_FORMAT!r})")
            return _decode(json.loads(metadata["state"]), tensors)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{path} is not a readable polypeft checkpoint ({error}); it was torn or written by "
                         "something else: train a new run, or resume from an intact copy") from None
