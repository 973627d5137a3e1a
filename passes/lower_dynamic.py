"""LowerDynamicInt8: linear layers with int8 weights and activations quantized at run time.

torch.ao's `quantize_dynamic` as a pass: each selected linear / addmm layer becomes a
`DynamicInt8Linear` holding int8 weight codes with one scale per output channel (zero-point 0) and the
float bias; every call quantizes its input (`kernels.dynamic`: per call on fbgemm as torch.ao does,
per row on `torch._int_mm`) and multiplies in integers. The weight grid is the layer's fake-quant
grid when it has one (`InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)`,
any symmetric linear grid of at most 8 bits), otherwise a symmetric 8-bit min-max grid per output
channel computed here; a layer whose fake-quant grid is not symmetric, wider than 8 bits, grouped,
k-means or fixed point is skipped with the reason.

Activation rounding changes the outputs (that is the method), so the kernel is chosen by measurement
on the layer's real input against the float layer with the same int8 weights, which stays where int8
loses; statistics per layer: the kernel, the milliseconds of every candidate, the activation grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from fxcompress.config import Boolean, Interval, Options, Regex, TupleOf, validate
from fxcompress.errors import PreconditionError
from fxcompress.kernels.lowering import fake_quant_module, install, layer_bias, layer_inputs, plan_layers
from fxcompress.kernels.dynamic import ACTIVATION_GRIDS, QUANTIZED_KERNELS, DynamicInt8Linear, choose, refusals
from fxcompress.layers import KINDS, Layer, constant_value, layer_node, select_layers, weight_arg
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant import GridWeight
from fxcompress.quant.quantizers import as_rows

from .lower_weight_only import LINEAR_KINDS


@dataclass(frozen=True, kw_only=True)
class LowerDynamicInt8(Pass):
    """kernels  the int8 kernels allowed (the float layer is always measured and kept where it wins):
             "fbgemm", "int_mm"
    repeats  timed rounds per candidate (medians); margin: how much faster a kernel must be than float
    cold     time each call after writing more than the caches hold (as between a decoder's layers,
             whose weights then come from memory): picks kernels that read fewer bytes; False: warm caches
    select   full-match regex over layer names (None: every linear / addmm layer)
    """

    kernels: tuple[str, ...] = QUANTIZED_KERNELS
    repeats: int = 7
    margin: float = 1.05
    cold: bool = False
    select: str | None = None

    constraints: ClassVar[dict] = {
        "kernels": (TupleOf(Options(*QUANTIZED_KERNELS), min_len=1),),
        "repeats": (Interval(int, 1, 1000),),
        "margin": (Interval(float, 1.0, 10.0),),
        "cold": (Boolean(),),
        "select": (Regex(), None),
    }

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = select_layers(gm, "LowerDynamicInt8", LINEAR_KINDS, self.select)
        planned, skipped = plan_layers(gm, layers, int8_weight)
        if not planned:
            raise PreconditionError(f"LowerDynamicInt8: no layer to lower: {skipped or 'no linear layer'}")
        inputs = layer_inputs(gm, [layer_node(gm, layer) for layer, _ in planned], ctx.example_inputs)
        stats: dict[str, Any] = {}
        for layer, (codes, scale, source) in ctx.each(planned, "timing kernels", lambda item: item[0].name):
            node = layer_node(gm, layer)
            module = DynamicInt8Linear.from_codes(codes, scale, layer_bias(gm, node))
            choice = choose(module, inputs[node], self.kernels, repeats=self.repeats, margin=self.margin,
                            cold=self.cold)
            path = install(gm, layer, node, module, "dynamic_int8")
            stats[layer.name] = {"module": path, **choice.as_stats(), "speedup": round(choice.speedup_over("float"), 4),
                                 "weights": source, "activations": ACTIVATION_GRIDS[choice.kernel],
                                 "input_shape": list(inputs[node].shape), "held_bytes": module.held_bytes(),
                                 "refused": refusals(self.kernels)}
        kernels = ("float", *self.kernels)
        return PassResult(changed=True, params_touched=tuple(layer.weight for layer, _ in planned),
                          stats={"layers": stats, "skipped": skipped,
                                 "kernels": {k: sum(s["kernel"] == k for s in stats.values()) for k in kernels}})


def int8_weight(gm: GraphModule, layer: Layer, node: Node) -> tuple[torch.Tensor, torch.Tensor, str] | str:
    """(codes [out, in], scales [out], where the grid came from), or why the layer has no int8 weight."""
    if layer.kind == "addmm" and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        return "addmm with alpha / beta other than 1"
    out_dim = KINDS[layer.kind].out_dim
    found = fake_quant_module(gm, node)
    if isinstance(found, str):
        source = weight_arg(node) if node.op == "call_function" else None
        if source is not None and source.op != "get_attr":
            return f"{found} (its weight chain is not a plain stored weight)"
        weight = (constant_value(gm, source) if source is not None
                  else gm.get_submodule(node.target).weight.detach())
        module, origin = GridWeight(8, "linear", symmetric=True, axis=out_dim), "symmetric 8-bit per channel (here)"
    else:
        module, quant = found
        if not (isinstance(module, GridWeight) and module.method == "linear" and module.symmetric and module.bits <= 8
                and getattr(module, "group_size", None) is None):
            return "its fake-quant grid is not a symmetric linear grid of at most 8 bits per channel or tensor"
        weight, origin = constant_value(gm, quant.args[0]), "fake-quant grid"
    grouped = module.grouped(weight)
    rows = weight.shape[out_dim]
    codes = as_rows(grouped.codes.reshape(weight.shape), out_dim) if module.axis is None else grouped.codes
    return codes, grouped.scale.reshape(-1).expand(rows).contiguous(), origin
