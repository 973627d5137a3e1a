"""Integer-only inference modules (Jacob et al. 2018): integer codes in, integer codes out.

Between layers a tensor holds *centered codes* `q - zero_point` as int32, so ReLU (max with 0),
max pooling and reshapes act on them directly. A layer multiplies centered input codes by
centered weight codes into an int32 accumulator, adds a bias quantized to the accumulator's
scale, and requantizes onto the next activation's grid with a 31-bit fixed-point multiplier and
a rounding right shift — no floating-point arithmetic on values. A residual add (`IntegerAdd`)
brings its two operands onto the output grid the same way. The last layer dequantizes.

PyTorch has no integer convolution on the CPU, so the accumulation runs through float64 kernels
on integer-valued tensors: every partial sum is an integer below 2^31 (checked when lowering),
which float64 represents exactly, so the result is the exact integer accumulator.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.layers import KINDS

ACCUMULATOR_BITS = 31  # accumulators are int32: |acc| < 2^31


def fixed_point_multiplier(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each positive real multiplier M as (M0, shift) with M ~= M0 * 2^-shift, 2^30 <= M0 < 2^31."""
    mantissas, exponents = [], []
    for value in real.double().flatten().tolist():
        mantissa, exponent = math.frexp(value)  # value = mantissa * 2^exponent, mantissa in [0.5, 1)
        m0 = round(mantissa * (1 << 31))
        if m0 == 1 << 31:  # rounding reached the next power of two
            m0, exponent = 1 << 30, exponent + 1
        mantissas.append(m0)
        exponents.append(31 - exponent)
    shape = real.shape
    return (torch.tensor(mantissas, dtype=torch.int64).reshape(shape),
            torch.tensor(exponents, dtype=torch.int64).reshape(shape))


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """round(acc * M0 / 2^shift) in int64, rounding half up (acc * M0 fits: both are below 2^31)."""
    return (acc * multiplier + (torch.ones_like(shift) << (shift - 1))) >> shift


def dequantize_codes(codes: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """The real values of activation codes, (q - zero_point) * scale in float32, as the fake-quant model's
    value: what a float op reads where codes met it (the reference backend's centered codes: zero_point 0)."""
    values = codes.to(torch.float32)
    return (values - zero_point if zero_point else values) * scale


class QuantizeInput(nn.Module):
    """The float -> integer boundary: centered codes of the input on an activation grid."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point).to(torch.int32)

    def config(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax}


# the weight codes' storage, narrowest first: a layer holds (and a file stores) the narrowest that fits
WEIGHT_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}


def narrowest_dtype(codes: torch.Tensor) -> str:
    """The name of the narrowest integer dtype of WEIGHT_DTYPES holding every value of `codes`."""
    low, high = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    return next(name for name, dtype in WEIGHT_DTYPES.items()
                if torch.iinfo(dtype).min <= low and high <= torch.iinfo(dtype).max)


# the layer kinds (fxcompress.layers.KINDS) whose functional form takes (x, w, bias, stride, padding,
# dilation, groups) or (x, w): transposed convolutions order their arguments otherwise
INTEGER_KINDS = ("linear", "conv1d", "conv2d", "conv3d")


class IntegerLayer(nn.Module):
    """A linear / conv layer on centered integer codes.

    Buffers: `weight` (centered weight codes, in `weight_dtype`: int8 for 8-bit symmetric grids,
    int16 or int32 for wider codes), `bias` (int32, at scale s_in * s_w),
    and either `multiplier` / `shift` / `low` / `high` (requantize onto the next grid, centered
    codes clamped to its range) or `output_scale` (dequantize: the last layer of the integer part).
    """

    def __init__(self, kind: str, weight_shape: list[int], requantize: bool, stride: list[int] | None = None,
                 padding: list[int] | None = None, dilation: list[int] | None = None, groups: int = 1,
                 weight_dtype: str = "int32") -> None:
        super().__init__()
        if kind not in INTEGER_KINDS:  # a configuration read from a file is checked too
            raise ConfigError(f"IntegerLayer.kind must be one of {list(INTEGER_KINDS)}, got {kind!r}")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"IntegerLayer.weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {weight_dtype!r}")
        self.kind, self.requantize, self.groups = kind, requantize, groups
        self.stride, self.padding, self.dilation = stride, padding, dilation
        out = weight_shape[0]
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=WEIGHT_DTYPES[weight_dtype]))
        self.register_buffer("bias", torch.zeros(out, dtype=torch.int32))
        if requantize:
            self.register_buffer("multiplier", torch.zeros(out, dtype=torch.int64))
            self.register_buffer("shift", torch.ones(out, dtype=torch.int64))
            self.register_buffer("low", torch.zeros((), dtype=torch.int64))
            self.register_buffer("high", torch.zeros((), dtype=torch.int64))
        else:
            self.register_buffer("output_scale", torch.ones(out, dtype=torch.float64))

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """The exact int64 accumulator sum(x * w) + bias, channels on dim 1 (dim -1 for linear)."""
        x, w = x.double(), self.weight.double()
        if self.kind == "linear":
            acc = F.linear(x, w)
            return acc.round().to(torch.int64) + self.bias
        acc = KINDS[self.kind].function(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        return acc.round().to(torch.int64) + self.bias.reshape(-1, *([1] * (acc.ndim - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind != "linear" and x.dim() == self.weight.dim() - 1:
            # an unbatched input (C, *spatial), which F.conv*d accepts: its channels are on dim 0, where the
            # bias and the per-channel multipliers below (laid out for dim 1) would broadcast onto the wrong dim
            return self.forward(x.unsqueeze(0)).squeeze(0)
        acc = self.accumulate(x)
        view = (-1,) if self.kind == "linear" else (-1, *([1] * (acc.ndim - 2)))
        if not self.requantize:
            return (acc.double() * self.output_scale.reshape(view)).float()
        out = requantize(acc, self.multiplier.reshape(view), self.shift.reshape(view))
        return torch.clamp(out, self.low, self.high).to(torch.int32)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight_shape": list(self.weight.shape), "requantize": self.requantize,
                "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
                "weight_dtype": str(self.weight.dtype).removeprefix("torch.")}

    def extra_repr(self) -> str:
        out = "requantize" if self.requantize else "dequantize"
        return f"{self.kind}, weight={tuple(self.weight.shape)}, {out}"


class IntegerAdd(nn.Module):
    """A residual add of two tensors of centered codes, each on its own grid.

    Requantizing (`requantize=True`): each operand's codes times a 31-bit fixed-point multiplier of
    its scale over the output's, brought to one shift, summed in int64 and rounded half up onto the
    output grid, clamped to [`low`, `high`]. Dequantizing: the real sum, `a * scale_a + b * scale_b`.
    """

    def __init__(self, requantize: bool) -> None:
        super().__init__()
        self.requantize = requantize
        self.register_buffer("multipliers", torch.zeros(2, dtype=torch.int64))  # requantizing: M0 a, M0 b
        self.register_buffer("shift", torch.ones((), dtype=torch.int64))
        self.register_buffer("low", torch.zeros((), dtype=torch.int64))
        self.register_buffer("high", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scales", torch.ones(2, dtype=torch.float64))  # the operands' grid scales

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.requantize:
            return (a.double() * self.scales[0] + b.double() * self.scales[1]).float()
        total = a.to(torch.int64) * self.multipliers[0] + b.to(torch.int64) * self.multipliers[1]
        out = (total + (torch.ones_like(self.shift) << (self.shift - 1))) >> self.shift
        return torch.clamp(out, self.low, self.high).to(torch.int32)

    def config(self) -> dict[str, Any]:
        return {"requantize": self.requantize}

    def extra_repr(self) -> str:
        return "requantize" if self.requantize else "dequantize"


class IntegerCat(nn.Module):
    """A concatenation of tensors of centered codes, each on its own grid, along `dim`.

    Requantizing: each operand's codes times its own 31-bit fixed-point multiplier of its scale over
    the output's (`multipliers`, `shifts`), rounded half up and clamped to [`low`, `high`], then
    concatenated; an operand already on the output grid passes through unchanged. Dequantizing: the
    operands' real values (codes times `scales`) concatenated.
    """

    def __init__(self, operands: int, dim: int, requantize: bool) -> None:
        super().__init__()
        self.dim, self.requantize = dim, requantize
        self.register_buffer("multipliers", torch.zeros(operands, dtype=torch.int64))
        self.register_buffer("shifts", torch.ones(operands, dtype=torch.int64))
        self.register_buffer("low", torch.zeros((), dtype=torch.int64))
        self.register_buffer("high", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scales", torch.ones(operands, dtype=torch.float64))

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if not self.requantize:
            return torch.cat([(t.double() * s).float() for t, s in zip(tensors, self.scales)], self.dim)
        parts = [torch.clamp(requantize(t.to(torch.int64), m, s), self.low, self.high).to(torch.int32)
                 for t, m, s in zip(tensors, self.multipliers, self.shifts)]
        return torch.cat(parts, self.dim)

    def config(self) -> dict[str, Any]:
        return {"operands": len(self.scales), "dim": self.dim, "requantize": self.requantize}

    def extra_repr(self) -> str:
        return f"{len(self.scales)} operands, dim={self.dim}, " + ("requantize" if self.requantize else "dequantize")
