"""LowerToInteger: replace fake-quantized layers by integer-only ones (Jacob et al. 2018).

Runs after InsertFakeQuant with linear or fixed-point weights and calibrated activation
fake-quant on the layers' inputs. Each `ActivationQuant` fed by float values becomes an explicit
`QuantizeInput` boundary; each quantized layer becomes an `IntegerLayer` that requantizes straight
onto the grid of the next activation fake-quant when only ReLU / max-pool / reshape ops stand in
between (those run on integer codes), and dequantizes otherwise (e.g. before a float op or the
model's output). A residual add or a concatenation whose operands all come out of activation fake-quants
(`ActivationConfig(joins=True)` puts them there) runs on codes too, requantizing onto the next grid
or dequantizing the same way. The result computes what the fake-quant model computes, up to the
rounding of the bias and of the requantization.

Two backends compute it. "reference" (`quant.integer`) is the exact oracle: centered int32 codes
and float64 kernels on integer values. "native" (`quant.native`, the default where this machine has
oneDNN's int8 kernels and every layer fits them) runs uint8 codes through one fused int8 kernel per
layer; it rounds the requantization in float32, so it agrees with the reference to one code per
layer. A model native cannot run exactly (asymmetric weight codes outside int8, activation grids
other than uint8, a layer kind or code op without a kernel, int16 saturation on a CPU without VNNI)
keeps the reference backend by default, the reasons in the pass's statistics; `backend="native"`
refuses it by layer instead.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.config import Options, validate
from fxcompress.errors import PreconditionError
from fxcompress.quant.integer import (ACCUMULATOR_BITS, IntegerAdd, IntegerCat, IntegerLayer, QuantizeInput,
                                      fixed_point_multiplier, narrowest_dtype)
from fxcompress.layers import Layer, chain_module_node, constant_value, layer_node, select_layers
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant import native
from fxcompress.quant.native import NativeAdd, NativeCat, NativeLayer, QuantizeToCodes, max_pool2d_codes, relu_codes
from fxcompress.quant import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.quant.quantizers import Grid, quantize

# Ops that commute with quantization onto a grid whose zero is exact: they may run on codes.
_CODE_SAFE_FUNCTIONS = {F.relu, torch.relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten,
                        torch.reshape, F.dropout, operator.getitem}
_CODE_SAFE_METHODS = {"relu", "flatten", "view", "reshape"}
_CODE_SAFE_MODULES = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Dropout, nn.Identity)


_RELU_FUNCTIONS = {F.relu, torch.relu}
_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


@dataclass(frozen=True)
class _Quantized:
    layer: Layer
    node: Node
    quantizer: GridWeight
    weight_input: Node  # the value the weight quantizer rounds (the float weight, after any mask)
    input_grid: Grid    # the grid of the activation fake-quant on the layer's input


@dataclass(frozen=True)
class _Plan:
    """What either backend builds a layer from, read before the graph changes."""

    codes: torch.Tensor              # centered weight codes, int32
    weight_scale: torch.Tensor       # float64, per output channel
    bias: torch.Tensor | None        # int32 at the accumulator's scale
    accumulator_scale: torch.Tensor  # float64, per output channel
    out_grid: Grid | None            # None: the layer dequantizes
    chain: tuple[Node, ...]          # the code-safe ops between the layer and out_grid's fake-quant
    options: dict                    # conv stride / padding / dilation / groups


@dataclass(frozen=True)
class _JoinPlan:
    """A residual add or a concatenation whose operands all come out of activation fake-quants
    (InsertFakeQuant(activations=ActivationConfig(joins=True)) puts them there): it runs on codes,
    requantizing onto `out_grid` or dequantizing."""

    kind: str                        # "add" or "cat"
    grids: tuple[Grid, ...]
    target: Node | None              # the activation fake-quant its output reaches through code-safe ops
    out_grid: Grid | None
    chain: tuple[Node, ...]
    dim: int = 0                     # cat only


@dataclass(frozen=True, kw_only=True)
class LowerToInteger(Pass):
    """Lower every layer with a linear / fixed-point weight quantizer and an input fake-quant to integers.

    backend  "native" (oneDNN int8 kernels on uint8 codes), "reference" (exact, float64 kernels on
             integer values) or None: native where this machine has the kernels and every layer fits
             them, reference otherwise (stats["native_refused"] says why)
    """

    backend: str | None = None

    constraints: ClassVar[dict] = {"backend": (Options("native", "reference"), None)}

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = self._quantized_layers(gm)  # grids are read before their fake-quant nodes go
        targets = {q.node: _requant_target(gm, q.node) for q in layers}
        plans = {q.node: _plan(gm, q, targets[q.node]) for q in layers}
        adds = {node: _join_plan(gm, node, kind) for node in gm.graph.nodes if (kind := _integer_join(gm, node))}
        fed = {t for t in targets.values() if t is not None} | {a.target for a in adds.values() if a.target}
        backend, refused = self._choose_backend(gm, layers, plans, adds, fed)
        boundaries = self._lower_activations(gm, fed, backend)
        for q in layers:
            (_replace_native if backend == "native" else _replace_layer)(gm, q, plans[q.node])
        for node, join in adds.items():
            if join.kind == "cat":
                (_replace_native_cat if backend == "native" else _replace_cat)(gm, node, join)
            else:
                (_replace_native_add if backend == "native" else _replace_add)(gm, node, join)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        for q in layers:
            _drop_float_parameters(gm, q.layer.weight.rpartition(".")[0])
        return PassResult(changed=bool(layers), params_touched=tuple(q.layer.weight for q in layers), stats={
            "backend": backend,
            "native_refused": refused,
            "integer_layers": len(layers),
            "integer_adds": sum(join.kind == "add" for join in adds.values()),
            "integer_cats": sum(join.kind == "cat" for join in adds.values()),
            "requantized": sum(t is not None for t in targets.values()),
            "dequantized": [q.layer.name for q in layers if targets[q.node] is None],
            "float_to_integer_boundaries": boundaries,
        })

    def _choose_backend(self, gm: GraphModule, layers: list[_Quantized], plans: dict[Node, _Plan],
                        adds: dict[Node, _JoinPlan], fed: set[Node]) -> tuple[str, dict[str, str]]:
        """The backend to build, and why native was not possible (by layer, add or fake-quant path)."""
        if self.backend == "reference":
            return "reference", {}
        refused: dict[str, str] = {}
        if not native.available():
            refused["*"] = "this torch build has no oneDNN int8 kernels (torch.ops.onednn)"
        else:
            for q in layers:
                if (reason := _native_refusal(gm, q, plans[q.node])) is not None:
                    refused[q.layer.name] = reason
            for node, add in adds.items():
                if (reason := _native_add_refusal(gm, add)) is not None:
                    refused[node.name] = reason
            consumers = {q.node for q in layers} | set(adds)
            for node in gm.graph.nodes:  # uint8 codes must reach native kernels only
                if _is_activation_quant(gm, node) and node not in fed:
                    others = [u for u in node.users if u not in consumers]
                    if others:
                        refused[node.target] = f"its codes would also reach {others[0].format_node()}"
        if not refused:
            return "native", {}
        if self.backend == "native":
            reasons = "; ".join(f"'{name}': {reason}" for name, reason in refused.items())
            raise PreconditionError(f"LowerToInteger(backend='native') cannot run this model on int8 kernels "
                                    f"exactly: {reasons}; backend='reference' runs any grid")
        return "reference", refused

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
            if module.group_size is not None:  # one scale per group of inputs: no integer accumulator spans them
                raise PreconditionError(f"LowerToInteger: layer '{layer.name}' has group-wise weight grids "
                                        f"(group_size={module.group_size}); integer lowering needs one scale per "
                                        "output channel or tensor; use LowerWeightOnly for group-wise weights")
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

    def _lower_activations(self, gm: GraphModule, fed_by_layer: set[Node], backend: str) -> int:
        """Activation fake-quants fed by an integer layer vanish; the others become the float boundary."""
        boundaries = 0
        for node in list(gm.graph.nodes):
            if not _is_activation_quant(gm, node):
                continue
            if node in fed_by_layer:  # the layer before already requantized onto this grid
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                continue
            grid = gm.get_submodule(node.target).grid()
            boundary = (QuantizeToCodes(float(grid.scale), int(grid.zero_point), grid.qmax) if backend == "native"
                        else QuantizeInput(float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax))
            gm.add_submodule(node.target, boundary)
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


def _code_chain(gm: GraphModule, node: Node, target: Node | None) -> tuple[Node, ...]:
    """The code-safe nodes from `node` (excluded) to its requantization target (excluded)."""
    chain, current = [], node
    while target is not None and current.users and next(iter(current.users)) is not target:
        (current,) = current.users
        chain.append(current)
    return tuple(chain)


def _plan(gm: GraphModule, q: _Quantized, target: Node | None) -> _Plan:
    """The layer's integer weights, bias and scales (one computation for both backends)."""
    weight = constant_value(gm, q.weight_input)
    grid = q.quantizer.grid(weight)
    _, zero_point = grid.broadcast(weight, q.quantizer.axis)
    codes = (quantize(weight, grid, q.quantizer.axis) - zero_point.to(torch.int32)).to(torch.int32)
    out_channels = weight.shape[0]
    weight_scale = grid.scale.double().expand(out_channels)
    accumulator_scale = q.input_grid.scale.double() * weight_scale
    bias = None
    if q.layer.bias is not None:
        bias = torch.round(gm.get_parameter(q.layer.bias).detach().double() / accumulator_scale).to(torch.int32)
    _check_accumulator(q.layer.name, codes, q.input_grid,
                       bias if bias is not None else torch.zeros(out_channels, dtype=torch.int32))
    out_grid = gm.get_submodule(target.target).grid() if target is not None else None
    return _Plan(codes, weight_scale, bias, accumulator_scale, out_grid, _code_chain(gm, q.node, target),
                 _conv_options(q.node, q.layer.kind))


def _replace_layer(gm: GraphModule, q: _Quantized, plan: _Plan) -> None:
    """Swap the layer for a reference IntegerLayer requantizing onto the plan's grid (None: dequantize)."""
    out_grid = plan.out_grid
    module = IntegerLayer(q.layer.kind, list(plan.codes.shape), requantize=out_grid is not None,
                          weight_dtype=narrowest_dtype(plan.codes), **plan.options)
    module.weight.copy_(plan.codes)
    if plan.bias is not None:
        module.bias.copy_(plan.bias)
    if out_grid is None:
        module.output_scale.copy_(plan.accumulator_scale)
    else:
        multiplier, shift = fixed_point_multiplier(plan.accumulator_scale / out_grid.scale.double())
        module.multiplier.copy_(multiplier)
        module.shift.copy_(shift)
        module.low.fill_(out_grid.qmin - int(out_grid.zero_point))
        module.high.fill_(out_grid.qmax - int(out_grid.zero_point))
    _swap(gm, q, module, "integer")


def _swap(gm: GraphModule, q: _Quantized, module: nn.Module, suffix: str) -> Node:
    """Call `module` on the layer's input in place of the layer node."""
    node = q.node
    owner = q.layer.weight.rpartition(".")[0]
    name = f"{owner}.{suffix}" if owner else f"{node.name}_{suffix}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _is_relu(gm: GraphModule, node: Node) -> bool:
    return ((node.op == "call_function" and node.target in _RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target == "relu")
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU)))


def _is_max_pool2d(gm: GraphModule, node: Node) -> bool:
    return ((node.op == "call_function" and node.target is F.max_pool2d)
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MaxPool2d)))


def _native_refusal(gm: GraphModule, q: _Quantized, plan: _Plan) -> str | None:
    """Why the native kernels could not compute this layer exactly as the reference does, if they cannot."""
    kind, codes, in_grid = q.layer.kind, plan.codes, q.input_grid
    if kind not in native.KERNELS:
        return f"{kind} has no native kernel (only {', '.join(native.KERNELS)})"
    low, high = int(codes.min()), int(codes.max())
    if low < native.INT8_RANGE[0] or high > native.INT8_RANGE[1]:
        return (f"its centered weight codes span [{low}, {high}], beyond int8 with zero-point 0 (quantize with "
                "InsertFakeQuant(method='linear', symmetric=True) or 'fixed_point', at most 8 bits)")
    for grid, what in ((in_grid, "input"), (plan.out_grid, "output")):
        if grid is not None and (grid.qmin != 0 or grid.qmax > native.UINT8_MAX):
            return (f"its {what} activation grid [{grid.qmin}, {grid.qmax}] is not uint8 (use "
                    "ActivationConfig(symmetric=False) with at most 8 bits)")
    if not native.saturation_free(codes, in_grid.qmax):
        return (f"two weight codes times input code {in_grid.qmax} could pass int16 in this CPU's u8 x s8 "
                "kernels (no VNNI); use ActivationConfig(bits=7) or 7-bit weights")
    for node in plan.chain:
        if not _native_code_safe(gm, node):
            return f"{node.format_node()} has no kernel on uint8 codes"
    return None


def _native_code_safe(gm: GraphModule, node: Node) -> bool:
    """Code-safe ops native can run on uint8: ReLU, 2-d max pooling without indices, reshapes, dropout."""
    if _is_relu(gm, node) or _is_max_pool2d(gm, node):
        return _is_relu(gm, node) or _native_pool_ok(gm, node)
    if node.target in (F.max_pool1d, F.max_pool3d) or (
            node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.MaxPool1d, nn.MaxPool3d))):
        return False
    return _code_safe(gm, node)


def _native_pool_ok(gm: GraphModule, node: Node) -> bool:
    if not _is_max_pool2d(gm, node):
        return False
    if node.op == "call_module":
        return not gm.get_submodule(node.target).return_indices
    return not dict(zip(_MAX_POOL_ARGS, node.args[1:]), **node.kwargs).get("return_indices", False)


def _replace_native(gm: GraphModule, q: _Quantized, plan: _Plan) -> None:
    """Swap the layer for a NativeLayer: one fused kernel, the ReLU right after it fused as well."""
    out_grid, in_grid = plan.out_grid, q.input_grid
    users = list(q.node.users)
    relu = users[0] if len(users) == 1 and _is_relu(gm, users[0]) and (not plan.chain or plan.chain[0] is users[0]) \
        else None
    module = NativeLayer(q.layer.kind, list(plan.codes.shape), float(in_grid.scale), int(in_grid.zero_point),
                         "float32" if out_grid is None else "uint8",
                         output_scale=1.0 if out_grid is None else float(out_grid.scale),
                         output_zero_point=0 if out_grid is None else int(out_grid.zero_point),
                         clamp=_native_clamp(out_grid, relu is not None), **plan.options)
    module.weight.copy_(plan.codes.to(torch.int8))
    module.weight_scale.copy_(plan.weight_scale.float())
    if plan.bias is not None:  # the reference's integer bias, as the value it stands for
        module.bias.copy_((plan.bias.double() * plan.accumulator_scale).float())
    new = _swap(gm, q, module, "native")
    if relu is not None:
        relu.replace_all_uses_with(new)
        gm.graph.erase_node(relu)
    zero_point = 0 if out_grid is None else int(out_grid.zero_point)
    for node in plan.chain:
        if node is not relu:
            _native_code_op(gm, node, zero_point)


def _native_clamp(out_grid: Grid | None, relu: bool) -> tuple[float, float | None] | None:
    """The fused clamp in real units: ReLU and / or the output grid's range where uint8 does not give it
    (no upper bound: None, which keeps the layer's configuration plain data)."""
    if out_grid is None:
        return (0.0, None) if relu else None
    scale, zero = float(out_grid.scale), int(out_grid.zero_point)
    high = None if out_grid.qmax == native.UINT8_MAX else (out_grid.qmax - zero) * scale
    if high is None and not relu:
        return None
    return (0.0 if relu else (out_grid.qmin - zero) * scale, high)


def _native_code_op(gm: GraphModule, node: Node, zero_point: int) -> None:
    """Respell one code-safe op for uint8 codes (ReLU clamps at the zero-point; max pooling and view
    take channels-last tensors, which the kernels write)."""
    if _is_relu(gm, node) and zero_point == 0:  # uint8 codes are >= 0 already: the identity
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return
    if _is_relu(gm, node):
        target, args = relu_codes, (node.args[0], zero_point)
    elif _is_max_pool2d(gm, node):
        if node.op == "call_module":
            pool = gm.get_submodule(node.target)
            values = {name: getattr(pool, name) for name in _MAX_POOL_ARGS[:-1]}
        else:
            values = dict(zip(_MAX_POOL_ARGS, node.args[1:]), **node.kwargs)
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
        kernel = pair(values["kernel_size"])
        stride = pair(values.get("stride") or kernel)
        target, args = max_pool2d_codes, (node.args[0], kernel, stride, pair(values.get("padding", 0)),
                                          pair(values.get("dilation", 1)), bool(values.get("ceil_mode", False)))
    elif node.op == "call_method" and node.target == "view":
        with gm.graph.inserting_before(node):
            new = gm.graph.call_method("reshape", node.args, node.kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return
    else:
        return
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_SHIFT_ROOM = 62  # the int64 sum of two operand codes times their aligned multipliers must stay below 2^62


def _integer_join(gm: GraphModule, node: Node) -> str | None:
    """"add" / "cat" for an add / concatenation of values that all come out of activation fake-quants."""
    if node.op == "call_function" and node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        ok = isinstance(tensors, (list, tuple)) and tensors and all(_is_activation_quant(gm, x) for x in tensors)
        return "cat" if ok else None
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in ("add", "add_")))
    ok = is_add and len(node.args) == 2 and not node.kwargs and all(_is_activation_quant(gm, x) for x in node.args)
    return "add" if ok else None


def _join_plan(gm: GraphModule, node: Node, kind: str) -> _JoinPlan:
    operands = _cat_operands(node) if kind == "cat" else tuple(node.args)
    grids = tuple(gm.get_submodule(x.target).grid() for x in operands)
    if any(grid is None for grid in grids):
        raise PreconditionError(f"LowerToInteger: an operand fake-quant of {node.format_node()} has "
                                "observed nothing; compile with calibration_data first")
    target = _requant_target(gm, node)
    out_grid = gm.get_submodule(target.target).grid() if target is not None else None
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) if kind == "cat" else 0
    return _JoinPlan(kind, grids, target, out_grid, _code_chain(gm, node, target), int(dim))


def _replace_add(gm: GraphModule, node: Node, add: _JoinPlan) -> None:
    """A reference IntegerAdd: fixed-point multipliers on one shift, or the real sum."""
    module = IntegerAdd(requantize=add.out_grid is not None)
    module.scales.copy_(torch.tensor([float(g.scale) for g in add.grids], dtype=torch.float64))
    if add.out_grid is not None:
        out = add.out_grid
        multipliers, shifts = fixed_point_multiplier(module.scales / float(out.scale))
        shift = int(shifts.max())
        aligned = multipliers << (shift - shifts)
        for grid, multiplier in zip(add.grids, aligned.tolist()):
            largest = max(abs(grid.qmin - int(grid.zero_point)), abs(grid.qmax - int(grid.zero_point)))
            if largest * multiplier >= 1 << _SHIFT_ROOM:
                raise PreconditionError(f"LowerToInteger: the add {node.format_node()} adds operands whose scales "
                                        f"differ too much to share one fixed-point shift ({shift - int(shifts.min())} "
                                        "bits apart)")
        module.multipliers.copy_(aligned)
        module.shift.fill_(shift)
        module.low.fill_(out.qmin - int(out.zero_point))
        module.high.fill_(out.qmax - int(out.zero_point))
    _swap_add(gm, node, module)


def _swap_add(gm: GraphModule, node: Node, module: nn.Module, suffix: str = "integer",
              operands: tuple[Node, ...] | None = None) -> Node:
    """Call `module` on the join's operands (the add's arguments unless given) in place of `node`."""
    name = f"{node.name}_{suffix}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, tuple(node.args) if operands is None else operands)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def _native_add_refusal(gm: GraphModule, add: _JoinPlan) -> str | None:
    for grid in (*add.grids, add.out_grid):
        if grid is not None and (grid.qmin != 0 or grid.qmax > native.UINT8_MAX):
            return f"an activation grid [{grid.qmin}, {grid.qmax}] of the add is not uint8"
    for node in add.chain:
        if not _native_code_safe(gm, node):
            return f"{node.format_node()} has no kernel on uint8 codes"
    return None


def _replace_native_add(gm: GraphModule, node: Node, add: _JoinPlan) -> None:
    """A NativeAdd on uint8 codes, the ReLU right after it fused as its lower clamp."""
    users = list(node.users)
    relu = users[0] if len(users) == 1 and _is_relu(gm, users[0]) and (not add.chain or add.chain[0] is users[0]) \
        else None
    a, b = ((float(g.scale), int(g.zero_point)) for g in add.grids)
    out = add.out_grid
    if out is None:
        module = NativeAdd(a, b, None, relu=relu is not None)
    else:
        zero = int(out.zero_point)
        module = NativeAdd(a, b, (float(out.scale), zero), low=zero if relu is not None else out.qmin, high=out.qmax)
    new = _swap_add(gm, node, module, "native")
    if relu is not None:
        relu.replace_all_uses_with(new)
        gm.graph.erase_node(relu)
    for chained in add.chain:
        if chained is not relu:
            _native_code_op(gm, chained, 0 if out is None else int(out.zero_point))


def _cat_operands(node: Node) -> tuple[Node, ...]:
    """The tensors a cat node reads now (its operands' fake-quants may have given way to codes)."""
    return tuple(node.args[0] if node.args else node.kwargs["tensors"])


def _replace_cat(gm: GraphModule, node: Node, cat: _JoinPlan) -> None:
    """A reference IntegerCat: each operand onto the output grid by its own fixed-point multiplier."""
    module = IntegerCat(len(cat.grids), cat.dim, requantize=cat.out_grid is not None)
    module.scales.copy_(torch.tensor([float(g.scale) for g in cat.grids], dtype=torch.float64))
    if cat.out_grid is not None:
        out = cat.out_grid
        multipliers, shifts = fixed_point_multiplier(module.scales / float(out.scale))
        module.multipliers.copy_(multipliers)
        module.shifts.copy_(shifts)
        module.low.fill_(out.qmin - int(out.zero_point))
        module.high.fill_(out.qmax - int(out.zero_point))
    _swap_add(gm, node, module, "integer", _cat_operands(node))


def _replace_native_cat(gm: GraphModule, node: Node, cat: _JoinPlan) -> None:
    out = cat.out_grid
    grids = [(float(g.scale), int(g.zero_point)) for g in cat.grids]
    output = None if out is None else (float(out.scale), int(out.zero_point))
    module = NativeCat(grids, output, cat.dim, *(() if out is None else (out.qmin, out.qmax)))
    _swap_add(gm, node, module, "native", _cat_operands(node))
    for chained in cat.chain:
        _native_code_op(gm, chained, 0 if out is None else int(out.zero_point))


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
