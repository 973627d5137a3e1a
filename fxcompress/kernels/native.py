"""Native integer execution: LowerToInteger's fast backend on oneDNN's int8 kernels.

Between layers a tensor holds the *raw codes* q of its activation grid as uint8 (not the centered
int32 codes of `quant.integer`): that is what the kernels read. A linear / conv2d layer is one
`NativeLayer` node: uint8 codes in, int8 weight codes (zero-point 0) times them accumulated in
int32, the bias, the requantization onto the next grid and a clamp (ReLU, or the grid's range)
fused into one oneDNN call (`torch.ops.onednn.qlinear_pointwise` / `qconv2d_pointwise`, what
PT2E's x86 lowering emits); the last layer of a run writes float32 instead. Max pooling runs on
the codes, and ReLU elsewhere on codes is a clamp at the zero-point.

A oneDNN call costs tens of microseconds whatever its size, so a layer may instead run its float
kernel (`NativeLayer(kernel="float")`: the weight dequantized from its codes, the scales folded in,
the same codes read and written), chosen per layer by measurement; between two float layers the
codes stay in float32 (`float_codes`), so a run of float layers costs about what the float model does.
A layer of such a run that a later measurement (`timing.remeasure`, another batch size or machine) moves
to an int8 kernel casts its float32 codes to uint8 and back at its edges: exact, the codes are integers.

A linear layer has a third kernel, our C `c_int8` (`q8`): the reference backend's arithmetic bit
for bit, in one call. oneDNN's kernels scale the int32 accumulator in float32 and round half to
even where the reference backend (`quant.integer`) uses a 31-bit fixed-point multiplier rounding
half up, so the two agree to one code per requantization, not bit for bit.

Exactness condition: x86 CPUs without VNNI multiply uint8 by int8 with `vpmaddubsw`, which adds
the products of two neighbouring inputs in int16 and saturates at 32767. oneDNN's int8 kernel is
exact there only if any two of a layer's weight codes times the largest input code stay below that
bound (`saturation_free`); 7-bit activations (what torch.ao's x86 `reduce_range` does) or 7-bit
weights always fit. Where they do not, the layer runs the float kernel or `c_int8` (which widens to
int16 pairs that cannot saturate) instead; only `kernels=("int8",)` refuses it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import ConfigError, FormatError, PreconditionError
from . import q8
from .timing import KernelChoice, measure

INT16_MAX = 32767  # pairwise int16 sums of u8 x s8 products on x86 without VNNI
UINT8_MAX = 255
INT8_RANGE = (-128, 127)

# layer kind -> the oneDNN kernel computing it on uint8 codes; kinds absent here have no native kernel
KERNELS = {"linear": "qlinear_pointwise", "conv2d": "qconv2d_pointwise"}
# what a NativeLayer writes: codes for the next layer, real values, or codes held in float32 (between float layers)
OUTPUTS = ("uint8", "float32", "float_codes")
# what computes a NativeLayer: oneDNN's int8 kernel, the float one, or our C int8 kernel (linear layers, `q8`)
LAYER_KERNELS = ("int8", "float", "c_int8")
# what a NativeLayer reads: uint8 codes, codes held in float32 (between float layers), or the real values before
# the input grid (chosen with c_int8, which quantizes them inside its call: a model's float input and its first
# layer in one call; another kernel measured faster later quantizes them first, onto the same codes)
INPUTS = ("uint8", "float_codes", "float32")


def available() -> bool:
    """Whether this torch build has oneDNN's int8 kernels on plain tensors (x86 CPUs)."""
    return (torch.backends.mkldnn.is_available()
            and all(hasattr(torch.ops.onednn, name) for name in ("qlinear_prepack", "qconv_prepack",
                                                                 *KERNELS.values())))


def vnni() -> bool:
    """Whether the CPU multiplies uint8 by int8 into int32 without an int16 intermediate (VNNI / AMX)."""
    return bool(torch.cpu._is_vnni_supported())


def saturation_free(codes: torch.Tensor, input_max: int) -> bool:
    """Whether no two weight codes of one output channel times `input_max` can pass int16.

    The kernel pairs neighbouring reduction elements in a layout of its own, so the bound takes the
    two largest |codes| of each output channel: no pairing can do worse.
    """
    if vnni():
        return True
    rows = codes.flatten(1).abs().to(torch.int64)
    top = rows.topk(min(2, rows.shape[1]), dim=1).values.sum(dim=1)
    return int(top.max()) * input_max <= INT16_MAX


def check_grid(owner: str, what: str, scale: float, zero_point: int, qmax: int = UINT8_MAX) -> None:
    """A uint8 activation grid the kernels can run on (they are built from files too): a finite positive
    scale, a zero-point among the codes 0..qmax, qmax at most 255. A ConfigError naming the grid otherwise."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0) \
            or type(zero_point) is not int or type(qmax) is not int or not 0 < qmax <= UINT8_MAX \
            or not 0 <= zero_point <= qmax:
        raise ConfigError(f"{owner}: {what} needs a finite scale > 0, a zero-point in 0..qmax and qmax in 1..255; "
                          f"got scale={scale!r}, zero_point={zero_point!r}, qmax={qmax!r}")


def check_code_range(owner: str, low: int, high: int) -> None:
    """Output codes a uint8 kernel can write: low <= high within 0..255."""
    if type(low) is not int or type(high) is not int or not 0 <= low <= high <= UINT8_MAX:
        raise ConfigError(f"{owner}: the output codes [low, high] must lie in 0..255 with low <= high; "
                          f"got [{low!r}, {high!r}]")


class QuantizeToCodes(nn.Module):
    """The float -> native boundary: uint8 codes of the input on an activation grid (qmin 0).

    `channels_last`: a contiguous 4-D input gets channels-last codes, written in the same pass (set where
    only convolutions read them: oneDNN's kernel reorders any other layout first; resnet18's stem at batch
    1 took 962 µs a call from NCHW codes against 834 µs from channels-last ones, which cost 66 µs more to
    write: benchmarks/bench_native_edges.py)."""

    def __init__(self, scale: float, zero_point: int, qmax: int, channels_last: bool = False) -> None:
        super().__init__()
        check_grid("QuantizeToCodes", "the input grid", scale, zero_point, qmax)
        self.scale, self.zero_point, self.qmax, self.channels_last = scale, zero_point, qmax, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_to_codes(x, self.scale, self.zero_point, self.qmax, self.channels_last)

    def config(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax,
                "channels_last": self.channels_last}

    def extra_repr(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        return f"scale={self.scale:g}, zero_point={self.zero_point}, qmax={self.qmax}{layout}"


def quantize_to_codes(x: torch.Tensor, scale: float, zero_point: int, qmax: int,
                      channels_last: bool = False) -> torch.Tensor:
    """uint8 codes of float x on an activation grid (qmin 0): one C call where it can, the torch ops otherwise;
    with `channels_last`, a 4-D x's codes are channels-last."""
    codes = q8.quantize(x, scale, zero_point, qmax, channels_last)
    if codes is not None:
        return codes
    # x / scale, not x * (1 / scale): the same rounding as the reference boundary, code for code
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax).to(torch.uint8)
    return codes.contiguous(memory_format=torch.channels_last) if channels_last and codes.dim() == 4 else codes


# what a NativeLayer makes from its buffers on first use, dropped whenever the buffers may change
_DERIVED = ("_packed", "_float", "_c", "_bias", "_call")


def _check_layer_config(kind: str, output: str, kernel: str, input: str, input_qmax: int, input_scale: float,
                        input_zero_point: int, output_scale: float, output_zero_point: int,
                        accumulate: tuple[float, int] | None) -> tuple[float, int]:
    """ConfigError for a NativeLayer configuration its kernels cannot run; the output grid it keeps."""
    if accumulate is not None and (kind != "conv2d" or kernel != "int8" or output != "uint8" or input != "uint8"
                                   or len(accumulate) != 2 or type(accumulate[1]) is not int
                                   or not 0 <= accumulate[1] <= UINT8_MAX):
        raise ConfigError(f"NativeLayer: accumulate (a residual's scale and zero-point) is oneDNN's sum post-op: "
                          f"a conv2d on kernel 'int8' from uint8 codes to uint8 codes, zero-point in 0..255; got "
                          f"kind={kind!r}, kernel={kernel!r}, input={input!r}, output={output!r}, "
                          f"accumulate={accumulate!r}")
    if kind not in KERNELS or output not in OUTPUTS or kernel not in LAYER_KERNELS or input not in INPUTS \
            or (kernel == "c_int8" and kind != "linear") \
            or type(input_qmax) is not int or not 0 < input_qmax <= UINT8_MAX:  # files are checked too
        raise ConfigError(f"NativeLayer: kind must be one of {sorted(KERNELS)}, output one of {OUTPUTS}, kernel "
                          f"one of {LAYER_KERNELS} and input one of {INPUTS} (c_int8 runs linear layers only; "
                          f"input_qmax in 1..255), got kind={kind!r}, output={output!r}, kernel={kernel!r}, "
                          f"input={input!r}, input_qmax={input_qmax!r}")
    check_grid("NativeLayer", "the input grid", input_scale, input_zero_point, input_qmax)
    if output == "float32":  # real values out: no output grid (oneDNN then takes exactly scale 1, zero-point 0)
        output_scale, output_zero_point = 1.0, 0
    else:
        check_grid("NativeLayer", "the output grid", output_scale, output_zero_point)
    if accumulate is not None:
        check_grid("NativeLayer", "the residual's grid (accumulate)", *accumulate)
    return output_scale, output_zero_point


class NativeLayer(nn.Module):
    """A linear / conv2d layer on uint8 codes with bias, requantization and clamp fused.

    Buffers: `weight` (int8 codes, zero-point 0), `weight_scale` (float32, per output channel),
    `bias` (int32, the reference's integer bias at the accumulator's scale: our C kernel adds it as it
    is; oneDNN's and the float kernel add its value, `float_bias`, made once). Files written before
    the bias was int32 hold its float32 value: `check_loaded` recovers the integers where that value
    keeps them exactly and refuses the file by module path otherwise. `output` is "uint8" (requantize onto the grid `output_scale` / `output_zero_point`,
    clamped to `clamp` = (low, high) in real units, high None for ReLU alone) or "float32"
    (dequantize; `clamp` (0.0, None) fuses a ReLU).

    `kernel` is what computes it, chosen by measurement (`kernel_choice`: milliseconds per call of
    each candidate, None when set by hand): "int8" is one oneDNN call; "float" multiplies the
    weight dequantized from its codes in float32 (`F.linear` / `F.conv2d`), with the input's scale
    and zero-point and the output's scale and zero-point folded into that weight and the bias, so
    it reads and writes the same codes at the cost of a cast in and a rounding out. Between two
    float layers the codes stay float32 (`input` / `output` "float_codes": integers on the grid,
    no cast), so a run of float layers costs one in-place rounding and clamp per layer over the
    float model (the clamp is the ReLU); an int8 kernel chosen there later casts them to uint8 and back.
    The oneDNN packed weight and the float weight are built
    on first use and never stored or copied: the codes are what a file holds. "c_int8" (linear layers)
    is our C kernel (`q8`): uint8 codes times int8 codes in an int32 accumulator and the reference
    backend's fixed-point requantization, bit for bit the reference, in one call; `input_qmax` (the
    input grid's largest code) lets it take vpmaddubsw's int16 pair sums where they cannot saturate.

    `accumulate` (scale, zero-point): a convolution that adds a residual inside its kernel (oneDNN's sum
    post-op; `ActivationConfig(fuse_adds=True)` models it): `forward(x, residual)` adds the real values of
    the uint8 codes `residual` on that grid to its own before the clamp and the one rounding onto the
    output grid. oneDNN writes the sum into the residual's memory: with `accumulate_in_place` (nothing
    reads the residual after this layer) that is the residual itself, otherwise a copy.

    A layer holds its weight once: when the chosen kernel's form is built and gives the codes back
    exactly (oneDNN's packed weight through `to_dense`, the float kernel's weight over its scale,
    rounded), the next call drops the codes buffer (our C kernel's codes become a view of its padded
    weight), and `weight` remakes them from that form on demand. `hold_buffers` registers them again for
    whatever reads the module's buffers (a file's writer, state_dict, copies, `.to`); the next call
    drops them again. Without this a native resnet18 held its 11.7 MB of codes twice.
    """

    def __init__(self, kind: str, weight_shape: list[int], input_scale: float, input_zero_point: int,
                 output: str, output_scale: float = 1.0, output_zero_point: int = 0,
                 clamp: tuple[float, float | None] | None = None, stride: list[int] | None = None,
                 padding: list[int] | None = None, dilation: list[int] | None = None, groups: int = 1,
                 kernel: str = "int8", input: str = "uint8", times_ms: dict[str, float] | None = None,
                 input_qmax: int = UINT8_MAX, accumulate: tuple[float, int] | None = None,
                 accumulate_in_place: bool = False) -> None:
        super().__init__()
        output_scale, output_zero_point = _check_layer_config(kind, output, kernel, input, input_qmax, input_scale,
                                                              input_zero_point, output_scale,
                                                              output_zero_point, accumulate)
        self.kind, self.output, self.clamp = kind, output, None if clamp is None else tuple(clamp)
        self._shape = list(weight_shape)  # what the codes must be (a file's tensors are checked against it)
        # the fused clamp: ReLU alone (no upper bound) is oneDNN's "relu"; a bounded range is "hardtanh"
        self.post_op = "none" if clamp is None else "relu" if self.clamp[1] is None else "hardtanh"
        self.input_scale, self.input_zero_point = input_scale, input_zero_point
        self.output_scale, self.output_zero_point = output_scale, output_zero_point
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.kernel, self.input = kernel, input
        self.input_qmax = input_qmax  # the largest input code (the grid's qmax): our C kernel's exactness bound
        self.accumulate = None if accumulate is None else (float(accumulate[0]), int(accumulate[1]))
        self.accumulate_in_place = bool(accumulate_in_place)
        # the input ranks oneDNN's call takes as they are (forward's shortcut checks only these): a convolution's
        # batched (N, C, H, W) codes; a linear layer's (..., in_features), a 1-D vector included (qlinear_pointwise
        # flattens the leading dims, as F.linear does). An unbatched (C, H, W) image runs as a batch of one.
        self._min_rank, self._max_rank = (4, 4) if kind == "conv2d" else (1, math.inf)
        self._where = "NativeLayer"  # what errors call it: LowerToInteger and files set its module path
        self.kernel_choice = None if times_ms is None else KernelChoice.from_stats({"kernel": kernel,
                                                                                    "times_ms": times_ms})
        out = weight_shape[0]
        self._buffers["weight"] = torch.zeros(weight_shape, dtype=torch.int8)  # the `weight` property reads it
        self._codes_in: str | None = None  # the kernel whose form holds the codes while the buffer is dropped
        self._release_due = False  # whether the next call may drop the codes (a form was built or they came back)
        self.register_buffer("weight_scale", torch.ones(out, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out, dtype=torch.int32))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int32), persistent=False)
        self._packed: torch.Tensor | None = None
        self._float: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._c: q8.Packed | None = None
        self._bias: torch.Tensor | None = None  # float_bias, made once
        # oneDNN's op and every argument after x, made once where the int8 kernel reads and writes plain codes:
        # eager calls go straight to it (the attribute reads and argument building cost about 20 µs a call,
        # 4% of resnet18's batch-1 time over its 20 convolutions); with `accumulate`, the arguments before and
        # after the residual
        self._call: tuple[Any, tuple] | tuple[Any, tuple, tuple] | None = None

    KERNELS: ClassVar[tuple[str, ...]] = LAYER_KERNELS  # what `timing.remeasure` may choose among

    @property
    def weight(self) -> torch.Tensor:
        """The int8 codes [out, in, ...]: the buffer, or remade from the kernel's form that holds them."""
        codes = self._buffers.get("weight")
        if codes is None:
            codes = self._codes_from_form(self._codes_in)
        if codes is None:  # AttributeError: what register_buffer's hasattr expects of an empty slot
            raise AttributeError("NativeLayer has no weight codes: neither the buffer nor a kernel form holds them")
        return codes

    def _codes_from_form(self, kernel: str | None) -> torch.Tensor | None:
        """The codes as `kernel`'s built form holds them (None where it is not built)."""
        if kernel == "int8" and self._packed is not None:
            dense = self._packed.to_dense()  # oneDNN keeps a linear weight as [in, out]
            return dense.t().contiguous() if self.kind == "linear" else dense
        if kernel == "float" and self._float is not None:
            weight = self._float[0] if self.output == "float32" else self._float[0] * self.output_scale
            # |codes| <= 128 and float32 keeps 24 bits: the rounding gives the integers back (checked on release)
            codes = torch.nan_to_num(weight / self._code_step()).round_().clamp_(*INT8_RANGE)
            return codes.to(torch.int8)
        if kernel == "c_int8" and self._c is not None:
            return self._c.weight[:, :self._c.in_features]  # a view: no copy
        return None

    def release_codes(self) -> None:
        """Drop the codes buffer where the chosen kernel's built form gives the codes back exactly."""
        self._release_due = False
        codes = self._buffers.get("weight")
        held = self._codes_from_form(self.kernel)
        if codes is None or held is None or not torch.equal(held, codes):
            return
        if self.kernel == "c_int8":
            self._buffers["weight"] = held  # the kernel's own memory
        else:
            del self._buffers["weight"]
            self._codes_in = self.kernel

    def held_bytes(self) -> int:
        """Bytes the layer holds between calls: its buffers and the forms built from them (oneDNN's packed
        weight, the float kernel's weight and bias, our C kernel's arguments), each memory counted once."""
        float_form = () if self._float is None else self._float[:2]
        c_form = () if self._c is None else (self._c.weight, self._c.bias, self._c.mult, self._c.shift, self._c.scale)
        tensors = [t for t in (*self._buffers.values(), *float_form, *c_form, self._bias) if t is not None]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        packed = 0 if self._packed is None else torch.ops.mkldnn._nbytes(self._packed)
        return sum(storages.values()) + packed

    def hold_buffers(self) -> None:
        """Register the codes as a buffer again, for readers of the module's buffers; the next call drops them."""
        self._call = None  # the next call takes forward's full path, which drops them
        if "weight" not in self._buffers:
            self._buffers["weight"] = self._codes_from_form(self._codes_in)
            self._codes_in = None
        self._release_due = True

    def kernel_refusals(self, kernels: Sequence[str]) -> dict[str, str]:
        """Why each of `kernels` cannot run this layer where it stands here (its input and output forms are
        fixed by the graph around it); the kernels that can are absent."""
        refused = {}
        for kernel in kernels:
            if kernel not in LAYER_KERNELS:
                raise ConfigError(f"NativeLayer: no kernel named {kernel!r}; kernels: {LAYER_KERNELS}")
            if kernel == "int8" and not available():
                refused[kernel] = "this torch build has no oneDNN int8 kernels"
            elif kernel == "int8" and not saturation_free(self.weight, self.input_qmax):
                refused[kernel] = f"two weight codes times input code {self.input_qmax} could pass int16 (no VNNI)"
            elif kernel != "int8" and self.accumulate is not None:
                refused[kernel] = "it adds a residual inside oneDNN's int8 kernel (the sum post-op)"
            elif kernel == "c_int8" and (reason := self.c_refusal()) is not None:
                refused[kernel] = reason
        return refused

    def choose(self, x: torch.Tensor, kernels: Sequence[str], *, repeats: int = 7, margin: float = 1.05,
               cold: bool = False, residual: torch.Tensor | None = None) -> KernelChoice:
        """Time every kernel of `kernels` that can run this layer here on its input `x` (and `residual`, for a
        layer that accumulates one) (interleaved medians, `timing.measure`) and switch to the fastest: float
        unless another wins by `margin` (where only one can run, it is timed and kept). `timing.remeasure`
        calls this on another machine or batch size."""
        self._check_residual(residual)
        refused = self.kernel_refusals(kernels)
        names = [kernel for kernel in kernels if kernel not in refused] or [self.kernel]
        forms = {}
        for kernel in names:
            forms[kernel] = form = NativeLayer(**{**self.config(), "kernel": kernel, "times_ms": None})
            form.load_state_dict(self.state_dict())
        calls = {k: form.forward for k, form in forms.items()}
        if self.accumulate is not None:  # timed on a copy: the kernel writes its sum into the residual's memory
            scratch = residual.detach().clone()
            calls = {k: functools.partial(form.forward, residual=scratch) for k, form in forms.items()}
        choice = measure(calls, x.detach(),
                         baseline="float" if "float" in forms else names[0], repeats=repeats, margin=margin,
                         cold=cold)
        chosen = forms[choice.kernel]
        self._drop_derived()  # the codes back in the buffer before another form replaces the one holding them
        self.kernel, self.kernel_choice = choice.kernel, choice
        self._packed, self._float, self._c = chosen._packed, chosen._float, chosen._c  # built while timing
        return choice

    def packed(self, x_shape: Sequence[int] | None = None) -> torch.Tensor:
        """oneDNN's packed weight, made once. A convolution's is laid out for `x_shape`, the first input it
        reads: packed without it, oneDNN's default layout can differ from what the input's shape wants, and
        the kernel then reorders the weight on every call (resnet18's 3x3 convs on 512 x 7 x 7 at batch 1:
        0.76 against 0.50 ms a call). `choose` packs again at the batch size it measures."""
        if self._packed is None:
            if not available():  # a file lowered on an x86 machine, opened on one without oneDNN's kernels
                raise PreconditionError(f"NativeLayer ({self.kind}): this torch build has no oneDNN int8 "
                                        f"kernel ({KERNELS[self.kind]}); lower the fake-quant model with "
                                        "LowerToInteger(backend='reference') for this machine")
            if self.kind == "linear":
                self._packed = torch.ops.onednn.qlinear_prepack(self.weight, None)
            else:
                self._packed = torch.ops.onednn.qconv_prepack(
                    self.weight, self.weight_scale, self.input_scale, self.input_zero_point, self.stride,
                    self.padding, self.dilation, self.groups, None if x_shape is None else list(x_shape))
            self._release_due = True
        return self._packed

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        call = self._call
        if call is not None and self._min_rank <= x.dim() <= self._max_rank and not torch.compiler.is_compiling():
            if residual is None:
                return call[0](x, *call[1])
            return call[0](x, *call[1], self._accumulator(residual), *call[2])
        self._check_residual(residual)
        if self.kind == "conv2d" and x.dim() == 3:
            # an unbatched image (C, H, W), which F.conv2d and the reference backend take: oneDNN's qconv2d reads a
            # 3-D tensor as a batch of 1-d signals and fails ("negative dimension"), so it runs as a batch of one
            # (a residual with it: the sum post-op still writes into the residual's memory, through the view)
            batched = None if residual is None else residual.unsqueeze(0)
            return self.forward(x.unsqueeze(0), batched).squeeze(0)
        self._check_rank(x)
        y = self._forward(x) if residual is None else self._forward_accumulating(x, residual)
        if self._release_due and not torch.compiler.is_compiling():  # the form this call used is built now
            self.release_codes()
        return y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input == "float32" and self.kernel != "c_int8":
            # c_int8 quantizes a float input inside its call; another kernel chosen later takes the same codes first
            x = quantize_to_codes(x, self.input_scale, self.input_zero_point, self.input_qmax)
        if self.kernel == "float":
            return self._forward_float(x)
        if self.input == "float_codes":  # an int8 kernel inside a run of float layers: integers, cast exactly
            x = x.to(torch.uint8)
        y = self._forward_codes(x)
        return y.float() if self.output == "float_codes" else y

    def _forward_codes(self, x: torch.Tensor) -> torch.Tensor:
        """An int8 kernel (oneDNN's or our C one) on uint8 codes (or c_int8's float input): uint8 codes out,
        or real values where the layer dequantizes."""
        if self.kernel == "c_int8":
            c = self._c or self.c_packed()
            # traced, straight to the op: tracing into `call`'s closure made guards torch.compile checks in Python
            return q8.traced(x, c) if torch.compiler.is_compiling() else c.call(x)
        op, args = self._int8_call(x.shape)
        if self.input == "uint8" and self.output != "float_codes" and not torch.compiler.is_compiling():
            self._call = op, args  # forward's shortcut from the next call on
        return op(x, *args)

    def _check_rank(self, x: torch.Tensor) -> None:
        """A PreconditionError naming the layer for an input no kernel of it can read (oneDNN's own error
        names neither the layer nor the shape it wanted)."""
        if not self._min_rank <= x.dim() <= self._max_rank:
            wanted = ("4-D codes (N, C, H, W) or an unbatched 3-D image (C, H, W)" if self.kind == "conv2d"
                      else f"an input of at least 1 dim (..., {self._shape[1]})")
            raise PreconditionError(f"{self._where} ({self.kind}): reads {wanted}, got a {x.dim()}-D input of shape "
                                    f"{list(x.shape)}")

    def _check_residual(self, residual: torch.Tensor | None) -> None:
        if (residual is None) != (self.accumulate is None):
            raise ConfigError(f"NativeLayer: a layer {'with' if self.accumulate else 'without'} `accumulate` is "
                              f"called {'without' if residual is None else 'with'} a residual")

    def _accumulator(self, residual: torch.Tensor) -> torch.Tensor:
        """The memory oneDNN writes the sum into: the residual itself where nothing reads it later and it is
        laid out as the output (channels-last), a copy otherwise."""
        if not residual.is_contiguous(memory_format=torch.channels_last):
            return residual.contiguous(memory_format=torch.channels_last)
        return residual if self.accumulate_in_place else residual.clone()

    def _forward_accumulating(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if residual.dtype != torch.uint8 or x.dtype != torch.uint8:
            raise PreconditionError(f"NativeLayer (conv2d, accumulating): reads uint8 codes and a uint8 residual, "
                                    f"got {x.dtype} and {residual.dtype}")
        if torch.compiler.is_compiling():
            return self._accumulated_by_ops(x, residual)
        # the residual comes before the bias; the sum post-op takes a ReLU (post_op "relu" or "none") after it
        head = self._weight_args(x.shape)
        tail = (self._bias_value(), self.stride, self.padding, self.dilation, self.groups, self.output_scale,
                self.output_zero_point, torch.uint8, *self.accumulate, "sum", 1.0, self.post_op, [], "")
        self._call = torch.ops.onednn.qconv2d_pointwise.binary, head, tail
        return torch.ops.onednn.qconv2d_pointwise.binary(x, *head, self._accumulator(residual), *tail)

    def _accumulated_by_ops(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The same sum, traced: the convolution's real output from oneDNN, the residual's real values added, one
        rounding. The sum post-op writes into its residual argument, a mutation that torch.compile's
        functionalization cannot run on uint8 tensors (aot_eager: no kernel for auto_functionalized_v2);
        these ops trace anywhere, and inductor fuses the elementwise part into one kernel."""
        real = torch.ops.onednn.qconv2d_pointwise.default(x, *self._weight_args(x.shape), self._bias_value(),
                                                          self.stride, self.padding, self.dilation, self.groups,
                                                          1.0, 0, torch.float32, "none", [], "")
        scale, zero = self.accumulate
        real = real + (residual.to(torch.float32) - zero) * scale
        if self.clamp is not None:
            real = real.clamp_min(self.clamp[0])
        codes = torch.round(real / self.output_scale) + self.output_zero_point
        return codes.clamp(0, UINT8_MAX).to(torch.uint8)

    def _weight_args(self, x_shape: Sequence[int]) -> tuple:
        """oneDNN's arguments after the input codes, up to the bias: the input's scale and zero-point, the packed
        weight, its scales and zero-points."""
        return (self.input_scale, self.input_zero_point, self.packed(x_shape), self.weight_scale,
                self.weight_zero_point)

    def _bias_value(self) -> torch.Tensor:
        return self._bias if self._bias is not None else self.float_bias()

    def _int8_call(self, x_shape: Sequence[int]) -> tuple[Any, tuple]:
        """oneDNN's op for this layer and its arguments after the input codes."""
        post, scalars = self.post_op, (list(self.clamp) if self.post_op == "hardtanh" else [])
        dtype = torch.float32 if self.output == "float32" else torch.uint8
        common = (*self._weight_args(x_shape), self._bias_value())
        output = (self.output_scale, self.output_zero_point, dtype, post, scalars, "")
        if self.kind == "linear":
            return torch.ops.onednn.qlinear_pointwise.default, (*common, *output)
        return torch.ops.onednn.qconv2d_pointwise.default, (*common, self.stride, self.padding, self.dilation,
                                                            self.groups, *output)

    def _forward_float(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias, shift, low, high = self._float or self.float_weights()
        if x.dtype == torch.uint8:
            x = x.float()
        if shift:
            x = x - shift
        if self.kind == "linear":
            y = F.linear(x, weight, bias)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.output == "float32":
            if self.clamp is None:
                return y
            return y.clamp_min_(self.clamp[0]) if self.clamp[1] is None else y.clamp_(*self.clamp)
        y = y.round_().clamp_(low, high)  # y is in output codes already: the clamp holds the ReLU and the grid
        return y.to(torch.uint8) if self.output == "uint8" else y

    def float_weights(self) -> tuple[torch.Tensor, torch.Tensor, float, int, int]:
        """(weight, bias, input shift, lowest and highest output code) of the float kernel, made once: the
        dequantized weight times the input's scale over the output's (codes out), the bias on the output's
        scale plus its zero-point; the input zero-point folded into the bias where no padding reads it."""
        weight = self.weight.float() * self._code_step()
        bias, shift = self.float_bias().clone(), 0.0
        if self.input_zero_point and (self.kind == "linear" or not any(self.padding)):
            bias = bias - self.input_zero_point * weight.flatten(1).sum(dim=1)
        elif self.input_zero_point:  # zero padding stands for the real value 0: the code zero_point
            shift = float(self.input_zero_point)
        if self.output != "float32":
            weight, bias = weight / self.output_scale, bias / self.output_scale + self.output_zero_point
        self._float = (weight.contiguous(), bias, shift, *self.code_range())
        self._release_due = True
        return self._float

    def _code_step(self) -> torch.Tensor:
        """float32, broadcast over the weight: the real value of one weight code times the input's scale, the
        factor the float kernel's weight carries (`float_weights`) and is divided by to give the codes back."""
        return self.weight_scale.reshape((-1,) + (1,) * (len(self._shape) - 1)) * self.input_scale

    def c_refusal(self) -> str | None:
        """Why our C kernel cannot run this layer here (None: it can)."""
        if self.kind != "linear":
            return "our C kernel runs linear layers only"
        if self.output == "float32" and self.clamp not in (None, (0.0, None)):
            return f"it dequantizes with ReLU at most, not clamp {self.clamp}"
        return q8.refusal(self.weight, self.bias, self.accumulator_scale(), self._multiplier())

    def c_packed(self) -> q8.Packed:
        """Our C kernel's arguments, made once from the buffers (the codes are what a file holds)."""
        if (refusal := self.c_refusal()) is not None:  # a file lowered on a machine with a compiler
            raise PreconditionError(f"NativeLayer ({self.kind}): kernel 'c_int8' cannot run here ({refusal}); lower "
                                    "again, or remeasure the model with kernels 'int8' / 'float'")
        self._c = q8.pack(self.weight, self.accumulator_scale(), self.bias, self.input_zero_point,
                          self.input_qmax, self._multiplier(), self.output_zero_point, self.code_range(),
                          self.clamp is not None and self.clamp[1] is None,
                          self.input_scale if self.input == "float32" else 0.0)
        self._release_due = True
        return self._c

    def float_bias(self) -> torch.Tensor:
        """The bias as the float32 value oneDNN's kernel and the float kernel add: the integer bias times the
        accumulator scale, rounded once (float64 product), so every kernel adds what the reference adds."""
        self._bias = (self.bias.double() * self.accumulator_scale()).float()
        return self._bias

    def check_loaded(self, path: str, root: nn.Module | None = None) -> None:
        """A layer rebuilt from a file: its tensors' dtypes and shapes against its configuration; an older
        file's float32 bias (its value, not its integers) becomes the int32 bias it stands for where float32
        kept it exactly, and the file is refused by module path where it did not."""
        self._where = f"NativeLayer {path}"
        shape, out = list(self.weight.shape), self.weight.shape[0] if self.weight.dim() else 0
        expected = {"weight": (torch.int8, self._shape), "weight_scale": (torch.float32, [out]),
                    "bias": (None, [out])}
        for name, (dtype, want) in expected.items():
            tensor = getattr(self, name)
            if list(tensor.shape) != want or (dtype is not None and tensor.dtype != dtype):
                raise FormatError(f"module {path!r}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}"
                                  f"{list(tensor.shape)}, the layer needs {dtype or 'int32'}{want} "
                                  f"(weight {shape})")
        if not (torch.isfinite(self.weight_scale).all() and (self.weight_scale > 0).all()):
            raise FormatError(f"module {path!r}: tensor 'weight_scale' holds a scale that is not finite and > 0")
        if self.bias.dtype == torch.int32:
            return
        integer = q8.integer_bias(self.bias, self.accumulator_scale()) if self.bias.dtype == torch.float32 else None
        if integer is None:
            raise FormatError(f"module {path!r}: tensor 'bias' is {str(self.bias.dtype).removeprefix('torch.')}; "
                              "the layer needs int32 codes, or (files of earlier versions) float32 values that are "
                              "integers times the accumulator scale exactly")
        self.bias = integer
        self._drop_derived()

    def accumulator_scale(self) -> torch.Tensor:
        """float64 per output channel: the value of one accumulator step (input scale times weight scale)."""
        return self.input_scale * self.weight_scale.double()

    def _multiplier(self) -> torch.Tensor | None:
        """The requantization's real multiplier per output channel, None where the layer dequantizes."""
        return None if self.output == "float32" else self.accumulator_scale() / self.output_scale

    def code_range(self) -> tuple[int, int]:
        """The output codes the fused clamp allows: ReLU's zero-point or the grid's range, within uint8."""
        zero, scale = self.output_zero_point, self.output_scale
        if self.clamp is None:
            return 0, UINT8_MAX
        low = max(0, zero + round(self.clamp[0] / scale))
        return low, UINT8_MAX if self.clamp[1] is None else min(UINT8_MAX, zero + round(self.clamp[1] / scale))

    def __getstate__(self) -> dict[str, Any]:
        self.hold_buffers()
        state = self.__dict__.copy()
        state["_buffers"] = dict(self._buffers)
        state.update(dict.fromkeys(_DERIVED))  # remade from the buffers: copies never hold them
        return state

    def _drop_derived(self) -> None:
        """Forget what was made from the buffers (packed weights, the float kernel, C arguments, float bias),
        the codes first taken back from the form that holds them."""
        self.hold_buffers()
        self.__dict__.update(dict.fromkeys(_DERIVED))

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._drop_derived()
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs) -> None:
        self.hold_buffers()
        super()._save_to_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._drop_derived()
        return super()._apply(fn, recurse)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "weight_shape": list(self._shape), "input_scale": self.input_scale,
                "input_zero_point": self.input_zero_point, "output": self.output,
                "output_scale": self.output_scale, "output_zero_point": self.output_zero_point,
                "clamp": None if self.clamp is None else list(self.clamp), "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation, "groups": self.groups, "kernel": self.kernel,
                "input": self.input, "input_qmax": self.input_qmax,
                "accumulate": None if self.accumulate is None else list(self.accumulate),
                "accumulate_in_place": self.accumulate_in_place,
                "times_ms": None if self.kernel_choice is None else dict(self.kernel_choice.as_stats()["times_ms"])}

    def extra_repr(self) -> str:
        clamp = "" if self.clamp is None else f", clamp={self.clamp}"
        chosen = "" if self.kernel_choice is None else f", {self.kernel_choice.ms:.3f} ms"
        added = "" if self.accumulate is None else " + residual"
        return (f"{self.kind}, weight={tuple(self._shape)}, {self.kernel} {self.input}{added} -> {self.output}"
                f"{clamp}{chosen}")


def float_codes(x: torch.Tensor, scale: float, zero_point: int, qmax: int) -> torch.Tensor:
    """The codes of `x` on an activation grid (qmin 0) held in float32: the boundary into a run of
    float-kernel layers (QuantizeToCodes without the narrowing, code for code)."""
    codes = (x / scale).round_()
    return (codes.add_(zero_point) if zero_point else codes).clamp_(0, qmax)


def max_pool2d_codes(x: torch.Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                     dilation: list[int], ceil_mode: bool) -> torch.Tensor:
    """Max pooling of uint8 codes in any memory format (aten's refuses channels-last uint8)."""
    # an unbatched image (C, H, W), which F.max_pool2d takes and this op refuses (it wants rank 4); a symbolic
    # trace (a pickled model's graph is traced again as it loads) cannot branch on a rank: it records the op
    if not isinstance(x, torch.fx.Proxy) and x.dim() == 3:
        return torch.ops.quantized.max_pool2d(x.unsqueeze(0), kernel_size, stride, padding, dilation,
                                              ceil_mode).squeeze(0)
    return torch.ops.quantized.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def relu_codes(x: torch.Tensor, zero_point: int) -> torch.Tensor:
    """ReLU on codes: the real value 0 is the code `zero_point`."""
    return torch.clamp_min(x, zero_point)


class NativeAdd(nn.Module):
    """A residual add of two uint8 code tensors on their grids, onto an output grid or to float32.

    out = round(a * (sa / so) + b * (sb / so) + c) with c = zo - za * sa / so - zb * sb / so, in
    float32, then clamped to [`low`, `high`] codes: one pass of our C `q8.add` where both operands
    share a layout (torch has no int8 add kernel on plain tensors; its ops take six passes, kept for
    other layouts and traced graphs); dequantizing, the real sum (ReLU fused as a clamp at 0), in one
    pass of `q8.add_values` likewise.
    """

    def __init__(self, a: tuple[float, int], b: tuple[float, int], output: tuple[float, int] | None,
                 low: int = 0, high: int = UINT8_MAX, relu: bool = False) -> None:
        super().__init__()
        for what, grid in (("operand a", a), ("operand b", b), ("the output", output)):
            if grid is not None:
                check_grid("NativeAdd", what, *grid)
        check_code_range("NativeAdd", low, high)
        self.a, self.b, self.output = tuple(a), tuple(b), None if output is None else tuple(output)
        self.low, self.high, self.relu = low, high, relu
        out_scale, out_zero = (1.0, 0) if output is None else output
        self.ka, self.kb = a[0] / out_scale, b[0] / out_scale
        self.offset = out_zero - a[1] * self.ka - b[1] * self.kb

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # one C pass where it can (the ops below make four to six over the tensor)
        if self.output is None:
            out = q8.add_values(a, b, self.ka, self.kb, self.offset, self.relu)
        else:
            out = q8.add(a, b, self.ka, self.kb, self.offset, self.low, self.high)
        if out is not None:
            return out
        if a.dim() == 3 and b.dim() == 3 and not torch.compiler.is_compiling():
            # an unbatched image (C, H, W): a convolution's channels-last codes squeezed are no layout our C pass
            # takes, and torch's ops round apart from it; as the batch of one they came from, they are channels-last
            return self.forward(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
        real = torch.add(a * self.ka, b, alpha=self.kb)  # uint8 times a float promotes: no conversion pass
        real.add_(self.offset)
        if self.output is None:
            return real.clamp_min_(0.0) if self.relu else real
        return real.round_().clamp_(self.low, self.high).to(torch.uint8)

    def config(self) -> dict[str, Any]:
        return {"a": list(self.a), "b": list(self.b), "output": None if self.output is None else list(self.output),
                "low": self.low, "high": self.high, "relu": self.relu}

    def extra_repr(self) -> str:
        out = "float32" if self.output is None else f"uint8 [{self.low}, {self.high}]"
        return f"-> {out}" + (", relu" if self.relu else "")


class NativeCat(nn.Module):
    """A concatenation of uint8 code tensors along `dim`, each moved onto the output grid first.

    An operand on the output grid already is concatenated as it is; another is requantized as
    round(q * (s / so) + zo - z * s / so), clamped to [`low`, `high`]. Dequantizing (`output` None),
    the operands' real values are concatenated in float32.
    """

    def __init__(self, grids: list[tuple[float, int]], output: tuple[float, int] | None, dim: int,
                 low: int = 0, high: int = UINT8_MAX) -> None:
        super().__init__()
        for index, grid in enumerate(grids):
            check_grid("NativeCat", f"operand {index}", *grid)
        if output is not None:
            check_grid("NativeCat", "the output", *output)
        check_code_range("NativeCat", low, high)
        self.grids, self.output = [tuple(g) for g in grids], None if output is None else tuple(output)
        self.dim, self.low, self.high = dim, low, high
        out_scale, out_zero = (1.0, 0) if output is None else output
        self.factors = [(scale / out_scale, out_zero - zero * scale / out_scale) for scale, zero in grids]

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        parts = []
        for t, grid, (factor, offset) in zip(tensors, self.grids, self.factors):
            if grid == self.output:
                parts.append(t)
                continue
            real = (t * factor).add_(offset)
            parts.append(real if self.output is None else real.round_().clamp_(self.low, self.high).to(torch.uint8))
        return torch.cat(parts, self.dim)

    def config(self) -> dict[str, Any]:
        return {"grids": [list(g) for g in self.grids], "output": None if self.output is None else list(self.output),
                "dim": self.dim, "low": self.low, "high": self.high}

    def extra_repr(self) -> str:
        out = "float32" if self.output is None else f"uint8 [{self.low}, {self.high}]"
        return f"{len(self.grids)} operands, dim={self.dim} -> {out}"
