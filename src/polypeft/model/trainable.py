"""What of the base model trains beside the routes: nothing by default (a frozen base, as in peft), plus the
modules a user names in `modules_to_save` (task heads), which are trained and saved with the routes."""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..core.anatomy import TASK_HEADS
from ..core.config import ConfigError

TASK_MODEL_MARKERS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                      "ForMultipleChoice")


def matches(module_name: str, wanted: str) -> bool:
    """peft's rule: the whole name, or its last parts (`classifier` matches `bert.classifier`)."""
    return module_name == wanted or module_name.endswith("." + wanted)


def resolve_modules_to_save(base_model: nn.Module, wanted: Optional[Sequence[str]],
                            routed_names: Iterable[str]) -> dict[str, nn.Module]:
    """The modules `wanted` names, by full name; a name that matches nothing, or a module that holds routed
    layers (their added weights are saved already), is refused by name."""
    if not wanted:
        return {}
    routed = list(routed_names)
    modules = dict(base_model.named_modules())
    found: dict[str, nn.Module] = {}
    for entry in wanted:
        hits = [name for name in modules if name and matches(name, entry)]
        outermost = [name for name in hits if not any(name.startswith(other + ".") for other in hits)]
        if not outermost:
            children = sorted(name for name, _ in base_model.named_children())
            raise ConfigError(f"modules_to_save: no module of this {type(base_model).__name__} is named {entry!r}; "
                              f"its top-level modules are {children}")
        for name in outermost:
            inside = [layer for layer in routed
                      if layer == name or layer.startswith(name + ".") or name.startswith(layer + ".")]
            if inside:
                raise ConfigError(f"modules_to_save: {name!r} holds or sits in routed layers ({inside[:3]}); name a "
                                  "module outside target_modules")
            found[name] = modules[name]
    return found


def freeze_all_but(base_model: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
    """Freeze every parameter of the base model except `trainable` (the routes and saved modules)."""
    keep = {id(parameter) for parameter in trainable}
    for parameter in base_model.parameters():
        parameter.requires_grad_(id(parameter) in keep)


def warn_if_head_frozen(base_model: nn.Module, saved: dict[str, nn.Module]) -> None:
    """A frozen base freezes a task model's new head too: say which module to list in modules_to_save."""
    if not any(marker in type(base_model).__name__ for marker in TASK_MODEL_MARKERS):
        return
    heads = [name for name, _ in base_model.named_modules()
             if name.rsplit(".", 1)[-1] in TASK_HEADS and not any(matches(name, s) or name.startswith(s + ".")
                                                                       for s in saved)]
    if heads:
        warnings.warn(
            f"the base model's task head {heads[0]!r} is frozen with the base (freeze_base=True): pass "
            f"modules_to_save=[{heads[0].rsplit('.', 1)[-1]!r}] to train and save it", stacklevel=3)


def saved_module_tensors(saved: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the saved modules under their full names (live tensors, for copy_ on load)."""
    return {f"{name}.{key}": tensor for name, module in saved.items()
            for key, tensor in module.state_dict(keep_vars=True).items()}
