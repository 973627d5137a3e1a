"""Analyses: facts about a graph computed once, cached by (class, parameters), dropped when a pass changes them.

An analysis is a class with a `compute(gm, ctx, **params)` classmethod returning an immutable
result. `ctx.get(ChannelGraph, attention="heads")` computes it on first use and caches it under
its key: the class and the parameters, defaults filled in, so one class serves every parameter
value. After a pass that changed the graph, compile() drops every cached result the pass did not
report preserved (LLVM's rule: a pass preserves nothing unless it says so). In the checking mode
(`compile(..., check_analyses=True)`) each preserved result is recomputed from scratch and
compared with `same_as`; a difference is the pass's mistake.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Union

from .errors import ConfigError, VerificationError

if TYPE_CHECKING:
    from torch.fx import GraphModule


class Context(Protocol):
    """What an analysis reads while it computes: other analyses of the same graph (a PassContext)."""

    def get(self, analysis: type, **params: Any) -> Any: ...

AnalysisKey = tuple[type, tuple[tuple[str, Any], ...]]  # (analysis class, sorted (parameter, value) pairs)
Preserved = Union[type, AnalysisKey]  # a class (every parameter value of it) or one key


class Analysis:
    """Base class of analyses. Subclasses implement `compute` and, if `==` is not the right test
    of "still the same result" (arrays, results that may grow with the graph), `same_as`."""

    name: ClassVar[str] = "analysis"

    @classmethod
    def compute(cls, gm: GraphModule, ctx: Context, **params: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def same_as(self, fresh: Any) -> bool:
        """Whether this (cached) result still describes the graph `fresh` was computed on."""
        return self == fresh


def analysis_key(analysis: type, **params: Any) -> AnalysisKey:
    """The cache key of `analysis` with `params`: unknown names and unhashable values raise ConfigError."""
    if not (isinstance(analysis, type) and issubclass(analysis, Analysis)):
        raise ConfigError(f"analysis must be an Analysis subclass, got {analysis!r}")
    try:
        bound = inspect.signature(analysis.compute).bind(None, None, **params)
    except TypeError as exc:
        raise ConfigError(f"{analysis.__name__}: bad parameters {params!r}: {exc}") from None
    bound.apply_defaults()  # ctx.get(A) and ctx.get(A, p=<default>) share one result
    named = dict(list(bound.arguments.items())[2:])  # past gm and ctx
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    pairs = tuple(sorted(named.items()))
    for name, value in pairs:
        try:
            hash(value)
        except TypeError:
            raise ConfigError(f"{analysis.__name__}.{name} must be hashable (it keys the cache), "
                              f"got {value!r}") from None
    return analysis, pairs


def describe(key: AnalysisKey) -> str:
    """`ChannelGraph(attention='heads')`, or the bare class name without parameters."""
    analysis, pairs = key
    return analysis.__name__ + (f"({', '.join(f'{k}={v!r}' for k, v in pairs)})" if pairs else "")


class AnalysisCache:
    """Results of analyses of one GraphModule, keyed by (analysis class, parameters)."""

    def __init__(self) -> None:
        self._results: dict[AnalysisKey, Any] = {}
        self.computed: list[str] = []  # keys described, in order of computation: lets tests prove sharing

    def get(self, analysis: type, gm: GraphModule, ctx: Context, **params: Any) -> Any:
        key = analysis_key(analysis, **params)
        if key not in self._results:
            self._results[key] = analysis.compute(gm, ctx, **dict(key[1]))
            self.computed.append(describe(key))
        return self._results[key]

    def put(self, result: Analysis, **params: Any) -> None:
        """Store a result computed elsewhere (compile's shape step) under its class's key."""
        self._results[analysis_key(type(result), **params)] = result

    def cached(self, analysis: type, **params: Any) -> bool:
        return analysis_key(analysis, **params) in self._results

    def keys(self) -> tuple[AnalysisKey, ...]:
        return tuple(self._results)

    def invalidate(self, keep: Iterable[Preserved] = ()) -> None:
        """Drop every result except those `keep` names (a class keeps all its keys, a key only itself)."""
        keep = tuple(keep)
        self._results = {k: v for k, v in self._results.items() if k in keep or k[0] in keep}

    def check(self, recompute: Callable[[AnalysisKey], Any], label: str) -> None:
        """Raise VerificationError naming `label` and the analysis if a cached result differs from
        `recompute(key)`, its value computed from scratch on the current graph."""
        for key, cached in self._results.items():
            try:
                same = cached.same_as(recompute(key))
            except (TypeError, ValueError) as exc:  # `==` on arrays: the analysis must define same_as
                raise VerificationError(f"{label}: {describe(key)}.same_as cannot compare its results "
                                        f"({type(exc).__name__}: {exc})") from exc
            if not same:
                raise VerificationError(f"{label} declared {describe(key)} preserved, but recomputing it "
                                        f"on the rewritten graph gives a different result")


def check_preserved(preserved: Any, label: str) -> tuple[Preserved, ...]:
    """`preserved` as reported by a pass: a tuple of Analysis classes or keys (VerificationError if not)."""
    items = tuple(preserved) if isinstance(preserved, (tuple, list, set, frozenset)) else None
    if items is None or not all(_is_preserved(item) for item in items):
        raise VerificationError(f"{label} reported preserved={preserved!r}: expected a tuple of Analysis "
                                f"classes or analysis_key(...) keys")
    return items


def _is_preserved(item: Any) -> bool:
    if isinstance(item, type):
        return issubclass(item, Analysis)
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], type)
            and issubclass(item[0], Analysis) and isinstance(item[1], tuple))
