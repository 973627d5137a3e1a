"""Analyses: facts about a graph computed once, cached by type, dropped when a pass changes them.

An analysis is a class with a `compute(gm, ctx)` classmethod returning an immutable result.
`AnalysisCache.get(ShapeInfo)` computes it on first use; after a pass that changed the graph,
compile() drops every cached result the pass did not list in its `preserves` (LLVM's rule:
a pass preserves nothing unless it says so).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from torch.fx import GraphModule

    from .pass_base import PassContext

T = TypeVar("T")


class Analysis:
    """Base class of analyses. Subclasses implement `compute`."""

    name: ClassVar[str] = "analysis"

    @classmethod
    def compute(cls, gm: GraphModule, ctx: PassContext) -> Any:  # pragma: no cover - interface
        raise NotImplementedError


class AnalysisCache:
    """Results of analyses of one GraphModule, keyed by analysis class."""

    def __init__(self) -> None:
        self._results: dict[type, Any] = {}
        self.computed: list[str] = []  # names, in order of computation: lets tests prove sharing

    def get(self, analysis: type[T], gm: GraphModule, ctx: PassContext) -> Any:
        if analysis not in self._results:
            self._results[analysis] = analysis.compute(gm, ctx)
            self.computed.append(analysis.__name__)
        return self._results[analysis]

    def cached(self, analysis: type) -> bool:
        return analysis in self._results

    def invalidate(self, keep: tuple[type, ...] = ()) -> None:
        """Drop every result except those of the analyses in `keep`."""
        self._results = {k: v for k, v in self._results.items() if k in keep}
