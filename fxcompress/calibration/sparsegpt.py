"""SparseGPT (Frantar & Alistarh 2023) as reconstruction: given a layer's mask — its own OBS choice,
magnitude, Wanda or any per-weight score — update the kept weights by the blockwise second-order
rule so that the layer's output on the calibration inputs moves as little as possible. Pruned
weights end exactly zero (the mask node multiplies them by 0 as well).

The update needs the values of the weights it prunes (their loss is what it makes up for), so it
chooses the mask itself; a mask already in the graph (InsertMasks zeroes the stored weights it
prunes) is kept, and only the weights pruned now are compensated.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from ..layers import Layer
from ..pruning.masks import get_mask, set_mask, sparsity_of, stored_weight
from ..pruning.nm import check_nm_width, nm_pattern
from .hessian import InputStats, damped_inverse
from .masks import select_keep
from .second_order import as_matrix, from_matrix, obs_select, obs_select_nm, output_error, sweep

SPARSEGPT_IMPORTANCES = ("sparsegpt", "abs", "wanda")


def reconstruct_layer(gm: GraphModule, layer: Layer, stats: InputStats, *, sparsity: float, granularity: str,
                      importance: Any, blocksize: int, percdamp: float) -> dict[str, Any]:
    """Prune one layer to `sparsity` (or its N:M pattern) and update its kept weights; the report."""
    weight = stored_weight(gm, layer)
    mask = get_mask(gm, layer)
    original = as_matrix(weight.detach(), layer.kind).to(torch.float64)
    inverse = damped_inverse(stats.hessian, layer.name, percdamp)
    start = original.clone()
    start[:, inverse.dead] = 0.0  # inputs that never fire: their weights carry nothing the update could keep
    pruned = None if mask is None else ~as_matrix(mask.bool(), layer.kind)
    nm = nm_pattern(granularity)
    if importance == "sparsegpt":
        if nm:
            check_nm_width(original.shape[1], *nm, layer.name)
        select = obs_select_nm(*nm) if nm else obs_select(sparsity)
        result = sweep(start, inverse.factor, pruned=pruned, select=select, select_every=nm[1] if nm else blocksize,
                       blocksize=blocksize)
    else:
        keep = select_keep(weight, mask, layer, granularity, importance, sparsity, stats.norms)
        result = sweep(start, inverse.factor, pruned=~as_matrix(keep, layer.kind), blocksize=blocksize)
    with torch.no_grad():
        weight.copy_(from_matrix(result.weight, layer.kind).to(weight.dtype))
    set_mask(gm, layer, from_matrix(~result.pruned, layer.kind))
    reference = output_error(original, torch.zeros_like(original), stats.hessian)
    magnitude_only = output_error(original, original.masked_fill(result.pruned, 0.0), stats.hessian)
    updated = output_error(original, result.weight, stats.hessian)
    return {"sparsity": round(sparsity_of(get_mask(gm, layer)), 6),
            "error_masked": round(magnitude_only / max(reference, 1e-30), 6),  # the mask alone, weights unchanged
            "error_updated": round(updated / max(reference, 1e-30), 6), **inverse.report()}
