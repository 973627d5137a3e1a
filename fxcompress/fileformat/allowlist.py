"""What a saved file may name: functions, tensor methods and module types (data tables).

Loading resolves names through these tables only, so a file can never reach other code
(no torch.load, no file or process functions, no imports by name). The tables grow in three
ways, never from a file: torchvision's traced-through functions when torchvision imports,
`register_function` and `register_module` for a program's own trusted code.
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import keyword
import math
import operator
import re
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.encoded.module import EncodedWeight
from fxcompress.errors import ConfigError
from fxcompress.frontends.experts import grouped_mm
from fxcompress.frontends.guards import check_input_shape
from fxcompress.kernels.dynamic import DynamicInt8Embedding, DynamicInt8Linear
from fxcompress.kernels.sparse import SparseLayer
from fxcompress.kernels.weight_only import WeightOnlyEmbedding, WeightOnlyLinear
from fxcompress.quant.integer import IntegerAdd, IntegerCat, IntegerLayer, QuantizeInput
from fxcompress.kernels.native import (NativeAdd, NativeCat, NativeLayer, QuantizeToCodes, float_codes,
                                     max_pool2d_codes, relu_codes)
from fxcompress.quant.modules import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.quant.integer import dequantize_codes

_FUNCTIONAL = """linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d relu relu6
gelu silu mish elu selu leaky_relu hardswish hardsigmoid hardtanh sigmoid tanh softmax log_softmax softplus
max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d
adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d dropout batch_norm layer_norm group_norm
instance_norm pad embedding normalize interpolate scaled_dot_product_attention pixel_shuffle glu relu_ rms_norm
one_hot dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout pixel_unshuffle""".split()
_TORCH = """flatten cat concat stack add sub mul div matmul bmm mm addmm baddbmm einsum relu sigmoid tanh softmax
log_softmax reshape transpose permute chunk split mean sum prod exp log sqrt rsqrt clamp where zeros_like
ones_like full_like narrow squeeze unsqueeze neg pow abs max min amax amin maximum minimum conv1d conv2d conv3d
conv_transpose1d conv_transpose2d conv_transpose3d batch_norm layer_norm erf argmax argmin topk sort cumsum
gather masked_fill arange ones zeros full tril triu roll flip round floor ceil sign square var std norm
adaptive_avg_pool1d max_pool1d max_pool2d avg_pool1d dropout t unbind index_select _assert swapaxes swapdims movedim
moveaxis repeat_interleave finfo iinfo clone detach sin cos diff rsub histc empty_like reciprocal scatter index_add
tensor_split eye tile cumprod logsumexp unflatten""".split()
_LINALG = "vector_norm".split()  # torch.linalg: norms the export front end spells (torch.norm, F.normalize)
_OPERATOR = """add sub mul truediv floordiv mod pow neg pos matmul getitem setitem eq ne lt le gt ge and_ or_ xor
invert abs""".split()
METHODS = frozenset("""view reshape flatten size permute transpose contiguous mean sum softmax log_softmax relu
sigmoid tanh chunk split unsqueeze squeeze expand expand_as view_as add sub mul div matmul t float half
type_as masked_fill clamp pow sqrt rsqrt exp log neg abs max min amax amin argmax narrow repeat flip roll dim
numel unbind gather index_select cumsum norm std var square detach clone split_with_sizes unflatten
mT transpose_ sub_ add_ mul_ div_ relu_ to swapaxes swapdims movedim moveaxis repeat_interleave bmm bool long int
double type new_ones new_zeros new_full new_empty scatter_ copy_ fill_ masked_fill_ tril triu eq ne lt le gt ge sin
cos detach_ zero_ index_put_ index_add_ tolist item tile cumprod logsumexp tensor_split topk sort""".split())


# `getattr(x, name)` (fx's form of `x.shape`) is saved only for these tensor properties.
TENSOR_PROPERTIES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT"})
# ... and for the fields of torch.finfo / torch.iinfo (`torch.finfo(x.dtype).min`, a masked value).
NUMERIC_LIMITS = frozenset({"min", "max", "eps", "tiny", "smallest_normal", "resolution", "bits"})
# ... and for the fields of a tensor's device (`x.device.type == "cuda"`, Llama's rotary embedding).
DEVICE_FIELDS = frozenset({"type", "index"})
# ... and for the fields of the (values, indices) results of these calls (`torch.topk(x, k).values`, which the
# channel tables follow): a torch.return_types tuple, whose other attributes a file has no use for.
RESULT_FIELDS = frozenset({"values", "indices"})
NAMED_RESULTS = frozenset({torch.topk, torch.sort, torch.max, torch.min, "topk", "sort", "max", "min"})


# ---- sizes a file states: functions and methods that allocate by their arguments -----------------
# A file is hostile, so `torch.arange(10**12)` must not reach a forward. Each entry below says how many
# elements a call creates from the sizes written in it; a size computed in the forward (a node: the
# inputs' shapes) counts 1, as the file does not choose it. Loading refuses a call over its bound.

def _count(value: Any) -> int:
    """A literal size (an int; a node, a bool or anything else counts 1); -1 keeps a size (expand)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 1


def _shape(sizes: tuple) -> int:
    """Elements of a shape written as (2, 3) or ((2, 3),): torch takes both."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    return math.prod(_count(size) for size in sizes)


def _arange(args: tuple, kwargs: dict) -> int:
    values = dict(zip(("start", "end", "step"), args if len(args) > 1 else (0, *args))) | kwargs
    start, end, step = values.get("start", 0), values.get("end"), values.get("step", 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, end, step)) or not step:
        return 1  # a bound computed in the forward, or one torch refuses itself
    if all(isinstance(v, int) for v in (start, end, step)):
        return max(-((start - end) // step), 0)  # exact for integers of any size
    span = (end - start) / step  # floats: a JSON number is at most about 1.8e308
    return max(math.ceil(span), 0) if math.isfinite(span) else _UNBOUNDED


_UNBOUNDED = 1 << 62


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _sizes(value: Any) -> tuple:
    """A size written as one number or as a list of them."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _factor(value: Any) -> int:
    """A scale factor written in the file (a float, or an int), rounded up; a node counts 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 1
    if not math.isfinite(value) or value >= _UNBOUNDED:
        return _UNBOUNDED
    return max(math.ceil(value), 1)


def _sequence_times(args: tuple, kwargs: dict) -> int:
    """`[0] * n`, `"a" * n`, `n * (1, 2)`: a sequence written in the file repeated n times (the dry run
    computes calls on constants for real)."""
    if len(args) != 2:
        return 1
    for items, times in (args, args[::-1]):
        if isinstance(items, (list, tuple, str)) and isinstance(times, int) and not isinstance(times, bool):
            return max(len(items), 1) * max(times, 1)
    return 1


def _power(args: tuple, kwargs: dict) -> int:
    """`7 ** n` on literal integers: the bits of the result (a huge integer costs memory and time)."""
    if len(args) != 2 or not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
        return 1
    base, exponent = args
    return max(exponent, 1) * max(abs(base).bit_length(), 1) if abs(base) > 1 else 1


def _padded(args: tuple, kwargs: dict) -> int:
    """F.pad: each padded dimension grows by its two pads (as a factor of the input's size)."""
    pads = _sizes(_argument(args, kwargs, 1, "pad", ()))
    return math.prod(1 + _count(low) + _count(high) for low, high in zip(pads[::2], pads[1::2]))


def _per_dim(value: Any, dims: int) -> tuple:
    """A size or factor per spatial dimension: one number stands for every one of `dims`."""
    values = _sizes(value)
    return values * dims if len(values) == 1 else values


def _interpolated(args: tuple, kwargs: dict) -> int:
    """F.interpolate: the output size written in the file, or the scale factors. The input's rank is not
    known here: one number counts once as a size (a long 1-d output is real) and over three dimensions as
    a factor (real ones are small)."""
    size, scale = _argument(args, kwargs, 1, "size"), _argument(args, kwargs, 2, "scale_factor")
    if size is not None:
        return _shape(_sizes(size))
    return min(math.prod(_factor(f) for f in _per_dim(scale, 3 if not isinstance(scale, (list, tuple)) else 1)),
               _UNBOUNDED)


def _output_size(dims: int) -> Callable[[tuple, dict], int]:
    """An adaptive pool's output size over its `dims` spatial dimensions (None keeps the input's)."""
    return lambda args, kwargs: _shape(_per_dim(_argument(args, kwargs, 1, "output_size", ()), dims))


def _transposed(dims: int) -> Callable[[tuple, dict], int]:
    """conv_transpose over `dims` spatial dimensions: each grows by its stride, dilation and output padding."""
    def count(args: tuple, kwargs: dict) -> int:
        stride, output_padding, dilation = (_argument(args, kwargs, i, n, d) for i, n, d in
                                            ((3, "stride", 1), (5, "output_padding", 0), (7, "dilation", 1)))
        return _grown(stride, dilation, output_padding, dims)
    return count


def _grown(stride: Any, dilation: Any, output_padding: Any, dims: int) -> int:
    """How much a transposed convolution can multiply its input's size (its weight's extent aside)."""
    return math.prod(_count(s) + _count(d) + _count(o) for s, d, o in
                     zip(_per_dim(stride, dims), _per_dim(dilation, dims), _per_dim(output_padding, dims)))


def _padded_by(padding: Any, dims: int) -> int:
    """A convolution's input grows by twice its padding in each dimension ('same' / 'valid' do not grow it)."""
    return 1 if isinstance(padding, str) else math.prod(1 + 2 * _count(p) for p in _per_dim(padding, dims))


def _convolved(dims: int) -> Callable[[tuple, dict], int]:
    return lambda args, kwargs: _padded_by(_argument(args, kwargs, 4, "padding", 0), dims)


# function or method name -> elements created, from (args, kwargs) as the graph node holds them
CREATED_ELEMENTS: dict[Any, Callable[[tuple, dict], int]] = {
    torch.arange: _arange,
    torch.ones: lambda args, kwargs: _shape(args or (kwargs.get("size", ()),)),
    torch.zeros: lambda args, kwargs: _shape(args or (kwargs.get("size", ()),)),
    torch.eye: lambda args, kwargs: _count(args[0] if args else kwargs.get("n")) * _count(
        args[1] if len(args) > 1 else kwargs.get("m", args[0] if args else kwargs.get("n"))),
    torch.full: lambda args, kwargs: _shape((args[0] if args else kwargs.get("size", ()),)),
    "new_ones": lambda args, kwargs: _shape(args[1:] or (kwargs.get("size", ()),)),
    "new_zeros": lambda args, kwargs: _shape(args[1:] or (kwargs.get("size", ()),)),
    "new_empty": lambda args, kwargs: _shape(args[1:] or (kwargs.get("size", ()),)),
    "new_full": lambda args, kwargs: _shape((args[1] if len(args) > 1 else kwargs.get("size", ()),)),
    "expand": lambda args, kwargs: _shape(args[1:] or (kwargs.get("size", ()),)),  # a view, read in full later
    "repeat": lambda args, kwargs: _shape(args[1:] or (kwargs.get("repeats", ()),)),  # times the input's size
    "tile": lambda args, kwargs: _shape(args[1:] or (kwargs.get("dims", ()),)),  # repeat's, with ones prepended
    torch.tile: lambda args, kwargs: _shape((_argument(args, kwargs, 1, "dims", ()),)),
    # the ones below multiply the input's size by what the file writes
    torch.repeat_interleave: lambda args, kwargs: _count(_argument(args, kwargs, 1, "repeats", 1)) * _count(
        kwargs.get("output_size", 1)),
    "repeat_interleave": lambda args, kwargs: _count(_argument(args, kwargs, 1, "repeats", 1)) * _count(
        kwargs.get("output_size", 1)),
    F.one_hot: lambda args, kwargs: _count(_argument(args, kwargs, 1, "num_classes", 1)),
    torch.histc: lambda args, kwargs: _count(_argument(args, kwargs, 1, "bins", 1)),
    F.pad: _padded,
    F.interpolate: _interpolated,
    **{fn: _output_size(dims) for fn, dims in ((F.adaptive_avg_pool1d, 1), (F.adaptive_avg_pool2d, 2),
                                                (F.adaptive_avg_pool3d, 3), (F.adaptive_max_pool1d, 1),
                                                (F.adaptive_max_pool2d, 2), (torch.adaptive_avg_pool1d, 1))},
    **{fn: _convolved(dims) for fn, dims in ((F.conv1d, 1), (F.conv2d, 2), (F.conv3d, 3))},
    **{fn: _transposed(dims) for fn, dims in ((F.conv_transpose1d, 1), (F.conv_transpose2d, 2),
                                              (F.conv_transpose3d, 3))},
    operator.mul: _sequence_times,
    operator.pow: _power,
}


def _sections(args: tuple, kwargs: dict) -> int:
    """tensor_split's pieces: a number of sections makes that many tensors whatever the input's size (empty ones
    past its end), a list of indices one more than it holds (the file carries the list)."""
    value = _argument(args, kwargs, 1, "indices_or_sections")
    for name in ("sections", "indices", "tensor_indices_or_sections"):
        value = kwargs.get(name, value)
    return len(value) + 1 if isinstance(value, (list, tuple)) else _count(value)


# A split makes one tensor (a Python object each) per piece: split / chunk / unbind make at most one per position of
# the recorded input, but tensor_split makes as many as the file writes (tensor_split(x, 10**9) is 10**9 empty
# tensors). Loading refuses a call of more pieces than this, which is more than a real model's graph reads.
MAX_PIECES = 1 << 16
# function or method name -> the tensors a call makes, from (args, kwargs) as the graph node holds them
CREATED_PIECES: dict[Any, Callable[[tuple, dict], int]] = {torch.tensor_split: _sections, "tensor_split": _sections}
# module type -> elements its forward creates per input element from the sizes its configuration writes
# (the standard layers a file may name: MODULES below; their configurations are checked like their calls)
MODULE_CREATED_ELEMENTS: dict[type, Callable[[nn.Module], int]] = {
    nn.Conv1d: lambda m: _padded_by(m.padding, 1), nn.Conv2d: lambda m: _padded_by(m.padding, 2),
    nn.Conv3d: lambda m: _padded_by(m.padding, 3),
    nn.ConvTranspose1d: lambda m: _grown(m.stride, m.dilation, m.output_padding, 1),
    nn.ConvTranspose2d: lambda m: _grown(m.stride, m.dilation, m.output_padding, 2),
    nn.ConvTranspose3d: lambda m: _grown(m.stride, m.dilation, m.output_padding, 3),
    nn.AdaptiveAvgPool1d: lambda m: _shape(_per_dim(m.output_size, 1)),
    nn.AdaptiveAvgPool2d: lambda m: _shape(_per_dim(m.output_size, 2)),
}
# Elements a call may create from sizes written in the file: as many as the model's own tensors hold
# together (the file carries at least that many bytes), plus this much for a parameter-free graph's
# masks and positions (a 2048 x 2048 causal mask).
CREATED_SLACK = 1 << 22

# torchvision functions that fx records as calls (torch.fx.wrap), registered when torchvision imports;
# its modules (StochasticDepth, Conv2dNormActivation, SqueezeExcitation, ...) are traced through.
TORCHVISION_FUNCTIONS = (
    ("torchvision.ops.stochastic_depth", "stochastic_depth"),
    ("torchvision.models.swin_transformer", "shifted_window_attention"),
    ("torchvision.models.swin_transformer", "_patch_merging_pad"),
    ("torchvision.models.swin_transformer", "_get_relative_position_bias"),
)


def _functions() -> dict[str, object]:
    table = {"builtins.getattr": builtins.getattr}
    for prefix, module, names in (("torch.nn.functional", F, _FUNCTIONAL), ("torch", torch, _TORCH),
                                  ("torch.linalg", torch.linalg, _LINALG), ("operator", operator, _OPERATOR)):
        for name in names:
            if hasattr(module, name):
                table.setdefault(f"{prefix}.{name}", getattr(module, name))
    return table


FUNCTIONS: dict[str, object] = _functions() | {
    # the native integer backend's functions on uint8 codes (kernels/native.py); the names are the file
    # format's, fixed when the module lived in quant/, as the module names below
    "fxcompress.quant.native.max_pool2d_codes": max_pool2d_codes,
    "fxcompress.quant.native.relu_codes": relu_codes,
    "fxcompress.quant.native.float_codes": float_codes,
    "fxcompress.quant.integer.dequantize_codes": dequantize_codes,
    "fxcompress.frontends.experts.grouped_mm": grouped_mm,  # mixture-of-experts layers (the export front end's)
    "fxcompress.frontends.guards.check_input_shape": check_input_shape,  # the shapes an exported graph takes
}
FUNCTION_NAMES: dict[object, str] = {}
for _name, _fn in FUNCTIONS.items():
    FUNCTION_NAMES.setdefault(_fn, _name)
_torchvision_tried = False

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_POOL = ("kernel_size", "stride", "padding")
# standard layers: type -> the attributes that are also constructor arguments
MODULES: dict[str, tuple[type, tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv1d": (nn.Conv1d, _CONV), "Conv2d": (nn.Conv2d, _CONV), "Conv3d": (nn.Conv3d, _CONV),
    "ConvTranspose1d": (nn.ConvTranspose1d, _CONV + ("output_padding",)),
    "ConvTranspose2d": (nn.ConvTranspose2d, _CONV + ("output_padding",)),
    "ConvTranspose3d": (nn.ConvTranspose3d, _CONV + ("output_padding",)),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm3d": (nn.BatchNorm3d, ("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
    "MultiheadAttention": (nn.MultiheadAttention, ("embed_dim", "num_heads", "dropout", "batch_first", "kdim",
                                                   "vdim", "add_zero_attn")),
    "Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim", "padding_idx")),
    "ReLU": (nn.ReLU, ("inplace",)), "ReLU6": (nn.ReLU6, ("inplace",)), "SiLU": (nn.SiLU, ("inplace",)),
    "GELU": (nn.GELU, ("approximate",)), "Sigmoid": (nn.Sigmoid, ()), "Tanh": (nn.Tanh, ()),
    "Hardswish": (nn.Hardswish, ("inplace",)), "Hardsigmoid": (nn.Hardsigmoid, ("inplace",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")), "Identity": (nn.Identity, ()),
    "Softmax": (nn.Softmax, ("dim",)), "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Dropout": (nn.Dropout, ("p", "inplace")), "Dropout1d": (nn.Dropout1d, ("p", "inplace")),
    "Dropout2d": (nn.Dropout2d, ("p", "inplace")), "Dropout3d": (nn.Dropout3d, ("p", "inplace")),
    "AlphaDropout": (nn.AlphaDropout, ("p", "inplace")),
    "FeatureAlphaDropout": (nn.FeatureAlphaDropout, ("p", "inplace")),
    # views and rearrangements of the input's elements (the channel tables follow them): nothing grows
    "Unflatten": (nn.Unflatten, ("dim", "unflattened_size")),
    "PixelShuffle": (nn.PixelShuffle, ("upscale_factor",)),
    "PixelUnshuffle": (nn.PixelUnshuffle, ("downscale_factor",)),
    "MaxPool2d": (nn.MaxPool2d, _POOL + ("dilation", "ceil_mode")), "AvgPool2d": (nn.AvgPool2d, _POOL),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
}
MODULE_NAMES: dict[type, str] = {cls: name for name, (cls, _) in MODULES.items()}
STANDARD_MODULES = frozenset(MODULES)  # built on the meta device, their unsaved tensors dropped


# fxcompress's own module types a file may name, each rebuilt as `cls(**config)`. The names are part
# of the file format, not of the code's layout: they stay when a class moves (IntegerLayer lived in
# fxcompress.integer when version 1 was written), so older files keep loading.
_OWN_MODULES: dict[str, type] = {
    "fxcompress.encoded.module.EncodedWeight": EncodedWeight,
    "fxcompress.quant.modules.KMeansWeight": KMeansWeight,
    "fxcompress.quant.modules.GridWeight": GridWeight,
    "fxcompress.quant.modules.ActivationQuant": ActivationQuant,
    "fxcompress.integer.IntegerLayer": IntegerLayer,
    "fxcompress.integer.QuantizeInput": QuantizeInput,
    "fxcompress.quant.integer.IntegerAdd": IntegerAdd,
    "fxcompress.quant.integer.IntegerCat": IntegerCat,
    "fxcompress.quant.native.NativeLayer": NativeLayer,
    "fxcompress.quant.native.QuantizeToCodes": QuantizeToCodes,
    "fxcompress.quant.native.NativeAdd": NativeAdd,
    "fxcompress.quant.native.NativeCat": NativeCat,
    "fxcompress.kernels.sparse.SparseLayer": SparseLayer,
    "fxcompress.kernels.weight_only.WeightOnlyLinear": WeightOnlyLinear,
    "fxcompress.kernels.weight_only.WeightOnlyEmbedding": WeightOnlyEmbedding,
    "fxcompress.kernels.dynamic.DynamicInt8Linear": DynamicInt8Linear,
    "fxcompress.kernels.dynamic.DynamicInt8Embedding": DynamicInt8Embedding,
}


def fxcompress_modules() -> dict[str, type]:
    """fxcompress's own module types a file may name, by their names in the file format."""
    return dict(_OWN_MODULES)

DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def _qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _check_new_name(name: Any, table: dict, entry: object, what: str) -> None:
    if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
        raise ConfigError(f"{what}: name {name!r} must be a dotted Python name")
    if table.get(name, entry) is not entry:
        raise ConfigError(f"{what}: name {name!r} already names {table[name]!r}")


def register_function(fn: Callable, name: str | None = None) -> str:
    """Allow `fn` in saved graphs as a call_function target, under `name` (default: module.qualname).

    Only a program that registered it can save or load a file naming it; register the same
    function, under the same name, before `fxcompress.load`. Returns the name.
    """
    if not callable(fn):
        raise ConfigError(f"register_function: {fn!r} is not callable")
    name = _qualified_name(fn) if name is None else name
    _check_new_name(name, FUNCTIONS, fn, "register_function")
    FUNCTIONS[name] = fn
    FUNCTION_NAMES.setdefault(fn, name)
    return name


def register_module(cls: type, fields: Iterable[str], name: str | None = None) -> str:
    """Allow module type `cls` in saved files, rebuilt as `cls(**{f: module.f for f in fields})`.

    `fields` are attributes of an instance that are also constructor arguments; its parameters and
    buffers come from the file's tensor table. Returns the name the file will use.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_module: {cls!r} is not an nn.Module subclass")
    fields = tuple(fields)
    accepted = inspect.signature(cls).parameters
    for field in fields:
        if not isinstance(field, str) or field not in accepted or not field.isidentifier():
            raise ConfigError(f"register_module: field {field!r} is not a constructor argument of {cls.__name__}")
    name = _qualified_name(cls) if name is None else name
    _check_new_name(name, {k: v[0] for k, v in MODULES.items()}, cls, "register_module")
    if MODULES.get(name, (cls, fields))[1] != fields:
        raise ConfigError(f"register_module: {name!r} is already registered with fields {MODULES[name][1]}")
    MODULES[name] = (cls, fields)
    MODULE_NAMES[cls] = name
    return name


def ensure_torchvision() -> None:
    """Register torchvision's traced functions, once, if torchvision can be imported (it is optional)."""
    global _torchvision_tried
    if _torchvision_tried:
        return
    _torchvision_tried = True
    for module_name, attr in TORCHVISION_FUNCTIONS:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue  # torchvision missing, or a version without this function
        FUNCTIONS.setdefault(f"{module_name}.{attr}", fn)
        FUNCTION_NAMES.setdefault(fn, f"{module_name}.{attr}")


def is_safe_name(name: Any) -> bool:
    """A name that may become Python source: an ASCII identifier (Python folds other letters to ASCII
    ones), not a keyword, no dunder, not `self`."""
    return (isinstance(name, str) and name.isascii() and name.isidentifier() and not keyword.iskeyword(name)
            and "__" not in name and name != "self")


def is_safe_path_part(part: str) -> bool:
    """One step of a module / attribute path: a safe name, a container index such as `0`, or a child
    name of letters, digits, `_` and `-` (torchvision's RegNet names blocks `block1-0`). torch.fx
    writes a step that is not an identifier as `getattr(base, "step")`; without quotes or backslashes
    such a step cannot leave that string. `self` is a fine step (BERT's `attention.self.query`): it is
    read as an attribute of a module, never as a name of its own."""
    return is_safe_name(part) or (isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_-]+", part) is not None
                                  and "__" not in part)
