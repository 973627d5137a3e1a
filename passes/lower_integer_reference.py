"""LowerToInteger's reference backend: the exact integer oracle (`quant.integer`).

Centered int32 codes flow between layers; each layer becomes an `IntegerLayer` (int32 accumulator,
31-bit fixed-point requantization rounding half up), each join an `IntegerAdd` / `IntegerCat`, and
the float -> integer boundary a `QuantizeInput`.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxcompress.errors import PreconditionError
from fxcompress.quant.integer import (IntegerAdd, IntegerCat, IntegerLayer, QuantizeInput, fixed_point_multiplier,
                                      narrowest_dtype)
from fxcompress.quant.quantizers import Grid

from .lower_integer_graph import (SHIFT_ROOM, JoinPlan, LayerPlan, Quantized, cat_operands, respell_clamps, swap,
                                  swap_join)


def boundary(grid: Grid) -> QuantizeInput:
    """The float -> integer boundary on an activation grid: centered int32 codes."""
    return QuantizeInput(float(grid.scale), int(grid.zero_point), grid.qmin, grid.qmax)


def replace_layer(gm: GraphModule, q: Quantized, plan: LayerPlan) -> None:
    """Swap the layer for a reference IntegerLayer requantizing onto the plan's grid (None: dequantize)."""
    out_grid = plan.out_grid
    module = IntegerLayer(plan.kind, list(plan.codes.shape), requantize=out_grid is not None,
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
    swap(gm, q, module, "integer")
    respell_clamps(gm, plan.chain, out_grid, centered=True)  # a ReLU6 on the way runs on the centered codes



def replace_add(gm: GraphModule, node: Node, add: JoinPlan) -> None:
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
            if largest * multiplier >= 1 << SHIFT_ROOM:
                raise PreconditionError(f"LowerToInteger: the add {node.format_node()} adds operands whose scales "
                                        f"differ too much to share one fixed-point shift ({shift - int(shifts.min())} "
                                        "bits apart)")
        module.multipliers.copy_(aligned)
        module.shift.fill_(shift)
        module.low.fill_(out.qmin - int(out.zero_point))
        module.high.fill_(out.qmax - int(out.zero_point))
    swap_join(gm, node, module)
    respell_clamps(gm, add.chain, add.out_grid, centered=True)



def replace_cat(gm: GraphModule, node: Node, cat: JoinPlan) -> None:
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
    swap_join(gm, node, module, "integer", cat_operands(node))
    respell_clamps(gm, cat.chain, cat.out_grid, centered=True)

