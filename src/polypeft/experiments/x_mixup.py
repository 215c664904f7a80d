"""X-Mixup (Yang et al. 2022) as a FLARE baseline: in training, the target pass is mixed with the English one.

The model it trains reads the target-language input alone at test time, like LoRA translate-train.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping, Optional

import torch
from torch import nn

from ..core.anatomy import AnatomyError, blocks
from ..core.config import PositiveInt, TypedConfig, UnitInterval
from ..methods.flare.fusion import attend
from ..methods.flare.layer import FLAREError
from ..methods.flare.source import LABEL_KEYS

Batch = Mapping[str, Any]


@dataclass
class XMixupSettings(TypedConfig):
    """`x_mixup:` where the target pass meets the English pass, and how much English is mixed in.

    Attributes:
        layer (int | None): Default None, the middle block: the hidden state after block `layer` (1 to the
            number of blocks) is mixed.
        ratio (float): Default 0.5, the paper's λ0: the share λ of the attended English state, in [0, 1].
    """

    error_type: ClassVar[type] = FLAREError
    layer: Optional[PositiveInt] = None
    ratio: UnitInterval = 0.5


def mixup_block(model: nn.Module, settings: XMixupSettings) -> tuple[int, nn.Module]:
    """The layer number and the block whose output is mixed: the encoder's where the model has one, else the
    decoder's; a layer beyond the stack is refused by value."""
    try:
        stacks = blocks(model)
    except AnatomyError as error:
        raise FLAREError(f"x_mixup: {error}") from None
    stack = stacks.get("encoder") or stacks["decoder"]
    count = len(stack.blocks)
    middle = max(count // 2, 1)
    layer = settings.layer if settings.layer is not None else middle
    if layer > count:
        raise FLAREError(f"x_mixup.layer={settings.layer} is not allowed: {type(model).__name__} has {count} blocks "
                         f"in {stack.path}; choose 1 to {count} (unset: the middle one, {middle})")
    return layer, stack.blocks[layer - 1]


class _EnglishStatesTaken(Exception):
    """Stops the English pass once the mixed layer's states are taken: the blocks above it are not needed."""


def hidden_of(output: Any) -> torch.Tensor:
    """A block's hidden states: the block's output itself, or the first element of the tuple it returns."""
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise FLAREError(f"x_mixup: a block returned {type(output).__name__}, not (batch, length, features) hidden "
                         "states or a tuple starting with them")
    return hidden


class ManifoldMixup:
    """What the `x_mixup` recipe adds to LoRA translate-train: cross-lingual manifold mixup in training.

    Implemented: both sides of a parallel pair run through the model being trained (gradients flow through
    both); after block `layer` every real target position's state h_t becomes (1 - λ) h_t + λ a_t, where a_t is
    parameter-free scaled dot-product attention from h_t over the real English positions; the task loss is the
    target pass's. At test time nothing is mixed and no English is read.
    Where the paper (and its code) differ: its attention is the layer's own multi-head attention, projections
    and output layer-norm included, and it mixes in every layer of a range (1-20 of 24 in its code); its λ is
    λ0 σ(w H + b), adapted per example from the entropy H of that attention; its loss adds the English task loss
    and consistency terms (KL between the two predictions, MSE between the two sentence states); and at test
    time it mixes in the machine translation of the input (translate-test), which this baseline does not read.
    """

    def __init__(self, model: nn.Module, settings: XMixupSettings):
        self.model, self.ratio = model, settings.ratio
        self.layer, self.block = mixup_block(model, settings)

    def english_states(self, source_batch: Batch) -> torch.Tensor:
        """The English hidden states after the mixed block, from the model as it trains."""
        taken: dict[str, torch.Tensor] = {}

        def take(module: nn.Module, args: tuple, output: Any) -> None:
            taken["hidden"] = hidden_of(output)
            raise _EnglishStatesTaken

        handle = self.block.register_forward_hook(take)
        try:
            self.model(**{key: value for key, value in source_batch.items() if key not in LABEL_KEYS})
        except _EnglishStatesTaken:
            pass
        finally:
            handle.remove()
        if "hidden" not in taken:
            raise FLAREError(f"x_mixup: the English pass never ran block {self.layer}; the English batch must run "
                             "the same blocks as the target batch")
        return taken["hidden"]

    @contextmanager
    def mixing(self, english: torch.Tensor, english_mask: Optional[torch.Tensor],
               target_mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Inside the block, the target pass's states after the mixed block are mixed with `english`."""
        def mix(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = hidden_of(output)
            if hidden.shape[0] != english.shape[0]:
                raise FLAREError(f"x_mixup: the English batch has {english.shape[0]} rows but the target batch "
                                 f"{hidden.shape[0]}; give one English row per target row")
            attended = attend(hidden, english.to(hidden.dtype), english.to(hidden.dtype), english_mask)
            shift = self.ratio * (attended - hidden)
            if target_mask is not None:
                shift = shift * target_mask.unsqueeze(-1).to(shift.dtype)  # padding stays as it was
            mixed = hidden + shift
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        handle = self.block.register_forward_hook(mix)
        try:
            yield
        finally:
            handle.remove()

    def loss(self, target_batch: Batch, source_batch: Batch) -> torch.Tensor:
        """The task loss of the target batch, its states mixed with those of its English parallel batch."""
        english = self.english_states(source_batch)
        with self.mixing(english, source_batch.get("attention_mask"), target_batch.get("attention_mask")):
            return self.model(**target_batch).loss
