"""ShapeInfo: tensor shapes and dtypes of every node, from torch.fx's ShapeProp on the example inputs."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..analysis import Analysis
from ..errors import PreconditionError


@dataclass(frozen=True)
class ShapeInfo(Analysis):
    """`meta[node_name]` is ShapeProp's TensorMetadata (or a tuple / dict of them) for that node."""

    meta: Mapping[str, Any]

    @classmethod
    def compute(cls, gm: GraphModule, ctx) -> ShapeInfo:
        from ..execution import evaluating

        if ctx.example_inputs is None:
            raise PreconditionError("shape analysis needs example_inputs")
        with evaluating(gm):
            ShapeProp(gm).propagate(*ctx.example_inputs)
        meta = {n.name: n.meta["tensor_meta"] for n in gm.graph.nodes if "tensor_meta" in n.meta}
        return cls(MappingProxyType(meta))

    def shape(self, node_name: str) -> tuple[int, ...] | None:
        """The shape of a node whose value is one tensor, else None."""
        m = self.meta.get(node_name)
        return tuple(m.shape) if isinstance(m, TensorMetadata) else None
