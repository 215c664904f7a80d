"""Tied weights (BART's shared embeddings, Gemma's lm_head) appear once in a PolyModel's state_dict, so a
plain `transformers.Trainer` can write it with safetensors; a load fills the alias back from its twin."""
from __future__ import annotations

import itertools

from torch import nn


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """Each name whose tensor an earlier name already holds, mapped to that earlier name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = itertools.chain(module.named_parameters(remove_duplicate=False),
                            module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _drop_aliases(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for alias, twin in tied_aliases(module).items():
        if prefix + twin in state_dict:
            state_dict.pop(prefix + alias, None)


def _fill_aliases(module: nn.Module, state_dict: dict, prefix: str, *unused) -> None:
    for alias, twin in tied_aliases(module).items():
        if prefix + alias not in state_dict and prefix + twin in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + twin]


def drop_tied_aliases_on_save(module: nn.Module) -> None:
    """state_dict() keeps the first name of each tied tensor; load_state_dict() (strict too) accepts that."""
    module.register_state_dict_post_hook(_drop_aliases)
    module.register_load_state_dict_pre_hook(_fill_aliases)
