"""The input shapes an exported graph was traced for, kept in the graph as checks.

torch.export traces a forward once and records what the trace assumed of the inputs' shapes: a size it held
fixed (the example's), and the range of a free one (a forward that branches on `x.shape[0] > 4` is exported,
from an example of 3, for batches of 2 to 4). `ExportedProgram.module()` checks them before each call; the
torch-level GraphModule the export front end builds would lose them, and would compute the traced branch for
any input (that model's graph doubled nothing at a batch of 5, silently). `check_input_shape` is a node after
the inputs holding only numbers, so files keep it and passes leave it; it raises a ConfigError naming the input
and the axis. As torch's own check does, a free size whose lower bound is the 2 export traces at also takes 1
(compile's own export verified the graph there; see `export._export_free_sizes`).
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx import Graph, Node

from ..errors import ConfigError

# (lowest, highest) size of each axis, highest None where unbounded
AxisRange = tuple[int, "int | None"]


# Why a graph takes only some sizes of an input, by the cause a check names: for its message.
WHY_FIXED = {
    "torch.export": "traced by torch.export for {sizes} there and computes something else outside (the model "
                    "fixes or branches on that size)",
    "specialize_shapes": "compiled with specialize_shapes=True, which folded its sizes to the example inputs' "
                         "({sizes} there), and computes something else for any other (a view of other sizes "
                         "mixes rows, silently)",
}


def check_input_shape(input: torch.Tensor, name: str, axes: tuple[AxisRange, ...],
                      cause: str = "torch.export") -> None:
    """Raise ConfigError unless `input` has len(axes) axes, each within its (lowest, highest) sizes; the message
    gives the `cause` (a key of WHY_FIXED) of the bounds."""
    if not isinstance(input, torch.Tensor) or input.dim() != len(axes):
        got = f"{input.dim()} axes {tuple(input.shape)}" if isinstance(input, torch.Tensor) else type(input).__name__
        raise ConfigError(f"input {name!r} has {got}; this graph was {_traced(cause)} for {len(axes)} axes")
    for axis, (lowest, highest) in enumerate(axes):
        size = input.shape[axis]
        if size < lowest or (highest is not None and size > highest):
            why = WHY_FIXED.get(cause, WHY_FIXED["torch.export"]).format(sizes=describe(lowest, highest))
            raise ConfigError(f"input {name!r} has size {size} along axis {axis} (shape {tuple(input.shape)}); this "
                              f"graph was {why}: compile with an example of that shape")


def _traced(cause: str) -> str:
    return "compiled with specialize_shapes=True" if cause == "specialize_shapes" else "traced"


def describe(lowest: int, highest: int | None) -> str:
    """An axis range in words: "size 3", "sizes 1 to 4", "sizes of 2 or more"."""
    if lowest == highest:
        return f"size {lowest}"
    return f"sizes {lowest} to {highest}" if highest is not None else f"sizes of {lowest} or more"


_has_side_effect = getattr(torch.fx.node, "has_side_effect", None)
if _has_side_effect is not None:  # a graph's own dead-code elimination keeps the check, as it keeps torch._assert
    _has_side_effect(check_input_shape)


def traced_shapes(source: torch.export.ExportedProgram | torch.fx.GraphModule,
                  traced_at_one: frozenset[tuple[int, int]] = frozenset()) -> list[tuple[AxisRange, ...] | None]:
    """For each user input of an ExportedProgram or of its `.module()` (in order), the (lowest, highest) size of each
    axis it was traced for: an int size fixed, a free one its range (a size written as an expression of others,
    unchecked); None where every axis takes any size. A free lower bound of 2 becomes 1 except on the (input,
    axis) pairs of `traced_at_one`, where a size of one was found to compute otherwise."""
    ranges = getattr(source, "range_constraints", None) or {}  # a deep copy of `.module()` has none left
    placeholders = list(source.graph.find_nodes(op="placeholder"))
    if isinstance(source, torch.export.ExportedProgram):
        user_inputs = set(source.graph_signature.user_inputs)
        placeholders = [node for node in placeholders if node.name in user_inputs]
    found = []
    for index, node in enumerate(placeholders):
        value = node.meta.get("val")
        axes = tuple(_axis_range(size, ranges, (index, axis) not in traced_at_one)
                     for axis, size in enumerate(value.shape)) if isinstance(value, torch.Tensor) else ()
        found.append(axes if any(axis != (0, None) for axis in axes) else None)
    return found


def _axis_range(size: int | torch.SymInt, ranges: dict, one_as_two: bool) -> AxisRange:
    if not isinstance(size, torch.SymInt) or size.node.expr.is_number:  # a size export fixed (Mamba's length)
        return (int(size), int(size))
    bounds = ranges.get(size.node.expr)
    if bounds is None:  # an expression of free sizes (2 * s0): the sizes it is made of are checked
        return (0, None)
    lowest = int(bounds.lower) if bounds.lower.is_Integer else 0
    highest = int(bounds.upper) if bounds.upper.is_Integer else None  # torch's int_oo: unbounded
    return (1 if lowest == 2 and one_as_two else lowest, highest)


def insert_input_checks(graph: Graph, shapes: list[tuple[AxisRange, ...] | None], cause: str = "torch.export") -> None:
    """After the inputs of `graph`, one `check_input_shape` per input with traced shapes (`shapes`, in the graph's
    placeholder order), for `cause` (a key of WHY_FIXED)."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    checks = [(node, axes) for node, axes in zip(placeholders, shapes) if axes is not None]
    extra = () if cause == "torch.export" else (cause,)  # the default stays unwritten: files keep their form
    if checks:
        with graph.inserting_after(placeholders[-1]):
            for node, axes in reversed(checks):
                graph.call_function(check_input_shape, (node, node.target, axes, *extra))


def insert_exact_input_checks(graph: Graph, example_inputs: tuple) -> None:
    """Checks that each tensor input has exactly its example's shape (compile's specialize_shapes, which folds sizes
    to the example's), in place of any checks the graph held (the example's shape lies within those)."""
    for check in input_checks(graph):
        graph.erase_node(check)
    shapes = [tuple((size, size) for size in x.shape) if isinstance(x, torch.Tensor) else None
              for x in example_inputs]
    insert_input_checks(graph, shapes, cause="specialize_shapes")


def input_checks(graph: Graph) -> list[Node]:
    """The input checks of `graph`."""
    return list(graph.find_nodes(op="call_function", target=check_input_shape))
