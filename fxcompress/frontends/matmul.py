"""`x @ weight.T` over a stored 2-D weight, read as `F.linear(x, weight)` on a graph from any front end.

Some forwards write a linear layer as a product with the transposed weight (Falcon's FalconLinear:
`input @ self.weight.T`). Read as it is written, the weight is no layer for masks, fake-quant, pruning or
lowering. `F.linear(x, weight)` is the product nn.Linear computes, the same values bit for bit (one
matrix product either way), so the layer tables see a linear layer there on both front ends.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, Node

from ..layers import stored_attr

# the spellings of a matrix product: torch functions (fx traces and export's respelled aten) and methods
# (`x.matmul(w.t())`); a transpose's spellings, `.T` / `.mT` attributes fx records through getattr among them,
# are read by `swapped_last_two`
_PRODUCTS = (torch.matmul, operator.matmul, "matmul")


def swapped_last_two(node: Any, ndim: int) -> Node | None:
    """What `node` transposes, where it swaps the last two dims of an `ndim`-D tensor and nothing else reads it
    (`w.T`, `w.t()`, `w.transpose(0, 1)`, `w.permute(1, 0)`, `w.mT`; of stacked matrices `transpose(-2, -1)`)."""
    if not (isinstance(node, Node) and node.op in ("call_function", "call_method") and len(node.users) == 1
            and not node.kwargs):
        return None
    target, (source, *rest) = node.target, node.args
    swap = tuple(range(ndim - 2)) + (ndim - 1, ndim - 2)
    if target is getattr:
        swaps = rest[0] == "mT" or (rest[0] == "T" and ndim == 2)
    elif target in (torch.t, "t"):
        swaps = not rest and ndim == 2
    elif target in (torch.transpose, "transpose"):
        swaps = len(rest) == 2 and all(isinstance(d, int) for d in rest) and {d % ndim for d in rest} == set(swap[-2:])
    elif target in (torch.permute, "permute"):
        swaps = tuple(rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest) == swap
    else:
        return None
    return source if swaps else None


def _stored_matrix(root: nn.Module, node: Any) -> bool:
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return False
    value = stored_attr(root, node.target)
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.is_floating_point()


def linears_written_as_matmul(graph: Graph, root: nn.Module) -> bool:
    """Rewrite each `x @ weight.T` over a stored 2-D float weight of `root` as `F.linear(x, weight)`;
    whether any was. The caller recompiles its GraphModule."""
    changed = False
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or node.target not in _PRODUCTS or node.kwargs \
                or len(node.args) != 2:
            continue
        x, transposed = node.args
        weight = swapped_last_two(transposed, 2)
        if not _stored_matrix(root, weight):
            continue
        with graph.inserting_before(node):
            linear = graph.call_function(F.linear, (x, weight))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        graph.erase_node(transposed)
        changed = True
    return changed
