"""GPTQ (Frantar et al. 2023): rounding with second-order error feedback, onto a grid or a codebook.

InsertFakeQuant(rounding="gptq") builds each layer's fake-quant module as usual (a grid from the
weight's range, or a k-means codebook), then fixes the weights column by column with the
blockwise sweep of `second_order.sweep`: each column is rounded onto the module's own values and
its rounding error is carried onto the columns not yet rounded through the inverse Hessian of the
layer's calibration inputs. `act_order` rounds the columns of largest Hessian diagonal first.

What the graph holds afterwards:

* grids (`GridWeight`, whose grid is recomputed from the weight each forward): the stored weight
  becomes the rounded values. Each grid's smallest and largest weight set its range, so they are
  fixed in advance: for an asymmetric linear grid at its lowest and highest level (the codes they
  round to), a range that gives the module the same grid back, so every other weight may take any
  code, as GPTQ onto a stored grid; otherwise at their float values, every other value kept inside
  that range. The module's output is then exactly the GPTQ result (checked).
* codebooks (`KMeansWeight`): the codes are rewritten; the centroids stay as k-means found them.

A group-wise grid (`group_size`, linear layers) is found as in GPTQ's reference code: when the sweep
reaches a group, from the group's weights as the earlier columns' errors left them, so the grid fits
what is rounded onto it (`static_groups`, and act_order, whose column order runs across groups, take
every group's grid from the weights before the sweep instead). The two weights that set a group's
range are then fixed from those updated values. A per-channel or per-tensor grid is found before the sweep, as
the reference does.

Masked weights (a mask node before the fake-quant) are fixed to exactly zero, as SparseGPT does
when it prunes and quantizes in one sweep.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from ..errors import PreconditionError, VerificationError
from ..layers import Layer, chain_module_node, constant_value, layer_node
from ..pruning.masks import get_mask, stored_weight
from ..quant.modules import GridWeight, KMeansWeight
from ..quant.quantizers import Grid, distinct_values
from .hessian import InputStats, damped_inverse
from .second_order import BLOCKSIZE, as_matrix, from_matrix, output_error, sweep
from .sequential import walk


@dataclass
class _Target:
    """What a column may be rounded to: per-element grid scale / zero point and the allowed range,
    or per-row codebook tables; plus the positions whose rounding is fixed in advance (pins): the
    value the module gives them and the value the stored weight holds there. A grid found during
    the sweep fills its columns' tables and pins when `prepare` is called at its group's first column."""

    round_column: Callable[[int, torch.Tensor], torch.Tensor]
    pinned: torch.Tensor          # (out, in) bool
    pinned_values: torch.Tensor   # (out, in) float64, read where pinned: what the module rounds them to
    pinned_stored: torch.Tensor   # (out, in) float64, read where pinned: the value stored there
    prepare: Callable[[int, torch.Tensor], None] | None = None
    group: int | None = None      # the columns each `prepare` call covers
    every_code: bool | None = None  # grids only: every grid's pins at its end levels, so every code reachable

    def __post_init__(self) -> None:
        self.any_pinned = bool(self.pinned.any())
        # column j as row j, what the sweep reads (copies: `prepare` writes these and the (out, in) forms)
        self.pinned_columns = self.pinned.T.contiguous()
        self.pinned_column_values = self.pinned_values.T.contiguous()


class _GridTables:
    """Per-element scale, zero point and allowed code range of a weight's linear grids, and their pins
    (each grid's smallest and largest weight), the module's rounding and the float values.

    The module recomputes a grid from the stored weights' range, so every stored value must stay inside
    the range that gave the grid. Kept at their float values, the two pins allow only the codes whose
    levels lie between them, and a min-max grid's rounded zero point puts one end level outside in
    nearly every grid: one code in 8 lost at 3 bits. Where both pins are stored at their end levels
    instead (the codes they round to anyway) and that range gives the module the same grid again, every
    code is allowed, as GPTQ with a stored grid has it (test layer, 3 bits, static grids: 27% less output error).
    """

    def __init__(self, module: GridWeight, weight: torch.Tensor, kind: str) -> None:
        matrix = as_matrix(weight, kind).to(torch.float32)
        # one row per grid: the whole tensor, an output channel, or a group of input channels of one
        width = module.group_size or (matrix.shape[1] if module.axis is not None else matrix.numel())
        rows = matrix.reshape(-1, width)
        low, high = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
        first, last = rows.argmin(1, keepdim=True), rows.argmax(1, keepdim=True)
        pinned = torch.zeros_like(rows, dtype=torch.bool)
        pinned.scatter_(1, first, low < 0)    # the range's ends define the grid:
        pinned.scatter_(1, last, high > 0)    # their values stay as they are, or become the end levels
        self.pinned = pinned.reshape(matrix.shape)
        self.stored = matrix.to(torch.float64)
        grid = module.grid(weight)
        ends = _end_levels(module, grid, weight, kind, width, first, last, (low < 0) & (high > 0))
        self.every_code = ends is not None
        if ends is not None:
            grid, levels = ends
            # read at the pins only; as the weight's dtype holds them, which is what the module gives back
            self.stored = levels.reshape(matrix.shape).to(weight.dtype).to(torch.float64)
        scale, zero = _per_element(grid, module, weight, kind)
        self.scale, self.zero = scale, zero
        if ends is not None:  # every code: the levels all lie between the stored ends
            self.qlo, self.qhi = torch.full_like(scale, grid.qmin), torch.full_like(scale, grid.qmax)
            self.own = self.stored  # the pins' values: their end levels, which the module gives them back
            return
        # the codes whose values lie inside the range, computed with the module's own float operations
        lo, hi = low.expand_as(rows).reshape(matrix.shape), high.expand_as(rows).reshape(matrix.shape)
        qlo = torch.clamp(torch.round(lo / scale) + zero, grid.qmin, grid.qmax)
        self.qlo = torch.where((qlo - zero) * scale < lo, qlo + 1, qlo)
        qhi = torch.clamp(torch.round(hi / scale) + zero, grid.qmin, grid.qmax)
        self.qhi = torch.where((qhi - zero) * scale > hi, qhi - 1, qhi)
        with torch.no_grad():  # the pins keep their float value: the module rounds them as it rounds any weight
            self.own = as_matrix(module(weight), kind).to(torch.float64)

    def columns(self) -> list[torch.Tensor]:
        """scale, zero, lowest and highest code, column j as row j: one contiguous read per column."""
        return [t.T.contiguous() for t in (self.scale, self.zero, self.qlo, self.qhi)]


def _per_element(grid: Grid, module: GridWeight, weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid's scale and zero point of every weight, as the (out, in) matrix the sweep reads."""
    return tuple(as_matrix(t.expand_as(weight).to(torch.float32), kind) for t in grid.broadcast(weight, module.axis))


END_LEVEL_TRIES = 4  # min-max -> grid -> end levels -> grid settles in one or two steps (a scale's last bit)


def _end_levels(module: GridWeight, grid: Grid, weight: torch.Tensor, kind: str, width: int, first: torch.Tensor,
                last: torch.Tensor, spans_zero: torch.Tensor) -> tuple[Grid, torch.Tensor] | None:
    """An asymmetric linear grid whose grids' lowest and highest levels, stored at each grid's smallest and
    largest weight, give the module that grid back (starting from `grid`, the weight's own): the grid and the
    levels at those positions, one row per grid (zeros elsewhere: inside every grid's range); None for other
    grids, a grid whose range does not span zero on both sides (an end at 0 is a level already), or no
    settled grid."""
    if module.method != "linear" or module.symmetric or not bool(spans_zero.all()):
        return None
    shape = as_matrix(weight, kind).shape
    for _ in range(END_LEVEL_TRIES):
        scale, zero = (t.reshape(-1, width)[:, :1] for t in _per_element(grid, module, weight, kind))
        rows = torch.zeros(shape, dtype=torch.float32).reshape(-1, width)  # levels as the module computes them:
        rows.scatter_(1, first, (torch.full_like(zero, grid.qmin) - zero) * scale)   # (code - zero) * scale
        rows.scatter_(1, last, (torch.full_like(zero, grid.qmax) - zero) * scale)
        candidate = from_matrix(rows.reshape(shape), kind).to(weight.dtype)
        again = module.grid(candidate)
        if torch.equal(again.scale, grid.scale) and torch.equal(again.zero_point, grid.zero_point):
            return grid, rows
        grid = again
    return None


def _snap(columns: list[torch.Tensor], j: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column j's values on its grid, as the module gives them: its float32 level in the weight's dtype (a
    float16 / bfloat16 weight holds the level rounded, and the error carried on must be that value's)."""
    s, z, low_code, high_code = (t[j] for t in columns)
    return ((torch.clamp(torch.round(x.to(torch.float32) / s) + z, low_code, high_code) - z) * s).to(dtype).double()


def _grid_target(module: GridWeight, weight: torch.Tensor, kind: str) -> _Target:
    """Every grid found from the weight before the sweep."""
    tables = _GridTables(module, weight, kind)
    columns = tables.columns()
    return _Target(lambda j, x: _snap(columns, j, x, weight.dtype), tables.pinned, tables.own, tables.stored,
                   every_code=tables.every_code)


def _group_target(module: GridWeight, weight: torch.Tensor, pruned: torch.Tensor | None) -> _Target:
    """A linear layer's group-wise grids, each found when the sweep reaches its group (`prepare`), from the
    group's current weights with the pruned ones at the zero they will be (what the module will read)."""
    shape, group = weight.shape, module.group_size
    columns = [torch.empty(shape[1], shape[0], dtype=torch.float32) for _ in range(4)]
    target = _Target(lambda j, x: _snap(columns, j, x, weight.dtype), torch.zeros(shape, dtype=torch.bool),
                     torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64), group=group,
                     every_code=True)

    def prepare(start: int, values: torch.Tensor) -> None:
        span = slice(start, start + group)
        if pruned is not None:
            values = values.masked_fill(pruned[:, span], 0.0)
        tables = _GridTables(module, values.to(weight.dtype), "linear")  # one group wide: one grid per row
        for table, found in zip(columns, tables.columns()):
            table[span] = found
        target.pinned[:, span], target.pinned_values[:, span] = tables.pinned, tables.own
        target.pinned_stored[:, span] = tables.stored
        target.every_code = target.every_code and tables.every_code
        target.pinned_columns[span] = tables.pinned.T
        target.pinned_column_values[span] = tables.own.T

    target.prepare, target.any_pinned = prepare, True  # pins come with each group's grid
    return target


def _codebook_target(module: KMeansWeight, kind: str, shape: torch.Size, dtype: torch.dtype) -> _Target:
    # (groups, entries); entry index = code. The entries as the module gives them: in the weight's dtype
    table = module.table().detach().to(dtype).to(torch.float64)
    rows = as_matrix(torch.empty(shape), kind).shape[0]
    tables = table.expand(rows, -1) if table.shape[0] == 1 else table

    def nearest(j: int, x: torch.Tensor) -> torch.Tensor:
        return tables.gather(1, (x.unsqueeze(1) - tables).abs().argmin(1, keepdim=True)).squeeze(1)

    matrix_shape = as_matrix(torch.empty(shape), kind).shape
    nothing = torch.zeros(matrix_shape, dtype=torch.float64)
    return _Target(nearest, torch.zeros(matrix_shape, dtype=torch.bool), nothing, nothing)


def gptq_round(gm: GraphModule, layer: Layer, stats: InputStats, *, act_order: bool, static_groups: bool = False,
               blocksize: int = BLOCKSIZE, percdamp: float = 0.01) -> dict[str, Any]:
    """Re-round one layer's weight (its fake-quant module already on the chain) by GPTQ; the report."""
    node = chain_module_node(gm, layer_node(gm, layer), (GridWeight, KMeansWeight))
    module = gm.get_submodule(node.target)
    weight = constant_value(gm, node.args[0])  # the chain's value before the fake-quant: masked weights are 0
    mask = get_mask(gm, layer)
    pruned = None if mask is None else ~as_matrix(mask.bool(), layer.kind)
    if isinstance(module, KMeansWeight):
        if pruned is not None and bool(pruned.any()) and not module.fixed_zero:
            raise PreconditionError(f"layer {layer.name!r}: GPTQ onto a codebook keeps pruned weights at zero only "
                                    f"with a fixed zero code (fix_zeros=True)")
        target = _codebook_target(module, layer.kind, weight.shape, weight.dtype)
    elif module.group_size and layer.kind == "linear" and not (act_order or static_groups):
        target = _group_target(module, weight, pruned)
        blocksize = max(blocksize // module.group_size, 1) * module.group_size  # a block holds whole groups
    else:
        target = _grid_target(module, weight, layer.kind)
    original = as_matrix(weight, layer.kind).to(torch.float64)
    with torch.no_grad():
        plain = as_matrix(module(weight), layer.kind).to(torch.float64)
    order = torch.argsort(torch.diag(stats.hessian), descending=True) if act_order else torch.arange(original.shape[1])
    inverse = damped_inverse(stats.hessian[order][:, order], layer.name, percdamp)
    start = original[:, order].clone()
    start[:, inverse.dead] = 0.0

    columns = order.tolist()

    def round_column(j: int, x: torch.Tensor) -> torch.Tensor:
        column = columns[j]
        fixed = target.round_column(column, x)
        if not target.any_pinned:
            return fixed
        return torch.where(target.pinned_columns[column], target.pinned_column_values[column], fixed)

    result = sweep(start, inverse.factor, pruned=None if pruned is None else pruned[:, order], round_=round_column,
                   prepare=target.prepare, prepare_every=target.group or blocksize, blocksize=blocksize)
    rounded = torch.empty_like(result.weight)
    rounded[:, order] = result.weight
    _store(gm, layer, module, rounded, target, original)
    reference = max(output_error(original, torch.zeros_like(original), stats.hessian), 1e-30)
    noise = float((original - rounded).pow(2).sum())
    return {"levels": int(distinct_values(rounded).numel()), "rounding": "gptq", "act_order": act_order,
            "every_code": target.every_code,  # or each value kept inside its grid's float range (None: codebook)
            "group_grids": None if not getattr(module, "group_size", None) else "static" if target.group is None
            else "sweep",  # found from the weights before the sweep, or as it reaches each group
            "sqnr_db": round(10 * math.log10(float(original.pow(2).sum()) / noise), 2) if noise else float("inf"),
            "zeroed": int(((original != 0) & (rounded == 0)).sum()),
            "error_nearest": round(output_error(original, plain, stats.hessian) / reference, 8),
            "error_gptq": round(output_error(original, rounded, stats.hessian) / reference, 8), **inverse.report()}


def _store(gm: GraphModule, layer: Layer, module: GridWeight | KMeansWeight, rounded: torch.Tensor,
           target: _Target, original: torch.Tensor) -> None:
    """Write the rounded weight where the module reads it, and check the module now gives exactly it."""
    with torch.no_grad():
        if isinstance(module, KMeansWeight):
            table = module.table().detach().to(stored_weight(gm, layer).dtype).to(torch.float64)  # as in the sweep
            tables = table.expand(rounded.shape[0], -1) if table.shape[0] == 1 else table
            codes = (rounded.unsqueeze(2) - tables.unsqueeze(1)).abs().argmin(2)
            module.codes.copy_(from_matrix(codes, layer.kind).to(module.codes.dtype))
        else:
            stored = torch.where(target.pinned, target.pinned_stored, rounded)
            weight = stored_weight(gm, layer)
            weight.copy_(from_matrix(stored, layer.kind).to(weight.dtype))
        node = chain_module_node(gm, layer_node(gm, layer), (GridWeight, KMeansWeight))
        produced = as_matrix(module(constant_value(gm, node.args[0])), layer.kind).to(torch.float64)
    wrong = int((produced != rounded).sum())
    if wrong:
        raise VerificationError(f"GPTQ on layer {layer.name!r}: {wrong} of {rounded.numel()} weights do not come out "
                                f"of its {type(module).__name__} as rounded")


def gptq_layers(gm: GraphModule, data: Sequence | None, plan: Sequence[tuple[Layer, Any]],
                quantize: Callable[[Layer, Any], dict[str, Any]], *, act_order: bool, static_groups: bool = False,
                owner: str = "InsertFakeQuant") -> tuple[dict[str, Any], Any]:
    """Quantize the planned layers block by block: `quantize(layer, spec)` puts the layer's module on
    its chain (from the weights as the earlier layers' updates left them), then GPTQ re-rounds it."""
    specs = {layer.name: spec for layer, spec in plan}

    def handle(group, stats: InputStats) -> dict[str, Any]:
        reports = {}
        for layer in group.layers:
            report = quantize(layer, specs[layer.name])
            report.pop("saturated", None)  # counted for nearest rounding of the float weights, not for what GPTQ rounds
            reports[layer.name] = {**report, **gptq_round(gm, layer, stats, act_order=act_order,
                                                                 static_groups=static_groups)}
        return reports

    report = walk(gm, [layer for layer, _ in plan], data, handle, owner=owner)
    return report.layers, report
