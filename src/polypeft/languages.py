"""Language registry: maps language codes to route ids and turns user input into checked id tensors.

Every error names the offending value, where it came from and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

SHARED = "shared"

LanguageSpec = Union[str, Sequence[str], torch.Tensor, None]


class LanguageError(ValueError):
    """A language code, list or id tensor that polypeft cannot route."""


@dataclass(frozen=True)
class Routes:
    """The (src, tgt) route ids of one forward pass, one per example.

    `homogeneous` is known on the host so layers can pick the one-matmul path without a device sync.
    """

    src: torch.Tensor
    tgt: torch.Tensor
    homogeneous: bool

    @property
    def batch_size(self) -> int:
        return int(self.src.shape[0])

    def expanded_to(self, batch_size: int) -> "Routes":
        """Follow a batch that generate() or beam search grew by repeat_interleave."""
        if batch_size == self.batch_size:
            return self
        if self.batch_size == 0 or batch_size % self.batch_size:
            raise LanguageError(
                f"routes were given for {self.batch_size} examples but a routed layer saw a batch of "
                f"{batch_size}; the batch must equal the number of routes or be a multiple of it "
                f"(beam search, num_return_sequences)"
            )
        factor = batch_size // self.batch_size
        return Routes(
            self.src.repeat_interleave(factor), self.tgt.repeat_interleave(factor), self.homogeneous
        )

    def to(self, device: torch.device) -> "Routes":
        if self.src.device == device:
            return self
        return Routes(self.src.to(device), self.tgt.to(device), self.homogeneous)


class LanguageRegistry:
    """Codes in a fixed order; id `len(languages)` is the FD shared route when it exists."""

    def __init__(self, languages: Sequence[str], shared_route: bool = False):
        self.languages = list(languages)
        self.shared_route = shared_route
        self._ids = {code: i for i, code in enumerate(self.languages)}
        if shared_route:
            self._ids[SHARED] = len(self.languages)

    @property
    def num_routes(self) -> int:
        """Rows of every per-language parameter table (languages plus the shared route)."""
        return len(self._ids)

    @property
    def shared_id(self) -> int:
        if not self.shared_route:
            raise LanguageError(
                "the shared route was asked for but this model has none; "
                "build it with shared_route=True to train fuse distillation"
            )
        return self._ids[SHARED]

    def allowed(self) -> list[str]:
        return list(self._ids)

    def id_of(self, code: str, where: str = "language") -> int:
        if not isinstance(code, str):
            raise LanguageError(f"{where}: expected a language code string, got {code!r}")
        try:
            return self._ids[code]
        except KeyError:
            raise LanguageError(
                f"{where}: unknown language code {code!r}; known codes are {self.allowed()}"
            ) from None

    def code_of(self, route_id: int) -> str:
        return self.allowed()[route_id]

    def to_ids(
        self, spec: LanguageSpec, batch_size: int, where: str
    ) -> tuple[torch.Tensor, bool]:
        """Turn one code, a list of codes or an id tensor into a (batch,) LongTensor.

        Returns the ids and whether they are all equal (known without a device sync when possible).
        """
        if spec is None:
            raise LanguageError(
                f"{where} is missing: pass a code, a list of {batch_size} codes or a LongTensor of ids"
            )
        if isinstance(spec, str):
            route_id = self.id_of(spec, where)
            return torch.full((batch_size,), route_id, dtype=torch.long), True
        if isinstance(spec, torch.Tensor):
            return self._check_tensor(spec, batch_size, where)
        codes = list(spec)
        if len(codes) != batch_size:
            raise LanguageError(
                f"{where} has {len(codes)} codes but the batch has {batch_size} examples; "
                f"pass one code for the whole batch or exactly one per example"
            )
        ids = [self.id_of(code, f"{where}[{i}]") for i, code in enumerate(codes)]
        return torch.tensor(ids, dtype=torch.long), len(set(ids)) <= 1

    def _check_tensor(
        self, ids: torch.Tensor, batch_size: int, where: str
    ) -> tuple[torch.Tensor, bool]:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise LanguageError(f"{where}: route ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() == 0:
            ids = ids.expand(batch_size)
        if ids.dim() != 1 or ids.shape[0] != batch_size:
            raise LanguageError(
                f"{where}: route tensor of shape {tuple(ids.shape)} does not fit a batch of "
                f"{batch_size}; expected shape ({batch_size},) or a scalar"
            )
        ids = ids.long()
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_routes:
                bad = low if low < 0 else high
                raise LanguageError(
                    f"{where}: route id {bad} is out of range; ids must lie in "
                    f"[0, {self.num_routes - 1}] for routes {self.allowed()}"
                )
            return ids, low == high
        return ids, True

    def routes(
        self, src_lang: LanguageSpec, tgt_lang: LanguageSpec, batch_size: int
    ) -> Routes:
        """Checked routes for a batch; a missing side defaults to the other (one-language tasks)."""
        if src_lang is None and tgt_lang is None:
            raise LanguageError(
                "no route given: pass src_lang= and/or tgt_lang= (a code, a list with one code per "
                f"example, or a LongTensor of ids); known codes are {self.allowed()}"
            )
        if src_lang is None:
            src_lang = tgt_lang
        if tgt_lang is None:
            tgt_lang = src_lang
        src, src_same = self.to_ids(src_lang, batch_size, "src_lang")
        tgt, tgt_same = self.to_ids(tgt_lang, batch_size, "tgt_lang")
        if self.shared_route:
            shared = self.shared_id
            if bool(((src == shared) != (tgt == shared)).any()):
                raise LanguageError(
                    "the shared route must be used on both sides: an example has src or tgt "
                    "'shared' but not both"
                )
        return Routes(src, tgt, src_same and tgt_same)
