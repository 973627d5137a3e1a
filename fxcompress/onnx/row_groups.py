"""Rows grouped by counts read from the data, kept as tensors for the exporter.

A mixture of experts sorts its tokens by expert and hands each expert the rows between two offsets computed from
the routing (`offsets.tolist()` then `rows[a:b]`, or `.item()` counts then `torch.split`). The TorchScript exporter
traces once, so those Python numbers would become constants of the example and the file would give every other
input the example's split. Here the numbers stay tensors: a slice between them picks the rows whose positions lie
between the bounds (ONNX computes how many from the data), a split takes consecutive such slices. Graphs whose read
numbers feed anything else are left as they are (`to_onnx` then refuses them by node)."""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import GraphModule, Node

SPLITS = frozenset({torch.split, torch.functional.split})
SPLIT_METHODS = frozenset({"split", "split_with_sizes"})


def rows_between(input: torch.Tensor, start: Any, end: Any) -> torch.Tensor:
    """input[start:end] along the first axis, for bounds that are ints, None or one-element tensors: the rows whose
    positions lie in [start, end), negative bounds counted from the end as Python's slices count them."""
    count = input.shape[0]
    positions = torch.arange(count, device=input.device)
    keep = torch.ones_like(positions, dtype=torch.bool)
    if start is not None:
        keep = keep & (positions >= _from_start(start, count))
    if end is not None:
        keep = keep & (positions < _from_start(end, count))
    return input[keep]


def split_rows(input: torch.Tensor, sizes: list | tuple) -> tuple[torch.Tensor, ...]:
    """torch.split(input, sizes) along the first axis for sizes that are ints or one-element tensors."""
    parts, start = [], 0
    for size in sizes:
        end = start + (size.reshape(()) if isinstance(size, torch.Tensor) else size)
        parts.append(rows_between(input, start, end))
        start = end
    return tuple(parts)


def _from_start(bound: Any, count: Any) -> Any:
    """A slice bound counted from the first row (a negative one counts from the end)."""
    if isinstance(bound, torch.Tensor):
        bound = bound.reshape(())
        return torch.where(bound < 0, bound + count, bound)
    return bound + count if bound < 0 else bound


def keep_row_counts_as_tensors(gm: GraphModule) -> int:
    """Rewrite, in `gm` (the exported copy), slices and splits of rows at numbers read from tensors (`item`, the
    elements of `tolist`) into `rows_between` / `split_rows` of the tensors themselves. All or nothing: where a
    read number has another use, the graph is left unchanged. Returns the number of slices and splits rewritten."""
    read = _read_numbers(gm)
    if read is None:
        return 0
    consumers = {user for number in read for user in number.users}
    if not consumers or not all(_rows_use(node, read) for node in consumers):
        return 0
    for node in consumers:
        if node.target is operator.getitem:
            bounds = node.args[1][0] if isinstance(node.args[1], tuple) else node.args[1]
            node.target, node.args = rows_between, (node.args[0], bounds.start, bounds.stop)
        else:
            node.op, node.target, node.args, node.kwargs = "call_function", split_rows, node.args[:2], {}
    for number, tensor in read.items():  # the number becomes the tensor element it was read from
        if number.target == "item":
            number.replace_all_uses_with(tensor)
            gm.graph.erase_node(number)
        else:
            number.args = (tensor, number.args[1])
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "tolist" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(consumers)


def _read_numbers(gm: GraphModule) -> dict[Node, Node] | None:
    """Each node holding a Python number read from a tensor -> that tensor (for `item`) or the tensor indexed (for an
    element of `tolist`); None where a `tolist` is used otherwise than element by element."""
    read = {}
    for node in gm.graph.nodes:
        if node.op != "call_method" or node.target not in ("item", "tolist"):
            continue
        if node.target == "item":
            read[node] = node.args[0]
            continue
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem and user.args[0] is node
                    and isinstance(user.args[1], int)):
                return None
            read[user] = node.args[0]
    return read


def _rows_use(node: Node, read: dict[Node, Node]) -> bool:
    """Whether `node` uses read numbers only as bounds of a slice of rows, or as sizes of a split of rows."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        index = node.args[1]
        bounds = index[0] if isinstance(index, tuple) and len(index) == 1 else index
        return (isinstance(bounds, slice) and bounds.step is None and node.args[0] not in read
                and all(b is None or isinstance(b, int) or b in read for b in (bounds.start, bounds.stop)))
    if (node.op == "call_function" and node.target in SPLITS) or (node.op == "call_method"
                                                                  and node.target in SPLIT_METHODS):
        if len(node.args) < 2 or set(node.kwargs) - {"dim"}:
            return False
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        sizes = node.args[1]
        return (dim == 0 and isinstance(sizes, (list, tuple)) and node.args[0] not in read
                and all(isinstance(s, int) or s in read for s in sizes))
    return False
