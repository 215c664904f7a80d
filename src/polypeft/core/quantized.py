"""Folding a route into a bitsandbytes 8-bit or 4-bit weight: dequantize, add, quantize again, as peft does.

The packed original is kept, so unmerge puts back the exact weight instead of rounding a second time.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

QUANTIZED_KINDS = {"Int8Params": "8-bit", "Params4bit": "4-bit"}


def quantization_of(weight: torch.Tensor) -> str | None:
    """'8-bit' or '4-bit' for a bitsandbytes weight, None for a plain tensor (floating or not)."""
    return QUANTIZED_KINDS.get(type(weight).__name__)


def dequantized(base_layer: nn.Module) -> torch.Tensor:
    """The layer's weight as float32 (out, in), the way bitsandbytes computes with it."""
    import bitsandbytes as bnb

    weight = base_layer.weight
    if quantization_of(weight) == "4-bit":
        return bnb.functional.dequantize_4bit(*standard_4bit_layout(weight)).float()
    scales = weight.SCB if getattr(base_layer.state, "SCB", None) is None else base_layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()


def standard_4bit_layout(weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    """The 4-bit weight's codes and state as `dequantize_4bit` reads them. On a CPU with AVX-512 BF16, bitsandbytes
    repacks a 4-bit weight in place at its first inference forward, into a layout `dequantize_4bit` misreads."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # The repacking keeps the scales transposed, in bfloat16, as the packed layer computes with them; bitsandbytes'
    # inverse leaves them so, or quantizes them a second time (double quantization). Take them as the layer uses them.
    scales = state.absmax.T.reshape(-1).float() if state.absmax.dim() == 2 else state.absmax.float()
    codes, state = _convert_weight_packed_for_cpu_inverse(weight.data, copy.deepcopy(state))  # it edits the state
    state.absmax, state.nested, state.offset, state.state2 = scales, False, None, None
    return codes, state


def standard_4bit_layouts(model: nn.Module) -> nn.Module:
    """Every 4-bit weight bitsandbytes repacked for CPU inference put back in its standard layout, before a
    `state_dict()`: bitsandbytes' own save undoes the repacking in part, in place, and later forwards misread it."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if quantization_of(weight) == "4-bit" and getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = standard_4bit_layout(weight)
    return model


def quantized_like(base_layer: nn.Module, values: torch.Tensor) -> nn.Parameter:
    """`values` (float, (out, in)) quantized the way the layer's weight is: same class, block size and type."""
    import bitsandbytes as bnb

    weight = base_layer.weight
    if quantization_of(weight) == "4-bit":
        options = {key: value for key, value in weight.__dict__.items()
                   if not key.startswith("_") and key not in ("data", "quant_state", "bnb_quantized")}
        options.update(requires_grad=False, bnb_quantized=False)
        return bnb.nn.Params4bit(values.to("cpu"), **options).to(weight.device)
    return bnb.nn.Int8Params(values.to("cpu"), requires_grad=False,
                             has_fp16_weights=weight.has_fp16_weights).to(weight.device)


def fold_into_quantized(base_layer: nn.Module, delta: torch.Tensor) -> tuple:
    """Put `W + delta` (W dequantized) in the layer as a new quantized weight; returns what `restore_quantized`
    needs to put the original back (the packed weight, and for 8-bit the scales the layer's state holds)."""
    original = base_layer.weight
    state = getattr(base_layer, "state", None)
    saved = (original, getattr(state, "CB", None), getattr(state, "SCB", None))
    base_layer.weight = quantized_like(base_layer, dequantized(base_layer) + delta.float().to(original.device))
    if state is not None:
        state.reset_grads()  # the new weight's own scales move into the state on its first forward
    return saved


def restore_quantized(base_layer: nn.Module, saved: tuple) -> None:
    """Put back what `fold_into_quantized` replaced: exact, no second rounding."""
    base_layer.weight, codes, scales = saved
    state = getattr(base_layer, "state", None)
    if state is not None:
        state.reset_grads()
        state.CB, state.SCB = codes, scales
