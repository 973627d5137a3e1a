"""Shared analyses of a GraphModule (computed once per graph, see fxcompress.analysis)."""
from .ownership import ParamOwnership
from .shapes import ShapeInfo, propagate_shapes

__all__ = ["ParamOwnership", "ShapeInfo", "propagate_shapes"]
