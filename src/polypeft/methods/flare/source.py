"""FLARE's source pass: each adapted linear's source state, from the frozen English pass or an MT encoder.

The English pass runs the base model with every routed layer bypassed; forward pre-hooks take each linear's
input `offset` blocks ahead (from the anatomy table). The target pass that follows reads them per layer.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from ...core.anatomy import BlockPosition, block_of, is_encoder_decoder
from ...core.modes import evaluation_mode
from .fusion import FusionSource
from .layer import FLAREError

# Keys a source batch may carry for training that its frozen pass must not see.
LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")


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
        raise FLAREError(
            f"source layer for {target_name!r} at offset {offset} would be {name!r}, which this model "
            "does not have (its blocks differ); use source_layer_offset=0"
        ) from None
    return name


class SourceCapture:
    """Records the first positional input of named modules during one forward pass of this thread."""

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.model = model
        self.names = sorted(set(names))
        self.captured: dict[str, torch.Tensor] = {}
        self.thread = threading.get_ident()

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
            raise FLAREError(
                f"the source pass never ran {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                "the source batch must run the same modules as the target batch"
            )

    def _hook_for(self, name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if threading.get_ident() == self.thread:  # another thread's forward is not this pass
                self.captured[name] = args[0]
        return record


def rows_of(batch: Mapping[str, Any], what: str) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise FLAREError(f"{what} has no input_ids, inputs_embeds or attention_mask tensor; keys: {sorted(batch)}")


def source_states(poly: nn.Module, source_batch: Mapping[str, Any],
                  target_batch: Mapping[str, Any]) -> dict[str, FusionSource]:
    """Each FLARE layer's source for the target pass (the registered source pass of the "flare" method)."""
    config = poly.poly_config
    if config.fusion is None:
        raise FLAREError("this model is plain LoRA (FLAREConfig.fusion=None); call it without source_batch")
    source_rows, target_rows = rows_of(source_batch, "source_batch"), rows_of(target_batch, "target batch")
    if source_rows != target_rows:
        raise FLAREError(
            f"source_batch has {source_rows} rows but the target batch has {target_rows}; FLARE pairs each "
            "target example with its English parallel example, so both batches need the same size"
        )
    hidden = encoder_sources(poly, source_batch) if config.source == "mt_encoder" else model_sources(poly, source_batch)
    # An encoder-decoder's decoder layers align decoder positions: their masks are the decoder's.
    two_stacks = is_encoder_decoder(poly.base_model)

    def mask(batch: Mapping[str, Any], side: str) -> Optional[torch.Tensor]:
        return batch.get("decoder_attention_mask" if two_stacks and side == "decoder" else "attention_mask")

    return {name: FusionSource(hidden[name], mask(source_batch, layer.side), mask(target_batch, layer.side))
            for name, layer in poly.routed_layers.items()}


def model_sources(poly: nn.Module, source_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The frozen English pass: no gradients, no dropout, every routed layer bypassed (so the same every time)."""
    base_model, offset = poly.base_model, poly.poly_config.source_layer_offset
    for name, layer in poly.routed_layers.items():
        if layer.source_name is None:
            layer.source_name = source_module_name(base_model, name, offset)
    names = {name: layer.source_name for name, layer in poly.routed_layers.items()}
    inputs = {k: v for k, v in source_batch.items() if k not in LABEL_KEYS}
    if getattr(getattr(base_model, "config", None), "use_cache", False):
        inputs["use_cache"] = False
    runner = source_runner(base_model, set(names.values()))
    capture = SourceCapture(base_model, names.values())
    with evaluation_mode(runner), poly.route_state.bypass(), capture.recording() as captured:
        runner(**inputs)
    return {name: captured[source] for name, source in names.items()}


def source_runner(base_model: nn.Module, names: set[str]) -> nn.Module:
    """The backbone when it holds every source module (skips the task head), else the whole model."""
    backbone = getattr(base_model, "base_model", base_model)
    inside = {id(m) for m in backbone.modules()}
    return backbone if all(id(base_model.get_submodule(n)) in inside for n in names) else base_model


def encoder_sources(poly: nn.Module, source_batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """FLARE-MT: the frozen MT encoder's states, projected to each adapted linear's input width."""
    encoder = poly.source_encoder
    if encoder is None:
        raise FLAREError("FLAREConfig.source='mt_encoder' needs the MT encoder: pp.wrap(model, config, "
                         "source_encoder=<HF encoder>) or PolyModel.from_pretrained(..., source_encoder=...)")
    inputs = {k: v for k, v in source_batch.items() if k in ("input_ids", "attention_mask", "inputs_embeds")}
    with evaluation_mode(encoder):
        states = encoder(**inputs)[0]
    by_width: dict[int, torch.Tensor] = {}
    for layer in poly.routed_layers.values():
        if layer.in_features not in by_width:
            by_width[layer.in_features] = layer.project_source(states)
    return {name: by_width[layer.in_features] for name, layer in poly.routed_layers.items()}
