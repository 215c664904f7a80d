"""Finding the linear layers a method targets, swapping them for wrapped layers, and back.

Targets are given PEFT's way: a list of names matched as dotted suffixes, or one regex string
matched against the whole qualified name.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence, Union

from torch import nn

TargetSpec = Union[str, Sequence[str], None]

# The FFN linears of BERT/XLM-R, BART/Marian, T5 (plain and gated) and Llama/Qwen-style models.
# `output.dense` is the BERT FFN's second linear; `attention.output.dense` is not an FFN.
DEFAULT_FFN_TARGETS = (
    r".*(\.fc1|\.fc2|\.intermediate\.dense|(?<!attention)\.output\.dense"
    r"|\.mlp\.(gate_proj|up_proj|down_proj)|\.DenseReluDense\.(wi|wi_0|wi_1|wo))"
)


class TargetError(ValueError):
    """A target specification that matches nothing, or matches something that cannot be wrapped."""


def name_matches(name: str, targets: TargetSpec) -> bool:
    """True when a qualified module name is selected by `targets` (regex string or suffix list)."""
    if targets is None:
        targets = DEFAULT_FFN_TARGETS
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: TargetSpec) -> list[tuple[str, nn.Linear]]:
    """All `nn.Linear` modules selected by `targets`, in module order; an error if there are none."""
    found, skipped = [], []
    for name, module in model.named_modules():
        if not name or not name_matches(name, targets):
            continue
        if isinstance(module, nn.Linear):
            found.append((name, module))
        else:
            skipped.append(f"{name} ({type(module).__name__})")
    if not found:
        shown = DEFAULT_FFN_TARGETS if targets is None else targets
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
        extra = f"; matched but not nn.Linear: {', '.join(skipped[:5])}" if skipped else ""
        raise TargetError(
            f"target_modules={shown!r} matches no nn.Linear in {type(model).__name__}{extra}. "
            f"Linear layers here include: {hint or 'none'}"
        )
    return found


def is_encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))


def is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return any("CausalLM" in a for a in architectures) or bool(getattr(config, "is_decoder", False))


def side_of(model: nn.Module, name: str) -> str:
    """'encoder' or 'decoder': which language a language-wise layer reads (src or tgt)."""
    if is_encoder_decoder(model):
        return "decoder" if "decoder" in name.split(".") else "encoder"
    return "decoder" if is_causal_lm(model) else "encoder"


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_targets(
    model: nn.Module, targets: TargetSpec, build: Callable[[str, nn.Linear], nn.Module]
) -> dict[str, nn.Module]:
    """Replace each target linear by `build(name, linear)`; returns the new modules by name."""
    wrapped = {}
    for name, linear in find_targets(model, targets):
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
