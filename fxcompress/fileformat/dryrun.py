"""Load's dry run: the rebuilt graph runs once on meta tensors of the recorded input shapes.

A file records the structure of its example inputs (`inputs`: each placeholder's shape and dtype,
the batch dimension as recorded). `load` runs the graph node by node on the meta device (no
memory, no compute: every parameter and buffer appears as a meta tensor of its stored shape and
dtype) before it returns, so a graph whose ops do not accept their arguments (a shape constant
that no longer fits, a swapped argument, a layer whose table entry disagrees with its input) is a
FormatError naming the node, its op and target, and the exception, rather than a PyTorch error at
the first forward. `save` runs the same dry run on what it records, so a file it writes loads.

How each kind of node runs:

- the common ops (elementwise arithmetic, comparisons and activations, where, masked_fill, a biased
  linear, layer norm, mean, attention; `metaops.py`) have their output's shape, strides and dtype
  computed by table, not run: on meta tensors torch runs them through its Python references, whose
  type-promotion wrapper imports torch._dynamo at its first call; a call the table does not cover
  exactly runs as below;
- torch functions, tensor methods and torch's own modules (the allow-lists' built-in entries) run
  as they are, on meta tensors (a module through `torch.func.functional_call` with its tensors
  swapped for meta ones; factory functions inside make meta tensors under `torch.device("meta")`);
- fxcompress's own modules run by the table `MODULE_RULES`: those written in plain torch ops
  (k-means weights, the embeddings tied to a weight-only or dynamic int8 head) run their own forward
  on meta tensors; the integer modules of either backend (the reference runtime's input quantizer,
  layer, add and cat; the native input quantizer, add and cat) and the functions a lowered graph
  calls on codes (`float_codes`, `relu_codes`, `dequantize_codes`: `FUNCTION_RULES`; relu and the
  respelled clamps on integer codes are in the table) run their forward's ops in its
  order with the common ones by table, as above, so loading an integer file does not import
  torch._dynamo either; those whose forward calls our C kernels, oneDNN or decodes
  bytes (encoded weights, native layers, sparse, weight-only and dynamic int8 layers) and the
  fake-quant modules whose grids read values (grid weights, activation quantizers) compute their
  output's shape and dtype from their configuration and input, as their forward would; a module type
  of ours missing from the table is never run on meta tensors (its output is unknown);
- functions and modules a program registered (`register_function`, `register_module`) are trusted
  code that may not run on meta tensors: they run, and if they fail their output is unknown;
- an op whose result depends on the data (`.item()`, `nonzero`, a Python `bool` of a tensor) or
  that has no meta kernel leaves its output unknown.

A node whose input is unknown is skipped, as are the nodes depending on it: the dry run proves
what it can and never refuses a file for what it cannot run. Files written before the format
recorded inputs (version 1), and files of graphs that carried no input shapes when saved
(`inputs` null), load without a dry run.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from fxcompress.encoded.module import EncodedWeight
from fxcompress.errors import ConfigError, FormatError
from fxcompress.execution import evaluating
from fxcompress.kernels.dynamic import DynamicInt8Embedding, DynamicInt8Linear
from fxcompress.kernels.native import (NativeAdd, NativeCat, NativeLayer, QuantizeToCodes, float_codes,
                                      relu_codes)
from fxcompress.kernels.sparse import SparseLayer
from fxcompress.kernels.weight_only import WeightOnlyEmbedding, WeightOnlyLinear
from fxcompress.layers import KINDS
from fxcompress.quant.integer import IntegerAdd, IntegerCat, IntegerLayer, QuantizeInput, dequantize_codes
from fxcompress.quant.modules import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.rewire import writes_in_place

from .allowlist import DTYPES, FUNCTION_NAMES, FUNCTIONS, MAX_PIECES, MODULES, STANDARD_MODULES, fxcompress_modules
from .metaops import FLOATS, MODULES as TABLED_MODULES, Refused, rule_for

MAX_INPUT_DIMS = 32
MAX_INPUT_ELEMENTS = 1 << 48  # per recorded input: meta tensors cost nothing, but sizes must stay exact integers
MAX_INPUT_DEPTH = 8  # nesting of one recorded input (tuples of tensors)
# An op that splits a tensor makes one meta tensor per piece (a Python object each): a recorded shape
# chosen by the file must not turn `unbind` into millions of them. More pieces than MAX_PIECES (allowlist.py,
# where loading refuses a tensor_split into more, a count the file writes) leave the node unknown (a real
# model's graph reads far fewer).
UNKNOWN = object()  # a value the dry run could not compute: the nodes reading it are skipped
_LIBRARY_FUNCTIONS = frozenset(id(fn) for fn in FUNCTIONS.values())  # before any registration
_STANDARD_MODULES = frozenset(MODULES[name][0] for name in STANDARD_MODULES)
_STANDARD_FIELDS = {MODULES[name][0]: MODULES[name][1] for name in STANDARD_MODULES}  # what a file rebuilds each from


class _Submodule:
    """What a get_attr of a submodule gives the dry run: an opaque stand-in, so that an op given a module
    where it wants a tensor fails as it would in the forward, while nothing can call, move or convert the
    real module (`.to("meta")` on it would empty the loaded model)."""

    def __init__(self, path: str, module: nn.Module) -> None:
        self.description = f"submodule {path!r} ({type(module).__name__})"

    def __repr__(self) -> str:
        return self.description


class _Unknown(Exception):
    """The dry run cannot compute this node (data-dependent, no meta kernel, trusted foreign code)."""


# ---- recording inputs (save) --------------------------------------------------------------------

def _spec_of_value(value: Any, where: str) -> Any:
    """One example input as data: a tensor's shape and dtype, tuples and lists of them, plain constants."""
    if isinstance(value, (torch.Tensor, TensorMetadata)):
        dtype = str(value.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ConfigError(f"{where}: dtype {dtype} cannot be recorded (supported: {sorted(DTYPES)})")
        return {"shape": [int(d) for d in value.shape], "dtype": dtype}
    if isinstance(value, tuple):
        return {"t": [_spec_of_value(v, where) for v in value]}
    if isinstance(value, list):
        return [_spec_of_value(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise ConfigError(f"{where}: a {type(value).__name__} cannot be recorded as an input")


def record_inputs(gm: GraphModule, example_inputs: Any = None) -> list | None:
    """The structure of each placeholder's input: from `example_inputs` when given, else from the shapes
    compile wrote to the placeholders (`node.meta["tensor_meta"]`); None when the graph carries none."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is not None:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(inputs) > len(placeholders) or any(not p.args for p in placeholders[len(inputs):]):
            raise ConfigError(f"save.example_inputs: {len(inputs)} inputs for a graph of {len(placeholders)} "
                              f"placeholders ({len([p for p in placeholders if not p.args])} without a default)")
        return [_spec_of_value(v, f"save.example_inputs[{i}]") for i, v in enumerate(inputs)] + \
            [{"default": True}] * (len(placeholders) - len(inputs))
    specs = []
    for node in placeholders:
        if "tensor_meta" in node.meta:
            try:
                specs.append(_spec_of_value(node.meta["tensor_meta"], f"input {node.name!r}"))
            except ConfigError:
                return None  # an input the format cannot describe: the file loads without a dry run
        elif node.args:
            specs.append({"default": True})
        else:
            return None
    return specs


# ---- reading recorded inputs (load) -------------------------------------------------------------

def _fail(where: str, message: str) -> FormatError:
    return FormatError(f"manifest: {where}: {message}")


def _tensor_spec(spec: dict, where: str) -> torch.Tensor:
    shape, dtype = spec["shape"], spec["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(where, f"dtype {dtype!r} is not supported")
    if (not isinstance(shape, list) or len(shape) > MAX_INPUT_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)
            or math.prod(shape) > MAX_INPUT_ELEMENTS):
        raise _fail(where, f"shape must be at most {MAX_INPUT_DIMS} non-negative sizes of at most "
                           f"{MAX_INPUT_ELEMENTS} elements together")
    return torch.empty(shape, dtype=DTYPES[dtype], device="meta")


def _input_value(spec: Any, placeholder: Node, where: str, depth: int = 0) -> Any:
    """The meta value of one recorded input (FormatError naming `where` if it is not a recorded input)."""
    if depth > MAX_INPUT_DEPTH:
        raise _fail(where, f"nested deeper than {MAX_INPUT_DEPTH} levels")
    if spec is None or isinstance(spec, (bool, int, float, str)):
        return spec
    if isinstance(spec, list):
        return [_input_value(s, placeholder, where, depth + 1) for s in spec]
    if isinstance(spec, dict) and set(spec) == {"shape", "dtype"}:
        return _tensor_spec(spec, where)
    if isinstance(spec, dict) and set(spec) == {"t"} and isinstance(spec["t"], list):
        return tuple(_input_value(s, placeholder, where, depth + 1) for s in spec["t"])
    if spec == {"default": True} and depth == 0:
        if not placeholder.args:
            raise _fail(where, "uses its default, but the placeholder has none")
        return placeholder.args[0]
    raise _fail(where, f"{str(spec)[:60]} is not a recorded input (shape and dtype, a tuple, a list, a constant)")


def input_values(specs: Any, gm: GraphModule) -> list:
    """The meta inputs `specs` records, one per placeholder (FormatError if they do not fit the graph)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not isinstance(specs, list) or len(specs) != len(placeholders):
        raise _fail("inputs", f"must list one recorded input for each of the {len(placeholders)} placeholders")
    return [_input_value(s, p, f"inputs: {p.name!r}") for s, p in zip(specs, placeholders)]


def keep_input_shapes(gm: GraphModule, values: list) -> None:
    """Write the recorded inputs to the placeholders' `tensor_meta`, as compile does, so saving the
    loaded model records them again."""
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], values):
        meta = torch.fx.node.map_aggregate(
            value, lambda v: _extract_tensor_metadata(v) if isinstance(v, torch.Tensor) else v)
        if any(isinstance(v, torch.Tensor) for v in _leaves(value)):
            node.meta["tensor_meta"] = meta


def _leaves(value: Any) -> list:
    found = []
    torch.fx.node.map_aggregate(value, found.append)
    return found


# ---- fxcompress's own modules: how each runs on meta tensors --------------------------------------

def _own_forward(module: nn.Module, state: dict, *args: Any, **kwargs: Any) -> Any:
    """Plain torch ops on the module's tensors: its forward itself, on meta tensors."""
    return torch.func.functional_call(module, state, args, kwargs, strict=False)


def _encoded(module: EncodedWeight, state: dict) -> torch.Tensor:
    """The decoded weight: the header's shape, in the dtype the model was converted to (`module.dtype`, set by
    model.double() / .half(): its forward casts to it) or else the header's (both checked by then: the
    constructor refuses another dtype name, check_loaded the header against the payload)."""
    header = module.header
    return torch.empty(header["shape"], dtype=DTYPES[module.dtype or header.get("dtype", "float32")], device="meta")


def _weight_like(module: nn.Module, state: dict, weight: torch.Tensor) -> torch.Tensor:
    axis = getattr(module, "axis", None)
    if axis is not None and not -weight.dim() <= axis < weight.dim():
        raise IndexError(f"{type(module).__name__}: axis {axis} is outside a weight of {weight.dim()} dims")
    if isinstance(module, KMeansWeight) and module.enabled:
        return torch.empty(module.codes.shape, dtype=weight.dtype, device="meta")
    return torch.empty_like(weight)


def _activation(module: ActivationQuant, state: dict, x: torch.Tensor) -> torch.Tensor:
    """x's shape and dtype. Its forward first makes its grid from the range its observer holds and the bits and
    symmetry the file gives, on any input: that runs here as it will there (on the CPU, a few scalars), so a
    grid it cannot make (bits=-8) fails the load, not the first call."""
    if module.enabled:
        with torch.device("cpu"):
            module.grid()
    return torch.empty_like(x)


def _linear_or_conv(kind: str, x: torch.Tensor, weight: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if kind == "linear":
        return F.linear(x, weight)
    # our kernels (oneDNN's, the sparse im2col) take exactly two of each
    check_conv(2, weight, None, {"stride": module.stride, "padding": module.padding, "dilation": module.dilation},
               lengths=(2,))
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, getattr(module, "groups", 1))


def _native_layer(module: NativeLayer, state: dict, x: torch.Tensor, residual: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The float kernel's arithmetic (it takes any input its casts take); the int8 kernels read uint8 codes
    (float32 for a layer that quantizes its input itself); a layer that accumulates reads a uint8 residual of
    its output's shape."""
    expected = torch.uint8 if module.input == "uint8" else torch.float32
    if module.kernel != "float" and x.dtype != expected:
        raise TypeError(f"NativeLayer kernel {module.kernel!r} reads {expected} codes, got {x.dtype}")
    # the float kernel multiplies float32 weights: by codes it converts (uint8, or those it quantizes a float32
    # input to) or by float32 values, nothing else (a float16 input met F.conv2d's dtype check at the first call)
    if module.kernel == "float" and module.input != "float32" and x.dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"NativeLayer kernel 'float' reads uint8 codes or float32 values, got {x.dtype}")
    if (residual is None) != (module.accumulate is None):
        raise TypeError(f"NativeLayer {'with' if module.accumulate else 'without'} accumulate called "
                        f"{'without' if residual is None else 'with'} a residual")
    x = x.float() if module.input == "uint8" else x
    y = _linear_or_conv(module.kind, x, torch.empty(module.weight.shape, device="meta"), module)
    if residual is not None and (residual.dtype != torch.uint8 or residual.shape != y.shape):
        raise TypeError(f"NativeLayer's residual must be uint8 codes of shape {tuple(y.shape)}, got "
                        f"{residual.dtype} {tuple(residual.shape)}")
    return y.to(torch.uint8) if module.output == "uint8" else y


def _sparse_layer(module: SparseLayer, state: dict, x: torch.Tensor) -> torch.Tensor:
    """Every kernel multiplies the input by a weight of the layer's dtype and takes no other input dtype (F.linear
    and F.conv2d refuse a mix, torch's sparse products too, our C kernel reads float32 only), which meta kernels
    do not check."""
    weight = torch.empty(module.weight_shape, dtype=getattr(torch, module.dtype), device="meta")
    if x.dtype != weight.dtype:
        raise TypeError(f"SparseLayer kernel {module.kernel!r} reads {weight.dtype} inputs, got {x.dtype}")
    return _linear_or_conv(module.kind, x, weight, module)


def _by_table(fn: Callable, *args: Any) -> Any:
    """`fn(*args)`, computed by metaops' table where it covers the call, else run on meta as it is."""
    rule = rule_for("call_function", fn)
    result = None if rule is None else rule(args, {})
    return fn(*args) if result is None else result


def _quantize_to_codes(module: QuantizeToCodes, state: dict, x: Any) -> Any:
    """QuantizeToCodes.forward's torch ops (its C call takes CPU tensors only), in its order, with `/`, `+` and
    `clamp` by table: on meta tensors torch runs those three through its Python references, whose wrapper imports
    torch._dynamo, so the first load of an integer-lowered file in a fresh process paid 1-3 s for it. A call the
    table does not cover (another operand type or dtype) runs on meta as the forward would run it."""
    codes = _by_table(operator.truediv, x, module.scale)
    codes = _by_table(torch.clamp, _by_table(operator.add, torch.round(codes), module.zero_point), 0, module.qmax)
    codes = codes.to(torch.uint8)
    return codes.contiguous(memory_format=torch.channels_last) if module.channels_last and codes.dim() == 4 else codes


# the Python ints torch converts to a scalar (int64 or uint64); a larger one is an OverflowError at the call
_SCALAR_INTS = (-(1 << 63), 1 << 64)


def _in_place(t: Any, method: str, *numbers: Any) -> Any:
    """`getattr(t, method)(*numbers)`, the in-place arithmetic of the native modules' forward on a tensor it just
    made: on a floating-point meta tensor and Python numbers that is `t` itself (nothing to check: a fresh tensor
    of a floating dtype takes any number), without torch's references (they import torch._dynamo)."""
    if isinstance(t, torch.Tensor) and t.is_meta and t.layout == torch.strided and t.dtype in FLOATS \
            and all(type(v) is float or (type(v) is int and _SCALAR_INTS[0] <= v < _SCALAR_INTS[1]) for v in numbers):
        return t
    return getattr(t, method)(*numbers)


def _native_add(module: NativeAdd, state: dict, a: Any, b: Any) -> Any:
    """NativeAdd.forward's torch ops (its C passes take CPU tensors only), in its order, the common ones by table
    (`_quantize_to_codes`); anything but two meta tensors runs the forward itself."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return _own_forward(module, state, a, b)
    if a.dim() == 3 and b.dim() == 3:  # the forward runs an unbatched image as a batch of one
        return _native_add(module, state, a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    scaled = _by_table(operator.mul, a, module.ka)
    # torch.add(scaled, b, alpha=kb): the table takes no alpha; for a floating-point `scaled` (what `* ka`, a float,
    # makes of any real tensor) the alpha changes neither the output's layout nor its dtype, and torch accepts it
    real = rule_for("call_function", operator.add)((scaled, b), {}) \
        if isinstance(scaled, torch.Tensor) and scaled.dtype in FLOATS else None
    real = torch.add(scaled, b, alpha=module.kb) if real is None else real
    real = _in_place(real, "add_", module.offset)
    if module.output is None:
        return _in_place(real, "clamp_min_", 0.0) if module.relu else real
    return _in_place(real.round_(), "clamp_", module.low, module.high).to(torch.uint8)


def _native_cat(module: NativeCat, state: dict, *tensors: Any) -> Any:
    """NativeCat.forward's torch ops, in its order, the common ones by table (`_quantize_to_codes`)."""
    parts = []
    for t, grid, (factor, offset) in zip(tensors, module.grids, module.factors):
        if grid == module.output:
            parts.append(t)
            continue
        real = _in_place(_by_table(operator.mul, t, factor), "add_", offset)
        parts.append(real if module.output is None else
                     _in_place(real.round_(), "clamp_", module.low, module.high).to(torch.uint8))
    return _by_table(torch.cat, parts, module.dim)


def _float_codes(x: Any, scale: Any, zero_point: Any, qmax: Any) -> Any:
    """native.float_codes' torch ops, in its order, the common ones by table (`_quantize_to_codes`)."""
    codes = _by_table(operator.truediv, x, scale).round_()
    codes = _in_place(codes, "add_", zero_point) if zero_point else codes
    return _in_place(codes, "clamp_", 0, qmax)


def _relu_codes(x: Any, zero_point: Any) -> Any:
    """native.relu_codes, `torch.clamp_min(x, zero_point)`: for a real meta tensor and a Python number, the
    elementwise output of x in torch's promotion of the two (metaops' rule for binary arithmetic computes exactly
    that); anything else runs on meta."""
    if isinstance(x, torch.Tensor) and x.dtype != torch.bool and not x.dtype.is_complex \
            and type(zero_point) in (int, float):
        result = rule_for("call_function", operator.add)((x, zero_point), {})
        if result is not None:
            return result
    return torch.clamp_min(x, zero_point)


# ---- the reference integer backend (quant/integer.py): each forward's torch ops in its order, the common ones by
# table. Its int64 `*`, `+`, `-`, its float64 `*`, its clamps between 0-d tensors and its `cat` went through torch's
# Python references on meta tensors, which import torch._dynamo (a fresh process's first load of a reference-
# lowered LeNet-5 paid about 0.9 s for it); `round`, `.to`, `<<`, `>>`, `ones_like`, the products without a bias and
# the indexing have C++ meta kernels and run as the forward runs them.

def _same_elementwise(x: Any) -> Any:
    """An elementwise output of x's shape, layout and dtype, for a strided meta tensor of a real non-bool dtype
    (`x + 0` by the table: 0 promotes no such dtype); None for anything else."""
    if not isinstance(x, torch.Tensor) or x.dtype == torch.bool or x.dtype.is_complex:
        return None
    return rule_for("call_function", operator.add)((x, 0), {})


def _clamp_between(x: Any, low: Any, high: Any) -> Any:
    """torch.clamp(x, low, high) with the bounds 0-d tensors (the reference modules' `low` / `high` buffers). For
    a real non-bool x and integer 0-d bounds the output is elementwise in x's dtype (a 0-d tensor of the same
    category promotes nothing, and its zero strides choose no layout); anything else runs on meta."""
    if all(isinstance(b, torch.Tensor) and b.is_meta and b.dim() == 0 and b.dtype != torch.bool
           and not b.dtype.is_floating_point and not b.dtype.is_complex for b in (low, high)):
        result = _same_elementwise(x)
        if result is not None:
            return result
    return torch.clamp(x, low, high)


def _requantize(acc: Any, multiplier: Any, shift: Any) -> Any:
    """quant.integer.requantize's ops, in its order: `*`, `-` and `+` by table."""
    product = _by_table(operator.mul, acc, multiplier)
    return _by_table(operator.add, product, torch.ones_like(shift) << _by_table(operator.sub, shift, 1)) >> shift


def _quantize_input(module: QuantizeInput, state: dict, x: Any) -> Any:
    """QuantizeInput.forward's ops, in its order: `/`, `+`, `clamp` and `-` by table."""
    q = _by_table(operator.add, torch.round(_by_table(operator.truediv, x, module.scale)), module.zero_point)
    q = _by_table(torch.clamp, q, module.qmin, module.qmax)
    return _by_table(operator.sub, q, module.zero_point).to(torch.int32)


def _integer_layer(module: IntegerLayer, state: dict, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`check_conv` on the stride, padding and dilation it was built with, then IntegerLayer.forward's ops on the
    module's meta tensors, in its order: the bias's `+`, the output scale's `*` and requantize by table. A call
    other than one tensor runs the forward itself (which refuses it as the real call does)."""
    if module.kind != "linear":
        check_conv(module.weight.dim() - 2, module.weight, None,
                   {"stride": module.stride, "padding": module.padding, "dilation": module.dilation})
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return _own_forward(module, state, *args, **kwargs)
    x, weight = args[0], state["weight"]
    if module.kind != "linear" and x.dim() == weight.dim() - 1:  # unbatched: run as a batch of one, as forward does
        return _integer_layer(module, state, x.unsqueeze(0)).squeeze(0)
    x, w = x.double(), weight.double()
    if module.kind == "linear":
        acc = _by_table(operator.add, F.linear(x, w).round().to(torch.int64), state["bias"])
    else:
        acc = KINDS[module.kind].function(x, w, None, module.stride, module.padding, module.dilation, module.groups)
        acc = _by_table(operator.add, acc.round().to(torch.int64), state["bias"].reshape(-1, *([1] * (acc.ndim - 2))))
    view = (-1,) if module.kind == "linear" else (-1, *([1] * (acc.ndim - 2)))
    if not module.requantize:
        return _by_table(operator.mul, acc.double(), state["output_scale"].reshape(view)).float()
    out = _requantize(acc, state["multiplier"].reshape(view), state["shift"].reshape(view))
    return _clamp_between(out, state["low"], state["high"]).to(torch.int32)


def _integer_add(module: IntegerAdd, state: dict, a: Any, b: Any) -> Any:
    """IntegerAdd.forward's ops, in its order, `*` and `+` by table; anything but two tensors runs the forward."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return _own_forward(module, state, a, b)
    if not module.requantize:
        scales = state["scales"]
        return _by_table(operator.add, _by_table(operator.mul, a.double(), scales[0]),
                         _by_table(operator.mul, b.double(), scales[1])).float()
    multipliers, shift = state["multipliers"], state["shift"]
    total = _by_table(operator.add, _by_table(operator.mul, a.to(torch.int64), multipliers[0]),
                      _by_table(operator.mul, b.to(torch.int64), multipliers[1]))
    rounding = torch.ones_like(shift) << _by_table(operator.sub, shift, 1)
    out = _by_table(operator.add, total, rounding) >> shift
    return _clamp_between(out, state["low"], state["high"]).to(torch.int32)


def _integer_cat(module: IntegerCat, state: dict, *tensors: Any) -> Any:
    """IntegerCat.forward's ops, in its order, `*`, requantize and `cat` by table."""
    if not module.requantize:
        return _by_table(torch.cat, [_by_table(operator.mul, t.double(), s).float()
                                     for t, s in zip(tensors, state["scales"])], module.dim)
    parts = [_clamp_between(_requantize(t.to(torch.int64), m, s), state["low"], state["high"]).to(torch.int32)
             for t, m, s in zip(tensors, state["multipliers"], state["shifts"])]
    return _by_table(torch.cat, parts, module.dim)


def _dequantize_codes(codes: Any, scale: Any, zero_point: Any) -> Any:
    """quant.integer.dequantize_codes' ops, in its order (either backend's codes read by a float op), `-` and `*`
    by table."""
    values = codes.to(torch.float32)
    return _by_table(operator.mul, _by_table(operator.sub, values, zero_point) if zero_point else values, scale)


# the functions a lowered graph calls whose torch ops meet torch's references on meta tensors: each by its
# forward's ops with the common ones by table (max_pool2d_codes' quantized op and max pooling of int32 codes have
# C++ meta kernels: they run). relu and the respelled clamps on the reference backend's integer codes need no rule
# here: metaops' tables cover integer tensors for those.
FUNCTION_RULES: dict[Callable, Callable] = {
    float_codes: _float_codes, relu_codes: _relu_codes, dequantize_codes: _dequantize_codes,
}


def _measured_linear(module: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    """MeasuredLayer.forward's reshapes around any kernel: rows of in_features in, out_features out."""
    rows = x.reshape(-1, module.in_features)
    return torch.empty(rows.shape[0], module.out_features, dtype=x.dtype, device="meta").reshape(*x.shape[:-1], module.out_features)


MODULE_RULES: dict[type, Callable] = {
    EncodedWeight: _encoded,
    KMeansWeight: _weight_like, GridWeight: _weight_like, ActivationQuant: _activation,
    QuantizeInput: _quantize_input, IntegerLayer: _integer_layer, IntegerAdd: _integer_add, IntegerCat: _integer_cat,
    QuantizeToCodes: _quantize_to_codes, NativeAdd: _native_add, NativeCat: _native_cat,
    NativeLayer: _native_layer, SparseLayer: _sparse_layer,
    WeightOnlyLinear: _measured_linear, DynamicInt8Linear: _measured_linear,
    WeightOnlyEmbedding: _own_forward, DynamicInt8Embedding: _own_forward,  # index_select and torch arithmetic
}


# ---- the run --------------------------------------------------------------------------------------

def _meta(tensor: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """A meta tensor of `tensor`'s shape, strides and dtype; one per tensor, so ties stay ties."""
    found = memo.get(id(tensor))
    if found is None:
        found = memo[id(tensor)] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                                       device="meta")
    return found


def _state(module: nn.Module, memo: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: _meta(t, memo) for name, t in named if t is not None}


def _on_meta(args: tuple, kwargs: dict, method: str | None) -> tuple[tuple, dict]:
    """Devices written in the graph become the meta device: a factory call with `device="cpu"` must not
    allocate for real, and a real tensor must not meet the meta ones."""
    def device(value: Any) -> Any:
        return torch.device("meta") if isinstance(value, torch.device) else value
    if any(isinstance(v, torch.device) for v in _leaves(args)):  # map_aggregate rebuilds every tuple it walks: a
        args = torch.fx.node.map_aggregate(args, device)  # topk's (values, indices) lost its fields, `.values` failed
    kwargs = {k: "meta" if k == "device" and isinstance(v, str) else device(v) for k, v in kwargs.items()}
    if method == "to":
        args = tuple("meta" if isinstance(a, str) else a for a in args)
    return args, kwargs


# op name -> position of its `dim` argument, for the ops that split a tensor into pieces
_SPLITS = {"split": 2, "chunk": 2, "unbind": 1, "split_with_sizes": 2}


def _pieces(name: str, args: tuple, kwargs: dict) -> int:
    """How many tensors a split-like call makes (0 for other calls, or ones torch refuses itself)."""
    if name not in _SPLITS or not args or not isinstance(args[0], torch.Tensor):
        return 0
    x, position = args[0], _SPLITS[name]
    dim = kwargs.get("dim", args[position] if len(args) > position else 0)
    if not isinstance(dim, int) or not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        return 0
    length = x.shape[dim] if x.dim() else 1
    if name == "unbind":
        return length
    size = args[1] if len(args) > 1 else next((kwargs[k] for k in ("split_size_or_sections", "split_size",
                                                                     "split_sizes", "chunks") if k in kwargs), 1)
    if isinstance(size, (list, tuple)):
        return len(size)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return 0
    return min(size, length) if name == "chunk" else -(-length // size)


def _call(gm: GraphModule, node: Node, args: tuple, kwargs: dict, memo: dict) -> Any:
    """Run one node on meta values; _Unknown where the dry run cannot tell."""
    if node.op == "get_attr":
        value = _attribute(gm, node.target)
        if isinstance(value, nn.Module):
            return _Submodule(node.target, value)
        return _meta(value, memo) if isinstance(value, torch.Tensor) else UNKNOWN
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        rule = MODULE_RULES.get(type(module))
        if rule is not None:
            inspect.signature(module.forward).bind(*args, **kwargs)
            return rule(module, _state(module, memo), *args, **kwargs)
        if type(module) in fxcompress_modules().values():  # a kernel module without a rule: never run it on meta
            raise _Unknown(f"{type(module).__name__} has no rule in MODULE_RULES")
        tabled = _tabled(node, args, kwargs, module, memo)
        if tabled is not None:
            return tabled
        return _trusted(type(module) not in _STANDARD_MODULES, _own_forward, module, _state(module, memo),
                        *args, **kwargs)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    args, kwargs = _on_meta(args, kwargs, node.target if node.op == "call_method" else None)
    tabled = _tabled(node, args, kwargs)
    if tabled is not None:
        return tabled
    try:
        native = FUNCTION_RULES.get(node.target) if node.op == "call_function" else None
    except TypeError:  # an unhashable target is none of them
        native = None
    if native is not None:
        if inspect.isfunction(node.target):  # a call the function would refuse, refused alike (torch's builtins
            inspect.signature(node.target).bind(*args, **kwargs)  # have no signature: their rules call them)
        return native(*args, **kwargs)
    if _pieces(name, args, kwargs) > MAX_PIECES:
        raise _Unknown(f"{name} would make more than {MAX_PIECES} tensors")
    if node.op == "call_method":
        return getattr(args[0], _sized(node.target, args, kwargs))(*args[1:], **kwargs)
    return _trusted(id(node.target) not in _LIBRARY_FUNCTIONS and not _torchvision(node.target), node.target,
                    *args, **kwargs)


def _tabled(node: Node, args: tuple, kwargs: dict, module: nn.Module | None = None, memo: dict | None = None) -> Any:
    """The output metaops' tables compute for a common op without running torch's Python references
    (which import torch._dynamo); None where the call runs on meta tensors."""
    if module is not None:
        rule = TABLED_MODULES.get(type(module))
        return None if rule is None else rule(module, _state(module, memo), *args, **kwargs)
    rule = rule_for(node.op, node.target)
    return None if rule is None else rule(args, kwargs)


def _sized(method: str, args: tuple, kwargs: dict) -> str:
    """`reshape` for a `view` to new sizes: meta kernels do not reproduce the memory layouts of CPU kernels
    (CPU attention returns its output stored transposed, so `view` after `transpose` works there and
    torch.export drops the `contiguous()` before it), so the dry run checks a view's sizes, not its strides."""
    retyped = any(isinstance(v, torch.dtype) for v in (*args[1:], *kwargs.values()))
    return "reshape" if method == "view" and not retyped and isinstance(args[0], torch.Tensor) else method


def _attribute(gm: GraphModule, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _torchvision(fn: Any) -> bool:
    return str(getattr(fn, "__module__", "")).startswith("torchvision.")


def _trusted(registered: bool, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call `fn`; a function or module a program registered is trusted code that may not run on meta
    tensors, so any failure of it leaves its output unknown rather than refusing the file."""
    if not registered:
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - foreign code: whatever it raises, the dry run cannot tell
        raise _Unknown(f"{type(exc).__name__}: {exc}") from None


def _undecidable(exc: Exception) -> bool:
    """An error of running on meta tensors, not of the graph: data-dependent values, missing meta kernels."""
    return isinstance(exc, (NotImplementedError, _Unknown)) or re.search(r"\bmeta\b", str(exc), re.I) is not None


def _describe(value: Any) -> str:
    def one(v: Any) -> Any:
        return f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" if isinstance(v, torch.Tensor) else v
    text = ", ".join(repr(torch.fx.node.map_aggregate(v, one)).replace("'", "") for v in value)
    return text if len(text) <= 200 else text[:197] + "..."


def _what(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"call_method .{node.target}()"
    if node.op == "call_function":
        return f"call_function {FUNCTION_NAMES.get(node.target, getattr(node.target, '__name__', node.target))}"
    return f"{node.op} {node.target}"


# ---- what meta kernels do not check -------------------------------------------------------------------
# The meta kernels of linear, the matrix products and the convolutions compute a shape from any mix of
# dtypes (a bool input times a float weight), and relu takes a bool tensor (gelu an int one), where the CPU
# kernels refuse them at the first forward. Such calls are probed on CPU tensors of one element per channel
# group and the same dtypes, which tests the kernels' dtype dispatch only (the meta run checked the shapes);
# operands all of float32 or all of float64, which every one of these CPU kernels takes, need no probe. The
# meta convolutions do not check a bias's size, or a stride's or padding's length and sign (`check_conv`).
# Found by fuzzing saved files (tests/fileformat/fuzz_harness.py): each loaded, then failed at its forward.
_PLAIN_DTYPES = frozenset({torch.float32, torch.float64})
_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3,
                 F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3, torch.conv_transpose1d: 1,
                 torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}
_CONV_MODULES = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, nn.ConvTranspose1d: F.conv_transpose1d,
                 nn.ConvTranspose2d: F.conv_transpose2d, nn.ConvTranspose3d: F.conv_transpose3d}
_ACTIVATIONS = {F.relu, torch.relu, F.relu_, F.relu6, F.leaky_relu, F.hardtanh, F.gelu, F.silu, F.hardswish,
                F.hardsigmoid, F.elu, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh, "relu", "relu_", "sigmoid", "tanh"}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                       nn.ELU, nn.Sigmoid, nn.Tanh)


def _cpu(tensor: Any, shape: tuple) -> Any:
    return torch.zeros(shape, dtype=tensor.dtype, device="cpu") if isinstance(tensor, torch.Tensor) else tensor


def _named(args: tuple, kwargs: dict, names: tuple[str, ...]) -> list:
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]


_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED_NAMES = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_PRODUCT_NAMES = {torch.matmul: ("input", "other"), operator.matmul: ("input", "other"), torch.mm: ("input", "mat2"),
                  torch.bmm: ("input", "mat2"), "matmul": ("self", "other"), "bmm": ("self", "mat2"),
                  torch.addmm: ("input", "mat1", "mat2"), torch.baddbmm: ("input", "batch1", "batch2")}
_PRODUCT_DIMS = {torch.bmm: 3, "bmm": 3, torch.baddbmm: 3}
_TRANSPOSED = frozenset({F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, torch.conv_transpose1d,
                         torch.conv_transpose2d, torch.conv_transpose3d})


def check_conv(dims: int, weight: Any, bias: Any, options: dict[str, Any], groups: Any = 1,
               transposed: bool = False, lengths: tuple[int, ...] = ()) -> None:
    """What a convolution's CPU kernel checks and its meta kernel does not: a stride, padding, dilation or output
    padding given per dimension has one entry (torch's kernels repeat it) or one per spatial dimension (only
    `lengths`, where given), strides and dilations are positive, paddings not negative, and the bias holds one
    value per output channel."""
    for name, value in options.items():
        if isinstance(value, (tuple, list, torch.Size)) and len(value) not in (lengths or (1, dims)):
            counts = " or ".join(map(str, lengths)) if lengths else f"1 or {dims}"
            raise ValueError(f"expected {name} to be a single integer value or a list of {counts} values, got "
                             f"{value!r}")
        least = 1 if name in ("stride", "dilation") else 0
        entries = value if isinstance(value, (tuple, list, torch.Size)) else [value]
        if any(type(v) is int and v < least for v in entries):
            raise ValueError(f"{name} {value!r} is not supported (each entry must be at least {least})")
    if isinstance(bias, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        out = weight.shape[1] * groups if transposed and type(groups) is int else weight.shape[0]
        if bias.dim() != 1 or bias.shape[0] != out:
            raise ValueError(f"a weight of size {list(weight.shape)} needs a bias of {out} elements, got "
                             f"{list(bias.shape)}")


# Calls whose dim, k or bounds the file writes: (argument names, the dim's default). Their meta kernels check
# them today, except sort's (it takes a dim of 2**62, the CPU kernel raises IndexError); each is checked here as
# the CPU kernel checks it, so a file whose topk(x, k) or narrow(x, dim, start, length) does not fit the recorded
# input is refused by name whatever the meta kernels of the torch at hand let through.
_ALONG: dict[Any, tuple[tuple[str, ...], int | None]] = {
    torch.topk: (("input", "k", "dim"), -1), "topk": (("self", "k", "dim"), -1),
    torch.sort: (("input", "dim"), -1), "sort": (("self", "dim"), -1),
    torch.narrow: (("input", "dim", "start", "length"), None), "narrow": (("self", "dim", "start", "length"), None),
}


def check_along(target: Any, args: tuple, kwargs: dict) -> None:
    """IndexError / ValueError unless the dim, topk's k and narrow's start and length given to a call of `_ALONG`
    fit its input (values of other types are torch's to refuse)."""
    try:
        names, default = _ALONG[target]
    except (KeyError, TypeError):  # not listed, or an unhashable target
        return
    values = dict(zip(names, _named(args, kwargs, names)))
    x, dim = values[names[0]], values.get("dim")
    dim = default if dim is None else dim
    if not isinstance(x, torch.Tensor) or type(dim) is not int:
        return
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        raise IndexError(f"dim {dim} is outside a tensor of {x.dim()} dims")
    size = x.shape[dim] if x.dim() else 1
    k, start, length = values.get("k"), values.get("start"), values.get("length")
    if type(k) is int and not 0 <= k <= size:
        raise ValueError(f"k={k} is outside 0..{size}, the size of dim {dim}")
    if type(start) is int and not -size <= start <= size:
        raise IndexError(f"start {start} is outside -{size}..{size}, the size of dim {dim}")
    if type(start) is int and type(length) is int and not 0 <= length <= size - (start + size if start < 0 else start):
        raise ValueError(f"length {length} from start {start} does not fit dim {dim} of size {size}")


def _check_unchecked(gm: GraphModule, node: Node, args: tuple, kwargs: dict) -> None:
    """For the calls listed above: raise what the CPU kernel raises for the dtypes of this call (Refused), and for a
    convolution what `check_conv` raises."""
    target = node.target
    if node.op == "call_module":
        module = gm.get_submodule(target)
        kind = type(module)
        if kind in _ACTIVATION_MODULES:  # no tensors of their own: the module itself is the probe
            target, args, kwargs = module, args[:1], {}
        elif (kind is nn.Linear or kind in _CONV_MODULES) and len(args) == 1 and not kwargs:
            target = F.linear if kind is nn.Linear else _CONV_MODULES[kind]
            if kind is not nn.Linear:  # the stride and the rest come from the file's configuration of the module
                fields = ("stride", "padding", "dilation", "output_padding") if module.transposed else \
                    ("stride", "padding", "dilation")
                check_conv(_CONVOLUTIONS[target], module.weight, module.bias,
                           {f: getattr(module, f) for f in fields}, module.groups, module.transposed)
            args = (args[0], module._parameters.get("weight"), module._parameters.get("bias"))
            kwargs = {"groups": module.groups} if kind is not nn.Linear else {}
        else:
            return
    elif node.op not in ("call_function", "call_method"):
        return
    try:
        listed = (target in _ACTIVATIONS or isinstance(target, _ACTIVATION_MODULES) or target is F.linear
                  or target in _PRODUCT_NAMES or target in _CONVOLUTIONS)
    except TypeError:  # an unhashable target is none of these
        return
    if node.op == "call_function" and target in _CONVOLUTIONS:
        names = _TRANSPOSED_NAMES if target in _TRANSPOSED else _CONV_NAMES
        values = dict(zip(names, _named(args, kwargs, names)))
        check_conv(_CONVOLUTIONS[target], values["weight"], values["bias"],
                   {k: v for k, v in values.items() if k in ("stride", "padding", "dilation", "output_padding")},
                   values["groups"] if values["groups"] is not None else 1, target in _TRANSPOSED)
    dtypes = {v.dtype for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)}
    if not listed or not dtypes or (len(dtypes) == 1 and dtypes <= _PLAIN_DTYPES):
        return
    try:
        if isinstance(target, nn.Module) or target in _ACTIVATIONS:  # with its options (numbers, inplace) as given
            tiny_args, tiny_kwargs = torch.fx.node.map_aggregate((args, kwargs), lambda v: _cpu(v, (1,)))
            call = getattr(tiny_args[0], target) if isinstance(target, str) else functools.partial(target, tiny_args[0])
            call(*tiny_args[1:], **tiny_kwargs)
        elif target is F.linear:
            x, weight, bias = _named(args, kwargs, ("input", "weight", "bias"))
            F.linear(_cpu(x, (1, 1)), _cpu(weight, (1, 1)), _cpu(bias, (1,)))
        elif target in _PRODUCT_NAMES:
            operands = _named(args, kwargs, _PRODUCT_NAMES[target])
            shape = (1,) * _PRODUCT_DIMS.get(target, 2)
            (torch.matmul if len(operands) == 2 else target)(*(_cpu(v, shape) for v in operands))
        else:
            x, weight, bias, *_, groups = _named(args, kwargs, _CONV_NAMES)  # groups: 7th in both signatures
            groups = groups if type(groups) is int and 0 < groups <= MAX_PIECES else 1
            spatial = (1,) * _CONVOLUTIONS[target]
            target(_cpu(x, (1, groups, *spatial)), _cpu(weight, (groups, 1, *spatial)), _cpu(bias, (groups,)),
                   groups=groups)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # NotImplementedError would read as a missing
        raise Refused(f"the CPU kernel refuses these dtypes ({exc})") from None  # meta kernel: not a refusal


# ---- repeated calls: a model's blocks repeat the same calls on the same shapes ----------------------
_TENSOR = object()  # marks a tensor's (shape, strides, dtype) in a cache key or a cached result
_SEQUENCES = (tuple, list, torch.Size, torch.fx.immutable_collections.immutable_list)  # each rebuilt from an iterable


def _cache_key(gm: GraphModule, node: Node, args: tuple, kwargs: dict) -> tuple | None:
    """The key of a call whose meta result depends only on what the key holds: a library function or
    tensor method that changes none of its arguments (its target and its arguments' shapes, strides,
    dtypes and values), or one of torch's own modules (its type, the configuration fields the file
    rebuilds it from, its tensors' metadata and its arguments). None for other calls (fxcompress's and
    registered modules, registered functions, in-place ops), which always run."""
    try:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            fields = _STANDARD_FIELDS.get(type(module))
            if fields is None or getattr(module, "inplace", False) is True:
                return None
            tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
            target = (type(module), _frozen([getattr(module, f) for f in fields]), _frozen(dict(tensors)))
        else:
            if writes_in_place(node.op, node.target, kwargs) \
                    or (node.op == "call_function" and id(node.target) not in _LIBRARY_FUNCTIONS):
                return None
            target = node.target
        key = (node.op, target, _frozen(args), _frozen(kwargs))
        hash(key)
    except TypeError:  # an argument the key cannot hold (a slice, a submodule): the call runs
        return None
    return key


def _frozen(value: Any, depth: int = 0) -> Any:
    """`value` as hashable data: tensors as their metadata; TypeError for anything else than plain values."""
    if isinstance(value, torch.Tensor):
        return (_TENSOR, tuple(value.shape), value.stride(), value.dtype)
    if value is None or type(value) in (int, float, bool, str):
        return value
    if type(value) in _SEQUENCES and depth < MAX_INPUT_DEPTH:
        return (type(value), *(_frozen(v, depth + 1) for v in value))
    if isinstance(value, dict) and depth < MAX_INPUT_DEPTH:
        return (dict, *((k, _frozen(v, depth + 1)) for k, v in value.items()))
    raise TypeError(f"a {type(value).__name__} is not cached")


def _thawed(frozen: Any) -> Any:
    """A cached result made anew: fresh meta tensors (a later in-place op must not reach the cache)."""
    if type(frozen) is not tuple:
        return frozen
    if frozen[0] is _TENSOR:
        return torch.empty_strided(frozen[1], frozen[2], dtype=frozen[3], device="meta")
    if frozen[0] is dict:
        return {k: _thawed(v) for k, v in frozen[1:]}
    return frozen[0](_thawed(v) for v in frozen[1:])


def _run_node(gm: GraphModule, node: Node, env: dict, memo: dict, cache: dict) -> Any:
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
    if any(v is UNKNOWN for v in _leaves((args, kwargs))):
        return UNKNOWN  # an input the dry run could not compute: nothing to check here
    key = _cache_key(gm, node, args, kwargs)
    if key is not None and key in cache:
        return _thawed(cache[key])
    try:
        result = _call(gm, node, args, kwargs, memo)
        _check_unchecked(gm, node, args, kwargs)
        if node.op in ("call_function", "call_method"):
            check_along(node.target, args, kwargs)
        if key is not None:
            _remember(cache, key, result)
        return result
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is either the dry run's limit or the file's
        if _undecidable(exc):
            return UNKNOWN
        message = (str(exc).strip().splitlines() or [""])[0]
        message = message if len(message) <= 300 else message[:297] + "..."
        raise _fail(f"graph node {node.name!r} ({_what(gm, node)})",
                    f"fails on the recorded input shapes, with arguments ({_describe(args)}"
                    f"{', ' if args and kwargs else ''}{_describe([kwargs]) if kwargs else ''}): "
                    f"{type(exc).__name__}: {message}") from None


def _remember(cache: dict, key: tuple, result: Any) -> None:
    try:
        cache[key] = _frozen(result)
    except TypeError:  # a result the cache cannot hold (torch.Size, a dtype): the next such call runs again
        pass


def dry_run(gm: GraphModule, specs: Any) -> dict[str, Any]:
    """Run `gm` once on meta tensors of the recorded inputs `specs` (module docstring); FormatError naming
    the first node that fails. Writes the recorded shapes to the placeholders' `tensor_meta`; returns each
    node's meta value by name (UNKNOWN where the dry run could not tell)."""
    values = input_values(specs, gm)
    env: dict[Node, Any] = {}
    memo: dict[int, torch.Tensor] = {}
    cache: dict[tuple, Any] = {}
    pending = iter(values)
    with evaluating(gm), torch.device("meta"):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(pending)
            elif node.op != "output":
                env[node] = _run_node(gm, node, env, memo, cache)
    keep_input_shapes(gm, values)
    return {node.name: value for node, value in env.items()}
