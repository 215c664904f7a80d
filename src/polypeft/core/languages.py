"""Language registry: maps language codes to route ids and turns user input into checked id tensors.

Every error names the offending value, where it came from and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from .language_codes import checked_codes, normalised

SHARED = "shared"

LanguageSpec = Union[str, Sequence[str], torch.Tensor, None]


class LanguageError(ValueError):
    """A language code, list or id tensor that polypeft cannot route."""


# Batches with at most this many runs of equal routes are computed run by run (plain matmuls);
# beyond it, layers gather per-example factors and use batched matmuls.
MAX_SEGMENTS = 4


@dataclass(frozen=True)
class RouteGroups:
    """A batch's examples grouped by the route ids one kind of layer reads, built on the host.

    Lets a layer fetch each group's weights once instead of once per example (beam search repeats
    every route num_beams times). `order`/`sizes` list the examples group by group; `slots` lays
    them out as `num_groups` blocks of `group_size`, a short group padded with its first member.
    """

    src_ids: tuple[int, ...]
    tgt_ids: tuple[int, ...]
    src: torch.Tensor
    tgt: torch.Tensor
    sizes: tuple[int, ...]
    order: torch.Tensor
    inverse: torch.Tensor
    slots: torch.Tensor
    position: torch.Tensor

    @property
    def num_groups(self) -> int:
        return len(self.sizes)

    @property
    def group_size(self) -> int:
        return max(self.sizes)

    @property
    def batch_size(self) -> int:
        return int(self.order.shape[0])

    @staticmethod
    def build(src: Sequence[int], tgt: Sequence[int], key: str, device: torch.device) -> "RouteGroups":
        members: dict[tuple[int, ...], list[int]] = {}
        for i, (s, t) in enumerate(zip(src, tgt)):
            members.setdefault(GROUP_KEYS[key](s, t), []).append(i)
        groups = list(members.values())
        width = max(len(group) for group in groups)
        order = [i for group in groups for i in group]
        slots = [group[min(k, len(group) - 1)] for group in groups for k in range(width)]
        position = [0] * len(order)
        for g, group in enumerate(groups):
            for k, i in enumerate(group):
                position[i] = g * width + k
        inverse = [0] * len(order)
        for rank, i in enumerate(order):
            inverse[i] = rank

        def as_tensor(ids: list[int]) -> torch.Tensor:
            return torch.tensor(ids, dtype=torch.long, device=device)

        src_ids = [src[group[0]] for group in groups]
        tgt_ids = [tgt[group[0]] for group in groups]
        return RouteGroups(
            src_ids=tuple(src_ids),
            tgt_ids=tuple(tgt_ids),
            src=as_tensor(src_ids),
            tgt=as_tensor(tgt_ids),
            sizes=tuple(len(group) for group in groups),
            order=as_tensor(order),
            inverse=as_tensor(inverse),
            slots=as_tensor(slots),
            position=as_tensor(position),
        )

    def apply(self, rows: torch.Tensor, compute) -> torch.Tensor:
        """`compute(src_id, tgt_id, rows_of_group)` per group, results back in the batch's order."""
        chunks = torch.split(rows.index_select(0, self.order), list(self.sizes))
        parts = [compute(s, t, chunk) for s, t, chunk in zip(self.src_ids, self.tgt_ids, chunks)]
        return torch.cat(parts, dim=0).index_select(0, self.inverse)

    def padded_cheaper_than_per_example(self, tokens_per_example: int, rank: int) -> bool:
        """Fetching rank-`rank` factors per group and moving the activations into padded group blocks
        (and back) moves fewer numbers than fetching the factors once per example."""
        moved_rows = self.num_groups * self.group_size + self.batch_size
        return self.num_groups * rank + moved_rows * tokens_per_example < self.batch_size * rank


# What a layer's weights depend on: both ids (pair-wise LMS), or one side's language.
GROUP_KEYS = {
    "pair": lambda s, t: (s, t),
    "src": lambda s, t: (s,),
    "tgt": lambda s, t: (t,),
}


@dataclass(frozen=True)
class Routes:
    """The (src, tgt) route ids of one forward pass, one per example.

    `segments` lists runs of equal routes as (start, stop, src_id, tgt_id) when they are few; layers
    then need no gather. `host_ids` keeps the ids on the host, so grouping them needs no device sync.
    """

    src: torch.Tensor
    tgt: torch.Tensor
    segments: Optional[tuple[tuple[int, int, int, int], ...]]
    host_ids: tuple[tuple[int, ...], tuple[int, ...]]
    # Derived views (expanded copies, groupings), built once per forward instead of once per layer.
    _derived: dict = field(default_factory=dict, compare=False, repr=False)

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
        key = ("expanded", batch_size)
        if key not in self._derived:
            factor = batch_size // self.batch_size
            src, tgt = (tuple(i for i in ids for _ in range(factor)) for ids in self.host_ids)
            self._derived[key] = Routes.from_ids(src, tgt, self.src.device)
        return self._derived[key]

    def to(self, device: torch.device) -> "Routes":
        if self.src.device == device:
            return self
        key = ("device", str(device))
        if key not in self._derived:
            self._derived[key] = Routes(self.src.to(device), self.tgt.to(device), self.segments, self.host_ids)
        return self._derived[key]

    def groups(self, key: str) -> RouteGroups:
        """The examples grouped by `key` ("pair", "src" or "tgt"), computed once per Routes."""
        cache_key = ("groups", key)
        if cache_key not in self._derived:
            self._derived[cache_key] = RouteGroups.build(*self.host_ids, key, self.src.device)
        return self._derived[cache_key]

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
        # An empty batch is one empty run, so every layer returns its usual output with no rows.
        runs = tuple(segments or [(0, 0, 0, 0)]) if len(segments) <= MAX_SEGMENTS else None
        def as_tensor(ids: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(ids), dtype=torch.long, device=device)

        return Routes(as_tensor(src), as_tensor(tgt), runs, (tuple(src), tuple(tgt)))


class LanguageRegistry:
    """Codes in a fixed order; id `len(languages)` is the FD shared route when it exists."""

    def __init__(self, languages: Sequence[str], shared_route: bool = False):
        self.languages = checked_codes(languages, "languages", LanguageError)
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
            return self._ids[normalised(code)]  # either Unicode spelling of a code is that code
        except KeyError:
            raise LanguageError(
                f"{where}: unknown language code {code!r}; known codes are {self.allowed()}"
            ) from None

    def code_of(self, route_id: int) -> str:
        """A route id's code; a registry without languages (a language-agnostic model) calls its one route "any"."""
        codes = self.allowed()
        return codes[route_id] if codes else "any"

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
        if isinstance(spec, (set, frozenset, dict)):
            raise LanguageError(f"{where}={spec!r} has no order: pass a list with one code per example, in batch order")
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
        if batch_size and len(src) == 1:
            # One code for the whole batch becomes one id per example: every call then hands the layers id
            # tensors of the batch's shape, which a compiled model reads without recompiling.
            src, tgt = src * batch_size, tgt * batch_size
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
