"""Verification after every pass: lint, recompile, a forward pass, output structure unchanged.

Every failure about a node names where the node came from (`tracing.origin`: the user's module path
and source line), not only its fx name, which the user never wrote."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten

from .errors import ConfigError, VerificationError
from .execution import evaluating, locate_failure
from .tracing import origin


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
    return f"{', '.join(culprits) or 'no input'} reaches {origin(node)}, which failed at {node.format_node()}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def failing_node(gm: GraphModule, example_inputs: tuple) -> str:
    """' at node %x = ... (<origin>)' for the node that raises on `example_inputs`; '' if none does."""
    node = locate_failure(gm, example_inputs)
    return f" at node {node.format_node()} ({origin(node)})" if node is not None else ""


def verify_graph(gm: GraphModule, example_inputs: tuple | None, expected: OutputSignature | None,
                 label: str) -> OutputSignature | None:
    """Raise VerificationError (naming `label` and the failing node) if `gm` is not sound; the
    signature of its outputs on `example_inputs` (None without them)."""
    check_graph(gm, label)
    return None if example_inputs is None else verify_forward(gm, example_inputs, expected, label)


def verify_forward(gm: GraphModule, example_inputs: tuple, expected: OutputSignature | None,
                   label: str) -> OutputSignature:
    """verify_graph's forward pass (on gm's current code) and output check; the outputs' signature."""
    try:
        outputs = forward(gm, example_inputs)
    except Exception as exc:
        raise VerificationError(f"{label}: forward pass failed{failing_node(gm, example_inputs)}: "
                                f"{type(exc).__name__}: {exc}") from exc
    return check_outputs(gm, outputs, expected, label)


def check_graph(gm: GraphModule, label: str) -> None:
    """verify_graph's first half: the graph lints and compiles to Python (gm's code is then current)."""
    try:
        gm.graph.lint()
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__  # lint appends the whole graph
        raise VerificationError(f"{label}: the graph does not lint: {first_line}") from exc
    try:
        gm.recompile()
    except Exception as exc:
        raise VerificationError(f"{label}: the graph does not compile to Python: {exc}") from exc


def check_outputs(gm: GraphModule, outputs: Any, expected: OutputSignature | None, label: str) -> OutputSignature:
    """verify_graph's last step: `outputs` (of a run on the example inputs) have the `expected`
    structure (any, when None); their signature."""
    got = OutputSignature.of(outputs)
    if expected is not None and got != expected:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        raise VerificationError(
            f"{label}: outputs changed at {output.format_node()}: expected {expected.leaves} "
            f"({expected.spec}), got {got.leaves} ({got.spec}); {_changed_leaves(output, expected, got)}")
    return got


def _changed_leaves(output: Node, expected: OutputSignature, got: OutputSignature) -> str:
    """Which output nodes changed, and where each came from."""
    leaves = tree_flatten(output.args[0])[0]
    if len(leaves) != len(expected.leaves) or len(leaves) != len(got.leaves):  # an output node holds a tuple
        return "output nodes: " + "; ".join(f"{n.name}: {origin(n)}" for n in output.all_input_nodes)
    changed = [f"output {i} {leaf.name if isinstance(leaf, Node) else repr(leaf)}: {origin(leaf)}"
               for i, (leaf, before, after) in enumerate(zip(leaves, expected.leaves, got.leaves))
               if before != after and isinstance(leaf, Node)]
    return "; ".join(changed) or "no output node to name"
