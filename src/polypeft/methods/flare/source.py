"""Where FLARE's source representation for each adapted linear comes from, and how it is captured.

The base model's own English pass (forward pre-hooks, `i + offset` blocks ahead) or an MT encoder.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from ...core.anatomy import BlockPosition, block_of


class SourceError(ValueError):
    """A source representation that cannot be found, captured or shaped for a target layer."""


def block_position(model: nn.Module, name: str) -> Optional[BlockPosition]:
    """The block holding `name` (its stack, index and path inside the block), from the anatomy table;
    None for modules outside any block stack (heads, poolers)."""
    return block_of(name, model)


def source_module_name(model: nn.Module, target_name: str, offset: int) -> str:
    """The module whose input is the source for `target_name`: same place, block `i + offset`.

    The block index is clipped into the stack, so with offset 1 the last block reads itself;
    a module outside any block stack reads its own input.
    """
    position = block_position(model, target_name)
    if position is None:
        return target_name
    index = min(max(position.index + offset, 0), position.count - 1)
    name = position.name_at(index)
    try:
        model.get_submodule(name)
    except AttributeError:
        raise SourceError(
            f"source layer for {target_name!r} at offset {offset} would be {name!r}, which this model "
            "does not have (its blocks differ); use source_layer_offset=0"
        ) from None
    return name


class SourceCapture:
    """Records the first positional input of named modules during one forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = sorted(set(names))
        self.captured: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        self.captured = {}
        handles = []
        try:
            for name in self.names:
                module = self.model.get_submodule(name)
                handles.append(module.register_forward_pre_hook(self._hook_for(name)))
            yield self.captured
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in self.names if n not in self.captured]
        if missing:
            raise SourceError(
                f"the source pass never ran {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                "the source batch must run the same modules as the target batch"
            )

    def _hook_for(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            self.captured[name] = args[0]
        return record


class MTSourceProjection(nn.Module):
    """Maps MT-encoder states into each adapted linear's input width (one learned map per width).

    For the usual targets every adapted linear reads the hidden size, so this is one linear; a
    target such as BERT's `output.dense` (input = FFN width) gets its own map.
    """

    def __init__(self, mt_hidden_size: int, input_widths: Iterable[int]):
        super().__init__()
        self.maps = nn.ModuleDict({f"to_{w}": nn.Linear(mt_hidden_size, w) for w in sorted(set(input_widths))})

    def forward(self, encoder_states: torch.Tensor, width: int) -> torch.Tensor:
        key = f"to_{width}"
        if key not in self.maps:
            raise SourceError(f"no MT projection to width {width}; this projection maps to {sorted(self.maps)}")
        return self.maps[key](encoder_states)


def encoder_hidden_size(encoder: nn.Module) -> int:
    """The output width of an HF encoder (d_model for BART/Marian/T5, hidden_size for BERT-likes)."""
    config = getattr(encoder, "config", None)
    for attribute in ("d_model", "hidden_size"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    raise SourceError(
        f"cannot tell the output width of MT encoder {type(encoder).__name__}: its config has neither "
        "d_model nor hidden_size; pass FLAREConfig(mt_hidden_size=...)"
    )
