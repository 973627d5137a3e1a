"""Our C int8 linear kernel (csrc/q8_linear.c): a native linear layer in one call, bit for bit the reference.

oneDNN's int8 linear costs tens of microseconds a call whatever its size, so small layers at small batches
ran their float kernel, which keeps the activations on their grids with a few elementwise ops per layer.
This kernel reads the layer's uint8 codes, multiplies them by the int8 weight codes in an int32
accumulator, adds the integer bias and requantizes onto the next grid with the reference backend's
31-bit fixed-point multiplier rounding half up (`quant.integer.requantize`), the clamp (ReLU, the grid's
range) fused — or dequantizes as the reference's last layer does. So where oneDNN and the float kernel
agree with the reference to one code per layer, this one agrees exactly. It widens both operands to
int16 and multiplies with vpmaddwd (pair sums in int32), so on AVX2 without VNNI it never saturates.

`pack` turns a NativeLayer's buffers (the codes a file holds) into the kernel's arguments once (the
weight padded to 16 columns, the int32 bias, the multipliers); `run`
calls the kernel through ctypes in eager inference and through the op `fxcompress::q8_linear`
when torch.compile / torch.export trace it. `quantize` is the float -> codes boundary in one call.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fxcompress.quant.integer import fixed_point_multiplier
from fxcompress.errors import ConfigError
from .compiled import library

STEP = 16  # the kernel's columns per vector step (int16 path; twice that raw): weight rows are padded to it
INT16_MAX = 32767  # vpmaddubsw's saturating pair sums
INT32_LIMIT = 1 << 31
BIAS_EXACT = 1 << 22  # integer biases below this come back exactly from their float32 value times the scale
SHIFTS = (1, 62)  # the requantization shifts the kernel's int64 arithmetic takes


class Layer(ctypes.Structure):
    """csrc/q8_linear.c's `Layer`: one layer's constant arguments, filled once, passed by pointer (a ctypes
    call costs about a tenth of a microsecond per argument)."""

    _fields_ = [("w", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("mult", ctypes.c_void_p),
                ("shift", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("in_features", ctypes.c_int64),
                ("out", ctypes.c_int64), ("stride", ctypes.c_int64), ("x_zero", ctypes.c_int32),
                ("y_zero", ctypes.c_int32), ("low", ctypes.c_int32), ("high", ctypes.c_int32),
                ("relu", ctypes.c_int32), ("raw", ctypes.c_int32)]


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """csrc/q8_linear.c built for this machine with its argument types set, or None where it cannot be."""
    lib = library("q8_linear")
    if lib is not None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
        lib.q8_linear.argtypes = [p, i64, p, ctypes.POINTER(Layer)]
        lib.q8_linear.restype = ctypes.c_int
        lib.q8_linear_float.argtypes = [p, i64, p, ctypes.POINTER(Layer), ctypes.c_float, i32]
        lib.q8_linear_float.restype = ctypes.c_int
        f32 = ctypes.c_float
        lib.q8_quantize.argtypes = [p, i64, f32, i32, i32, p]
        lib.q8_quantize.restype = None
        lib.q8_quantize_nhwc.argtypes = [p, i64, i64, i64, f32, i32, i32, p]
        lib.q8_quantize_nhwc.restype = None
        lib.q8_add.argtypes = [p, p, i64, f32, f32, f32, i32, i32, p]
        lib.q8_add.restype = None
        lib.q8_add_values.argtypes = [p, p, i64, f32, f32, f32, i32, p]
        lib.q8_add_values.restype = None
    return lib


@dataclass(frozen=True)
class Packed:
    """The kernel's arguments for one layer: weight int8 [out, stride] (zero past in_features), bias int32,
    then mult / shift (int64, requantizing onto codes clamped to [low, high]) or scale (float64, dequantizing);
    `layer` points at them all (the tensors here keep that memory alive). With `x_scale` (0: uint8 codes in)
    the layer reads float32 values and quantizes them onto its input grid (x_scale, x_zero, x_qmax) first."""

    weight: torch.Tensor
    bias: torch.Tensor
    mult: torch.Tensor | None
    shift: torch.Tensor | None
    scale: torch.Tensor | None
    in_features: int
    x_zero: int
    y_zero: int
    low: int
    high: int
    relu: bool
    raw: bool = False
    x_scale: float = 0.0
    x_qmax: int = 255

    @functools.cached_property
    def layer(self) -> Layer:
        address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        return Layer(self.weight.data_ptr(), self.bias.data_ptr(), address(self.mult), address(self.shift),
                     address(self.scale), self.in_features, self.weight.shape[0], self.weight.shape[1], self.x_zero,
                     self.y_zero, self.low, self.high, int(self.relu), int(self.raw))

    @functools.cached_property
    def scalars(self) -> tuple:
        return (self.in_features, self.x_zero, self.y_zero, self.low, self.high, self.relu, self.raw, self.x_scale,
                self.x_qmax)

    @functools.cached_property
    def arguments(self) -> tuple:
        """What identifies the layer: its tensors' addresses and its scalars."""
        return _arguments((self.weight, self.bias, self.mult, self.shift, self.scale), self.scalars)

    @functools.cached_property
    def ref(self) -> object:
        return ctypes.byref(self.layer)

    @functools.cached_property
    def call(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layer as one function, its constants bound once: a 2-D contiguous input of the right dtype goes
        straight to the kernel (per call: one output allocation and one ctypes call), anything else through
        `eager`'s checks, a traced graph through the custom op."""
        lib, ref, out, columns = c_library(), self.ref, self.weight.shape[0], self.in_features
        dtype, wanted = torch.uint8 if self.mult is not None else torch.float32, self.input_dtype
        fn, extra = (lib.q8_linear_float, (self.x_scale, self.x_qmax)) if self.x_scale else (lib.q8_linear, ())

        def call(x: torch.Tensor) -> torch.Tensor:
            if type(x) is not torch.Tensor or torch.compiler.is_compiling():
                return traced(x, self)
            if x.dtype != wanted or x.dim() != 2 or x.shape[1] != columns or not x.is_contiguous():
                return eager(x, self)
            y = torch.empty((x.shape[0], out), dtype=dtype)
            if fn(x.data_ptr(), x.shape[0], y.data_ptr(), ref, *extra):
                raise MemoryError(f"q8_linear could not allocate {x.shape[0]} x {self.weight.shape[1]} of scratch")
            return y
        return call

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.float32 if self.x_scale else torch.uint8


def integer_bias(bias: torch.Tensor, accumulator_scale: torch.Tensor) -> torch.Tensor | None:
    """The int32 bias a float32 bias value stands for (files of earlier versions held the reference's integer
    bias times the accumulator's scale), or None where float32 cannot have kept it exactly."""
    integer = torch.round(bias.double() / accumulator_scale)
    if bool((integer.abs() >= BIAS_EXACT).any()) or not torch.equal((integer * accumulator_scale).float(), bias):
        return None
    return integer.to(torch.int32)


def refusal(weight: torch.Tensor, bias: torch.Tensor, accumulator_scale: torch.Tensor,
            multiplier: torch.Tensor | None) -> str | None:
    """Why the C kernel cannot compute this linear layer exactly here (None: it can)."""
    if c_library() is None:
        return "no C compiler here to build it (or FXCOMPRESS_NO_C=1)"
    if weight.device.type != "cpu":
        return f"the codes are on {weight.device}, the C kernel runs on the CPU"
    if bias.dtype != torch.int32:
        return f"its bias is {bias.dtype}, the kernel adds int32 codes"
    if multiplier is not None:
        _, shift = fixed_point_multiplier(multiplier)
        if int(shift.min()) < SHIFTS[0] or int(shift.max()) > SHIFTS[1]:
            return f"a requantization shift of {int(shift.min())}..{int(shift.max())} bits is outside {SHIFTS}"
    return None


def raw_fits(weight: torch.Tensor, bias: torch.Tensor, x_zero: int, input_max: int) -> bool:
    """Whether raw uint8 codes up to `input_max` times `weight` run exactly in vpmaddubsw's int16 pair sums
    (neighbouring columns 2j, 2j + 1 of a row) and every partial sum stays in int32 (the bias taking the
    zero-point's share, x_zero * sum_k w)."""
    codes = weight.to(torch.int64)
    width = codes.shape[1] + codes.shape[1] % 2
    pairs = torch.nn.functional.pad(codes.abs(), (0, width - codes.shape[1])).reshape(codes.shape[0], -1, 2).sum(2)
    shifted = bias.to(torch.int64) - x_zero * codes.sum(1)
    return (int(pairs.max()) * input_max <= INT16_MAX and int(codes.abs().sum(1).max()) * input_max < INT32_LIMIT
            and int(shifted.abs().max()) < INT32_LIMIT)


# The Packed a traced graph was made from, by its weight's address: the op of a compiled graph finds it there
# and makes the one ctypes call (building a Packed and its ctypes structure per call cost more than the kernel on
# small layers). While a registered Packed lives it holds its tensors, so no other tensor has their addresses.
_TRACED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def pack(weight: torch.Tensor, accumulator_scale: torch.Tensor, bias: torch.Tensor, x_zero: int, input_max: int,
         multiplier: torch.Tensor | None, y_zero: int, code_range: tuple[int, int], relu: bool,
         x_scale: float = 0.0) -> Packed:
    """The kernel's arguments: `multiplier` is the requantization's real multiplier per output channel
    (accumulator scale over output scale; None: dequantize with `accumulator_scale`); `x_scale` > 0: the
    layer reads float32 values and quantizes them itself. Input codes never pass `input_max`; where the raw
    path is exact for them it is taken (about twice the products per instruction), the int16 path otherwise."""
    out, in_features = weight.shape
    integer = bias.to(torch.int32).contiguous()
    raw = raw_fits(weight, integer, x_zero, input_max)
    step = 2 * STEP if raw else STEP
    stride = -(-in_features // step) * step
    padded = torch.zeros(out, stride, dtype=torch.int8)
    padded[:, :in_features] = weight
    if raw:
        integer = (integer.to(torch.int64) - x_zero * weight.to(torch.int64).sum(1)).to(torch.int32)
    mult = shift = scale = None
    if multiplier is not None:
        mult, shift = fixed_point_multiplier(multiplier)
    else:
        scale = accumulator_scale.double().contiguous()
    packed = Packed(padded, integer, mult, shift, scale, in_features, int(x_zero), int(y_zero), *code_range, relu,
                    raw, float(x_scale), int(input_max))
    _register(packed)
    return packed


def _register(p: Packed) -> None:
    """Where the custom op of a traced graph finds `p` (while `p` lives): its arguments are p's tensors."""
    # A weak reference is no tensor op: it is made outside any trace. Without torch._dynamo loaded no trace
    # can be running, and decorating with torch.compiler.disable at import would load it (about 2 s of every
    # process that imports fxcompress).
    (_store_outside_traces() if "torch._dynamo" in sys.modules else _store)(p)


def _store(p: Packed) -> None:
    _TRACED[p.weight.data_ptr()] = p


@functools.cache
def _store_outside_traces() -> Callable[[Packed], None]:
    return torch.compiler.disable(_store)


def eager(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """The layer on x [..., in_features] (CPU; uint8 codes, or float32 values with `x_scale`): uint8 codes, or
    float32 values dequantizing."""
    if p.x_scale and x.is_floating_point() and x.dtype != torch.float32:  # the boundary's own ops, as unfused
        codes = torch.clamp(torch.round(x / p.x_scale) + p.x_zero, 0, p.x_qmax).to(torch.uint8)
        return eager(codes, dataclasses.replace(p, x_scale=0.0))
    if x.dtype != p.input_dtype or x.shape[-1] != p.in_features:
        raise ConfigError(f"q8_linear reads {p.input_dtype} [..., {p.in_features}], got {x.dtype} {tuple(x.shape)}")
    rows = x if x.dim() == 2 else x.reshape(-1, p.in_features)
    rows = rows.contiguous()
    y = torch.empty(rows.shape[0], p.weight.shape[0], dtype=torch.uint8 if p.mult is not None else torch.float32)
    lib, common = c_library(), (rows.data_ptr(), rows.shape[0], y.data_ptr(), p.ref)
    if lib.q8_linear_float(*common, p.x_scale, p.x_qmax) if p.x_scale else lib.q8_linear(*common):
        raise MemoryError(f"q8_linear could not allocate {rows.shape[0]} x {p.weight.shape[1]} int16 of scratch")
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], p.weight.shape[0])


def _op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mult: torch.Tensor | None,
        shift: torch.Tensor | None, scale: torch.Tensor | None, in_features: int, x_zero: int, y_zero: int,
        low: int, high: int, relu: bool, raw: bool, x_scale: float, x_qmax: int) -> torch.Tensor:
    scalars = (in_features, x_zero, y_zero, low, high, relu, raw, x_scale, x_qmax)
    found = _TRACED.get(weight.data_ptr())
    if found is not None and found.weight is weight and found.bias is bias and found.mult is mult \
            and found.shift is shift and found.scale is scale and found.scalars == scalars:
        # the very tensor objects a compiled graph holds as constants: no address to read per call
        return found.call(x)
    if found is not None and found.arguments == _arguments((weight, bias, mult, shift, scale), scalars):
        return found.call(x)  # the very layer: the same tensors (addresses) and scalars
    return eager(x, Packed(weight, bias, mult, shift, scale, *scalars))


def _arguments(tensors: tuple[torch.Tensor | None, ...], scalars: tuple) -> tuple:
    return tuple(None if t is None else t.data_ptr() for t in tensors) + scalars


# The same layer as an opaque op, for graphs torch.compile / torch.export trace; eager inference calls ctypes
# directly. Defined with torch.library.Library and a CPU kernel rather than torch.library.custom_op: a
# custom_op call costs about 40 times as much Python as this dispatch (194 against 5 us measured), more than
# the kernel on a small layer, which made compiled native models slower than eager ones
_LIBRARY = torch.library.Library("fxcompress", "FRAGMENT")
_LIBRARY.define("q8_linear(Tensor x, Tensor weight, Tensor bias, Tensor? mult, Tensor? shift, Tensor? scale, "
                "int in_features, int x_zero, int y_zero, int low, int high, bool relu, bool raw, float x_scale, "
                "int x_qmax) -> Tensor")
_LIBRARY.impl("q8_linear", _op, "CPU")


@torch.library.register_fake("fxcompress::q8_linear")
def _(x, weight, bias, mult, shift, scale, in_features, x_zero, y_zero, low, high, relu, raw, x_scale, x_qmax):
    dtype = torch.uint8 if mult is not None else torch.float32
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


def traced(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """The layer in a graph torch.compile / torch.export trace (fake or proxy tensors): the custom op."""
    return torch.ops.fxcompress.q8_linear(x, p.weight, p.bias, p.mult, p.shift, p.scale, p.in_features, p.x_zero,
                                          p.y_zero, p.low, p.high, p.relu, p.raw, p.x_scale, p.x_qmax)


def quantize(x: torch.Tensor, scale: float, zero_point: int, qmax: int, channels_last: bool = False
             ) -> torch.Tensor | None:
    """uint8 codes of float32 x in one C call (QuantizeToCodes code for code), or None where the torch ops
    must do it: no compiler, another dtype or device, a strided tensor (channels-last is dense: one pass over
    its storage, the codes keep its layout), or a traced graph. With `channels_last` a contiguous 4-D x gets
    channels-last codes, written in the same pass."""
    if not _c_runs(torch.float32, x) \
            or not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None
    lib = c_library()
    if channels_last and x.dim() == 4 and x.is_contiguous():
        y = torch.empty_like(x, dtype=torch.uint8, memory_format=torch.channels_last)
        batch, channels, height, width = x.shape
        lib.q8_quantize_nhwc(x.data_ptr(), batch, channels, height * width, scale, zero_point, qmax, y.data_ptr())
        return y
    y = torch.empty_like(x, dtype=torch.uint8)  # the same strides: element i of the storage maps to element i
    lib.q8_quantize(x.data_ptr(), x.numel(), scale, zero_point, qmax, y.data_ptr())
    return y


def add(a: torch.Tensor, b: torch.Tensor, ka: float, kb: float, offset: float, low: int, high: int
        ) -> torch.Tensor | None:
    """NativeAdd onto an output grid in one C pass: clamp(round(a * ka + b * kb + offset), low, high) of two
    uint8 code tensors laid out alike (any memory format), or None where the torch ops must do it: no
    compiler, other dtypes, shapes or strides, a layout neither contiguous nor channels-last, or a traced graph."""
    if not _same_layout_codes(a, b):
        return None
    y = torch.empty_like(a)  # the same strides: one pass over the storage of each
    c_library().q8_add(a.data_ptr(), b.data_ptr(), a.numel(), ka, kb, offset, low, high, y.data_ptr())
    return y


def _same_layout_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether one C pass over the storage of each can add uint8 codes a and b: one shape and strides,
    contiguous or channels-last (`_c_runs` besides)."""
    return (_c_runs(torch.uint8, a, b) and a.shape == b.shape and a.stride() == b.stride()
            and (a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last)))


def _c_runs(dtype: torch.dtype, *tensors: torch.Tensor) -> bool:
    """Whether our C passes can take `tensors`: plain CPU tensors of `dtype`, outside any trace (a traced graph
    keeps torch's ops), with the library built here."""
    return (not torch.compiler.is_compiling() and c_library() is not None
            and all(type(t) is torch.Tensor and t.dtype == dtype and t.is_cpu for t in tensors))


def add_values(a: torch.Tensor, b: torch.Tensor, ka: float, kb: float, offset: float, relu: bool
               ) -> torch.Tensor | None:
    """NativeAdd dequantizing in one C pass: (a * ka + b * kb) + offset as float32, at least 0 with `relu`; None
    where the torch ops must do it (as `add`)."""
    if not _same_layout_codes(a, b):
        return None
    y = torch.empty_like(a, dtype=torch.float32)  # the same strides: one pass over the storage of each
    c_library().q8_add_values(a.data_ptr(), b.data_ptr(), a.numel(), ka, kb, offset, int(relu), y.data_ptr())
    return y
