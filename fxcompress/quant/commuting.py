"""Ops that commute with quantization onto a per-tensor grid whose zero is exact.

Monotone, zero-preserving ops (ReLU, max pooling) and ops that only move or select values (flatten,
reshape, view, slicing, eval-mode dropout) give the same result before or after rounding to such a
grid, so a layer's output may be quantized where the layer writes it and the op may run on codes.
The integer lowering and the QDQ ONNX export both read this one table; InsertFakeQuant reads it to
see that an operand of a residual add is already on a quantized layer's grid.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

COMMUTING_FUNCTIONS = {F.relu, torch.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten, torch.reshape,
                       F.dropout, operator.getitem}
COMMUTING_METHODS = {"relu", "flatten", "view", "reshape"}
COMMUTING_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity)


def commutes_with_quantization(gm: GraphModule, node: Node) -> bool:
    """Whether `node` is one of the ops above (a module call looked up in `gm`)."""
    if node.op == "call_function":
        return node.target in COMMUTING_FUNCTIONS
    if node.op == "call_method":
        return node.target in COMMUTING_METHODS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), COMMUTING_MODULES)


# residual adds as fx spells them (operator, torch and method forms); both the placement of the grids a
# join needs (InsertFakeQuant) and the integer lowering of the join recognise them here
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}


def is_add(node: Node) -> bool:
    """Whether `node` adds tensors (its operands are not checked)."""
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))
