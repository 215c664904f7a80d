"""Finiteness of tensors: a NaN or inf weight is refused by name wherever weights are written or read.

One NaN in a route turns every output of that route NaN; keeping it in a file spreads it to every later load.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch


class NonFiniteError(ValueError):
    """A loss, gradient or weight that is NaN or infinite, where polypeft keeps only finite numbers."""


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating tensor holding a NaN or an inf, with how many; None when all are finite.
    Sharded (DTensor) weights are left to the write of their gathered copy: counting them here is a collective."""
    from torch.distributed.tensor import DTensor

    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            continue
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                return f"{name} ({bad} of {tensor.numel()} values NaN or inf)"
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse `tensors` if any is non-finite; `what` says where they were going or came from."""
    found = first_non_finite(tensors)
    if found is not None:
        raise NonFiniteError(f"{what}: tensor {found}; polypeft keeps only finite weights (a NaN spreads to every "
                             "output of its route): find the step or file where it first appeared")
