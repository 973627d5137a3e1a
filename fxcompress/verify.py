"""Verification after every pass: lint, recompile, a forward pass, output structure unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

from .errors import VerificationError
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
