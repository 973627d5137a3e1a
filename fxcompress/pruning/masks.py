"""Masks as graph nodes: `mul(weight, get_attr <module>.weight_mask)` on a layer's weight chain.

The mask is a buffer named `<param>_mask` on the module that owns the weight, as in
torch.nn.utils.prune, so state_dict keys read `fc1.weight_mask`. Because the product is in the
graph, autograd gives pruned weights a gradient of exactly zero and the layer always computes with
exact zeros there, whatever the optimizer does to the stored tensor. A mask only ever shrinks:
setting a new one keeps every weight an older mask pruned.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..layers import Layer, find_layers, insert_on_weight, layer_node, stored_attr, submodule, weight_arg, weight_source


def mask_name(weight: str) -> str:
    """The qualified buffer name of a weight's mask: "fc1.weight" -> "fc1.weight_mask"."""
    return f"{weight}_mask"


def mask_node(gm: GraphModule, layer: Layer) -> Node | None:
    """The `mul(w, mask)` node on the layer's weight chain, if the layer is masked."""
    return _mask_on(layer_node(gm, layer), layer)


def _mask_on(node: Node, layer: Layer) -> Node | None:
    """mask_node's walk down the weight chain of `node`, the layer's node."""
    current = weight_arg(node) if node.op == "call_function" else None
    target = mask_name(layer.weight)
    while isinstance(current, Node) and current.op != "get_attr":
        mask = current.args[1] if len(current.args) > 1 else None
        if (current.target is operator.mul and isinstance(mask, Node) and mask.op == "get_attr"
                and mask.target == target):
            return current
        current = current.args[0] if current.args else None
    return None


def masks_only(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """For a functional layer whose weight is its stored tensor times mask buffers and nothing else
    (no fake-quant, no encoding), the combined mask; None for any other weight. Whatever is done to
    the stored tensor's rows (scaled, refitted) then reaches the layer the same way, zeros kept."""
    source, current = weight_source(node), weight_arg(node)
    if source is None or source.op != "get_attr":
        return None
    combined = torch.ones_like(gm.get_parameter(source.target), dtype=torch.bool)
    while current is not source:
        mask = current.args[1] if len(current.args) > 1 else None
        if not (current.op == "call_function" and current.target is operator.mul and isinstance(mask, Node)
                and mask.op == "get_attr"):
            return None
        combined &= gm.get_buffer(mask.target) != 0
        current = current.args[0]
    return combined


def get_mask(gm: GraphModule, layer: Layer) -> torch.Tensor | None:
    """The layer's mask buffer (1 = kept, 0 = pruned), or None when the layer is not masked."""
    if mask_node(gm, layer) is None:
        return None
    return gm.get_buffer(mask_name(layer.weight))


def masked_layers(gm: GraphModule) -> list[Layer]:
    """The layers of `gm` that carry a mask node."""
    return [layer for layer in find_layers(gm) if mask_node(gm, layer) is not None]


def stored_weight(gm: GraphModule, layer: Layer) -> torch.Tensor:
    return stored_attr(gm, layer.weight)


def set_mask(gm: GraphModule, layer: Layer, keep: torch.Tensor) -> bool:
    """Mask the layer with `keep` (weight-shaped) AND any mask it already has; masks are bool buffers.

    Creates the buffer and the mul node when the layer has none (returns True: the graph changed);
    the stored weight is zeroed where pruned, so state_dicts and exports see the zeros too.
    """
    weight = stored_weight(gm, layer)
    mask = keep.to(device=weight.device, dtype=torch.bool)  # a byte per weight, not four
    owner, _, attr = mask_name(layer.weight).rpartition(".")
    module = submodule(gm, owner)
    node = layer_node(gm, layer)  # looked up once: registering the mask buffer leaves the graph as it is
    created = _mask_on(node, layer) is None
    with torch.no_grad():
        existing = getattr(module, attr, None)
        if isinstance(existing, torch.Tensor) and existing.shape == mask.shape:
            mask = mask & existing.bool()
            existing.copy_(mask)
        else:
            module.register_buffer(attr, mask.contiguous())
        weight.mul_(mask)
    if created:
        name = mask_name(layer.weight)
        insert_on_weight(gm, layer, lambda graph, w: graph.call_function(operator.mul, (w, graph.get_attr(name))),
                         node=node)
    return created


def sparsity_of(mask: torch.Tensor) -> float:
    return 1.0 - mask.count_nonzero().item() / max(mask.numel(), 1)
