"""AWQ's weight clip (AutoAWQ's auto_clip), read from the calibration Hessian.

Per (output row, input group) the bound ratio * max|w| among `ratios` whose quantized group has the
smallest output error dw_g H_gg dw_g^T: AutoAWQ's objective (the mean squared partial output x_g . dw_g
over the tokens), with no activations kept. The clamp is symmetric, as AutoAWQ's, and ratio 1 (no
clamp) wins ties, so a group left whole keeps its weights bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..quant.quantizers import fake_quantize, linear_grid
from .second_order import output_error


@dataclass(frozen=True)
class ClipGrid:
    """The linear grid the clip quantizes with: one per output row and `group_size` inputs (None: a row)."""

    bits: int
    symmetric: bool
    group_size: int | None


def clip_ratios(clip_grid: int, max_shrink: float) -> list[float]:
    """AutoAWQ's ratios: 1, 1 - 1/clip_grid, ... while the shrink is below max_shrink."""
    return [1 - i / clip_grid for i in range(max(1, math.ceil(max_shrink * clip_grid - 1e-9)))]


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, ratios: list[float],
                grid: ClipGrid) -> tuple[torch.Tensor, dict[str, Any]]:
    """The bounds (rows, groups, 1) in the weight's dtype and the report: ratios chosen, the groups'
    summed error and the layer's whole output error tr(dW H dW^T), before and after."""
    rows, size = weight.shape[0], grid.group_size or weight.shape[1]
    groups = weight.detach().reshape(rows, -1, size)
    blocks = torch.stack([hessian[g:g + size, g:g + size] for g in range(0, weight.shape[1], size)])
    peak = groups.abs().amax(dim=-1, keepdim=True)
    best = torch.full(peak.shape[:2], math.inf, dtype=torch.float64)
    ratio = torch.ones_like(best)
    plain_groups = None
    for r in ratios:
        delta = _quantized(clamp(groups, (peak * r).to(weight.dtype)), grid) - groups.double()
        error = (torch.einsum("ogi,gij->ogj", delta, blocks) * delta).sum(-1)
        plain_groups = error if plain_groups is None else plain_groups
        better = error < best
        best, ratio = torch.where(better, error, best), torch.where(better, r, ratio)
    bound = (peak * ratio.unsqueeze(-1)).to(weight.dtype)
    clipped = _quantized(clamp(groups, bound), grid).reshape(weight.shape)
    chosen = torch.unique(ratio, return_counts=True)
    return torch.where(ratio.unsqueeze(-1) < 1, bound, peak), {
        "groups": best.numel(), "groups_clipped": int((ratio < 1).sum()),
        "ratios": {f"{float(r):.2f}": int(n) for r, n in zip(*chosen)},
        "group_error_before": float(plain_groups.sum()), "group_error_after": float(best.sum()),
        "error_before": output_error(weight, _quantized(groups, grid).reshape(weight.shape), hessian),
        "error_after": output_error(weight, clipped, hessian)}


def clamp(groups: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Each group clamped to [-bound, bound] (a bound of max|w| leaves the group bit for bit)."""
    return torch.minimum(torch.maximum(groups, -bound), bound)


def _quantized(groups: torch.Tensor, grid: ClipGrid) -> torch.Tensor:
    """The groups (rows, groups, size) on their linear grids, as float64."""
    flat = groups.reshape(groups.shape[0], -1)
    fitted = linear_grid(flat, grid.bits, grid.symmetric, axis=0, group_size=grid.group_size)
    return fake_quantize(flat, fitted, axis=0).double().reshape(groups.shape)
