"""Language registry: maps language codes to route ids and turns user input into checked id tensors.

Every error names the offending value, where it came from and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

SHARED = "shared"

LanguageSpec = Union[str, Sequence[str], torch.Tensor, None]


class LanguageError(ValueError):
    """A language code, list or id tensor that polypeft cannot route."""


# Batches with at most this many runs of equal routes are computed run by run (plain matmuls);
# beyond it, layers gather per-example factors and use batched matmuls.
MAX_SEGMENTS = 4


@dataclass(frozen=True)
class Routes:
    """The (src, tgt) route ids of one forward pass, one per example.

    `segments` lists runs of equal routes as (start, stop, src_id, tgt_id) when they are known on the
    host and few; layers then need no device sync and no gather. None means "mixed: gather".
    """

    src: torch.Tensor
    tgt: torch.Tensor
    segments: Optional[tuple[tuple[int, int, int, int], ...]]

    @property
    def batch_size(self) -> int:
        return int(self.src.shape[0])

    @property
    def homogeneous(self) -> bool:
        return self.segments is not None and len(self.segments) == 1

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
        segments = self.segments and tuple(
            (start * factor, stop * factor, s, t) for start, stop, s, t in self.segments
        )
        return Routes(self.src.repeat_interleave(factor), self.tgt.repeat_interleave(factor), segments)

    def to(self, device: torch.device) -> "Routes":
        if self.src.device == device:
            return self
        return Routes(self.src.to(device), self.tgt.to(device), self.segments)

    @staticmethod
    def from_ids(src: Sequence[int], tgt: Sequence[int], device: Optional[torch.device] = None) -> "Routes":
        """Routes from host-side id lists, with their runs found once here."""
        segments: list[tuple[int, int, int, int]] = []
        for i, pair in enumerate(zip(src, tgt)):
            if segments and segments[-1][2:] == pair:
                start = segments[-1][0]
                segments[-1] = (start, i + 1, *pair)
            else:
                segments.append((i, i + 1, *pair))
        runs = tuple(segments) if len(segments) <= MAX_SEGMENTS else None
        def as_tensor(ids: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(ids), dtype=torch.long, device=device)

        return Routes(as_tensor(src), as_tensor(tgt), runs)


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

    def to_ids(self, spec: LanguageSpec, batch_size: Optional[int], where: str) -> list[int]:
        """One code (a batch of one, broadcast later), a list of codes, or an id tensor, as checked ids."""
        if spec is None:
            raise LanguageError(
                f"{where} is missing: pass a code, a list with one code per example or a LongTensor of ids"
            )
        if isinstance(spec, str):
            return [self.id_of(spec, where)]
        if isinstance(spec, torch.Tensor):
            return self._check_tensor(spec, batch_size, where)
        codes = list(spec)
        if batch_size is not None and len(codes) != batch_size:
            raise LanguageError(
                f"{where} has {len(codes)} codes but the batch has {batch_size} examples; "
                f"pass one code for the whole batch or exactly one per example"
            )
        return [self.id_of(code, f"{where}[{i}]") for i, code in enumerate(codes)]

    def _check_tensor(self, ids: torch.Tensor, batch_size: Optional[int], where: str) -> list[int]:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise LanguageError(f"{where}: route ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.dim() > 1 or (ids.dim() == 1 and batch_size is not None and ids.shape[0] != batch_size):
            raise LanguageError(
                f"{where}: route tensor of shape {tuple(ids.shape)} does not fit a batch of "
                f"{batch_size}; expected shape ({batch_size},) or a scalar"
            )
        values = ids.reshape(-1).tolist()
        for position, value in enumerate(values):
            if not 0 <= value < self.num_routes:
                raise LanguageError(
                    f"{where}[{position}]: route id {value} is out of range; ids must lie in "
                    f"[0, {self.num_routes - 1}] for routes {self.allowed()}"
                )
        return values

    def routes(
        self,
        src_lang: LanguageSpec,
        tgt_lang: LanguageSpec,
        batch_size: Optional[int] = None,
        device: Optional[torch.device] = None,
    ) -> Routes:
        """Checked routes for a batch; a missing side defaults to the other (one-language tasks)."""
        if src_lang is None and tgt_lang is None:
            raise LanguageError(
                "no route given: pass src_lang= and/or tgt_lang= (a code, a list with one code per "
                f"example, or a LongTensor of ids); known codes are {self.allowed()}"
            )
        src = self.to_ids(tgt_lang if src_lang is None else src_lang, batch_size, "src_lang")
        tgt = self.to_ids(src_lang if tgt_lang is None else tgt_lang, batch_size, "tgt_lang")
        src, tgt = _broadcast(src, tgt)
        if self.shared_route:
            shared = self.shared_id
            for position, pair in enumerate(zip(src, tgt)):
                if (pair[0] == shared) != (pair[1] == shared):
                    raise LanguageError(
                        f"example {position}: the shared route must be used on both sides, got "
                        f"src={self.code_of(pair[0])!r}, tgt={self.code_of(pair[1])!r}"
                    )
        return Routes.from_ids(src, tgt, device)


def _broadcast(src: list[int], tgt: list[int]) -> tuple[list[int], list[int]]:
    """A one-element side stands for the whole batch of the other side."""
    if len(src) == len(tgt):
        return src, tgt
    if len(src) == 1:
        return src * len(tgt), tgt
    if len(tgt) == 1:
        return src, tgt * len(src)
    raise LanguageError(f"src_lang gives {len(src)} routes but tgt_lang gives {len(tgt)}")
