"""Shape specialization: every size a graph computes from its inputs' shapes becomes the constant it
has on the example inputs.

    size = x.size(); s = size[:-1] + (heads, head_dim); y = x.view(s)   ->   y = x.view((2, 8, 4, 8))

A size node reads a shape (`x.size()`, `x.size(i)`, `x.shape`, `x.dim()`, `x.ndim`, `x.numel()`,
aten's `sym_size`), or computes a plain value (int, float, bool, tuple, torch.Size) from size nodes
and constants only (`size[-1]`, `a + (h, d)`, `d // heads`, `d ** 0.5`). Each such value is computed
once on the example inputs and written into the arguments of the nodes that read it; the size nodes
are then erased. A tensor built from sizes (`torch.arange(x.size(1))`) stays a node: only its size
arguments become constants. A size read from a tensor whose shape depends on the data (`x[x > 0]`,
`nonzero`) is left as it is and named in a warning: fixing it to the example's value would be wrong
for other data of the same shape.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten

from ..execution import evaluating
from ..tracing import origin

aten = torch.ops.aten

# method names and attributes that read a tensor's shape (the value is a size, whatever the data)
SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
SHAPE_ATTRIBUTES = frozenset({"shape", "ndim"})
SHAPE_FUNCTIONS = frozenset({torch.numel, aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default,
                             aten.dim.default})

# ops whose output shape depends on the values of their input, not only on its shape: sizes read
# from their results (or from anything computed from them) are not the same for all inputs of the
# example's shapes
DATA_SHAPED_FUNCTIONS = frozenset({torch.nonzero, torch.masked_select, torch.unique, torch.unique_consecutive,
                                   torch.repeat_interleave, torch.argwhere, aten.nonzero.default,
                                   aten.masked_select.default, aten.repeat_interleave.Tensor})
DATA_SHAPED_METHODS = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "repeat_interleave",
                                 "argwhere"})

_PLAIN = (int, float, bool, str, type(None))


def reads_shape(node: Node) -> bool:
    """Whether `node` reads a tensor's shape: `x.size(...)`, `x.shape`, `x.dim()`, `sym_size`, ..."""
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in SHAPE_ATTRIBUTES
    return _in(node.target, SHAPE_FUNCTIONS)


def _in(target: Any, table: frozenset) -> bool:
    try:
        return target in table
    except TypeError:  # an unhashable callable is in no table
        return False


def _data_shaped(node: Node, masks: set[Node]) -> bool:
    """Whether `node` makes a tensor whose shape depends on its input's values (`masks`: the nodes
    holding boolean tensors, which select a data-dependent count when used as an index)."""
    if node.op == "call_method":
        return node.target in DATA_SHAPED_METHODS
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return any(isinstance(i, Node) and i in masks for i in tree_flatten(node.args[1:])[0])
    if node.target is torch.where and len(node.args) + len(node.kwargs) == 1:  # torch.where(cond) is nonzero
        return True
    return _in(node.target, DATA_SHAPED_FUNCTIONS)


def _is_plain(value: Any) -> bool:
    """A value fx writes into generated code as a literal: numbers, strings, None, tuples / lists of them."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return False


def _literal(value: Any) -> Any:
    """`value` as the literal fx writes into code (a torch.Size as a plain tuple of ints)."""
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(_literal(v) for v in value)
    return value


class _SizeRecorder(Interpreter):
    """Runs the graph once, keeping the value of every size node and noting which tensors' shapes
    depend on the data."""

    def __init__(self, gm: GraphModule, candidates: set[Node]) -> None:
        super().__init__(gm)
        self.candidates = candidates
        self.values: dict[Node, Any] = {}
        self.data_shaped: set[Node] = set()
        self.masks: set[Node] = set()

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            self.masks.add(n)
        if _data_shaped(n, self.masks) or any(a in self.data_shaped for a in n.all_input_nodes):
            self.data_shaped.add(n)
        if n in self.candidates:
            self.values[n] = value
        return value


def _candidates(gm: GraphModule) -> set[Node]:
    """Nodes that read a shape or compute from such nodes and constants only, in graph order."""
    found: set[Node] = set()
    for node in gm.graph.nodes:
        inputs = node.all_input_nodes
        if reads_shape(node) or (node.op in ("call_function", "call_method") and inputs
                                 and all(i in found for i in inputs)):
            found.add(node)
    return found


def specialize_shapes(gm: GraphModule, example_inputs: tuple) -> dict[str, Any]:
    """Fold every size computed from the inputs' shapes into the constant it has on `example_inputs`.

    Rewrites `gm` in place (and recompiles it); returns {erased node name: its constant}. The
    GraphModule then accepts only inputs of the example inputs' shapes. Sizes read from tensors
    whose shape depends on the data are kept, and a warning names them.
    """
    candidates = _candidates(gm)
    if not candidates:
        return {}
    recorder = _SizeRecorder(gm, candidates)
    with evaluating(gm):
        recorder.run(*example_inputs)
    kept = [n for n in candidates if reads_shape(n) and n.args[0] in recorder.data_shaped]
    if kept:
        warnings.warn("fxcompress: specialize_shapes keeps sizes that depend on the data, not only on the "
                      "inputs' shapes: " + "; ".join(f"{n.format_node()} ({origin(n)})" for n in kept),
                      stacklevel=3)
    unfolded = _closure(candidates, kept)
    folded = {n: recorder.values[n] for n in candidates
              if n not in unfolded and _is_plain(_literal(recorder.values[n]))}
    _replace(gm, folded)
    return {n.name: _literal(value) for n, value in folded.items()}


def _closure(candidates: set[Node], kept: list[Node]) -> set[Node]:
    """`kept` and every candidate computed from them (graph order makes one sweep enough)."""
    out = set(kept)
    for node in sorted(candidates, key=_order(candidates)):
        if any(i in out for i in node.all_input_nodes):
            out.add(node)
    return out


def _order(nodes: set[Node]) -> Callable[[Node], int]:
    graph = next(iter(nodes)).graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    return position.__getitem__


def _replace(gm: GraphModule, folded: dict[Node, Any]) -> None:
    """Write each folded value into its readers' arguments, erase the folded nodes, recompile. The
    model's outputs keep a torch.Size as one (its output structure must not change); arguments get
    plain tuples."""
    for node, size in folded.items():
        for user in list(node.users):
            if user in folded:
                continue
            value = _literal(size)
            if user.op == "output" and isinstance(size, torch.Size):  # fx would store a plain tuple
                with gm.graph.inserting_before(user):
                    value = gm.graph.call_function(torch.Size, (value,))
            user.args = map_arg(user.args, lambda n, node=node, value=value: value if n is node else n)
            user.kwargs = map_arg(user.kwargs, lambda n, node=node, value=value: value if n is node else n)
    for node in reversed(list(gm.graph.nodes)):
        if node in folded and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
