"""Automated gradual pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Sparsity rises from `initial` to the final target over [begin, end] steps, fast at first and
slowly at the end, updated every `every` steps from `begin` and at `end` itself:

    s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** 3

so the final sparsity holds from step `end` on even when `every` does not divide end - begin (a
loop that stops at `end` would otherwise never reach it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..config import Interval, validate
from ..errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class AGP:
    """The schedule; the final sparsity of each layer comes from the pass that uses it."""

    end: int
    begin: int = 0
    every: int = 1
    initial: float = 0.0

    constraints: ClassVar[dict] = {"end": (Interval(int, 0),), "begin": (Interval(int, 0),),
                                   "every": (Interval(int, 1),), "initial": (Interval(float, 0.0, 1.0),)}

    def __post_init__(self) -> None:
        validate(self)
        if self.end <= self.begin:
            raise ConfigError(f"AGP.end must be after AGP.begin ({self.begin}), got {self.end}")

    def progress(self, step: int) -> float:
        """The fraction of the schedule done at `step`, held between updates (every `every` steps, and `end`)."""
        if step <= self.begin:
            return 0.0
        if step >= self.end:
            return 1.0
        last_update = self.begin + (step - self.begin) // self.every * self.every
        return (last_update - self.begin) / (self.end - self.begin)

    def sparsity(self, final: float, step: int) -> float:
        """s_t for a layer whose final sparsity is `final` (an initial above it is capped at it)."""
        start = min(self.initial, final)
        return final + (start - final) * (1.0 - self.progress(step)) ** 3

    def updates_at(self, step: int) -> bool:
        """Whether the masks change at `step` (so a loop may skip the work in between): every `every` steps
        from `begin`, at `end`, and at the first of those steps past `end` too (a loop that calls only on
        multiples of `every` still reaches the final sparsity)."""
        if step < self.begin:
            return False
        return step == self.end or ((step - self.begin) % self.every == 0 and step - self.every < self.end)
