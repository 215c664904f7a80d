"""How a torch module runs for the length of a block: eval mode without gradients, then as before.

Shared by the frozen passes (FLARE's English source, LRP2/LENS statistics) so none of them sees dropout.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad for the block, then every submodule's own training flag again."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training
