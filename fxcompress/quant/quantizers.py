"""Weight quantizers as pure functions: integer grids (linear, fixed-point) and k-means codebooks.

A grid maps an integer code q in [qmin, qmax] to the value (q - zero_point) * scale. Every grid
here contains 0 exactly, so pruned zeros stay zero.

* linear, asymmetric: q in [0, 2^b - 1], the range [min(w, 0), max(w, 0)], an integer zero-point;
* linear, symmetric: q in [-(2^(b-1) - 1), 2^(b-1) - 1], zero-point 0 (needs b >= 2);
* fixed point: b-bit two's complement, q in [-2^(b-1), 2^(b-1) - 1], scale 2^-frac_bits with
  frac_bits = b - int_bits; round to nearest, saturate at exactly that range;
* k-means: a codebook of at most 2^b centroids (one of them a fixed 0 when zeros are kept).

Scales are per tensor, per output channel (`axis` = the output-channel dimension of the weight), or
per group of `group_size` consecutive input channels within each output channel (GPTQ / AWQ's "group"
layout, for 2-D weights: one scale and zero-point per (output channel, group)).
Rounding of the fake-quantized forward uses the straight-through estimator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, PreconditionError
from .kmeans1d import kmeans1d

METHODS = ("kmeans", "linear", "fixed_point")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """PreconditionError naming `what` when `tensor` holds NaN or Inf."""
    flat = tensor.detach().reshape(-1)
    # a NaN or Inf makes the float64 sum NaN or Inf, and float32 or narrower values cannot overflow it:
    # a finite sum (one pass, no copy) proves every value finite; otherwise the bad ones are counted
    if flat.is_floating_point() and math.isfinite(float(flat.sum(dtype=torch.float64))):
        return
    block = 1 << 18  # counted a block at a time: no bool copy of a whole layer
    bad = flat.numel() - sum(int(torch.isfinite(flat[i:i + block]).sum()) for i in range(0, flat.numel(), block))
    if bad:
        raise PreconditionError(f"{what}: {bad} of {tensor.numel()} values are NaN/Inf; only finite weights "
                                f"can be quantized (check the training run that produced them)")


NUMPY_UNIQUE = 4096  # values from which numpy's unique beats torch's (measured: equal near 3000)


def distinct_values(values: torch.Tensor) -> torch.Tensor:
    """torch.unique(values), by numpy's sort where both give the same set: a CPU float32 / float64
    tensor without NaN (numpy merges NaNs, torch keeps each; -0.0 and 0.0 are one value in both).
    torch's CPU sort made the levels count most of the statistics' time on a large layer: numpy's is
    10x faster on 65536 values; below about 3000 torch's is faster, so small tensors stay with it."""
    if values.numel() >= NUMPY_UNIQUE and values.device.type == "cpu" and \
            values.dtype in (torch.float32, torch.float64) and not bool(values.isnan().any()):
        return torch.from_numpy(np.unique(values.detach().numpy()))
    return torch.unique(values)


def as_rows(tensor: torch.Tensor, axis: int | None) -> torch.Tensor:
    """The tensor as (groups, values): one row per output channel along `axis`, or one row."""
    if axis is None:
        return tensor.reshape(1, -1)
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1)


def from_rows(rows: torch.Tensor, shape: torch.Size, axis: int | None) -> torch.Tensor:
    """Inverse of `as_rows`."""
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1:])
    return rows.reshape(moved).movedim(0, axis)


@dataclass(frozen=True)
class Grid:
    """Integer codes qmin..qmax standing for (q - zero_point) * scale; scale is (groups,) or ().

    With `group_size`, scale and zero_point are (output channels, input channels // group_size):
    one grid per run of `group_size` consecutive input channels of each output channel.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    group_size: int | None = None

    def broadcast(self, like: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """scale and zero_point shaped to broadcast against `like` along `axis`."""
        if self.group_size is not None:  # one value per weight: each group's repeated over its columns
            return tuple(from_rows(t.repeat_interleave(self.group_size, dim=1), like.shape, axis)
                         for t in (self.scale, self.zero_point))
        if axis is None:
            return self.scale, self.zero_point
        shape = [1] * like.ndim
        shape[axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)


def integer_range(method: str, bits: int, symmetric: bool = False) -> tuple[int, int]:
    """(qmin, qmax) of a b-bit grid."""
    if method == "fixed_point":
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if symmetric:
        return -((1 << (bits - 1)) - 1), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def check_groups(weight: torch.Tensor, axis: int | None, group_size: int, what: str) -> None:
    """ConfigError naming `what` unless `weight` splits into groups of `group_size` input channels."""
    if weight.ndim != 2 or axis is None:
        raise ConfigError(f"{what}: group_size={group_size} needs a 2-D weight grouped per output channel "
                          f"(a linear layer's), got a weight of shape {tuple(weight.shape)}")
    columns = weight.shape[1 - axis]
    if group_size < 1 or columns % group_size:
        raise ConfigError(f"{what}: group_size={group_size} does not divide the layer's {columns} input "
                          f"features; choose a divisor of {columns}")


def _min_max(weight: torch.Tensor, axis: int | None,
             group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max, widened to include 0 so that 0 is on the grid."""
    rows = as_rows(weight.detach(), axis).float()
    if group_size is not None:
        rows = rows.reshape(rows.shape[0], -1, group_size)
    # amin and amax, not aminmax: torch's aminmax along a dim is not vectorized on CPU (ten times slower
    # on a 256 x 256 weight); both are exact, so the grid is the same
    low, high = rows.amin(dim=-1).clamp_(max=0.0), rows.amax(dim=-1).clamp_(min=0.0)
    return (low[0], high[0]) if axis is None else (low, high)


SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def linear_grid(weight: torch.Tensor, bits: int, symmetric: bool = False, axis: int | None = None,
                group_size: int | None = None, scale_dtype: str = "float32") -> Grid:
    """The min-max uniform grid of `bits` bits covering the weight (every value within half a step);
    with `group_size`, one grid per group of that many input channels of each output channel.
    `scale_dtype="float16"` rounds each scale to half precision before the zero point is chosen (as
    GPTQ checkpoints keep scales in the model's half dtype), so a file stores every scale in 16 bits exactly."""
    if symmetric and bits < 2:
        raise ConfigError("linear_grid: a symmetric grid needs bits >= 2 (1 bit has no room for -s, 0 and +s)")
    if group_size is not None:
        check_groups(weight, axis, group_size, "linear_grid")
    qmin, qmax = integer_range("linear", bits, symmetric)
    low, high = _min_max(weight, axis, group_size)
    scale = _steps_of_empty_groups(_rounded((torch.maximum(-low, high) if symmetric else high - low) / qmax,
                                            scale_dtype))
    zero_point = torch.zeros_like(scale) if symmetric else torch.round(-low / scale).clamp_(0, qmax)
    return Grid(scale, zero_point, qmin, qmax, group_size)


def _steps_of_empty_groups(scale: torch.Tensor) -> torch.Tensor:
    """Steps where a group of zero weights (no positive step: pruned, or masked to nothing) takes the largest
    step of the other groups, 1 where all are empty. Any step keeps its zeros exact; the step matters where an
    integer lowering rounds the channel's bias to input step * weight step: a step of 1 rounded it to a whole
    input step, where the fake-quant model adds it as it is."""
    positive = scale > 0  # branch-free: grids are computed inside torch.export / torch.compile traces too
    largest = torch.where(positive, scale, 0.0).amax()
    return torch.where(positive, scale, torch.where(largest > 0, largest, 1.0))


def _rounded(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Scales rounded to `scale_dtype` and back to float32; a nonzero scale below that dtype's smallest
    positive value keeps the smallest one (never 0), one above its largest is refused."""
    if scale_dtype == "float32":
        return scale
    kind = SCALE_DTYPES[scale_dtype]
    info = torch.finfo(kind)
    if bool((scale > info.max).any()):
        raise PreconditionError(f"linear_grid: a scale of {float(scale.max()):g} is beyond {scale_dtype}'s largest "
                                f"value {info.max:g}; use scale_dtype='float32' for weights this large")
    rounded = scale.to(kind).to(torch.float32)
    return torch.where((scale > 0) & (rounded == 0), torch.tensor(info.smallest_normal * info.eps),
                       rounded)


def fixed_point_grid(weight: torch.Tensor, bits: int, int_bits: int | None = None,
                     axis: int | None = None) -> Grid:
    """A b-bit two's-complement grid with step 2^-(bits - int_bits).

    `int_bits` counts the bits left of the binary point, sign included. None picks, per group,
    the most fraction bits for which no weight saturates (each is then within half a step).
    """
    qmin, qmax = integer_range("fixed_point", bits)
    if int_bits is not None:
        frac = torch.tensor(float(bits - int_bits))
        if axis is not None:
            frac = frac.expand(weight.shape[axis])
    else:
        low, high = _min_max(weight, axis)
        # largest f with high <= (qmax + 1/2) 2^-f and -low <= (-qmin + 1/2) 2^-f
        fits_high = torch.log2((qmax + 0.5) / high)
        fits_low = torch.log2((-qmin + 0.5) / low.abs())  # abs: -(0.0) would give -inf
        frac = torch.floor(torch.minimum(fits_high, fits_low))
        fits = torch.isfinite(frac)  # not where a group is all zero: it takes the coarsest step of the others
        coarsest = torch.where(fits, frac, torch.inf).amin()
        frac = torch.where(fits, frac, torch.where(torch.isfinite(coarsest), coarsest, 0.0)).clamp(-100, 100)
    scale = torch.exp2(-frac)
    return Grid(scale, torch.zeros_like(scale), qmin, qmax)


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quantize(x: torch.Tensor, grid: Grid, axis: int | None = None) -> torch.Tensor:
    """x snapped onto the grid: round to nearest, saturate at [qmin, qmax].

    Gradients pass straight through the rounding and are zero where the value saturates.
    """
    if grid.group_size is not None:  # (rows, groups, group_size) against (rows, groups, 1): no repeated scales
        rows = as_rows(x, axis)
        grouped = rows.reshape(rows.shape[0], -1, grid.group_size)
        snapped = _snap(grouped, grid.scale.unsqueeze(-1), grid.zero_point.unsqueeze(-1), grid)
        return from_rows(snapped.reshape(rows.shape), x.shape, axis)
    scale, zero_point = grid.broadcast(x, axis)
    return _snap(x, scale, zero_point, grid)


def _snap(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grid: Grid) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point) - zero_point, times scale: one function of the values, two ways."""
    q = x / scale
    gradient = torch.is_grad_enabled() and (q.requires_grad or zero_point.requires_grad)
    # out of place: a gradient to pass straight through the rounding, a zero point that widens the type,
    # or a compiler tracing this (dynamo cannot trace result_type)
    if gradient or torch.compiler.is_compiling() or torch.result_type(q, zero_point) != q.dtype:
        rounded = _RoundSTE.apply(q) if gradient else torch.round(q)
        return (torch.clamp(rounded + zero_point, grid.qmin, grid.qmax) - zero_point) * scale
    # nothing to differentiate and no widening: the same ops in the same order, in place on the one new
    # tensor (no autograd node, no four temporaries), so every value is bit for bit the same
    q = q.round_().add_(zero_point).clamp_(grid.qmin, grid.qmax)
    return q.sub_(zero_point).mul_(scale)


def quantize(x: torch.Tensor, grid: Grid, axis: int | None = None) -> torch.Tensor:
    """The integer codes of x on the grid (int32); dequantize: (q - zero_point) * scale."""
    scale, zero_point = grid.broadcast(x, axis)
    with torch.no_grad():
        return torch.clamp(torch.round(x / scale) + zero_point, grid.qmin, grid.qmax).to(torch.int32)


@dataclass(frozen=True)
class GroupedCodes:
    """A weight on a grid in the (output channel, input channel) layout kernels read.

    codes       int32 (rows, columns): row r is output channel r (one row for a per-tensor grid)
    scale       float32 (rows, columns // group_size); zero_point the same shape (integers as floats)
    group_size  input channels sharing one scale (columns for per-channel and per-tensor grids)

    `dequantize()` is bit-identical to the fake-quantized weight in this layout.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    group_size: int
    qmin: int
    qmax: int

    def dequantize(self) -> torch.Tensor:
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        zero_point = self.zero_point.repeat_interleave(self.group_size, dim=1)
        return (self.codes.to(scale.dtype) - zero_point) * scale


def grouped_codes(weight: torch.Tensor, grid: Grid, axis: int | None) -> GroupedCodes:
    """The codes of `weight` on `grid` with their scales and zero-points, one row per output channel."""
    codes = as_rows(quantize(weight, grid, axis), axis)
    rows = codes.shape[0]
    scale = grid.scale.float().reshape(rows, -1)
    zero_point = grid.zero_point.float().reshape(rows, -1)
    return GroupedCodes(codes.contiguous(), scale, zero_point, codes.shape[1] // scale.shape[1],
                        grid.qmin, grid.qmax)


@dataclass(frozen=True)
class Codebook:
    """Per-group centroids (groups, size) and each weight's code; code 0 is a fixed 0 when `fixed_zero`.

    A weight's value is `centroids[group, code - 1]` when fixed_zero (0 for code 0), else
    `centroids[group, code]`. Groups with fewer distinct values repeat their last centroid.
    """

    centroids: torch.Tensor  # float32 (groups, size)
    codes: torch.Tensor      # the weight's shape, in `codebook_code_dtype(bits)` (uint8 up to 8 bits)
    fixed_zero: bool


def codebook_code_dtype(bits: int) -> np.dtype:
    """The narrowest type torch can hold for codes 0 .. 2^bits - 1 (k-means codes, a fixed zero included)."""
    return np.dtype(np.uint8 if bits <= 8 else np.int16 if bits <= 15 else np.int32)


def kmeans_codebook(weight: torch.Tensor, bits: int, init: str | np.ndarray = "linear", *,
                    fix_zeros: bool = True, axis: int | None = None, seed: int = 0) -> Codebook:
    """Weight sharing: cluster each group's values into at most 2^bits shared values.

    With `fix_zeros`, exact zeros (pruned weights) are left out of the clustering and keep a code
    of their own that always decodes to 0; the nonzeros share the other 2^bits - 1 centroids.
    `init` may also be an array (groups, size) of starting centroids (re-clustering).
    """
    rows = as_rows(weight.detach().float().cpu(), axis)
    # the codes are written in their final narrow type: an int32 array (and int32 labels) would cost
    # 4 + 4 bytes a weight on top of the 1 the KMeansWeight keeps. They outlive every transient of the
    # clustering, so they are allocated before any: a long-lived block made after the transients would
    # sit above the holes they leave, and the heap could not shrink past it
    codes = np.zeros(rows.shape, codebook_code_dtype(bits))
    fixed_zero = bool(fix_zeros and (rows == 0).any())
    size = (1 << bits) - int(fixed_zero)
    centroids = np.zeros((rows.shape[0], max(size, 1)), np.float32)
    for g, row in enumerate(rows.numpy()):
        keep = row != 0 if fixed_zero else None
        if keep is not None and not keep.any():
            continue
        start = init if isinstance(init, str) else np.asarray(init, np.float64)[g]
        result = kmeans1d(row if keep is None else row[keep], size, start, seed=seed)
        found = result.centroids.size
        centroids[g, :found] = result.centroids
        centroids[g, found:] = result.centroids[-1]
        labels = np.add(result.labels, int(fixed_zero), dtype=codes.dtype)
        del result
        if keep is None:
            codes[g] = labels
        else:
            codes[g, keep] = labels
    shape = weight.shape
    return Codebook(torch.from_numpy(centroids), from_rows(torch.from_numpy(codes), shape, axis).contiguous(),
                    fixed_zero)
