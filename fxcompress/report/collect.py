"""What the report shows, gathered from a compressed GraphModule: each layer's weights before and after
quantization, and the values they were quantized to.

The weights before quantization are the input of the first quantizing transform on the layer's
weight chain (a fake-quant model keeps its float weights there). A lowered or encoded model no
longer holds them; the report then reads them from a reference model (the fake-quant model, or the
dense one) whose layer of the same name supplies them the same way, or its plain weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import ConfigError
from ..layers import constant_value, effective_weight, find_layers, layer_node, weight_arg

MAX_CENTROIDS = 256  # more distinct values than this: the weight is not on a codebook or grid worth marking


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights: `after` as the model computes with them, `before` quantization (None if
    neither the model nor the reference holds them), and `centroids`: the distinct nonzero values of
    `after` when it has at most MAX_CENTROIDS of them (a k-means codebook or a linear grid), else None."""

    name: str
    after: torch.Tensor
    before: torch.Tensor | None
    centroids: torch.Tensor | None


def _quantizer_input(gm: GraphModule, layer_node_: Node) -> Node | None:
    """The node feeding the first (source-side) transform on the chain that sets a bit width."""
    current, found = weight_arg(layer_node_), None
    while isinstance(current, Node) and current.op != "get_attr":
        if current.op == "call_module" and getattr(gm.get_submodule(current.target), "bits", None):
            found = current.args[0] if current.args and isinstance(current.args[0], Node) else None
        current = current.args[0] if current.args and isinstance(current.args[0], Node) else None
    return found


def _before(gm: GraphModule, name: str) -> torch.Tensor | None:
    """The layer's weight before quantization in `gm`, if `gm` holds it."""
    layer = next((layer for layer in find_layers(gm) if layer.name == name), None)
    if layer is None:
        return None
    node = layer_node(gm, layer)
    if node.op == "call_module":
        return None
    source = _quantizer_input(gm, node)
    return None if source is None else constant_value(gm, source).detach()


def _reference_weight(reference: nn.Module, name: str) -> torch.Tensor | None:
    if isinstance(reference, GraphModule):
        found = _before(reference, name)
        if found is not None:
            return found
        layer = next((layer for layer in find_layers(reference) if layer.name == name), None)
        return None if layer is None else effective_weight(reference, layer)
    try:
        weight = getattr(reference.get_submodule(name), "weight", None)
    except AttributeError:
        return None
    return weight.detach() if isinstance(weight, torch.Tensor) else None


def _centroids(weight: torch.Tensor) -> torch.Tensor | None:
    values = torch.unique(weight[weight != 0].float())
    return values if 0 < values.numel() <= MAX_CENTROIDS else None


def layer_weights(gm: GraphModule, reference: nn.Module | None = None) -> list[LayerWeights]:
    """Every untied layer's weights before and after quantization (see the module docstring)."""
    if reference is not None and not isinstance(reference, nn.Module):
        raise ConfigError(f"report.reference must be a torch.nn.Module, got {type(reference).__name__}")
    found = []
    for layer in find_layers(gm):
        if layer.tied_to is not None:
            continue
        after = effective_weight(gm, layer)
        before = _before(gm, layer.name)
        if before is None and reference is not None:
            before = _reference_weight(reference, layer.name)
        if before is not None and before.shape != after.shape:
            raise ConfigError(f"report.reference: layer {layer.name} has weight shape {tuple(before.shape)}, "
                              f"the compressed model {tuple(after.shape)}")
        found.append(LayerWeights(layer.name, after, before, _centroids(after)))
    return found
