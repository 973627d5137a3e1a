"""LowerWeightOnly: linear layers with fake-quantized weights run from integer codes (weight-only).

Runs after `InsertFakeQuant(method="linear", ...)`: int8 per channel (`bits=8, per_channel=True`),
int4 group-wise (`bits=4, group_size=32 | 64 | 128`), or any linear grid of at most 8 bits; a k-means
codebook lowers too when its values lie exactly on a uniform grid (checked value for value; otherwise
the layer is skipped with the reason). Each selected linear / addmm layer becomes a
`WeightOnlyLinear` holding the codes, scales and zero-points only: the float weight, its mask and
its fake-quant module are removed. Activations stay float, so the outputs equal the fake-quant
model's up to float summation order.

The kernel is chosen per layer by measurement on the layer's real input from the example inputs
(`kernels.weight_only.choose`): the float layer (the dequantized weight and `F.linear`) against every
allowed kernel that fits, interleaved medians; a kernel replaces float only when it is `margin`
times faster. Statistics per layer: the kernel, the milliseconds of every candidate, the bytes held.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch.fx import GraphModule, Node

from fxcompress.config import Boolean, Interval, Options, Regex, TupleOf, validate
from fxcompress.errors import PreconditionError
from fxcompress.kernels.lowering import fake_quant_module, install, layer_bias, layer_inputs, plan_layers
from fxcompress.kernels.weight_only import QUANTIZED_KERNELS, WeightOnlyLinear, choose, fit_grid, refusals
from fxcompress.layers import KINDS, Layer, constant_value, layer_node, select_layers
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant import KMeansWeight
from fxcompress.quant.quantizers import GroupedCodes, as_rows


LINEAR_KINDS = ("linear", "addmm")


@dataclass(frozen=True, kw_only=True)
class LowerWeightOnly(Pass):
    """kernels  the quantized kernels allowed (the float layer is always measured and kept where it wins):
             "int8pack", "int4pack", "fbgemm_fp16", "dequantize"
    repeats  timed rounds per candidate (medians); margin: how much faster a kernel must be than float
    cold     time each call after writing more than the caches hold (as between a decoder's layers,
             whose weights then come from memory): picks kernels that read fewer bytes; False: warm caches
    select   full-match regex over layer names (None: every linear layer with a linear fake-quant weight)
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
        layers = select_layers(gm, "LowerWeightOnly", LINEAR_KINDS, self.select)
        planned, skipped = plan_layers(gm, layers, weight_codes)
        if not planned:
            raise PreconditionError(f"LowerWeightOnly: no layer to lower: {skipped or 'no linear layer'}; "
                                    f"put InsertFakeQuant(method='linear', ...) on them first")
        inputs = layer_inputs(gm, [layer_node(gm, layer) for layer, _ in planned], ctx.example_inputs)
        stats: dict[str, Any] = {}
        for layer, grouped in ctx.each(planned, "timing kernels", lambda item: item[0].name):
            node = layer_node(gm, layer)
            module = WeightOnlyLinear.from_grouped(grouped, layer_bias(gm, node))
            choice = choose(module, inputs[node], self.kernels, repeats=self.repeats, margin=self.margin,
                            cold=self.cold)
            path = install(gm, layer, node, module, "weight_only")
            stats[layer.name] = {"module": path, **choice.as_stats(), "speedup": round(choice.speedup_over("float"), 4),
                                 "bits": module.bits, "group_size": module.group_size,
                                 "input_shape": list(inputs[node].shape), "held_bytes": module.held_bytes(),
                                 "fp32_bytes": 4 * (module.in_features + module.has_bias) * module.out_features,
                                 "refused": refusals(module, self.kernels)}
        kernels = ("float", *self.kernels)
        return PassResult(changed=True, params_touched=tuple(layer.weight for layer, _ in planned),
                          stats={"layers": stats, "skipped": skipped,
                                 "kernels": {k: sum(s["kernel"] == k for s in stats.values()) for k in kernels}})


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
    grouped = module.grouped(weight)
    if module.axis is None:  # one grid for the tensor: the same scale on every output row
        codes = as_rows(grouped.codes.reshape(weight.shape), out_dim)
        rows = codes.shape[0]
        grouped = GroupedCodes(codes.contiguous(), grouped.scale.expand(rows, 1).contiguous(),
                               grouped.zero_point.expand(rows, 1).contiguous(), codes.shape[1],
                               grouped.qmin, grouped.qmax)
    return grouped

