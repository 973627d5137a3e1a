"""LowerWeightOnly: linear layers with fake-quantized weights run from integer codes (weight-only).

Runs after `InsertFakeQuant(method="linear", ...)`: int8 per channel (`bits=8, per_channel=True`),
int4 group-wise (`bits=4, group_size=32 | 64 | 128`), or any linear grid of at most 8 bits; a k-means
codebook lowers too when its values lie exactly on a uniform grid (checked value for value; otherwise
the layer is skipped with the reason). Each selected linear / addmm layer becomes a
`WeightOnlyLinear` holding the codes, scales and zero-points only: the float weight, its mask and
its fake-quant module are removed. Activations stay float, so the outputs equal the fake-quant
model's up to float summation order.

The kernel is chosen per layer by measurement on the layer's real input from the example inputs
(`kernels.timing.MeasuredLayer.choose`): the float kernel (dequantizing on the fly: no float weight is
held) against every allowed kernel that fits, with the float layer it replaced timed beside them as the
reference ("fp32"), interleaved medians; a kernel replaces the float kernel only when it is `margin`
times faster. Our C kernel ("c_gemv") serves decoding, a few rows per call. Statistics per layer: the
kernel, the milliseconds of every candidate, the speed-up over the float layer, the bytes held.

A linear layer whose weight is tied to token embeddings (GPT-2's LM head reading `wte`; quantize the
table with `InsertFakeQuant(..., group_size=N)` selecting the embedding, which groups each token's row,
the head's output channel) lowers too: the head becomes a `WeightOnlyLinear` on its measured kernel and
each embedding a `WeightOnlyEmbedding` gathering the rows it reads from the head's codes, scales and
zero-points (one packed copy; its statistics name the embeddings under `tied_embeddings`).
Fields and their checks are `kernels.lowering.MeasuredLowering`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch.fx import GraphModule, Node

from fxcompress.kernels.lowering import MeasuredLowering, fake_quant_module, layer_bias, measured_constraints
from fxcompress.kernels.weight_only import QUANTIZED_KERNELS, WeightOnlyEmbedding, WeightOnlyLinear, fit_grid
from fxcompress.layers import KINDS, Layer, constant_value
from fxcompress.quant import KMeansWeight
from fxcompress.quant.quantizers import GroupedCodes, as_rows

@dataclass(frozen=True, kw_only=True)
class LowerWeightOnly(MeasuredLowering):
    """kernels  the quantized kernels allowed (the float kernel is always measured and kept where it
             wins): "c_gemv", "int8pack", "int4pack", "fbgemm_fp16"
    repeats, margin, cold, select: see MeasuredLowering (select None: every linear layer with a
             linear fake-quant weight)
    """

    kernels: tuple[str, ...] = QUANTIZED_KERNELS

    constraints: ClassVar[dict] = measured_constraints(QUANTIZED_KERNELS)
    suffix: ClassVar[str] = "weight_only"
    tied_module: ClassVar = WeightOnlyEmbedding.tied_to
    hint: ClassVar[str] = "; put InsertFakeQuant(method='linear', ...) on them first"

    def read(self, gm: GraphModule, layer: Layer, node: Node) -> GroupedCodes | str:
        return weight_codes(gm, layer, node)

    def build(self, gm: GraphModule, node: Node, found: GroupedCodes) -> WeightOnlyLinear:
        return WeightOnlyLinear.from_grouped(found, layer_bias(gm, node))

    def layer_stats(self, module: WeightOnlyLinear, found: GroupedCodes) -> dict[str, Any]:
        return {"bits": module.bits, "group_size": module.group_size, "packing": module.packing,
                "fp32_bytes": 4 * (module.in_features + module.has_bias) * module.out_features}


def weight_codes(gm: GraphModule, layer: Layer, node: Node) -> GroupedCodes | str:
    """The layer's fake-quant weight as codes in rows of output channels, or why it has none."""
    if layer.kind == "addmm" and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        return "addmm with alpha / beta other than 1"
    found = fake_quant_module(gm, node)
    if isinstance(found, str):
        return found
    module, quant = found
    weight = constant_value(gm, quant.args[0])
    out_dim = KINDS[layer.kind].out_dim
    if isinstance(module, KMeansWeight):
        fitted = fit_grid(as_rows(module(weight), out_dim), per_row=module.axis is not None)
        return fitted if not isinstance(fitted, str) else f"k-means codebook is not a uniform grid: {fitted}"
    if module.method != "linear" or module.bits > 8:
        return f"{module.method} grid of {module.bits} bits: weight-only kernels take linear grids of at most 8 bits"
    if module.axis not in (None, out_dim):  # a tied embedding's per-channel grid: one per table column
        return (f"its grid runs along weight dim {module.axis}, not along its output channels (dim {out_dim}); "
                f"a tied embedding's table takes group_size (grids along its rows)")
    grouped = module.grouped(weight)
    if module.axis is None:  # one grid for the tensor: the same scale on every output row
        codes = as_rows(grouped.codes.reshape(weight.shape), out_dim)
        rows = codes.shape[0]
        grouped = GroupedCodes(codes.contiguous(), grouped.scale.expand(rows, 1).contiguous(),
                               grouped.zero_point.expand(rows, 1).contiguous(), codes.shape[1],
                               grouped.qmin, grouped.qmax)
    return grouped

