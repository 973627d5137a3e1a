"""LowerToInteger: replace fake-quantized layers by integer-only ones (Jacob et al. 2018).

Runs after InsertFakeQuant with linear or fixed-point weights and calibrated activation
fake-quant on the layers' inputs. Each `ActivationQuant` fed by float values becomes an explicit
`QuantizeInput` boundary; each quantized layer becomes an `IntegerLayer` that requantizes straight
onto the grid of the next activation fake-quant when only ReLU / max-pool / reshape ops stand in
between (those run on integer codes), and dequantizes otherwise (e.g. before a residual add or the
model's output). The result computes what the fake-quant model computes, up to the rounding of
the bias and of the requantization.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.config import validate
from fxcompress.errors import PreconditionError
from fxcompress.quant.integer import ACCUMULATOR_BITS, IntegerLayer, QuantizeInput, fixed_point_multiplier
from fxcompress.layers import Layer, chain_module_node, constant_value, layer_node, select_layers
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.quant.quantizers import Grid, quantize

# Ops that commute with quantization onto a grid whose zero is exact: they may run on codes.
_CODE_SAFE_FUNCTIONS = {F.relu, torch.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten,
                        torch.reshape, F.dropout, operator.getitem}
_CODE_SAFE_METHODS = {"relu", "flatten", "view", "reshape"}
_CODE_SAFE_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class _Quantized:
    layer: Layer
    node: Node
    quantizer: GridWeight
    weight_input: Node  # the value the weight quantizer rounds (the float weight, after any mask)
    input_grid: Grid    # the grid of the activation fake-quant on the layer's input


@dataclass(frozen=True, kw_only=True)
class LowerToInteger(Pass):
    """Lower every layer with a linear / fixed-point weight quantizer and an input fake-quant to integers."""

    constraints: ClassVar[dict] = {}  # no options: which layers are lowered follows from the graph

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = self._quantized_layers(gm)  # grids are read before their fake-quant nodes go
        targets = {q.node: _requant_target(gm, q.node) for q in layers}
        out_grids = {node: gm.get_submodule(t.target).grid() for node, t in targets.items() if t is not None}
        boundaries = self._lower_activations(gm, set(targets.values()) - {None})
        for q in layers:
            _replace_layer(gm, q, out_grids.get(q.node))
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        for q in layers:
            _drop_float_parameters(gm, q.layer.weight.rpartition(".")[0])
        return PassResult(changed=bool(layers), params_touched=tuple(q.layer.weight for q in layers), stats={
            "integer_layers": len(layers),
            "requantized": sum(t is not None for t in targets.values()),
            "dequantized": [q.layer.name for q in layers if targets[q.node] is None],
            "float_to_integer_boundaries": boundaries,
        })

    def _quantized_layers(self, gm: GraphModule) -> list[_Quantized]:
        """Every layer to lower; a layer quantized only in part (or by k-means) is refused by name."""
        found = []
        for layer in select_layers(gm, "LowerToInteger"):
            if layer.kind in ("embedding", "addmm"):
                continue  # no integer kernel: a table lookup, and addmm's [in, out] layout, stay fake-quant
            node = layer_node(gm, layer)
            x = node.args[0]
            quant_node = chain_module_node(gm, node, (GridWeight, KMeansWeight))
            module = gm.get_submodule(quant_node.target) if quant_node is not None else None
            if isinstance(module, KMeansWeight):
                raise PreconditionError(f"LowerToInteger: layer '{layer.name}' shares weights by k-means; its "
                                        "codebook is not an integer grid, and integer lowering needs linear or "
                                        "fixed-point weights (an affine grid)")
            if not _is_activation_quant(gm, x):
                if module is None:
                    continue  # a float layer (mixed precision): left as it is
                raise PreconditionError(f"LowerToInteger: layer '{layer.name}' has a weight fake-quant but no "
                                        "activation grid on its input; quantize its input too with "
                                        "InsertFakeQuant(..., activations=ActivationConfig()) and calibration_data")
            if node.op != "call_function":
                raise PreconditionError(f"LowerToInteger: layer '{layer.name}' has an input fake-quant but no "
                                        "weight fake-quant; run InsertFakeQuant(method='linear') on it")
            if not isinstance(module, GridWeight) or layer.kind not in ("linear", "conv1d", "conv2d", "conv3d"):
                raise PreconditionError(f"LowerToInteger: layer '{layer.name}' ({layer.kind}) at "
                                        f"{node.format_node()} has no linear / fixed-point weight fake-quant")
            input_grid = gm.get_submodule(x.target).grid()
            if input_grid is None:
                raise PreconditionError(f"LowerToInteger: the input fake-quant '{x.target}' of layer '{layer.name}' "
                                        "has observed nothing; compile with calibration_data first")
            found.append(_Quantized(layer, node, module, quant_node.args[0], input_grid))
        if not found:
            raise PreconditionError("LowerToInteger: no layer has both a linear / fixed-point weight fake-quant and a "
                                    "calibrated activation grid on its input, so there is nothing to lower; run "
                                    "InsertFakeQuant(method='linear', activations=ActivationConfig()) with "
                                    "calibration_data first")
        return found

    def _lower_activations(self, gm: GraphModule, fed_by_layer: set[Node]) -> int:
        """Activation fake-quants fed by an integer layer vanish; the others become QuantizeInput."""
        boundaries = 0
        for node in list(gm.graph.nodes):
            if not _is_activation_quant(gm, node):
                continue
            if node in fed_by_layer:  # the layer before already requantized onto this grid
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                continue
            grid = gm.get_submodule(node.target).grid()
            gm.add_submodule(node.target, QuantizeInput(float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax))
            boundaries += 1
        return boundaries


def _is_activation_quant(gm: GraphModule, node) -> bool:
    return isinstance(node, Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                                                ActivationQuant)


def _code_safe(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _CODE_SAFE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _CODE_SAFE_METHODS
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), _CODE_SAFE_MODULES)


def _requant_target(gm: GraphModule, node: Node) -> Node | None:
    """The activation fake-quant this layer's output reaches through code-safe ops only, if any."""
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        if _is_activation_quant(gm, user):
            return user
        if not _code_safe(gm, user) or user.args[0] is not current:
            return None
        current = user
    return None


def _replace_layer(gm: GraphModule, q: _Quantized, out_grid: Grid | None) -> None:
    """Swap the layer for an IntegerLayer requantizing onto `out_grid` (None: dequantize)."""
    node, x, in_grid = q.node, q.node.args[0], q.input_grid
    weight = constant_value(gm, q.weight_input)
    grid = q.quantizer.grid(weight)
    _, zero_point = grid.broadcast(weight, q.quantizer.axis)
    codes = (quantize(weight, grid, q.quantizer.axis) - zero_point.to(torch.int32)).to(torch.int32)
    out_channels = weight.shape[0]
    accumulator_scale = (in_grid.scale.double() * grid.scale.double()).expand(out_channels)
    module = IntegerLayer(q.layer.kind, list(weight.shape), requantize=out_grid is not None,
                          **_conv_options(node, q.layer.kind))
    module.weight.copy_(codes)
    if q.layer.bias is not None:
        bias = gm.get_parameter(q.layer.bias).detach().double()
        module.bias.copy_(torch.round(bias / accumulator_scale).to(torch.int32))
    _check_accumulator(q.layer.name, codes, in_grid, module.bias)
    if out_grid is None:
        module.output_scale.copy_(accumulator_scale)
    else:
        multiplier, shift = fixed_point_multiplier(accumulator_scale / out_grid.scale.double())
        module.multiplier.copy_(multiplier)
        module.shift.copy_(shift)
        module.low.fill_(out_grid.qmin - int(out_grid.zero_point))
        module.high.fill_(out_grid.qmax - int(out_grid.zero_point))
    owner = q.layer.weight.rpartition(".")[0]
    name = f"{owner}.integer" if owner else f"{node.name}_integer"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _drop_float_parameters(gm: GraphModule, owner: str) -> None:
    """Replace the (no longer called) float layer module by a plain container of its used children.

    The integer module and the input quantizer live under the layer's path, which keeps the float
    module alive; its weight, bias and mask would otherwise stay in the state dict for nothing.
    """
    if not owner or not _has_submodule(gm, owner):
        return  # the root, or a layer whose output nothing read: dead-code elimination removed it already
    referenced = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    if any(t == owner or (t.startswith(owner + ".") and t.count(".") == owner.count(".") + 1
                          and not isinstance(getattr(gm.get_submodule(owner), t.rpartition(".")[2]), nn.Module))
           for t in referenced):
        return  # the module itself, or one of its own tensors, is still used
    container = nn.Module()
    for name, child in gm.get_submodule(owner).named_children():
        container.add_module(name, child)
    parent, _, name = owner.rpartition(".")
    setattr(gm.get_submodule(parent), name, container)


def _has_submodule(gm: GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _conv_options(node: Node, kind: str) -> dict:
    if kind == "linear":
        return {}
    names = ("stride", "padding", "dilation", "groups")
    values = dict(zip(names, node.args[3:7]))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    if isinstance(values.get("padding"), str):
        raise PreconditionError(f"LowerToInteger: padding={values['padding']!r} at {node.format_node()} "
                                "is not supported; use explicit padding")

    def listed(value, default):
        value = default if value is None else value
        return list(value) if isinstance(value, (tuple, list)) else [value] * (int(kind[-2]))

    return {"stride": listed(values.get("stride"), 1), "padding": listed(values.get("padding"), 0),
            "dilation": listed(values.get("dilation"), 1), "groups": int(values.get("groups", 1) or 1)}


def _check_accumulator(name: str, codes: torch.Tensor, in_grid: Grid, bias: torch.Tensor) -> None:
    """Refuse layers whose worst-case accumulator would not fit in int32."""
    zero = int(in_grid.zero_point)
    largest_input = max(abs(in_grid.qmin - zero), abs(in_grid.qmax - zero))
    per_output = codes.abs().flatten(1).sum(dim=1).to(torch.int64) * largest_input + bias.abs().to(torch.int64)
    worst = int(per_output.max())
    if worst >= 1 << ACCUMULATOR_BITS:
        raise PreconditionError(f"LowerToInteger: layer '{name}' could reach an accumulator of {worst} "
                                f"(>= 2^{ACCUMULATOR_BITS}); use fewer weight or activation bits")
