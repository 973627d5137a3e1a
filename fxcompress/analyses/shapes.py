"""ShapeInfo: tensor shapes and dtypes of every node, from torch.fx's ShapeProp on the example inputs.

`propagate_shapes` is the one step that writes `node.meta["tensor_meta"]`: compile() runs it after
every pass that changed the graph, so every node (those a pass just added included) carries its
shape for summary(), draw() and later passes. ShapeInfo is its result as an analysis.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from ..analysis import Analysis
from ..errors import PreconditionError
from ..execution import evaluating
from ..rewire import writes_in_place


@dataclass(frozen=True)
class ShapeInfo(Analysis):
    """`meta[node_name]` is ShapeProp's TensorMetadata (or a tuple / dict of them) for that node."""

    meta: Mapping[str, Any]
    # nodes whose sizes follow the data (`data_sized`): a mixture of experts' rows per expert change with the
    # router's weights, so a pass that changes no shape still changes theirs
    data_sized: frozenset[str] = frozenset()

    @classmethod
    def compute(cls, gm: GraphModule, ctx) -> ShapeInfo:
        return propagate_shapes(gm, ctx.example_inputs)

    def shape(self, node_name: str) -> tuple[int, ...] | None:
        """The shape of a node whose value is one tensor, else None."""
        m = self.meta.get(node_name)
        return tuple(m.shape) if isinstance(m, TensorMetadata) else None

    def same_as(self, fresh: ShapeInfo) -> bool:
        """Every node this result describes and the graph still has keeps its shapes and dtypes.
        Nodes a pass added are not compared (compile's shape step describes them); gradient flags,
        strides and memory formats are not shapes (lowering turns parameters into buffers)."""
        return all(_shapes(meta, name in self.data_sized) == _shapes(fresh.meta[name], name in self.data_sized)
                   for name, meta in self.meta.items() if name in fresh.meta)


def propagate_shapes(gm: GraphModule, example_inputs: tuple | None) -> ShapeInfo:
    """Run `gm` on `example_inputs` in eval mode (BatchNorm statistics untouched), write every node's
    `node.meta["tensor_meta"]`, and return them as a ShapeInfo."""
    if example_inputs is None:
        raise PreconditionError("shape analysis needs example_inputs")
    with evaluating(gm):
        prop = _ShapeProp(gm)
        (prop if prop.fake_mode is None else ShapeProp(gm)).propagate(*example_inputs)
    return _shape_info(gm)


def shapes_and_outputs(gm: GraphModule, example_inputs: tuple) -> tuple[ShapeInfo, Any] | None:
    """`propagate_shapes(gm, example_inputs)` and the graph's outputs of that same run, which are
    what calling `gm` returns when `gm` has no forward hooks and the inputs bind to its forward (the
    interpreter feeds placeholders as the generated code binds its arguments, unpacks as its pytree
    codegen does, and calls every op with the same arguments). None, having run nothing, where a
    fake-tensor mode is active: torch's ShapeProp then runs on fake tensors, whose outputs prove nothing."""
    with evaluating(gm):
        prop = _ShapeProp(gm)
        if prop.fake_mode is not None:
            return None
        outputs = prop.propagate(*example_inputs)
    return _shape_info(gm), _as_returned(outputs)


def _as_returned(value: Any) -> Any:
    """The interpreter's outputs as the generated code returns them: the output node's arguments are torch.fx's
    immutable dicts and lists, which `return {...}` builds as plain ones (their pytree specs differ, so a pass
    verified by calling the module was refused as changing the outputs of a model returning a dict)."""
    if isinstance(value, immutable_dict):
        return {k: _as_returned(v) for k, v in value.items()}
    if isinstance(value, immutable_list):
        return [_as_returned(v) for v in value]
    if type(value) is tuple:
        return tuple(_as_returned(v) for v in value)
    return value


def _shape_info(gm: GraphModule) -> ShapeInfo:
    meta = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    return ShapeInfo(MappingProxyType(meta), data_sized(gm))


# Calls whose result's size (or, for `tolist` / `item`, whose Python values, used as sizes) come from tensor values.
DATA_SIZED_METHODS = frozenset({"tolist", "item", "nonzero", "unique", "masked_select"})
DATA_SIZED_FUNCTIONS = frozenset({torch.nonzero, torch.unique, torch.masked_select, torch.argwhere})


# Calls whose result has the size of their first argument whatever the others hold (scatter-like writes).
SIZE_OF_FIRST_METHODS = frozenset({"index_add", "index_put", "index_copy", "scatter", "scatter_add", "masked_fill"})
SIZE_OF_FIRST_FUNCTIONS = frozenset({torch.index_add, torch.index_put, torch.index_copy, torch.scatter,
                                     torch.scatter_add, torch.masked_fill})
_RESHAPES = frozenset({"view", "reshape", "expand"})


def reads_values_as_sizes(node: Node) -> bool:
    """Whether a call's result has a size (or, `tolist` / `item`, Python values) taken from tensor values."""
    return (node.op == "call_method" and node.target in DATA_SIZED_METHODS) or (
        node.op == "call_function" and (node.target in DATA_SIZED_FUNCTIONS
                                        or (node.target is torch.where and len(node.args) == 1)))


def data_sized(gm: GraphModule) -> frozenset[str]:
    """The nodes whose sizes may follow tensor values: such calls (and torch.where of a condition alone), and what
    is computed from them, except where the size is set otherwise: a view / reshape / expand to sizes that are
    all known (no -1), or a write into a tensor (in place, or scatter-like) whose size is known."""
    found: set[str] = set()

    def sized(value: Any) -> bool:
        return isinstance(value, Node) and value.name in found

    for node in gm.graph.nodes:
        if reads_values_as_sizes(node):
            found.add(node.name)
        elif not any(sized(source) for source in node.all_input_nodes):
            continue
        elif node.op == "call_method" and node.target in _RESHAPES and len(node.args) > 1:
            sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            if any(sized(size) or size == -1 for size in sizes):
                found.add(node.name)
        elif writes_in_place(node.op, node.target, node.kwargs) \
                or (node.op == "call_method" and node.target in SIZE_OF_FIRST_METHODS) \
                or (node.op == "call_function" and node.target in SIZE_OF_FIRST_FUNCTIONS):
            if node.args and sized(node.args[0]):
                found.add(node.name)
        else:
            found.add(node.name)
    return frozenset(found)


def _shapes(meta: Any, rank_only: bool = False) -> Any:
    """`meta` with each TensorMetadata reduced to (shape, dtype) (it is a named tuple itself, so
    torch.fx's map_aggregate would take it apart); `rank_only`: (number of dims, dtype)."""
    if isinstance(meta, TensorMetadata):
        return len(meta.shape) if rank_only else tuple(meta.shape), meta.dtype
    if isinstance(meta, (tuple, list)):
        return tuple(_shapes(m, rank_only) for m in meta)
    if isinstance(meta, Mapping):
        return {k: _shapes(v, rank_only) for k, v in meta.items()}
    return meta


class _ShapeProp(ShapeProp):
    """torch.fx's ShapeProp on real tensors, writing the same `tensor_meta` and `type` at a fraction
    of its cost per node: torch describes each tensor's memory format through the symbolic-shape
    checks of `torch._prims_common` (guards imported and built per call, about half of the
    propagation's own time on a small model); on concrete sizes those checks are the plain stride
    comparisons of `_memory_format` below. Fake-tensor runs keep torch's own ShapeProp.
    benchmarks/bench_compile_overhead.py measures it against torch's."""

    def run_node(self, n: Node) -> Any:
        try:
            if fx_traceback.should_preserve_node_meta:  # torch's own step, which publishes the node it runs
                result = Interpreter.run_node(self, n)
            else:  # the same step less its two context managers, which do nothing then
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as e:  # torch's ShapeProp error, so callers see the same exception
            raise RuntimeError(f"ShapeProp error for: node={n.format_node()} with meta={n.meta}") from e
        found = False

        def describe(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, describe) if isinstance(result, (tuple, list, dict, slice)) \
            else describe(result)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


_CONCRETE = (torch.Tensor, nn.Parameter)  # exact types: subclasses may describe themselves otherwise


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """`_extract_tensor_metadata(t)` (equal field by field; tests/test_analysis.py checks it)."""
    if type(t) not in _CONCRETE or t.layout is not torch.strided or t.is_quantized or t.is_nested:
        return _extract_tensor_metadata(t)
    stride = t.stride()
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, stride, _memory_format(tuple(t.shape), stride),
                          False, {})


def _memory_format(shape: tuple[int, ...], stride: tuple[int, ...]) -> torch.memory_format | None:
    """The first of contiguous, channels-last (4-d) and channels-last-3d (5-d) that `shape` and `stride`
    are contiguous in, as torch._prims_common decides it on concrete sizes: dims of length 1 are
    skipped, and fewer than two elements are contiguous."""
    numel = 1
    for size in shape:
        numel *= size
    if numel < 2 or _nested(shape, stride, range(len(shape) - 1, -1, -1)):
        return torch.contiguous_format
    if len(shape) == 4 and _nested(shape, stride, (1, 3, 2, 0)):
        return torch.channels_last
    if len(shape) == 5 and _nested(shape, stride, (1, 4, 3, 2, 0)):
        return torch.channels_last_3d
    return None


def _nested(shape: tuple[int, ...], stride: tuple[int, ...], order) -> bool:
    """Each dim in `order` (innermost first) strides over exactly the dims before it."""
    expected = 1
    for dim in order:
        if shape[dim] == 1:
            continue
        if stride[dim] != expected:
            return False
        expected *= shape[dim]
    return True
