"""What the report shows, gathered from a compressed GraphModule: each layer's weights before and after
quantization, and the values they were quantized to.

The weights before quantization are the input of the first quantizing transform on the layer's
weight chain (a fake-quant model keeps its float weights there). A lowered or encoded model no
longer holds them; the report then reads them from a reference model (the fake-quant model, or the
dense one) whose layer of the same name supplies them the same way, or its plain weight.

Layers lowered to run-time modules (integer, oneDNN int8, weight-only, dynamic int8, sparse) are
read back through the table LOWERED. A weight on a linear grid (per tensor, per output channel or
per group of input channels) carries its integer codes with their scales (`grid`): the report marks
the levels of one representative grid — the channel or group of median step — and counts the
weights per level over all of them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import ConfigError
from ..kernels.dynamic import DynamicInt8Linear
from ..kernels.sparse import SparseLayer
from ..kernels.weight_only import WeightOnlyLinear
from ..layers import chain_module_node, constant_value, effective_weight, find_layers, layer_node, weight_arg
from ..quant.integer import IntegerLayer
from ..quant.modules import GridWeight
from ..kernels.native import NativeLayer
from ..quant.quantizers import GroupedCodes

MAX_CENTROIDS = 256  # more distinct values than this: the weight is not on a codebook or grid worth marking


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights: `after` as the model computes with them (real values; an integer layer's
    codes when no reference gives their scale), `before` quantization (None if neither the model nor
    the reference holds them), `centroids`: the values to mark — a codebook's centroids (the distinct
    nonzero values of `after` when it has at most MAX_CENTROIDS of them, shared by its weights), or the levels of the
    representative grid of `grid` — and `marks`, what they are in words."""

    name: str
    after: torch.Tensor
    before: torch.Tensor | None
    centroids: torch.Tensor | None
    grid: GroupedCodes | None = None  # a linear grid's codes, scales and zero-points, one row per output channel
    marks: str = ""  # the legend of the marks: "16 centroids", "255 levels of channel 8"
    caption: str = ""  # what the picture shows, in a sentence under it
    codes_only: bool = False  # `after` holds integer codes: the weight scale was folded away (integer layers)


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
    """The distinct nonzero values when the weights share them. A small (or heavily pruned) float layer has
    few distinct values too, each taken by one weight: those are no codebook and are not marked as one."""
    kept = weight[weight != 0].float()
    values = torch.unique(kept)
    return values if 0 < values.numel() <= MAX_CENTROIDS and values.numel() < kept.numel() else None


def _rows_grid(codes: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> GroupedCodes:
    """A per-output-channel symmetric grid (zero-point 0) of codes shaped like the weight."""
    rows = codes.reshape(codes.shape[0], -1).int()
    return GroupedCodes(rows, scale.float().reshape(-1, 1), torch.zeros(len(rows), 1), rows.shape[1], qmin, qmax)


def _weight_only_grid(m: WeightOnlyLinear) -> GroupedCodes:
    return GroupedCodes(m.unsigned_codes().int(), m.scale.float(), m.zero.float(), m.group_size, 0, 2 ** m.bits - 1)


# lowered run-time module -> (its weight in real units or None, its grid or None); the layer is the
# module's parent path. An integer layer keeps codes only: its weight scale is folded into the
# requantization, so the grid comes from the reference model when there is one.
LOWERED: dict[type, Callable[[nn.Module], tuple[torch.Tensor | None, GroupedCodes | None]]] = {
    IntegerLayer: lambda m: (None, None),
    NativeLayer: lambda m: (m.weight.float() * m.weight_scale.reshape(-1, *[1] * (m.weight.ndim - 1)),
                            _rows_grid(m.weight, m.weight_scale, -128, 127)),
    DynamicInt8Linear: lambda m: (m.dequantize(), _rows_grid(m.weight, m.weight_scale, -128, 127)),
    WeightOnlyLinear: lambda m: (m.dequantize(), _weight_only_grid(m)),
    SparseLayer: lambda m: (m.dense_weight().detach(), None),
}


# the attribute a lowering pass gives its run-time module under the layer's path (`fc1.integer`); a module
# put in the layer's own place (LowerToSparse's `fc1`) is named by its path
LOWERED_SUFFIXES = ("integer", "native", "weight_only", "dynamic_int8", "sparse")


def _layer_name(path: str) -> str:
    owner, _, last = path.rpartition(".")
    return owner if owner and last in LOWERED_SUFFIXES else path


def _chain_grid(gm: GraphModule, name: str, before: torch.Tensor | None) -> GroupedCodes | None:
    """The grid the GridWeight on layer `name`'s chain in `gm` puts `before` on, if it has one."""
    layer = next((layer for layer in find_layers(gm) if layer.name == name), None)
    if layer is None or before is None:
        return None
    node = chain_module_node(gm, layer_node(gm, layer), GridWeight)
    if node is None:
        return None
    return gm.get_submodule(node.target).grouped(before)


def representative_levels(grid: GroupedCodes) -> tuple[torch.Tensor, str, str]:
    """The real values of every level of the grid (row, group) of median step, its legend and caption."""
    steps = grid.scale.flatten()
    index = int(steps.argsort()[(len(steps) - 1) // 2])
    row, group = divmod(index, grid.scale.shape[1])
    levels = (torch.arange(grid.qmin, grid.qmax + 1).float() - grid.zero_point[row, group]) * steps[index]
    if len(steps) == 1:
        return levels, f"{len(levels)} grid levels", f"Marked: the {len(levels)} levels of the layer's one grid."
    per = "group" if grid.scale.shape[1] > 1 else "channel"
    where = f"output channel {row}" + (f", inputs {group * grid.group_size}-{(group + 1) * grid.group_size - 1}"
                                       if per == "group" else "")
    return levels, f"{len(levels)} levels of {per} {row}" + (f"/{group}" if per == "group" else ""), (
        f"Marked: the {len(levels)} grid levels of {where}, the {per} of median step among {len(steps)} "
        f"per-{per} grids (steps {steps.min():.3g} to {steps.max():.3g}); the counts on the right are over all "
        f"of them, by integer level.")


def _weights(name: str, after: torch.Tensor, before: torch.Tensor | None, grid: GroupedCodes | None,
             codes_only: bool = False) -> LayerWeights:
    if before is not None and before.shape != after.shape:
        raise ConfigError(f"report.reference: layer {name} has weight shape {tuple(before.shape)}, "
                          f"the compressed model {tuple(after.shape)}")
    if grid is not None:
        levels, marks, caption = representative_levels(grid)
        return LayerWeights(name, after, before, levels, grid, marks, caption, codes_only)
    centroids = None if codes_only else _centroids(after)  # codes are no codebook: they are counted per code
    marks = "" if centroids is None else f"{centroids.numel()} centroids"
    caption = ("Integer codes: this layer's weight scale is folded into its requantization; pass the fake-quant "
               "model as reference for the weights before quantization and the grid." if codes_only else
               f"Marked: the {centroids.numel()} shared values (centroids) the weights took." if centroids is not None
               else "")
    return LayerWeights(name, after, before, centroids, None, marks, caption, codes_only)


def _lowered(gm: GraphModule, reference: nn.Module | None) -> list[LayerWeights]:
    found = []
    for path, module in gm.named_modules():
        read = LOWERED.get(type(module))
        if read is None:
            continue
        name = _layer_name(path)
        after, grid = read(module)
        before = None if reference is None else _reference_weight(reference, name)
        codes_only = False
        if isinstance(module, IntegerLayer):  # codes; their scale from the reference's grid, if it has one
            grid = _chain_grid(reference, name, before) if isinstance(reference, GraphModule) else None
            after = module.weight.float() if grid is None else grid.dequantize().reshape(module.weight.shape)
            codes_only = grid is None
        found.append(_weights(name, after, before, grid, codes_only))
    return found


def layer_weights(gm: GraphModule, reference: nn.Module | None = None) -> list[LayerWeights]:
    """Every untied layer's weights before and after quantization (see the module docstring), lowered
    layers included, in the order of the model's modules."""
    if reference is not None and not isinstance(reference, nn.Module):
        raise ConfigError(f"report.reference must be a torch.nn.Module, got {type(reference).__name__}")
    found = []
    for layer in find_layers(gm):
        if layer.tied_to is not None:
            continue
        before = _before(gm, layer.name)
        grid = _chain_grid(gm, layer.name, before)
        if before is None and reference is not None:
            before = _reference_weight(reference, layer.name)
        found.append(_weights(layer.name, effective_weight(gm, layer), before, grid))
    order = {path: i for i, (path, _) in enumerate(gm.named_modules())}
    return sorted(found + _lowered(gm, reference), key=lambda w: order.get(w.name, len(order)))
