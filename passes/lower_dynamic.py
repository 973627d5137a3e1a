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
on the layer's real input against the float kernel with the same int8 weights (dequantized on the
fly), which stays where int8 loses, with the float layer it replaced timed beside them as the reference;
statistics per layer: the kernel, the milliseconds of every candidate, the activation grid. Fields
and their checks are `kernels.lowering.MeasuredLowering`'s. A linear layer tied to token embeddings
(GPT-2's LM head and `wte`) lowers too, each embedding becoming a `DynamicInt8Embedding` that gathers
the rows it reads from the head's int8 codes (one copy): the table is then on the head's int8 grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule, Node

from fxcompress.kernels.dynamic import ACTIVATION_GRIDS, QUANTIZED_KERNELS, DynamicInt8Embedding, DynamicInt8Linear
from fxcompress.kernels.lowering import MeasuredLowering, fake_quant_module, layer_bias, measured_constraints
from fxcompress.layers import KINDS, Layer, constant_value, weight_arg
from fxcompress.quant import GridWeight
from fxcompress.quant.quantizers import as_rows

Int8Weight = tuple[torch.Tensor, torch.Tensor, str]  # codes [out, in], scales [out], where the grid came from


@dataclass(frozen=True, kw_only=True)
class LowerDynamicInt8(MeasuredLowering):
    """kernels  the int8 kernels allowed (the float kernel is always measured and kept where it wins):
             "fbgemm", "int_mm"
    repeats, margin, cold, select: see MeasuredLowering (select None: every linear / addmm layer)
    """

    kernels: tuple[str, ...] = QUANTIZED_KERNELS

    constraints: ClassVar[dict] = measured_constraints(QUANTIZED_KERNELS)
    suffix: ClassVar[str] = "dynamic_int8"
    tied_module: ClassVar = DynamicInt8Embedding.tied_to

    def read(self, gm: GraphModule, layer: Layer, node: Node) -> Int8Weight | str:
        return int8_weight(gm, layer, node)

    def build(self, gm: GraphModule, node: Node, found: Int8Weight) -> DynamicInt8Linear:
        codes, scale, _ = found
        return DynamicInt8Linear.from_codes(codes, scale, layer_bias(gm, node))

    def layer_stats(self, module: DynamicInt8Linear, found: Int8Weight) -> dict[str, Any]:
        return {"weights": found[2], "activations": ACTIVATION_GRIDS[module.kernel]}


def int8_weight(gm: GraphModule, layer: Layer, node: Node) -> Int8Weight | str:
    """(codes [out, in], scales [out], where the grid came from), or why the layer has no int8 weight."""
    if layer.kind == "addmm" and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        return "addmm with alpha / beta other than 1"
    out_dim = KINDS[layer.kind].out_dim
    found = fake_quant_module(gm, node)
    if isinstance(found, str):  # a float weight, stored or made by a chain without a grid (masks, a decoder)
        source = weight_arg(node) if node.op == "call_function" else None
        weight = (constant_value(gm, source) if source is not None
                  else gm.get_submodule(node.target).weight.detach())
        chain = "" if source is None or source.op == "get_attr" else " of the weight its chain computes"
        module = GridWeight(8, "linear", symmetric=True, axis=out_dim)
        origin = f"symmetric 8-bit per channel (here){chain}"
    else:
        module, quant = found
        weight, origin = constant_value(gm, quant.args[0]), "fake-quant grid"
        row = weight.shape[1 - out_dim]  # one group per output channel is a per-channel grid
        if not (isinstance(module, GridWeight) and module.method == "linear" and module.symmetric and module.bits <= 8
                and getattr(module, "group_size", None) in (None, row) and module.axis in (None, out_dim)):
            return ("its fake-quant grid is not a symmetric linear grid of at most 8 bits per output channel or "
                    "tensor (a tied table's per-row grid is group_size = its dim)")
    grouped = module.grouped(weight)
    rows = weight.shape[out_dim]
    codes = as_rows(grouped.codes.reshape(weight.shape), out_dim) if module.axis is None else grouped.codes
    return codes, grouped.scale.reshape(-1).expand(rows).contiguous(), origin
