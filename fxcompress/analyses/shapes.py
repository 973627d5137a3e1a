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

from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..analysis import Analysis
from ..errors import PreconditionError
from ..execution import evaluating


@dataclass(frozen=True)
class ShapeInfo(Analysis):
    """`meta[node_name]` is ShapeProp's TensorMetadata (or a tuple / dict of them) for that node."""

    meta: Mapping[str, Any]

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
        return all(_shapes(meta) == _shapes(fresh.meta[name])
                   for name, meta in self.meta.items() if name in fresh.meta)


def propagate_shapes(gm: GraphModule, example_inputs: tuple | None) -> ShapeInfo:
    """Run `gm` on `example_inputs` in eval mode (BatchNorm statistics untouched), write every node's
    `node.meta["tensor_meta"]`, and return them as a ShapeInfo."""
    if example_inputs is None:
        raise PreconditionError("shape analysis needs example_inputs")
    with evaluating(gm):
        ShapeProp(gm).propagate(*example_inputs)
    meta = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
    return ShapeInfo(MappingProxyType(meta))


def _shapes(meta: Any) -> Any:
    """`meta` with each TensorMetadata reduced to (shape, dtype) (it is a named tuple itself, so
    torch.fx's map_aggregate would take it apart)."""
    if isinstance(meta, TensorMetadata):
        return tuple(meta.shape), meta.dtype
    if isinstance(meta, (tuple, list)):
        return tuple(_shapes(m) for m in meta)
    if isinstance(meta, Mapping):
        return {k: _shapes(v) for k, v in meta.items()}
    return meta
