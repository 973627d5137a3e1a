"""Verification after every pass: lint, recompile, a forward pass, output structure unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten

from .errors import ConfigError, VerificationError
from .execution import evaluating, locate_failure


@dataclass(frozen=True)
class OutputSignature:
    """The structure of a model's outputs: pytree spec plus each leaf's shape and dtype."""

    spec: str
    leaves: tuple[tuple[tuple[int, ...], torch.dtype] | str, ...]

    @classmethod
    def of(cls, outputs: Any) -> OutputSignature:
        leaves, spec = tree_flatten(outputs)
        described = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
                          for x in leaves)
        return cls(str(spec), described)


def forward(gm: GraphModule, example_inputs: tuple) -> Any:
    with evaluating(gm):
        return gm(*example_inputs)


def check_example_inputs(gm: GraphModule, example_inputs: tuple) -> Any:
    """The model's outputs on `example_inputs`, before any pass ran.

    A failure here is the inputs' fault, not a pass's: ConfigError naming the inputs that reach
    the failing node (index, shape, dtype) and the module it belongs to.
    """
    try:
        return forward(gm, example_inputs)
    except Exception as exc:
        node = locate_failure(gm, example_inputs)
        raise ConfigError(f"compile.example_inputs do not fit the model (no pass has run yet): "
                          f"{_input_failure(gm, example_inputs, node)}: {type(exc).__name__}: {exc}") from exc


def _input_failure(gm: GraphModule, example_inputs: tuple, node: Node | None) -> str:
    """Which inputs reach the failing node, and where in the model that node is."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if node is None or node.op == "placeholder" or len(example_inputs) > len(placeholders):
        return f"{len(example_inputs)} inputs given, the model's forward takes {[p.target for p in placeholders]}"
    upstream, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current not in upstream:
            upstream.add(current)
            pending.extend(current.all_input_nodes)
    culprits = [f"example_inputs[{i}] ({_describe(example_inputs[i])})" for i, p in enumerate(placeholders)
                if p in upstream and i < len(example_inputs)]
    return f"{', '.join(culprits) or 'no input'} reaches {_module_path(node)}, which failed at {node.format_node()}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def _module_path(node: Node) -> str:
    """The module a node runs in: its own target for call_module, else the innermost traced module."""
    if node.op == "call_module":
        return f"module '{node.target}'"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        return f"module '{path}' ({getattr(kind, '__name__', kind)})"
    return "the model's own forward"


def verify_graph(gm: GraphModule, example_inputs: tuple | None, expected: OutputSignature | None,
                 label: str) -> None:
    """Raise VerificationError (naming `label` and the failing node) if `gm` is not sound."""
    try:
        gm.graph.lint()
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # lint appends the whole graph
        raise VerificationError(f"{label}: the graph does not lint: {first_line}") from exc
    try:
        gm.recompile()
    except Exception as exc:
        raise VerificationError(f"{label}: the graph does not compile to Python: {exc}") from exc
    if example_inputs is None:
        return
    try:
        outputs = forward(gm, example_inputs)
    except Exception as exc:
        node = locate_failure(gm, example_inputs)
        where = f" at node {node.format_node()}" if node is not None else ""
        raise VerificationError(f"{label}: forward pass failed{where}: {type(exc).__name__}: {exc}") from exc
    if expected is not None:
        got = OutputSignature.of(outputs)
        if got != expected:
            output = next(n for n in gm.graph.nodes if n.op == "output")
            raise VerificationError(
                f"{label}: outputs changed at {output.format_node()}: expected {expected.leaves} "
                f"({expected.spec}), got {got.leaves} ({got.spec})")
