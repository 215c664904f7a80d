"""Cached-state evaluation for bench/experiments/lrp2_all_languages/lrp2_all_languages.py: e5's blocks run from any layer on stored token states.

A shift at layer i then re-runs only the blocks above i, which makes a full LIRP/LSRP grid affordable on a CPU.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from polypeft.interventions.capture import find_blocks, tokenize

Shift = torch.Tensor  # (hidden,) added to every token state at one layer


class BlockRunner:
    """Token states of a batch at every layer (layer k = input of block k, N = output of the last block), and
    the blocks re-run from layer k on edited states with the very arguments the model passed to its blocks."""

    def __init__(self, model, tokenizer, max_length: int, prefix: str):
        self.model, self.tokenizer, self.max_length, self.prefix = model, tokenizer, max_length, prefix
        self.blocks = find_blocks(model)["encoder"]
        self.num_layers = len(self.blocks)
        self._call: Optional[tuple[tuple, dict]] = None
        self.mask: Optional[torch.Tensor] = None

    def states(self, texts: list[str]) -> list[torch.Tensor]:
        """Every layer's token states of one batch; remembers the mask and block arguments for `run_from`."""
        batch = tokenize(self.tokenizer, [self.prefix + text for text in texts], self.max_length,
                         torch.device("cpu"))
        captured: dict[int, torch.Tensor] = {}

        def first(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[0] = hidden
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            self._call = (tuple(args[1:]), rest)

        def after(layer: int):
            return lambda module, args, output: captured.__setitem__(
                layer, output[0] if isinstance(output, tuple) else output)

        handles = [self.blocks[0].register_forward_pre_hook(first, with_kwargs=True)]
        handles += [block.register_forward_hook(after(index + 1)) for index, block in enumerate(self.blocks)]
        try:
            with torch.inference_mode():
                self.model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        self.mask = batch["attention_mask"]
        return [captured[layer] for layer in range(self.num_layers + 1)]

    def run_from(self, start: int, hidden: torch.Tensor, keep: frozenset = frozenset()
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks start..N-1 on `hidden` (the state at layer `start`); returns the output and the states at `keep`."""
        args, kwargs = self._call
        kept = {}
        with torch.inference_mode():
            for layer in range(start, self.num_layers):
                if layer in keep:
                    kept[layer] = hidden
                output = self.blocks[layer](hidden, *args, **kwargs)
                hidden = output[0] if isinstance(output, tuple) else output
        if self.num_layers in keep:
            kept[self.num_layers] = hidden
        return hidden, kept

    def embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """e5's sentence embedding: mean over the real tokens, L2-normalised."""
        weights = self.mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def pooled_layers(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """(layers, batch, hidden) mean-pooled, not normalised: what language vectors average."""
        weights = self.mask.unsqueeze(-1).to(hidden_states[0].dtype)
        return torch.stack([(state * weights).sum(1) / weights.sum(1).clamp_min(1.0) for state in hidden_states])


def batches(texts: list[str], size: int) -> Iterator[list[int]]:
    """Indices of `texts` in length-sorted batches (less padding); results are put back in input order."""
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]), reverse=True)
    for start in range(0, len(order), size):
        yield order[start:start + size]


def cell_embeddings(runner: BlockRunner, texts: list[str], plan: dict, batch_size: int, progress=None
                    ) -> dict[str, torch.Tensor]:
    """Embeddings of `texts` for each named cell of `plan`.

    `plan` maps a name to None (no shift) or to a tuple of (layer, shift) in increasing layers; cells sharing
    their first shift share its forward pass (a LIRP at i, then each LSRP at j > i from the stored state at j).
    """
    hidden_size = runner.model.config.hidden_size
    out = {name: torch.empty(len(texts), hidden_size) for name in plan}
    by_first: dict[tuple, list[str]] = {}
    for name, shifts in plan.items():
        if shifts:
            by_first.setdefault((shifts[0][0], id(shifts[0][1])), []).append(name)
    for index in batches(texts, batch_size):
        states = runner.states([texts[i] for i in index])
        for name, shifts in plan.items():
            if not shifts:
                out[name][index] = runner.embedding(states[-1])
        for (layer, _), names in by_first.items():
            first_shift = plan[names[0]][0][1]
            later = frozenset(plan[name][1][0] for name in names if len(plan[name]) > 1)
            final, kept = runner.run_from(layer, states[layer] + first_shift, later)
            for name in names:
                shifts = plan[name]
                if len(shifts) == 1:
                    out[name][index] = runner.embedding(final)
                else:
                    second, shift = shifts[1]
                    shifted, _ = runner.run_from(second, kept[second] + shift)
                    out[name][index] = runner.embedding(shifted)
        if progress is not None:
            progress.update(len(index))
    return out
