"""Load's dry run, the common ops by table: their output's shape, strides and dtype computed, not run.

On the meta device torch runs most ops through its Python references (torch._refs, torch._decomp,
torch._meta_registrations). Their type-promotion wrapper is decorated with `torch._disable_dynamo`,
which imports torch._dynamo (about 2 s) at its first call, so the first `mul`, `relu` or biased
`linear` of a fresh process's `fxcompress.load` paid for a compiler it never uses, and every later
call pays for the references' Python. The ops here compute what those references compute, from
broadcasting and torch's own type promotion (`torch.broadcast_shapes`, `torch.result_type`) and the
output strides torch's elementwise kernels choose (`compute_elementwise_output_strides`), and make
the output with `torch.empty_strided` on the meta device: nothing is allocated or run.

A rule returns None for any call it does not cover exactly (an unusual argument, an operand type or
dtype outside its table, shapes that do not broadcast); the dry run then runs that call on meta
tensors as before, so every error torch raises is still torch's own error, with its own message.
`tests/fileformat/test_metaops.py` checks every entry against torch on real CPU tensors.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch._prims_common import compute_elementwise_output_strides, suggest_memory_format

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# the integer dtypes whose relu and clamp CPU kernels exist (bool has neither: torch refuses a bool relu, and a
# clamp whose bounds keep it bool); the unsigned ones wider than uint8 are left to torch
INTEGERS = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})
_NUMBER = (bool, int, float)


def _meta_tensor(value: Any) -> bool:
    # is_meta, not device.type: the same answer without making a torch.device (called for every operand)
    return isinstance(value, torch.Tensor) and value.is_meta and value.layout == torch.strided


def _operands(*values: Any) -> bool:
    """Each a strided meta tensor or a plain Python number, at least one of them a tensor."""
    return (all(_meta_tensor(v) or type(v) in _NUMBER for v in values)
            and any(isinstance(v, torch.Tensor) for v in values))


def _result(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """The output of an elementwise op on `tensors`: their broadcast shape, the strides torch's kernels
    give it (the layout of the operands, as TensorIterator chooses), `dtype`. None if they do not broadcast."""
    layout = _layout(tuple((tuple(t.shape), t.stride()) for t in tensors))
    return None if layout is None else torch.empty_strided(*layout, dtype=dtype, device="meta")


@functools.lru_cache(maxsize=4096)
def _layout(operands: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]) -> tuple[tuple, tuple] | None:
    """(shape, strides) of an elementwise output from its operands' (shape, strides), or None if they do not
    broadcast. Cached: torch's stride rule is Python (about 0.2 ms a call) and depends on nothing else, and a
    graph repeats a few layouts in every block."""
    try:
        shape = torch.broadcast_shapes(*(s for s, _ in operands))
    except RuntimeError:
        return None  # torch's own run refuses it, with its own message
    expanded = (torch.empty_strided(s, st, device="meta").expand(shape) for s, st in operands)
    return tuple(shape), tuple(compute_elementwise_output_strides(*expanded))


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list | None:
    """Positional and keyword arguments as a list in the order of `names` (the last len(defaults) have
    defaults); None for anything a plain call of that signature would not accept."""
    try:
        bound = _signature(names, defaults).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return list(bound.arguments.values())


@functools.cache
def _signature(names: tuple[str, ...], defaults: tuple) -> inspect.Signature:
    required = len(names) - len(defaults)
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                default=defaults[i - required] if i >= required
                                                else inspect.Parameter.empty)
                              for i, name in enumerate(names)])


# ---- binary arithmetic and comparisons -------------------------------------------------------------

def _binary(kind: str, tensor_first: bool = False) -> Callable:
    """add / sub / mul ("arith": torch's default promotion), true division ("div": integers and bools
    promote to the default float dtype), comparisons ("compare": bool), bitwise and / or / xor ("bitwise":
    bool and integer operands only) and minimum / maximum ("extremum": two tensors), on tensors and Python
    numbers (torch's functions take a number second only: `tensor_first`; Python's operators either way)."""
    def rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
        if kwargs or len(args) != 2 or not _operands(*args) or (tensor_first and not _meta_tensor(args[0])):
            return None
        dtype = torch.result_type(*args)
        if kind == "compare":
            dtype = torch.bool
        elif kind == "div" and not (dtype.is_floating_point or dtype.is_complex):
            dtype = torch.get_default_dtype()
        elif kind == "extremum" and not all(_meta_tensor(a) for a in args):
            return None  # minimum / maximum take two tensors
        elif kind == "bitwise" and (dtype.is_floating_point or dtype.is_complex):
            return None  # torch refuses bitwise ops on floats, with its own message
        elif kind == "sub" and any(a.dtype == torch.bool if isinstance(a, torch.Tensor) else type(a) is bool
                                   for a in args):
            _refuse_bool_sub(args)
            return None
        return _result([a for a in args if isinstance(a, torch.Tensor)], dtype)
    return rule


class Refused(RuntimeError):
    """A call torch refuses on every device, raised by a rule with torch's message where torch's own meta run
    raises it as NotImplementedError, the type the dry run reads as a missing meta kernel (a check it cannot
    make): the file would load and fail at its first call."""


def _refuse_bool_sub(args: tuple) -> None:
    """torch refuses `-` with a bool operand, with its own message: a RuntimeError before torch 2.14, a
    NotImplementedError since."""
    try:
        operator.sub(*args)
    except (RuntimeError, NotImplementedError) as exc:
        raise Refused(str(exc)) from None


def _pow(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """pow(float tensor, exponent) (GPT-2's gelu: x ** 3): a number or a tensor of the base's dtype."""
    if kwargs or len(args) != 2 or not _meta_tensor(args[0]) or not args[0].dtype.is_floating_point:
        return None
    base, exponent = args
    if not (type(exponent) in (int, float) or (_meta_tensor(exponent) and exponent.dtype == base.dtype)):
        return None
    return _result([a for a in args if isinstance(a, torch.Tensor)], base.dtype)


def _abs(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if kwargs or len(args) != 1 or not _meta_tensor(args[0]) or args[0].dtype in (torch.bool, torch.uint8):
        return None  # torch refuses abs of a bool tensor (and of uint8 on some builds)
    return _result([args[0]], args[0].dtype)


def _neg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if kwargs or len(args) != 1 or not _meta_tensor(args[0]) or args[0].dtype == torch.bool:
        return None  # torch refuses `-` on a bool tensor
    return _result([args[0]], args[0].dtype)


# ---- unary activations and clamps ----------------------------------------------------------------------------

def _unary(names: tuple[str, ...] = (), defaults: tuple = (), check: Callable = lambda **options: True,
           dtypes: frozenset = FLOATS) -> Callable:
    """An activation on a tensor of one of `dtypes` (floating point unless the activation keeps integers as
    they are): same shape and dtype (other inputs, which some of these refuse and others promote, run on meta
    as before). With inplace=True the output is the input."""
    def rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
        bound = _bind(args, kwargs, ("input", *names), defaults)
        if bound is None or not _meta_tensor(bound[0]) or bound[0].dtype not in dtypes:
            return None
        options = dict(zip(names, bound[1:]))
        if not check(**options) or options.get("inplace", False) not in (True, False):
            return None
        return bound[0] if options.get("inplace") else _result([bound[0]], bound[0].dtype)
    return rule


def _limits(min_val: Any = -1.0, max_val: Any = 1.0, inplace: bool = False) -> bool:
    return type(min_val) in (int, float) and type(max_val) in (int, float) and min_val <= max_val


def _approximate(approximate: Any = "none") -> bool:
    return approximate in ("none", "tanh")


def _clamping(names: tuple[str, ...]) -> Callable:
    """clamp / clip (`names` min and max, at least one given, as torch asks), clamp_min and clamp_max (one,
    required) of a real tensor between Python numbers. As torch's CPU kernels: the output is elementwise in the
    promotion of the tensor with each bound (an integer tensor with a float bound computes in the default float
    dtype, a bool tensor with an int bound in int64), and each bound must convert to that dtype without overflow.
    What those kernels refuse is left to torch: a bool result (no bool clamp kernel) and a bound out of range
    (which torch's meta run lets through: it still runs there, as before); tensor bounds are left to it too."""
    def rule(args: tuple, kwargs: dict) -> torch.Tensor | None:
        bound = _bind(args, kwargs, ("input", *names), (None,) * len(names) if len(names) == 2 else ())
        if bound is None or not _meta_tensor(bound[0]) or bound[0].dtype not in FLOATS | INTEGERS | {torch.bool}:
            return None
        x, limits = bound[0], [v for v in bound[1:] if v is not None]
        if not limits or not all(type(v) in _NUMBER and (type(v) is not int or -2 ** 63 <= v < 2 ** 63)
                                 for v in limits):
            return None  # tensor bounds; ints beyond int64, which torch's argument parser converts or refuses
        dtype = functools.reduce(torch.promote_types, (torch.result_type(x, v) for v in limits))
        # with both bounds given and one NaN, torch's kernel fills the output with NaN without converting either
        nan = len(limits) == 2 and any(type(v) is float and math.isnan(v) for v in limits)
        if dtype == torch.bool or not (nan or all(_converts(v, dtype) for v in limits)):
            return None
        return _result([x], dtype)
    return rule


def _converts(value: bool | int | float, dtype: torch.dtype) -> bool:
    """Whether torch converts the Python number to `dtype` without its overflow error (c10's `overflows`): a
    float dtype takes infinities, NaN and finite values up to its largest; a signed integer dtype its range; an
    unsigned one -max..max too (torch lets negative values wrap, so uint8 takes -255)."""
    if type(value) is bool:
        return True
    if dtype.is_floating_point:
        return math.isinf(value) or math.isnan(value) or abs(float(value)) <= torch.finfo(dtype).max
    info = torch.iinfo(dtype)
    return -info.max <= value <= info.max if info.min == 0 else info.min <= value <= info.max


def _where(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """where(condition, x, y): a bool condition; x and y tensors or numbers, promoted together."""
    bound = _bind(args, kwargs, ("condition", "input", "other"), ())
    if bound is None or not _meta_tensor(bound[0]) or bound[0].dtype != torch.bool or not _operands(*bound[1:]):
        return None
    return _result([v for v in bound if isinstance(v, torch.Tensor)], torch.result_type(*bound[1:]))


def _masked_fill(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """masked_fill(mask, value) of a floating-point tensor with a bool mask and a number: the two broadcast
    together (out of place, torch fills a contiguous copy of the input expanded to the mask's shape)."""
    bound = _bind(args, kwargs, ("input", "mask", "value"), ())
    if (bound is None or not _meta_tensor(bound[0]) or bound[0].dtype not in FLOATS or not _meta_tensor(bound[1])
            or bound[1].dtype != torch.bool or type(bound[2]) not in (int, float)):
        return None
    try:
        shape = torch.broadcast_shapes(bound[0].shape, bound[1].shape)
    except RuntimeError:
        return None
    return torch.empty(shape, dtype=bound[0].dtype, device="meta")


# ---- linear with a bias -------------------------------------------------------------------------------

def _linear(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """F.linear with a bias: torch's meta run of the product without it (matmul's meta kernel, no
    reference), then the bias checked as addmm checks it (same dtype, broadcast to the output)."""
    bound = _bind(args, kwargs, ("input", "weight", "bias"), (None,))
    if bound is None or not all(_meta_tensor(v) for v in bound):
        return None  # no bias: torch's meta run needs no reference
    x, weight, bias = bound
    if not x.dtype == weight.dtype == bias.dtype or x.dtype not in FLOATS or x.dim() == 0 or weight.dim() != 2:
        return None
    if x.shape[-1] != weight.shape[1] or bias.shape != weight.shape[:1]:
        return None
    return F.linear(x, weight)


# ---- normalization, reduction, attention -------------------------------------------------------------

def _same_float(*tensors: Any) -> bool:
    """Each a strided meta tensor of one floating-point dtype (None entries are absent optional tensors)."""
    present = [t for t in tensors if t is not None]
    return all(_meta_tensor(t) for t in present) and present[0].dtype in FLOATS and \
        len({t.dtype for t in present}) == 1


def _layer_norm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """F.layer_norm: the input's shape and dtype (contiguous), the trailing sizes equal to normalized_shape
    and the affine tensors of exactly that shape and the input's dtype."""
    bound = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"), (None, None, 1e-5))
    if bound is None or not _same_float(bound[0], bound[2], bound[3]) or type(bound[4]) not in (int, float):
        return None
    x, shape = bound[0], bound[1]
    if not isinstance(shape, (list, tuple)) or not shape or not all(type(d) is int for d in shape):
        return None
    if tuple(x.shape[x.dim() - len(shape):]) != tuple(shape) or len(shape) > x.dim() or \
            any(t is not None and tuple(t.shape) != tuple(shape) for t in bound[2:4]):
        return None
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _mean(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """mean over distinct dims (or all) of a floating-point tensor, keepdim as given; contiguous."""
    bound = _bind(args, kwargs, ("input", "dim", "keepdim"), (None, False))
    if bound is None or not _meta_tensor(bound[0]) or bound[0].dtype not in FLOATS or type(bound[2]) is not bool:
        return None
    x, dim, keepdim = bound
    dims = (dim,) if type(dim) is int else () if dim is None else dim  # none or an empty list: every dim
    rank = max(x.dim(), 1)
    if not isinstance(dims, (list, tuple)) or not all(type(d) is int and -rank <= d < rank
                                                                      for d in dims):
        return None
    picked = {d % rank for d in dims} if dims else set(range(rank))
    if len(picked) != len(dims) and dims or x.dim() == 0:
        return None  # a repeated dim (torch refuses it) or a 0-d input
    shape = [1 if i in picked else n for i, n in enumerate(x.shape) if keepdim or i not in picked]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _attention(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """scaled_dot_product_attention on 4-d (batch, heads, length, features) tensors of one float dtype, with
    no mask, a bool mask or one of their dtype broadcast to (length, source length); no dropout, no groups."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = _bind(args, kwargs, names, (None, 0.0, False, None, False))
    if bound is None or not _same_float(*bound[:3]) or bound[4] != 0.0 or type(bound[5]) is not bool:
        return None
    q, k, v, mask, _, causal, scale, gqa = bound
    if (gqa is not False or not (scale is None or type(scale) is float) or not q.dim() == k.dim() == v.dim() == 4
            or not q.shape[:2] == k.shape[:2] == v.shape[:2] or q.shape[3] != k.shape[3] or k.shape[2] != v.shape[2]):
        return None
    if mask is not None:
        if causal or not _meta_tensor(mask) or mask.dtype not in (torch.bool, q.dtype):
            return None
        try:
            if torch.broadcast_shapes(mask.shape, (*q.shape[:3], k.shape[2])) != (*q.shape[:3], k.shape[2]):
                return None
        except RuntimeError:
            return None
    return torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device="meta")


def _diff(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """diff(input, n, dim, prepend, append): n times the difference of neighbours along dim (sub, or
    logical_xor for bools: the input's dtype), each the elementwise result of two views of the last one;
    prepend / append (transformers' masks prepend a column to expanded position ids) are joined to the
    input first, as torch's cat joins them when they are tensors of its dtype and its other sizes: into a
    contiguous tensor (cat keeps another layout only for 4-d and 5-d inputs, left contiguous here)."""
    bound = _bind(args, kwargs, ("input", "n", "dim", "prepend", "append"), (1, -1, None, None))
    if bound is None:
        return None
    x, n, dim, *ends = bound
    if not _meta_tensor(x) or type(n) is not int or type(dim) is not int or x.dtype.is_complex \
            or not -x.dim() <= dim < x.dim():
        return None
    ends = [e for e in ends if e is not None]
    if ends:
        dim %= x.dim()
        others = [size for i, size in enumerate(x.shape) if i != dim]
        if not all(_meta_tensor(t) and (t.dim() not in (4, 5) or t.is_contiguous()) and t.dtype == x.dtype
                   and t.dim() == x.dim() and [size for i, size in enumerate(t.shape) if i != dim] == others
                   for t in (x, *ends)):
            return None
        shape = list(x.shape)
        shape[dim] += sum(e.shape[dim] for e in ends)
        x = torch.empty(shape, dtype=x.dtype, device="meta")
    if not 0 < n <= x.shape[dim]:
        return None  # n = 0 returns the input itself, n beyond the size an empty difference: left to torch
    for _ in range(n):
        length = x.shape[dim] - 1
        x = _result([x.narrow(dim, 1, length), x.narrow(dim, 0, length)], x.dtype)
    return x


def _cumsum(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """cumsum(input, dim, dtype=None): the input's shape, contiguous (as torch's CPU kernel writes it);
    integer and bool inputs sum in int64 unless a dtype is given."""
    bound = _bind(args, kwargs, ("input", "dim", "dtype"), (None,))
    if bound is None:
        return None
    x, dim, dtype = bound
    if not _meta_tensor(x) or type(dim) is not int or x.dtype.is_complex or not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        return None
    if dtype is None:
        dtype = x.dtype if x.dtype.is_floating_point else torch.int64
    elif not isinstance(dtype, torch.dtype) or dtype.is_complex:
        return None
    return torch.empty(x.shape, dtype=dtype, device="meta")


def _addmm(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """addmm(input, mat1, mat2, beta=, alpha=) (transformers' Conv1D): mat1 @ mat2 plus the input broadcast to
    it, on tensors of one float dtype; contiguous."""
    bound = _bind(args, kwargs, ("input", "mat1", "mat2", "beta", "alpha"), (1, 1))
    if bound is None:
        return None
    bias, mat1, mat2, beta, alpha = bound
    if not (_same_float(bias, mat1, mat2) and None not in (bias, mat1, mat2) and mat1.dim() == mat2.dim() == 2
            and mat1.shape[1] == mat2.shape[0] and type(beta) in _NUMBER and type(alpha) in _NUMBER):
        return None
    shape = (mat1.shape[0], mat2.shape[1])
    try:
        if torch.broadcast_shapes(bias.shape, shape) != shape:
            return None
    except RuntimeError:
        return None
    return torch.empty(shape, dtype=mat1.dtype, device="meta")


def _cat(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """cat(tensors, dim): tensors of one rank (4-d and 5-d ones not laid out channels-last, a layout cat
    keeps), equal but for dim, joined in their promoted dtype; contiguous."""
    bound = _bind(args, kwargs, ("tensors", "dim"), (0,))
    if bound is None:
        return None
    tensors, dim = bound
    if not isinstance(tensors, (list, tuple)) or not tensors or type(dim) is not int:  # fx: an immutable_list
        return None
    rank = tensors[0].dim() if isinstance(tensors[0], torch.Tensor) else 0
    if not (0 < rank and -rank <= dim < rank) or not all(
            _meta_tensor(t) and t.dim() == rank and not t.dtype.is_complex
            and (rank < 4 or suggest_memory_format(t) == torch.contiguous_format) for t in tensors):
        return None
    dim %= rank
    if any(t.shape[:dim] != tensors[0].shape[:dim] or t.shape[dim + 1:] != tensors[0].shape[dim + 1:] for t in tensors):
        return None
    shape = (*tensors[0].shape[:dim], sum(t.shape[dim] for t in tensors), *tensors[0].shape[dim + 1:])
    return torch.empty(shape, dtype=functools.reduce(torch.promote_types, (t.dtype for t in tensors)), device="meta")


# ---- the tables -------------------------------------------------------------------------------------

_ARITH, _DIV, _COMPARE, _SUB = _binary("arith"), _binary("div"), _binary("compare"), _binary("sub")
_T_ARITH, _T_DIV, _T_COMPARE, _T_SUB = (_binary(kind, tensor_first=True) for kind in ("arith", "div", "compare", "sub"))
_BITWISE, _T_BITWISE = _binary("bitwise"), _binary("bitwise", tensor_first=True)
_EXTREMUM = _binary("extremum", tensor_first=True)
_INPLACE = _unary(("inplace",), (False,))  # an activation whose one option is inplace
_HARDTANH = _unary(("min_val", "max_val", "inplace"), (-1.0, 1.0, False), _limits)
_PLAIN = _unary()
_GELU = _unary(("approximate",), ("none",), _approximate)
# relu keeps integer tensors as they are (the reference integer backend's codes): the same rule on their dtypes
_RELU, _RELU_PLAIN = _unary(("inplace",), (False,), dtypes=FLOATS | INTEGERS), _unary(dtypes=FLOATS | INTEGERS)
_CLAMP, _CLAMP_MIN, _CLAMP_MAX = _clamping(("min", "max")), _clamping(("min",)), _clamping(("max",))

# call_function targets
FUNCTIONS: dict[Any, Callable] = {
    operator.add: _ARITH, operator.mul: _ARITH, operator.sub: _SUB, operator.truediv: _DIV, operator.neg: _neg,
    torch.add: _T_ARITH, torch.mul: _T_ARITH, torch.sub: _T_SUB, torch.div: _T_DIV, torch.neg: _neg,
    **{op: _COMPARE for op in (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)},
    **{op: _T_COMPARE for op in (torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge)},
    **{op: _BITWISE for op in (operator.and_, operator.or_, operator.xor)},
    **{op: _T_BITWISE for op in (torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor)},
    F.relu: _RELU, torch.relu: _RELU_PLAIN, F.relu6: _INPLACE,
    F.hardtanh: _HARDTANH, F.silu: _INPLACE, F.gelu: _GELU, F.hardswish: _INPLACE, F.hardsigmoid: _INPLACE,  # MobileNetV3
    torch.sigmoid: _PLAIN, F.sigmoid: _PLAIN, torch.tanh: _PLAIN, F.tanh: _PLAIN,
    **{op: _PLAIN for op in (torch.cos, torch.sin, torch.exp, torch.log, torch.sqrt, torch.rsqrt)},  # rotary, RMSNorm, T5
    torch.clamp: _CLAMP, torch.clip: _CLAMP, torch.clamp_min: _CLAMP_MIN,
    torch.clamp_max: _CLAMP_MAX, torch.where: _where, torch.masked_fill: _masked_fill,
    F.linear: _linear, F.layer_norm: _layer_norm, torch.mean: _mean,
    F.scaled_dot_product_attention: _attention, torch.diff: _diff, torch.cumsum: _cumsum, torch.abs: _abs,
    torch.minimum: _EXTREMUM, torch.maximum: _EXTREMUM,
    torch.addmm: _addmm, torch.cat: _cat, torch.concat: _cat, torch.pow: _pow, operator.pow: _pow,
}
# call_method names (self is the first argument)
METHODS: dict[str, Callable] = {
    "add": _T_ARITH, "mul": _T_ARITH, "sub": _T_SUB, "div": _T_DIV, "neg": _neg,
    **{name: _T_COMPARE for name in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{name: _T_BITWISE for name in ("bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__")},
    **{name: _PLAIN for name in ("sigmoid", "tanh", "cos", "sin", "exp", "log", "sqrt", "rsqrt")}, "relu": _RELU_PLAIN,
    "clamp": _CLAMP, "clip": _CLAMP, "clamp_min": _CLAMP_MIN, "clamp_max": _CLAMP_MAX,
    "masked_fill": _masked_fill, "mean": _mean, "diff": _diff, "cumsum": _cumsum,
    "pow": _pow, "abs": _abs, "minimum": _EXTREMUM, "maximum": _EXTREMUM,
}


def _module_call(rule: Callable, *fields: str) -> Callable:
    """One of torch's activation modules as its functional form, with its configuration as keywords."""
    def call(module: nn.Module, state: dict, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        if kwargs or len(args) != 1:
            return None
        return rule(args, {f: getattr(module, f) for f in fields})
    return call


def _linear_module(module: nn.Module, state: dict, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    if kwargs or len(args) != 1 or state.get("bias") is None:
        return None
    return _linear((args[0], state["weight"], state["bias"]), {})


# call_module types (exact types: a subclass may change forward); `state` holds the module's meta tensors
MODULES: dict[type, Callable] = {
    nn.ReLU: _module_call(_RELU, "inplace"), nn.ReLU6: _module_call(_HARDTANH, "min_val", "max_val", "inplace"),
    nn.Hardtanh: _module_call(_HARDTANH, "min_val", "max_val", "inplace"), nn.SiLU: _module_call(_INPLACE, "inplace"),
    nn.GELU: _module_call(_GELU, "approximate"), nn.Sigmoid: _module_call(_PLAIN), nn.Tanh: _module_call(_PLAIN),
    nn.Hardswish: _module_call(_INPLACE, "inplace"), nn.Hardsigmoid: _module_call(_INPLACE, "inplace"),
    nn.Linear: _linear_module,
}


def rule_for(op: str, target: Any) -> Callable | None:
    """The table's rule for a call_function target or call_method name, or None."""
    table = METHODS if op == "call_method" else FUNCTIONS
    try:
        return table.get(target)
    except TypeError:  # an unhashable target is in no table
        return None
