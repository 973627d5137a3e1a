"""What LowerToInteger reads from a fake-quant graph before it changes it, for either backend.

The layers to lower (each with its weight grid in per-channel form and its input's activation grid),
each layer's integer plan (centered weight codes, bias at the accumulator's scale, the grid it
requantizes onto and the code-safe ops on the way there), the joins (residual adds, concatenations)
that run on codes, the op tables that say which ops commute with quantization, and how a run-time
module takes a node's place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.errors import PreconditionError
from fxcompress.layers import KINDS, Layer, chain_module_node, constant_value, input_arg, layer_node, select_layers
from fxcompress.quant import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.quant.channel_grid import per_channel_grid
from fxcompress.quant.commuting import commutes_with_quantization, is_add
from fxcompress.quant.integer import ACCUMULATOR_BITS
from fxcompress.quant.quantizers import Grid, quantize



RELU_FUNCTIONS = {F.relu, torch.relu}
# Clamps with constant bounds (ReLU6, hardtanh, clamp): for the monotone rounding q onto any activation grid,
# q(clamp(y, lo, hi)) = clamp(q(y), q(lo), q(hi)), so a layer may requantize through one and the clamp runs on
# its codes (fused into the layer where it follows it directly). Each entry: the names of the bound arguments
# after the input, their defaults; ReLU6 modules are Hardtanh modules (min_val, max_val)
CLAMP_FUNCTIONS = {F.relu6: ((), (0.0, 6.0)), F.hardtanh: (("min_val", "max_val"), (-1.0, 1.0)),
                   torch.clamp: (("min", "max"), (None, None)), torch.clip: (("min", "max"), (None, None))}
CLAMP_METHODS = {"clamp": (("min", "max"), (None, None)), "clip": (("min", "max"), (None, None))}
# layer kinds with an integer form, and the kind each runs as: HF's Conv1D (addmm with an [in, out]
# weight) is a linear layer of the transposed weight, transposed once when it is planned
INTEGER_KINDS = {"linear": "linear", "addmm": "linear", "conv1d": "conv1d", "conv2d": "conv2d", "conv3d": "conv3d"}
MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


@dataclass(frozen=True)
class Quantized:
    """A layer LowerToInteger lowers, as read from the fake-quant graph."""

    layer: Layer
    node: Node
    quantizer: GridWeight
    weight_input: Node  # the value the weight quantizer rounds (the float weight, after any mask)
    input_grid: Grid    # the grid of the activation fake-quant on the layer's input
    weight_grid: Grid   # the weight's grid with at most one scale per output channel (per_channel_grid)
    input_quant: Node   # that activation fake-quant


@dataclass(frozen=True)
class LayerPlan:
    """What either backend builds a layer from, read before the graph changes."""

    codes: torch.Tensor              # centered weight codes, int32
    weight_scale: torch.Tensor       # float64, per output channel
    bias: torch.Tensor | None        # int32 at the accumulator's scale
    accumulator_scale: torch.Tensor  # float64, per output channel
    out_grid: Grid | None            # None: the layer dequantizes
    chain: tuple[Node, ...]          # the code-safe ops between the layer and out_grid's fake-quant
    target: Node | None              # that activation fake-quant (None: the layer dequantizes)
    options: dict                    # conv stride / padding / dilation / groups
    kind: str                        # the integer layer's kind (INTEGER_KINDS): codes are [out, in, ...]


@dataclass(frozen=True)
class JoinPlan:
    """A residual add or a concatenation whose operands all come out of activation fake-quants
    (InsertFakeQuant(activations=ActivationConfig(joins=True)) puts them there): it runs on codes,
    requantizing onto `out_grid` or dequantizing."""

    kind: str                        # "add" or "cat"
    grids: tuple[Grid, ...]
    target: Node | None              # the activation fake-quant its output reaches through code-safe ops
    out_grid: Grid | None
    chain: tuple[Node, ...]
    dim: int = 0                     # cat only


def is_activation_quant(gm: GraphModule, node) -> bool:
    return isinstance(node, Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                                                ActivationQuant)


def requant_target(gm: GraphModule, node: Node) -> Node | None:
    """The activation fake-quant this layer's output reaches through code-safe ops only, if any."""
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        if is_activation_quant(gm, user):
            return user
        code_safe = commutes_with_quantization(gm, user) or clamp_bounds(gm, user) is not None
        if not code_safe or user.args[0] is not current:
            return None
        current = user
    return None


Bounds = tuple[float | None, float | None]  # a clamp's (low, high) in real units; None: unbounded on that side


def clamp_bounds(gm: GraphModule, node: Node) -> Bounds | None:
    """The constant (low, high) of a clamp node (CLAMP_FUNCTIONS / CLAMP_METHODS, nn.Hardtanh and ReLU6), None
    for any other node or bounds that are not plain numbers (a tensor bound is no clamp onto codes)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return (float(module.min_val), float(module.max_val)) if isinstance(module, nn.Hardtanh) else None
    table = CLAMP_FUNCTIONS if node.op == "call_function" else CLAMP_METHODS if node.op == "call_method" else {}
    try:
        names, defaults = table[node.target]
    except (KeyError, TypeError):  # an unhashable target is no clamp either
        return None
    given = dict(zip(names, node.args[1:]), **{k: v for k, v in node.kwargs.items() if k in names})
    bounds = [given.get(name, default) for name, default in zip(names, defaults)] if names else list(defaults)
    if len(node.args) > 1 + len(names) or any(b is not None and type(b) not in (int, float) for b in bounds):
        return None
    low, high = (None if b is None else float(b) for b in bounds)
    if (low is not None and (math.isnan(low) or low == math.inf)) or \
            (high is not None and (math.isnan(high) or high == -math.inf)):
        return None  # no value passes, or NaN: not a clamp onto codes
    # an infinite bound is no bound (`clamp(x, 0, float("inf"))`): its code would be an infinite integer
    return (None if low == -math.inf else low, None if high == math.inf else high)


def clamp_codes(grid: Grid, bounds: Bounds) -> tuple[int, int]:
    """The codes of a clamp's bounds on `grid` (the grid's own range where a side is unbounded): what the
    clamp is on codes, as the fake-quant model rounds them."""
    code = lambda b, side: side if b is None else int(quantize(torch.tensor(b), grid))  # noqa: E731
    return code(bounds[0], grid.qmin), code(bounds[1], grid.qmax)


def respell_clamps(gm: GraphModule, chain: tuple[Node, ...], grid: Grid | None, centered: bool) -> None:
    """Each clamp of `chain` (ops on codes of `grid`) as torch.clamp at its bounds' codes (centered: minus the
    zero-point, as the reference backend's codes are)."""
    for node in chain:
        if (bounds := clamp_bounds(gm, node)) is None or grid is None:
            continue
        low, high = clamp_codes(grid, bounds)
        shift = int(grid.zero_point) if centered else 0
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.clamp, (node.args[0], low - shift, high - shift))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def code_chain(gm: GraphModule, node: Node, target: Node | None) -> tuple[Node, ...]:
    """The code-safe nodes from `node` (excluded) to its requantization target (excluded)."""
    chain, current = [], node
    while target is not None and current.users and next(iter(current.users)) is not target:
        (current,) = current.users
        chain.append(current)
    return tuple(chain)


def plan_layer(gm: GraphModule, q: Quantized, target: Node | None) -> LayerPlan:
    """The layer's integer weights, bias and scales (one computation for both backends)."""
    weight, grid = constant_value(gm, q.weight_input), q.weight_grid
    _, zero_point = grid.broadcast(weight, q.quantizer.axis)
    codes = (quantize(weight, grid, q.quantizer.axis) - zero_point.to(torch.int32)).to(torch.int32)
    if KINDS[q.layer.kind].is_transposed:
        codes = codes.t().contiguous()   # addmm's [in, out] weight as a linear layer's [out, in] rows
    kind = INTEGER_KINDS[q.layer.kind]
    out_channels = codes.shape[0]
    weight_scale = grid.scale.double().expand(out_channels)
    accumulator_scale = q.input_grid.scale.double() * weight_scale
    bias = torch.zeros(out_channels, dtype=torch.int64)
    if q.layer.bias is not None:
        bias = torch.round(gm.get_parameter(q.layer.bias).detach().double() / accumulator_scale).to(torch.int64)
    check_accumulator(q.layer.name, codes, q.input_grid, bias)  # before int32 could wrap a bias around
    bias = bias.to(torch.int32) if q.layer.bias is not None else None
    out_grid = gm.get_submodule(target.target).grid() if target is not None else None
    return LayerPlan(codes, weight_scale, bias, accumulator_scale, out_grid, code_chain(gm, q.node, target), target,
                     conv_options(q.node, kind), kind)


def swap(gm: GraphModule, q: Quantized, module: nn.Module, suffix: str) -> Node:
    """Call `module` on the layer's input in place of the layer node."""
    node = q.node
    owner = q.layer.weight.rpartition(".")[0]
    name = f"{owner}.{suffix}" if owner else f"{node.name}_{suffix}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (input_arg(node),))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def is_relu(gm: GraphModule, node: Node) -> bool:
    return ((node.op == "call_function" and node.target in RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target == "relu")
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU)))


def is_max_pool2d(gm: GraphModule, node: Node) -> bool:
    return ((node.op == "call_function" and node.target is F.max_pool2d)
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MaxPool2d)))



SHIFT_ROOM = 62  # the int64 sum of two operand codes times their aligned multipliers must stay below 2^62


def integer_join(gm: GraphModule, node: Node) -> str | None:
    """"add" / "cat" for an add / concatenation of values that all come out of activation fake-quants."""
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        ok = isinstance(tensors, (list, tuple)) and tensors and all(is_activation_quant(gm, x) for x in tensors)
        return "cat" if ok else None
    ok = is_add(node) and len(node.args) == 2 and not node.kwargs and all(is_activation_quant(gm, x) for x in node.args)
    return "add" if ok else None


def join_plan(gm: GraphModule, node: Node, kind: str) -> JoinPlan:
    operands = cat_operands(node) if kind == "cat" else tuple(node.args)
    grids = tuple(gm.get_submodule(x.target).grid() for x in operands)
    if any(grid is None for grid in grids):
        raise PreconditionError(f"LowerToInteger: an operand fake-quant of {node.format_node()} has "
                                "observed nothing; compile with calibration_data first")
    target = requant_target(gm, node)
    out_grid = gm.get_submodule(target.target).grid() if target is not None else None
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) if kind == "cat" else 0
    return JoinPlan(kind, grids, target, out_grid, code_chain(gm, node, target), int(dim))


def swap_join(gm: GraphModule, node: Node, module: nn.Module, suffix: str = "integer",
              operands: tuple[Node, ...] | None = None) -> Node:
    """Call `module` on the join's operands (the add's arguments unless given) in place of `node`."""
    name = f"{node.name}_{suffix}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, tuple(node.args) if operands is None else operands)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def cat_operands(node: Node) -> tuple[Node, ...]:
    """The tensors a cat node reads now (its operands' fake-quants may have given way to codes)."""
    return tuple(node.args[0] if node.args else node.kwargs["tensors"])


def conv_options(node: Node, kind: str) -> dict:
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


def check_accumulator(name: str, codes: torch.Tensor, in_grid: Grid, bias: torch.Tensor) -> None:
    """Refuse layers whose worst-case accumulator would not fit in int32."""
    zero = int(in_grid.zero_point)
    largest_input = max(abs(in_grid.qmin - zero), abs(in_grid.qmax - zero))
    per_output = codes.abs().flatten(1).sum(dim=1).to(torch.int64) * largest_input + bias.to(torch.int64).abs()
    worst = int(per_output.max())
    if worst >= 1 << ACCUMULATOR_BITS:
        raise PreconditionError(f"LowerToInteger: layer '{name}' could reach an accumulator of {worst} "
                                f"(>= 2^{ACCUMULATOR_BITS}); use fewer weight or activation bits")


def _check_unscaled(layer: Layer, node: Node) -> None:
    """addmm(bias, x, W, beta=, alpha=) scales its bias and product: the integer layer computes x W + bias."""
    if layer.kind != "addmm":
        return
    scaled = {k: node.kwargs[k] for k in ("beta", "alpha") if node.kwargs.get(k, 1) != 1}
    if scaled or len(node.args) > 3:   # beta and alpha are keyword-only: extra positions name them too
        raise PreconditionError(f"LowerToInteger: layer '{layer.name}' at {node.format_node()} scales its bias or "
                                f"product ({scaled or node.args[3:]}); the integer linear layer computes "
                                "x @ weight + bias only")


def quantized_layers(gm: GraphModule) -> list[Quantized]:
    """Every layer to lower; a layer quantized only in part (or by k-means) is refused by name."""
    found = []
    for layer in select_layers(gm, "LowerToInteger"):
        if layer.kind == "embedding":
            continue  # a table lookup has no integer kernel: it stays fake-quant
        node = layer_node(gm, layer)
        x = input_arg(node)
        quant_node = chain_module_node(gm, node, (GridWeight, KMeansWeight))
        module = gm.get_submodule(quant_node.target) if quant_node is not None else None
        if isinstance(module, KMeansWeight):
            raise PreconditionError(f"LowerToInteger: layer '{layer.name}' shares weights by k-means; its "
                                    "codebook is not an integer grid, and integer lowering needs linear or "
                                    "fixed-point weights (an affine grid)")
        if not is_activation_quant(gm, x):
            if module is None:
                continue  # a float layer (mixed precision): left as it is
            raise PreconditionError(f"LowerToInteger: layer '{layer.name}' has a weight fake-quant but no "
                                    "activation grid on its input; quantize its input too with "
                                    "InsertFakeQuant(..., activations=ActivationConfig()) and calibration_data")
        if node.op != "call_function":
            raise PreconditionError(f"LowerToInteger: layer '{layer.name}' has an input fake-quant but no "
                                    "weight fake-quant; run InsertFakeQuant(method='linear') on it")
        if not isinstance(module, GridWeight) or layer.kind not in INTEGER_KINDS:
            raise PreconditionError(f"LowerToInteger: layer '{layer.name}' ({layer.kind}) at "
                                    f"{node.format_node()} has no linear / fixed-point weight fake-quant")
        _check_unscaled(layer, node)
        weight_input = quant_node.args[0]
        grid = per_channel_grid(module, constant_value(gm, weight_input))
        if isinstance(grid, str):  # one scale per group of inputs: no integer accumulator spans them
            raise PreconditionError(f"LowerToInteger: layer '{layer.name}' ({quant_node.target}): {grid}; integer "
                                    "lowering needs one scale per output channel or tensor; use LowerWeightOnly "
                                    "for group-wise weights")
        input_grid = gm.get_submodule(x.target).grid()
        if input_grid is None:
            raise PreconditionError(f"LowerToInteger: the input fake-quant '{x.target}' of layer '{layer.name}' "
                                    "has observed nothing; compile with calibration_data first")
        found.append(Quantized(layer, node, module, weight_input, input_grid, grid, x))
    if not found:
        raise PreconditionError("LowerToInteger: no layer has both a linear / fixed-point weight fake-quant and a "
                                "calibrated activation grid on its input, so there is nothing to lower; run "
                                "InsertFakeQuant(method='linear', activations=ActivationConfig()) with "
                                "calibration_data first")
    return found
