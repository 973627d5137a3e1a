"""The int8 QDQ form of a fake-quant graph, as ONNX Runtime runs it on its int8 kernels: every calibrated activation
grid becomes QuantizeLinear -> DequantizeLinear, every weight grid of at most 8 bits stored integer codes ->
DequantizeLinear, a bias next to an input grid int32 codes at the accumulator's scale; a layer whose output reaches
a grid through ReLU, constant clamps, max pooling or flatten quantizes where it writes."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import PreconditionError
from ..layers import KINDS, bias_arg, chain_module_node, constant_value, find_layers, input_arg, layer_node
from ..passes.lower_integer_graph import clamp_bounds, clamp_codes, is_relu
from ..quant import ActivationQuant, GridWeight, KMeansWeight
from ..quant.channel_grid import per_channel_grid
from ..quant.commuting import commutes_with_quantization
from ..quant.quantizers import Grid, quantize
from ..rewire import drop_unread

# the integer types ONNX quantizes to, each with its full range: QuantizeLinear saturates there
_ONNX_INTEGERS = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
_INT32_MAX = 2 ** 31 - 1


class _QuantizeDequantizeFn(torch.autograd.Function):
    """Fake-quant of an activation onto codes [qmin, qmax]; exports as QuantizeLinear [-> Clip of the codes]
    -> DequantizeLinear (int8: QuantizeLinear [-> DequantizeLinear -> Clip -> QuantizeLinear] -> DequantizeLinear)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool):
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)  # fake_quantize's arithmetic
        return (q - zero_point) * scale

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool):
        dtype = torch.int8 if signed else torch.uint8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        codes = g.op("QuantizeLinear", x, s, z)
        # QuantizeLinear saturates at the type's ends, not the grid's: a Clip after it, since one before it
        # would keep ORT from fusing the layer that writes x with QuantizeLinear. ORT runs uint8 codes
        # through a Clip of the codes; int8 ones only in Q -> DQ pairs (it turns them into uint8 for its
        # kernels), so their clamp runs on their values, at the grid points of qmin and qmax
        if (qmin, qmax) != _ONNX_INTEGERS[dtype] and not signed:
            codes = g.op("Clip", codes, *[g.op("Constant", value_t=torch.tensor(q, dtype=dtype)) for q in (qmin, qmax)])
        elif (qmin, qmax) != _ONNX_INTEGERS[dtype]:
            bounds = [g.op("Constant", value_t=torch.tensor((q - zero_point) * scale, dtype=torch.float32))
                      for q in (qmin, qmax)]
            codes = g.op("QuantizeLinear", g.op("Clip", g.op("DequantizeLinear", codes, s, z), *bounds), s, z)
        return g.op("DequantizeLinear", codes, s, z)


class _DequantizeFn(torch.autograd.Function):
    """Stored integer codes to float; exports as DequantizeLinear (per channel on `axis`, or per tensor)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int | None):
        shape = [-1 if d == axis else 1 for d in range(codes.ndim)] if axis is not None else []
        return ((codes.to(torch.float32) - zero_point.to(torch.float32).reshape(shape))
                * scale.reshape(shape))

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int | None):
        if axis is None:
            return g.op("DequantizeLinear", codes, scale, zero_point)
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class QuantizeDequantize(nn.Module):
    """An activation grid as ONNX sees it: QuantizeLinear -> DequantizeLinear (uint8, or int8 if signed)."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax, self.signed = scale, zero_point, qmin, qmax, signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantizeFn.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, self.signed)


class Dequantize(nn.Module):
    """Stored integer codes (a weight or a bias) -> DequantizeLinear; per channel on `axis`, or per tensor."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 axis: int | None) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point.to(codes.dtype))

    def forward(self) -> torch.Tensor:
        return _DequantizeFn.apply(self.codes, self.scale, self.zero_point, self.axis)


def _qdq_type(module: QuantizeDequantize) -> torch.dtype:
    return torch.int8 if module.signed else torch.uint8


def _integer_type(qmin: int, qmax: int) -> torch.dtype | None:
    """The ONNX integer type holding every code of [qmin, qmax]: int8 first, then uint8; None if neither."""
    return next((t for t in (torch.int8, torch.uint8) if _ONNX_INTEGERS[t][0] <= qmin and qmax <= _ONNX_INTEGERS[t][1]),
                None)


def _activation_grids(gm: GraphModule) -> dict[Node, Grid]:
    """Each ActivationQuant node's grid, its module swapped for QuantizeDequantize."""
    grids = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, ActivationQuant):
            continue
        grid = module.grid() if module.enabled else None
        if grid is None:
            raise PreconditionError(f"to_onnx(quantized=True): the activation fake-quant '{node.target}' is "
                                    "disabled or has observed nothing; compile with calibration_data first")
        signed = grid.qmin < 0
        low, high = _ONNX_INTEGERS[torch.int8 if signed else torch.uint8]
        if not low <= grid.qmin <= grid.qmax <= high:
            raise PreconditionError(f"to_onnx(quantized=True): the activation grid '{node.target}' spans codes "
                                    f"[{grid.qmin}, {grid.qmax}] ({module.bits} bits); QDQ ONNX holds at most 8")
        gm.add_submodule(node.target, QuantizeDequantize(float(grid.scale), int(grid.zero_point), grid.qmin,
                                                         grid.qmax, signed))
        grids[node] = grid
    return grids


def quantize_dequantize(gm: GraphModule) -> GraphModule:
    """A copy of fake-quant `gm` whose grids are QDQ modules and whose weights are stored integer codes."""
    gm = copy.deepcopy(gm)
    grids = _activation_grids(gm)
    weights = 0
    for layer in find_layers(gm):
        node = layer_node(gm, layer)
        chain = chain_module_node(gm, node, (GridWeight, KMeansWeight))
        if chain is None:
            continue  # a float layer (mixed precision) stays float
        _quantize_layer(gm, layer, node, chain, grids.get(input_arg(node)))
        _quantize_output_early(gm, node, grids)
        weights += 1
    if not grids and not weights:
        raise PreconditionError("to_onnx(quantized=True): the model has no activation or weight fake-quant; run "
                                "InsertFakeQuant(method='linear', bits=8, activations=ActivationConfig(bits=8)) "
                                "with calibration_data first")
    drop_unread(gm, module_calls_have_effects=False)  # keeps in-place writes, which fx's own drops
    gm.delete_all_unused_submodules()
    _drop_unread_tensors(gm)
    gm.recompile()
    return gm


def _drop_unread_tensors(gm: GraphModule) -> None:
    """Delete the float weights (and masks) the integer codes replaced: the exporter would keep them."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    tensors = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    tensors += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for name in tensors:
        if name not in read and not name.startswith(called):
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)


def _quantize_output_early(gm: GraphModule, node: Node, grids: dict[Node, Grid]) -> None:
    """Quantize the layer's output where the layer writes it when it reaches a grid through code-safe ops
    only (clamps with constant bounds, ReLU among them; max pooling, flatten and others that move values):
    a layer -> QuantizeLinear pair that ORT fuses into QLinearConv / QGemm.

    The same values: rounding q onto a grid is monotone, so q(clamp(x, lo, hi)) = clamp(q(x), q(lo), q(hi))
    and the ops that move values commute with it and with clamps. The clamps leave the graph and their
    codes become the range of the layer's own QDQ (a Clip of the codes after QuantizeLinear, none where
    they are the grid's ends: the grid saturates there itself); the grid after the ops stays."""
    found = _grid_reached(gm, node, grids)
    if found is None:
        return
    steps, target = found
    grid, module = grids[target], gm.get_submodule(target.target)
    low, high = _code_range(gm, steps, grid, _ONNX_INTEGERS[_qdq_type(module)])
    clamps = [step for step in steps if _clamp(gm, step) is not None]
    for step in clamps:
        step.replace_all_uses_with(step.args[0])
        gm.graph.erase_node(step)
    if not steps:
        return  # the layer writes straight into its grid: layer -> QuantizeLinear already
    name = f"{node.name}_output_quant"
    gm.add_submodule(name, QuantizeDequantize(module.scale, module.zero_point, low, high, module.signed))
    if len(steps) == len(clamps):  # only clamps: the grid itself takes their range (its own module: a
        target.target = name       # grid module called elsewhere keeps its range there)
        return
    with gm.graph.inserting_after(node):
        early = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(early, delete_user_cb=lambda u: u is not early)


def _grid_reached(gm: GraphModule, node: Node, grids: dict[Node, Grid]) -> tuple[list[Node], Node] | None:
    """The code-safe ops from `node` (each the only user of the one before, reading it first) to the
    activation grid they reach, and that grid's node; None if another op or a fork comes first."""
    current, steps = node, []
    while len(current.users) == 1:
        (user,) = current.users
        if user in grids:
            return steps, user
        if not user.args or user.args[0] is not current \
                or not (commutes_with_quantization(gm, user) or _clamp(gm, user) is not None):
            return None
        current = user
        steps.append(user)
    return None


def _clamp(gm: GraphModule, node: Node) -> tuple[float | None, float | None] | None:
    """A clamp's constant (low, high) (LowerToInteger's table; ReLU is (0, None)); None for any other node."""
    return (0.0, None) if is_relu(gm, node) else clamp_bounds(gm, node)


def _code_range(gm: GraphModule, steps: list[Node], grid: Grid, codes: tuple[int, int]) -> tuple[int, int]:
    """The codes [low, high] that the clamps among `steps`, in order, then `grid` leave of the integer type's
    `codes`: clamps compose into one clamp, whose bounds are where the lowest and highest codes go."""
    whole = Grid(grid.scale, grid.zero_point, *codes)  # the layer's rounding saturates at the type's ends
    low, high = codes
    for step in steps:
        if (bounds := _clamp(gm, step)) is not None:
            a, b = clamp_codes(whole, bounds)
            low, high = min(max(low, a), b), min(max(high, a), b)  # torch.clamp: max first, then min
    return min(max(low, grid.qmin), grid.qmax), min(max(high, grid.qmin), grid.qmax)


def _quantize_layer(gm: GraphModule, layer: Any, node: Node, chain: Node, input_grid: Grid | None) -> None:
    """Replace the layer's weight chain by integer codes -> DequantizeLinear, and its bias by int32 codes."""
    quantizer = gm.get_submodule(chain.target)
    if not isinstance(quantizer, GridWeight) or not quantizer.enabled:
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has a {type(quantizer).__name__} "
                                "weight (k-means codebooks are no integer grid) or a disabled one; QDQ needs an "
                                "enabled linear / fixed-point grid")
    weight = constant_value(gm, chain.args[0])
    grid = per_channel_grid(quantizer, weight)
    if isinstance(grid, str):
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' ({chain.target}): {grid}; QDQ ONNX "
                                "holds one weight scale per output channel or tensor")
    dtype = _integer_type(grid.qmin, grid.qmax)
    if dtype is None:
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has {quantizer.bits}-bit weight codes "
                                f"[{grid.qmin}, {grid.qmax}]; QDQ ONNX holds at most 8 bits")
    axis, out_dim = quantizer.axis, KINDS[layer.kind].out_dim
    # DequantizeLinear's axis must be the weight's output channel (0 for conv and Gemm weights, 1 for a transposed
    # convolution's), so that each output's accumulator has one scale; an embedding's table has no accumulator,
    # and its rows are gathered from the dequantized table on any axis
    if axis not in (None, out_dim) and KINDS[layer.kind].family != "embedding":
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has per-channel weight scales on "
                                f"axis {axis}; only per-tensor grids or ones along its output channels (axis "
                                f"{out_dim}) are exported")
    codes = quantize(weight, grid, axis).to(dtype)
    prefix = _module_prefix(gm, layer.name)
    _replace(gm, chain, f"{prefix}weight_dequantize", Dequantize(codes, grid.scale, grid.zero_point.round(), axis))
    bias = bias_arg(node)
    if bias is None or input_grid is None:
        return  # without an input grid the layer's accumulator has no scale: the bias stays float
    bias_value = constant_value(gm, bias).float()
    scale = _accumulator_scale(layer.name, input_grid.scale.float() * grid.scale.float(), bias_value.numel())
    bias_codes = torch.round(bias_value / scale)
    if bias_codes.abs().max() > _INT32_MAX:
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has a bias beyond int32 at the "
                                f"accumulator's scale (largest |code| {bias_codes.abs().max():.3g})")
    _replace(gm, bias, f"{prefix}bias_dequantize",
             Dequantize(bias_codes.to(torch.int32), scale, torch.zeros_like(scale), 0), users=[node])


def _module_prefix(gm: GraphModule, name: str) -> str:
    """Where a layer's Dequantize modules go: inside the layer's module ("fc." -> fc.weight_dequantize), or beside the
    weight where the layer is a parameter read by a functional call (F.linear(x, self.w): "w_"), which cannot hold
    a submodule (add_submodule raised torch's AttributeError there)."""
    found: Any = gm
    for part in name.split("."):
        found = getattr(found, part, None)  # None: nothing of that name yet, add_submodule makes the path
    if found is None or isinstance(found, nn.Module):
        return f"{name}."
    owner, _, attr = name.rpartition(".")
    return f"{owner}.{attr}_" if owner else f"{attr}_"


def _accumulator_scale(layer: str, scale: torch.Tensor, outputs: int) -> torch.Tensor:
    """The accumulator's scale of each of the layer's `outputs` (its bias's length) from the product of input and
    weight scales: one per tensor, one per output channel, or, for a grouped transposed convolution (whose weight
    holds out_channels / groups output columns, each group's outputs reading the same ones), one per column."""
    scale = scale.flatten()
    if outputs % scale.numel():
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer}' has {scale.numel()} weight scales for its "
                                f"{outputs} outputs; QDQ ONNX needs one per output channel or per tensor")
    return scale.repeat(outputs // scale.numel())


def _replace(gm: GraphModule, node: Node, target: str, module: nn.Module, users: list[Node] | None = None) -> None:
    """A call_module of `module` (no inputs) in place of `node` for `users` (default: all of them)."""
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(node if node.op != "get_attr" else next(iter(users or node.users))):
        new = gm.graph.call_module(target, ())
    for user in list(users or node.users):
        user.replace_input_with(node, new)
