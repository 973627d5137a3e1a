"""The pass protocol: a frozen dataclass whose fields are its whole configuration.

A pass validates its fields in `__post_init__` (a bad value raises ConfigError naming the field),
checks graph preconditions in `requires`, rewrites the GraphModule in `run`, and returns a
PassResult saying what it changed and which analyses it kept valid. `__call__` is torch.fx's
requires -> run -> ensures. `unknown_ops` says which ops of a graph the pass cannot read, so that
compile() never lets a pass do nothing without a word on such a graph.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from .analysis import AnalysisCache, Preserved
from .layers import bias_arg, find_layers, kind_of_node, weight_arg


@dataclass(frozen=True)
class PassResult:
    """What a pass changed. Nodes created / erased are found by compile() from a graph diff.

    `preserved` lists the analyses (classes, or `analysis_key(cls, **params)` keys) this run kept
    valid; None means the pass class's `preserves`. A run that changed nothing preserves everything.
    """

    changed: bool
    params_touched: tuple[str, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)
    gm: GraphModule | None = None  # set only by a pass that returns a new GraphModule
    preserved: tuple[Preserved, ...] | None = None


@dataclass
class PassContext:
    """What a pass may read besides the graph: inputs, calibration data and shared analyses."""

    example_inputs: tuple
    calibration_data: Sequence | None = None
    analyses: AnalysisCache = field(default_factory=AnalysisCache)
    gm: GraphModule | None = None
    progress: bool = False

    def get(self, analysis: type, **params: Any) -> Any:
        """The result of `analysis` with `params` on the current graph, computed at most once."""
        return self.analyses.get(analysis, self.gm, self, **params)

    def each(self, items: Iterable, what: str, name: Callable[[Any], str] = lambda item: item.name,
             file: Any = None) -> Iterator:
        """`items` one by one; with `progress`, behind a tqdm bar saying `what` and naming the current
        item's layer (off where the output is not a terminal, as tqdm decides)."""
        items = list(items)
        with tqdm(items, desc=what, unit="layer", disable=None if self.progress else True, file=file,
                  leave=False) as bar:
            for item in bar:
                bar.set_postfix_str(name(item))  # drawn at once: each item is a layer's slow work
                yield item


@dataclass(frozen=True, kw_only=True)
class Pass:
    """Base class of passes. Subclasses are `@dataclass(frozen=True, kw_only=True)`."""

    # analyses still valid after this pass changed the graph, unless its PassResult says otherwise
    preserves: ClassVar[tuple[Preserved, ...]] = ()
    changes_output_shapes: ClassVar[bool] = False  # verification then skips the output-shape check

    def __call__(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        self.requires(gm, ctx)
        result = self.run(gm, ctx)
        self.ensures(result.gm if result.gm is not None else gm, ctx)
        return result

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        """Raise PreconditionError if the pass cannot run on `gm`."""

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def ensures(self, gm: GraphModule, ctx: PassContext) -> None:
        """Raise VerificationError if the pass's own postconditions do not hold."""

    def config(self) -> dict[str, Any]:
        """The configuration as plain data (for history, summaries and files)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def unknown_ops(self, gm: GraphModule) -> list[Node]:
        """The call nodes of `gm` whose ops this pass does not know. compile() names them when the
        pass changed nothing (UnknownOpWarning; UnknownOpError with strict=True), since the pass
        may have found nothing to do only because it could not read them.

        The default serves the layer passes, which read only `fxcompress.layers.KINDS`: aten ops
        the front end left unspelled, and ops that compute with a stored weight (a parameter of two
        or more dims) without being a layer kind or a step of a layer's weight chain (an LSTM, a
        custom leaf module, `x @ self.w`). A pass with op tables of its own overrides this."""
        return unknown_weight_ops(gm)


def is_unspelled_aten(node: Node) -> bool:
    """An aten overload the front end had no torch-level spelling for: no table of ours knows it."""
    return node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload,
                                                                   torch._ops.OpOverloadPacket))


def unknown_weight_ops(gm: GraphModule) -> list[Node]:
    """Unspelled aten ops, and the ops that use a stored weight but are no known layer (see
    `Pass.unknown_ops`), in graph order."""
    known = _layer_nodes(gm)
    return [n for n in gm.graph.nodes if n.op.startswith("call_") and n not in known
            and (is_unspelled_aten(n) or _reads_weight(gm, n))]


def _layer_nodes(gm: GraphModule) -> set[Node]:
    """Every layer node of `gm` and the nodes of its weight and bias chains."""
    nodes = {n.name: n for n in gm.graph.nodes}
    known: set[Node] = set()
    for layer in find_layers(gm):
        node = nodes[layer.node]
        known.add(node)
        for arg in (weight_arg(node), bias_arg(node)):
            while isinstance(arg, Node) and arg not in known:  # a chain step takes the weight first
                known.add(arg)
                arg = arg.args[0] if arg.args else None
    return known


def _reads_weight(gm: GraphModule, node: Node) -> bool:
    """Whether a call node computes with a parameter of two or more dims (a layer's kind of weight)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return kind_of_node(gm, node) is None and any(p.dim() >= 2 for p in module.parameters())
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = operator.attrgetter(arg.target)(gm)
            if isinstance(value, nn.Parameter) and value.dim() >= 2:
                return True
    return False


def _plain(value: Any) -> Any:
    """A JSON-friendly rendering of a config value (callables and objects by name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return value.__name__
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)


@dataclass(frozen=True)
class PassRecord:
    """One entry of a GraphModule's pass history: plain data, safe to save and print."""

    name: str
    config: Mapping[str, Any]
    changed: bool
    nodes_created: tuple[str, ...] = ()
    nodes_erased: tuple[str, ...] = ()
    nodes_changed: tuple[str, ...] = ()
    params_touched: tuple[str, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PassRecord:
        tuples = {"nodes_created", "nodes_erased", "nodes_changed", "params_touched"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})
