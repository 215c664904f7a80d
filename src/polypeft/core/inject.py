"""Finding the linear layers a method targets, swapping them for wrapped layers, and back.

Targets are given PEFT's way (dotted suffixes or one regex); None asks the anatomy table for the FFNs.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

from .anatomy import fused_expert_parameters, is_fused_experts, targets_for
from .routed import LinearProxy  # polypeft's own layers hold 3-D route tables, yet are no fused experts

TargetSpec = Union[str, Sequence[str], None]


class TargetError(ValueError):
    """A target specification that matches nothing, or matches something that cannot be wrapped."""


def name_matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    """True when a qualified module name is selected by `targets` (regex string or suffix list)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(
    model: nn.Module, targets: TargetSpec, accept_conv1d: bool = False, by_default: str = "ffn"
) -> list[tuple[str, nn.Linear]]:
    """All `nn.Linear` modules selected by `targets` (None: the anatomy table's `by_default` linears, the FFNs
    or the sublayer outputs), in module order; with `accept_conv1d`, transformers' Conv1D too (GPT-2)."""

    if targets is None:
        targets = targets_for(model, by_default)
    found, skipped = [], []
    for name, module in model.named_modules():
        if not name or not name_matches(name, targets):
            continue
        if isinstance(module, nn.Linear) or (accept_conv1d and isinstance(module, Conv1D)):
            found.append((name, module))
        elif is_weight_leaf(module) or (is_fused_experts(module) and not isinstance(module, LinearProxy)):
            raise TargetError(not_linear_message(name, module, targets))
        else:
            skipped.append(f"{name} ({type(module).__name__})")
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        extra = f"; matched but not nn.Linear: {', '.join(skipped[:5])}" if skipped else ""
        fused = [n for n, m in model.named_modules() if is_fused_experts(m)]
        if fused:  # Mixtral-style FFNs: no linear to find, so say where the FFN weights are
            extra += f"; its MoE FFN weights are fused 3-D expert stacks ({', '.join(fused[:3])}), which cannot be wrapped"
        raise TargetError(
            f"target_modules={targets!r} matches no nn.Linear in {type(model).__name__}{extra}. "
            f"Linear layers here include: {hint or 'none'}"
        )
    return found


def is_weight_leaf(module: nn.Module) -> bool:
    """A module with its own weight and no children: a layer a target names to be wrapped."""
    return next(module.children(), None) is None and getattr(module, "weight", None) is not None


def not_linear_message(name: str, module: nn.Module, targets: TargetSpec) -> str:
    kind = type(module).__name__
    if kind == "Conv1D":
        why = ("transformers' Conv1D (GPT-2, mGPT) stores its weight transposed, as (in, out), and this method wraps "
               "nn.Linear (out, in) only (methods whose config has handles_conv1d=True, the low-rank ones, wrap Conv1D)")
    elif is_fused_experts(module):
        why = ("it holds every MoE expert's weights stacked in 3-D parameters "
               f"({', '.join(fused_expert_parameters(module))}), not one linear per expert; polypeft's routed layers "
               "wrap 2-D linears only, so target the attention or shared-expert linears instead")
    else:
        why = "polypeft's routed layers wrap nn.Linear only"
    return (
        f"target_modules={targets!r} selects {name} ({kind}), which cannot be wrapped: {why}; "
        f"choose target_modules that select nn.Linear layers only"
    )


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_targets(
    model: nn.Module, targets: TargetSpec, build: Callable[[str, nn.Linear], nn.Module], accept_conv1d: bool = False,
    by_default: str = "ffn",
) -> dict[str, nn.Module]:
    """Replace each target linear by `build(name, linear)`; returns the new modules by name. An error if there
    are none, or if a selected leaf holding a weight (or fused expert stack) is not a linear."""
    wrapped = {}
    for name, linear in find_targets(model, targets, accept_conv1d, by_default):
        parent, child = get_parent(model, name)
        new = build(name, linear)
        setattr(parent, child, new)
        wrapped[name] = new
    return wrapped


def restore_base_layers(model: nn.Module, wrapped: dict[str, nn.Module]) -> None:
    """Put each wrapped layer's `base_layer` back where the wrapper stands."""
    for name, layer in wrapped.items():
        parent, child = get_parent(model, name)
        setattr(parent, child, layer.base_layer)
