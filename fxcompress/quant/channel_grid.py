"""One answer to "can this weight grid be written with one scale per output channel?".

Integer kernels (LowerToInteger), QDQ ONNX (`export.to_onnx_int8`) and compressed-tensors' "channel"
strategy all hold at most one scale and zero-point per output channel (or one per tensor). A
group-wise grid (`GridWeight(group_size=N)`: one grid per run of N input channels) fits that form
exactly when every group of each output channel has the same scale and zero-point (a layer whose
rows have one group, or whose groups happen to share their range); otherwise the grid has no
per-channel form and the caller refuses the layer by name with the reason given here.
"""
from __future__ import annotations

import torch

from .modules import GridWeight
from .quantizers import Grid


def per_channel_grid(quantizer: GridWeight, weight: torch.Tensor) -> Grid | str:
    """`quantizer`'s grid on `weight` with at most one scale and zero-point per output channel (on
    `quantizer.axis`), or the reason it has none. Per-tensor and per-channel grids come back as they
    are; a group-wise grid whose groups agree within each channel comes back as that channel's grid,
    so `quantize(weight, grid, quantizer.axis)` gives the same codes as the grouped grid."""
    grid = quantizer.grid(weight)
    if grid.group_size is None:
        return grid
    scale, zero_point = grid.scale.reshape(grid.scale.shape[0], -1), grid.zero_point.reshape(grid.scale.shape[0], -1)
    differs = (scale != scale[:, :1]).any(dim=1) | (zero_point != zero_point[:, :1]).any(dim=1)
    if bool(differs.any()):
        channel = int(differs.nonzero()[0, 0])
        return (f"its group-wise weight grid (group_size={grid.group_size}) has {int(differs.sum())} output "
                f"channel(s) whose groups differ in scale or zero-point (first: channel {channel}), so it has no "
                "form with one scale per output channel")
    return Grid(scale[:, 0].contiguous(), zero_point[:, 0].contiguous(), grid.qmin, grid.qmax)
