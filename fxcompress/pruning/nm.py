"""N:M sparsity as a mask constraint, and per-row selection (Wanda's comparison group).

"N:M" keeps, in every run of M consecutive input channels of each output (and kernel position),
the N weights of highest score: 2:4 is what sparse tensor cores execute, 4:8 a looser variant.
The selection is exact: every group ends with at most N kept weights (fewer only where an
earlier mask had already pruned more), whatever the scores.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Constraint
from ..errors import PreconditionError
from ..layers import KINDS

_PATTERN = re.compile(r"(\d+):(\d+)")
MAX_M = 64  # a group wider than this is no hardware pattern; larger M is a typo more likely than a wish


def nm_pattern(granularity: Any) -> tuple[int, int] | None:
    """(N, M) of an "N:M" granularity, None for any other value (or an invalid pattern)."""
    match = _PATTERN.fullmatch(granularity) if isinstance(granularity, str) else None
    if match is None:
        return None
    n, m = int(match[1]), int(match[2])
    return (n, m) if 0 < n < m <= MAX_M else None


@dataclass(frozen=True)
class NMPattern(Constraint):
    """An "N:M" granularity string with 0 < N < M <= 64 ("2:4", "4:8")."""

    def satisfied_by(self, value: Any) -> bool:
        return nm_pattern(value) is not None

    def claims(self, value: Any) -> bool:
        return isinstance(value, str) and ":" in value

    def describe(self) -> str:
        return f"an 'N:M' pattern with 0 < N < M <= {MAX_M} ('2:4', '4:8')"

    def example(self) -> Any:
        return "2:4"

    def invalid_values(self) -> tuple[Any, ...]:
        return ("4:4", "0:4", "2:x", "3:200")


def _channels_last(scores: torch.Tensor, n: int, m: int, kind: str, layer: str) -> tuple[torch.Tensor, int]:
    in_dim = KINDS[kind].in_dim
    if in_dim is None:   # an embedding table: a pass that selects every layer reaches it unless told not to
        grouped = tuple(name for name, k in KINDS.items() if k.in_dim is not None)
        raise PreconditionError(f"layer {layer!r}: {n}:{m} sparsity groups input channels, which its {kind} weight "
                                f"does not have; leave the layer out with types={grouped} (the kinds that have them) "
                                f"or select=...")
    return scores.movedim(in_dim, -1), in_dim


def check_nm_width(width: int, n: int, m: int, layer: str) -> None:
    """An N:M pattern groups input channels by M: refuse a layer whose width M does not divide."""
    if width % m:
        raise PreconditionError(f"layer {layer!r}: {n}:{m} sparsity needs input channels in multiples of {m}; "
                                f"it has {width}")


def nm_keep(scores: torch.Tensor, n: int, m: int, kind: str, layer: str) -> torch.Tensor:
    """Bool, shaped like `scores`: the N highest of every M consecutive input channels."""
    moved, in_dim = _channels_last(scores, n, m, kind, layer)
    width = moved.shape[-1]
    check_nm_width(width, n, m, layer)
    groups = moved.reshape(-1, width // m, m)
    # a stable sort, not topk (which breaks ties in no specified order): of equal scores the earliest are
    # pruned, as InsertMasks's other selections choose them
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.sort(groups, dim=2, stable=True).indices[..., m - n:], True)
    return keep.reshape(moved.shape).movedim(-1, in_dim)


def row_keep(scores: torch.Tensor, sparsity: float, kind: str) -> torch.Tensor:
    """Bool, shaped like `scores`: in each output channel, all but the round(sparsity * row) lowest."""
    out_dim = KINDS[kind].out_dim
    rows = scores.movedim(out_dim, 0).reshape(scores.shape[out_dim], -1)
    count = min(rows.shape[1], round(sparsity * rows.shape[1]))
    keep = torch.ones_like(rows, dtype=torch.bool)
    if count:
        keep.scatter_(1, torch.sort(rows, dim=1, stable=True).indices[:, :count], False)  # ties: earliest pruned
    moved = (scores.shape[out_dim], *scores.shape[:out_dim], *scores.shape[out_dim + 1:])
    return keep.reshape(moved).movedim(0, out_dim)
