"""Running a GraphModule for analysis or verification: eval mode, no grad, failures located."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no grad for the block; every submodule's training flag is restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, flag in flags:
            m.training = flag


class NodeLocatingInterpreter(Interpreter):
    """An Interpreter that remembers the node it was running when something raised."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.current: Node | None = None

    def run_node(self, n: Node) -> Any:
        self.current = n
        return super().run_node(n)


def locate_failure(gm: GraphModule, inputs: tuple) -> Node | None:
    """Re-run `gm` node by node and return the node that raises (None if nothing does)."""
    interpreter = NodeLocatingInterpreter(gm)
    with evaluating(gm):
        try:
            interpreter.run(*inputs)
        except Exception:  # noqa: BLE001 - we only want to know where it fails
            return interpreter.current
    return None
