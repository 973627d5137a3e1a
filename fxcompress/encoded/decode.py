"""decode(gm): a plain dense GraphModule — every weight a float parameter, no encoded modules,
no masks or fake-quant chains (their effective weights are folded in)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.layers import effective_weight, find_layers, layer_node, weight_arg

from .module import EncodedWeight
from fxcompress.rewire import swap_input


def decode(gm: GraphModule) -> GraphModule:
    """A copy of `gm` computing the same outputs with dense float weights: encoded weights decoded, weight chains
    (masks, codebooks, grids) folded, and the lowered sparse, weight-only and dynamic int8 layers replaced by the
    nn.Linear / nn.Conv2d / nn.Embedding they compute (`dense_module`; a dynamic int8 layer's input is then no
    longer rounded at run time). Native-integer layers stay: their activations are integer codes."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None and hasattr(module, "dense_module"):
            owner, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(owner), name, module.dense_module())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), EncodedWeight):
            owner, _, name = node.target.rpartition(".")
            _set_parameter(gm, owner, name.removesuffix("_encoded"), gm.get_submodule(node.target)())
            with gm.graph.inserting_before(node):
                plain = gm.graph.get_attr(f"{owner}.{name.removesuffix('_encoded')}" if owner
                                          else name.removesuffix("_encoded"))
            for user in list(node.users):
                swap_input(gm, user, node, plain)
    for layer in find_layers(gm):
        node = layer_node(gm, layer)
        chain = weight_arg(node) if node.op == "call_function" else None
        if chain is not None and chain.op != "get_attr":
            value = effective_weight(gm, layer)
            owner, _, name = layer.weight.rpartition(".")
            with gm.graph.inserting_before(node):
                plain = gm.graph.get_attr(layer.weight)
            swap_input(gm, node, chain, plain)
            _set_parameter(gm, owner, name, value)
    gm.recompile()
    return gm


def _set_parameter(gm: GraphModule, owner: str, name: str, value: torch.Tensor) -> None:
    module = gm.get_submodule(owner)
    if hasattr(module, name):
        delattr(module, name)
    module.register_parameter(name, nn.Parameter(value.detach().clone()))
