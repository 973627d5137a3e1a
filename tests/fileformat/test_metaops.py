"""The dry run's op tables (fileformat/metaops.py) against torch itself: for every entry, on small real CPU
tensors of every dtype a file may record (bool, integers, float16, bfloat16, float32, float64), scalars,
broadcasting and non-contiguous operands, the table's output has the shape, dtype and strides torch's own
result has, in-place spellings give back their input, and every call torch refuses is left to torch (the
rule declines it, so load refuses it with the FormatError and message it always gave)."""
import copy
import itertools
import json
import operator
import struct
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import FormatError
from fxcompress.fileformat import metaops
from fxcompress.fileformat.container import HEADER_BYTES, from_bytes, to_bytes

DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
          torch.float64)


def _tensors(dtypes=DTYPES, shapes=((), (3,), (2, 1), (2, 3), (4,))):
    """Small CPU tensors: every dtype at two shapes, float32 and int64 at every shape, and a transposed and a
    channels-last operand of each of those two."""
    def made(dtype, shape):
        return (torch.arange(1, 1 + torch.Size(shape).numel()).reshape(shape) % 3).to(dtype)
    every = [made(d, s) for d in dtypes for s in shapes[-2:]]
    every += [made(d, s) for d in (torch.float32, torch.int64) for s in shapes[:-2]]
    every += [made(d, (3, 2)).t() for d in (torch.float32, torch.int64)]
    return every + [made(d, (2, 3, 2, 2)).to(memory_format=torch.channels_last) for d in (torch.float32, torch.int64)]


def _meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if type(value) in (list, tuple):  # cat's tensors
        return type(value)(_meta(v) for v in value)
    return value


def _agrees(call, rule, args, kwargs=None):
    """(torch accepts the call, the rule covers it). The rule may decline a call torch accepts, never cover
    one torch refuses; when it covers one, its result agrees with torch's in shape, dtype and strides, and
    in identity for in-place calls."""
    kwargs = kwargs or {}
    try:
        expected = call(*args, **kwargs)
    except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError, OverflowError):
        # torch 2.14 refuses `-` with a bool operand by NotImplementedError; its argument parser refuses an int
        # bound beyond int64 by OverflowError
        expected = None
    meta_args = tuple(_meta(a) for a in args)
    with torch.device("meta"):
        try:
            got = rule(meta_args, {k: _meta(v) for k, v in kwargs.items()})
        except metaops.Refused:  # the rule refuses a call with torch's message: torch must refuse it too
            assert expected is None, f"the table refuses a call torch accepts: {args}, {kwargs}"
            return False, False
    if expected is None or got is None:
        assert got is None, f"the table accepts a call torch refuses: {args}, {kwargs}"
        return expected is not None, False
    assert (got.shape, got.dtype, got.stride()) == (expected.shape, expected.dtype, expected.stride()), (args, kwargs)
    assert (got is meta_args[0]) == (expected is args[0]), "in place: the output is the input"
    return True, True


def _count(cases):
    """(calls torch accepts, calls the rule covers) over (call, rule, args, kwargs) cases."""
    results = [_agrees(*case) for case in cases]
    return sum(a for a, _ in results), sum(c for _, c in results)


def _method(name):
    return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)


BINARY = [operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub, torch.div,
          operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
          torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
          operator.and_, operator.or_, operator.xor, torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor,
          torch.minimum, torch.maximum]
BINARY_METHODS = ["add", "mul", "sub", "div", "eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or",
                  "bitwise_xor", "__and__", "__or__", "__xor__", "minimum", "maximum"]
# activation -> keyword settings tried (torch refuses some: an unknown approximation, min above max)
UNARY = {operator.neg: [{}], torch.neg: [{}], torch.abs: [{}], torch.relu: [{}], torch.sigmoid: [{}], F.sigmoid: [{}],
         torch.tanh: [{}], F.tanh: [{}], torch.cos: [{}], torch.sin: [{}], torch.exp: [{}], torch.sqrt: [{}],
         torch.rsqrt: [{}], torch.log: [{}], F.relu: [{}, {"inplace": True}], F.relu6: [{}, {"inplace": True}],
         F.silu: [{}, {"inplace": True}], F.hardswish: [{}, {"inplace": True}], F.hardsigmoid: [{}, {"inplace": True}],
         F.gelu: [{}, {"approximate": "tanh"}, {"approximate": "exact"}],
         F.hardtanh: [{}, {"min_val": -2, "max_val": 0.5}, {"min_val": 1.0, "max_val": 0.0}, {"inplace": True}],
         torch.clamp: [{"min": 0}, {"max": 0.5}, {"min": -1.0, "max": 1}, {}],
         torch.clip: [{"min": 0}, {"min": 2, "max": 1}], torch.clamp_min: [{"min": 0}], torch.clamp_max: [{"max": 0.5}]}
UNARY_METHODS = {"neg": [{}], "abs": [{}], "relu": [{}], "sigmoid": [{}], "tanh": [{}], "cos": [{}], "sin": [{}], "exp": [{}],
                 "sqrt": [{}], "rsqrt": [{}], "log": [{}], "clamp": [{"min": 0.0}, {}],
                 "clip": [{"max": 1}], "clamp_min": [{"min": -1}], "clamp_max": [{"max": 2.0}]}
OTHERS = [torch.where, torch.masked_fill, F.linear, F.layer_norm, torch.mean, F.scaled_dot_product_attention, torch.diff,
          torch.cumsum, torch.addmm, torch.cat, torch.concat, torch.pow, operator.pow]


def test_every_table_entry_is_checked_here():
    assert set(metaops.FUNCTIONS) == set(BINARY) | set(UNARY) | set(OTHERS)
    assert set(metaops.METHODS) == set(BINARY_METHODS) | set(UNARY_METHODS) | {"masked_fill", "mean", "diff", "cumsum", "pow"}


def test_binary_ops_promote_and_broadcast_as_torch_does():
    """Every call torch accepts is covered: tensors of every dtype, scalars, broadcasting, odd layouts (torch's
    other spellings share those rules and are tried on fewer operands, a tensor first)."""
    operands = _tensors() + [True, 2, -1.5]  # 31 operands: every dtype, scalars, broadcasting, layouts
    pairs = [p for p in itertools.product(operands, repeat=2) if any(isinstance(v, torch.Tensor) for v in p)]
    tensor_first = list(itertools.product(_tensors()[::3], _tensors()[1::3] + [True, 2, -1.5]))
    full = {operator.add, operator.sub, operator.truediv, operator.lt, operator.and_}  # one spelling of each rule: every pair
    cases = [(target, metaops.FUNCTIONS[target], pairs if target in full else tensor_first) for target in BINARY]
    cases += [(_method(name), metaops.METHODS[name], tensor_first) for name in BINARY_METHODS]
    bitwise = {operator.and_, operator.or_, operator.xor, torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor,
               *(metaops.METHODS[name] for name in BINARY_METHODS if "and" in name or "or" in name)}
    for call, rule, tried in cases:
        accepted, covered = _count((call, rule, pair) for pair in tried)
        share = 8 if rule in bitwise or call in bitwise else 3  # bitwise ops: integer and bool operands only
        assert covered == accepted > len(tried) / share, (call, covered, accepted)
    assert metaops.FUNCTIONS[operator.mul]((3, 4), {}) is None  # sizes multiplied: plain Python runs it
    assert metaops.FUNCTIONS[torch.add]((2, torch.empty(3, device="meta")), {}) is None  # left to torch


def test_activations_cover_float_tensors_and_leave_the_rest_to_torch():
    operands = _tensors()
    floats = [t for t in operands if t.dtype.is_floating_point]
    for targets, rules, call in ((UNARY, metaops.FUNCTIONS, lambda t: t), (UNARY_METHODS, metaops.METHODS, _method)):
        for target, settings in targets.items():
            for kwargs in settings:
                accepted, covered = _count((call(target), rules[target], (t.clone(),), kwargs) for t in floats)
                assert covered == accepted, (target, kwargs)
                _count((call(target), rules[target], (t.clone(),), kwargs) for t in operands
                       if not t.dtype.is_floating_point)  # declined or refused, never wrong
    refused = [(F.gelu, {"approximate": "exact"}), (F.hardtanh, {"min_val": 1.0, "max_val": 0.0}), (torch.clamp, {})]
    for target, kwargs in refused:  # torch refuses these: the rule declines them
        assert _agrees(target, metaops.FUNCTIONS[target], (floats[0],), kwargs) == (False, False)
    assert _count((F.relu, metaops.FUNCTIONS[F.relu], (t.clone(),), {}) for t in floats) == (len(floats),) * 2


def test_where_masked_fill_and_a_biased_linear_agree_with_torch():
    operands = _tensors(shapes=((), (3,), (2, 1), (4,)))
    conditions = [t for t in operands if t.dtype == torch.bool] + [operands[-1]]
    cases = [(torch.where, metaops.FUNCTIONS[torch.where], abc)
             for abc in itertools.product(conditions, operands[::3] + [0.5, 2], operands[1::3] + [True])
             if any(isinstance(v, torch.Tensor) for v in abc[1:])]
    accepted, covered = _count(cases)
    assert covered == accepted > len(cases) / 3, (covered, accepted, len(cases))
    for x, mask, value in itertools.product(operands, conditions, (0.0, -1, float("-inf"))):
        _agrees(torch.masked_fill, metaops.FUNCTIONS[torch.masked_fill], (x, mask, value))
        _agrees(_method("masked_fill"), metaops.METHODS["masked_fill"], (x, mask, value))
    floats = [t for t in operands if t.dtype.is_floating_point]
    masks = [(torch.masked_fill, metaops.FUNCTIONS[torch.masked_fill], (x, m, -1)) for x in floats for m in conditions]
    accepted, covered = _count(masks)
    assert covered == accepted > len(masks) / 3
    for dtype, x_shape, w_shape, b_shape in itertools.product(
            (torch.float32, torch.float64, torch.bfloat16, torch.int64), ((5,), (2, 5), (3, 2, 5), (2, 4)),
            ((3, 5), (3, 4)), ((3,), (1,), (2,), ())):
        x, w, b = torch.rand(x_shape).to(dtype), torch.rand(w_shape).to(dtype), torch.rand(b_shape).to(dtype)
        covered = _agrees(F.linear, metaops.FUNCTIONS[F.linear], (x, w, b))[1]
        assert covered == (dtype.is_floating_point and x_shape[-1] == w_shape[1] and b_shape == (3,))
    x, w = torch.rand(2, 5), torch.rand(3, 5)
    assert _agrees(F.linear, metaops.FUNCTIONS[F.linear], (x, w, torch.rand(3, dtype=torch.float64))) == (False, False)


# bounds at and just past each integer dtype's limits (uint8 takes -255..255: torch lets negative values wrap),
# a bool, floats that promote an integer tensor or overflow float16 / float32, infinities, NaN, ints beyond int64
_BOUNDS = [0, -1, True, 127, 128, -128, -129, 255, 256, -255, -256, 32767, 32768, -32769, 2 ** 31 - 1, 2 ** 31,
           -2 ** 31 - 1, 2 ** 63 - 1, -2 ** 63, 2 ** 63, -2 ** 63 - 1, 0.5, -2.5, 65504.0, 65505.0, 70000, 1e10,
           1e300, float("inf"), float("-inf"), float("nan")]


def _beyond_int64(bounds):
    """An int bound torch's argument parser converts or refuses before any kernel: the table leaves it to torch."""
    return any(type(b) is int and not -2 ** 63 <= b < 2 ** 63 for b in bounds)


def test_relu_and_number_clamps_cover_integer_and_bool_tensors_as_torch_does():
    """relu keeps an integer tensor's dtype and refuses a bool one (left to torch); clamp, clip, clamp_min and
    clamp_max between numbers promote as torch's CPU kernels do (a bool tensor with an int bound: int64), and
    every call those kernels refuse (a bound that does not convert to the result dtype, a bool result) is
    declined: on every dtype, the table covers exactly the calls torch accepts."""
    operands = _tensors(dtypes=DTYPES + (torch.int8, torch.int16))
    relus = [(F.relu, metaops.FUNCTIONS[F.relu], {}), (F.relu, metaops.FUNCTIONS[F.relu], {"inplace": True}),
             (torch.relu, metaops.FUNCTIONS[torch.relu], {}), (_method("relu"), metaops.METHODS["relu"], {})]
    for call, rule, kwargs in relus:
        accepted, covered = _count((call, rule, (t.clone(),), kwargs) for t in operands)
        assert covered == accepted == sum(t.dtype != torch.bool for t in operands), (call, kwargs)
    one_bound = [(torch.clamp, metaops.FUNCTIONS[torch.clamp], "min"),
                 (torch.clamp, metaops.FUNCTIONS[torch.clamp], "max"), (torch.clip, metaops.FUNCTIONS[torch.clip], "max"),
                 (_method("clamp"), metaops.METHODS["clamp"], "min"),
                 (torch.clamp_min, metaops.FUNCTIONS[torch.clamp_min], "min"),
                 (torch.clamp_max, metaops.FUNCTIONS[torch.clamp_max], "max"),
                 (_method("clamp_min"), metaops.METHODS["clamp_min"], "min"),
                 (_method("clamp_max"), metaops.METHODS["clamp_max"], "max")]
    cases = [(call, rule, (t,), {name: b}) for call, rule, name in one_bound for t in operands for b in _BOUNDS]
    cases += [(call, rule, (t, b)) for call, rule, _ in one_bound[4:] for t in operands for b in _BOUNDS[::4]]
    cases += [(call, rule, (t, low, high)) for call, rule in ((torch.clamp, metaops.FUNCTIONS[torch.clamp]),
                                                              (_method("clamp"), metaops.METHODS["clamp"]))
              for t in operands[::2] for low in _BOUNDS[::3] for high in _BOUNDS[1::3]]
    def bounds(case):
        return [*case[2][1:], *(case[3].values() if len(case) > 3 else ())]
    accepted, covered = _count([c for c in cases if not _beyond_int64(bounds(c))])
    assert covered == accepted > len(cases) / 2, (accepted, covered, len(cases))
    _count([c for c in cases if _beyond_int64(bounds(c))])  # declined or refused, never wrong
    meta = torch.empty(2, 3, dtype=torch.uint8, device="meta")
    assert metaops.FUNCTIONS[torch.clamp]((meta, -255, 255), {}).dtype == torch.uint8  # torch's wrap: accepted
    for refused in ((meta, -256), (meta, 0, 256), (meta.bool(), True)):  # out of range, a bool clamp: torch's
        assert metaops.FUNCTIONS[torch.clamp](refused, {}) is None
    assert metaops.FUNCTIONS[torch.clamp]((meta.bool(), 0, 1), {}).dtype == torch.int64
    assert metaops.FUNCTIONS[torch.clamp]((meta, torch.zeros((), dtype=torch.uint8, device="meta")), {}) is None


@pytest.mark.parametrize("module", [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.Hardtanh(-2.0, 3.0), nn.SiLU(),
                                    nn.Hardswish(), nn.Hardsigmoid(inplace=True),
                                    nn.GELU("tanh"), nn.Sigmoid(), nn.Tanh(), nn.Linear(3, 4)])
def test_each_torch_module_in_the_table_agrees_with_its_forward(module):
    for x in _tensors(shapes=((3,), (2, 3))):
        own = copy.deepcopy(module).to(x.dtype) if x.dtype.is_floating_point else module
        state = {k: _meta(v) for k, v in own.state_dict().items()}
        rule = metaops.MODULES[type(module)]
        result = _agrees(own, lambda args, kwargs: rule(own, state, *args, **kwargs), (x.clone(),))
        if x.dtype.is_floating_point and (x.shape[-1] == 3 or not isinstance(module, nn.Linear)):
            assert result == (True, True), (module, x.dtype, x.shape)
        elif isinstance(module, nn.ReLU):  # integer tensors too (the reference backend's codes); bool: torch refuses
            assert result == ((True, True) if x.dtype != torch.bool else (False, False)), (module, x.dtype)


def test_layer_norm_mean_and_attention_agree_with_torch():
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    norms = [(F.layer_norm, metaops.FUNCTIONS[F.layer_norm], (torch.rand(x).to(d), n, *affine))
             for d, x, n in itertools.product(floats + (torch.int64,), ((2, 3), (4, 2, 3), (3,)), ([3], (2, 3), [2]))
             for affine in ((), (torch.rand(n).to(d), torch.rand(n).to(d)), (torch.rand(3).to(torch.float64), None))]
    accepted, covered = _count(norms)
    assert covered >= 20 and accepted - covered <= 8, (accepted, covered)  # mixed-dtype affine calls left to torch
    means = [(call, rule, (x.to(d), *dims))
             for call, rule in ((torch.mean, metaops.FUNCTIONS[torch.mean]), (_method("mean"), metaops.METHODS["mean"]))
             for d, x in itertools.product(floats + (torch.int64,), (torch.rand(2, 3, 4), torch.rand(3, 2).t()))
             for dims in ((), (1,), (-1, True), ([0, 2],), ((0, -3),), (5,), ([],))]
    accepted, covered = _count(means)
    assert covered == accepted > 40, (accepted, covered)
    q, k, v = torch.rand(2, 4, 5, 8), torch.rand(2, 4, 6, 8), torch.rand(2, 4, 6, 3)
    masks = (None, torch.rand(5, 6) > 0.5, torch.rand(2, 1, 5, 6), torch.rand(5, 7) > 0.5, torch.rand(6, 5) > 0.5)
    cases = [(F.scaled_dot_product_attention, metaops.FUNCTIONS[F.scaled_dot_product_attention],
              tuple(t.to(d) for t in (q, k, value)), {"attn_mask": m if m is None or m.dtype == torch.bool else m.to(d),
                                                     "is_causal": causal})
             for d in floats for value in (v, k, q) for m in masks for causal in (False, True)]
    # torch's CPU kernels also take a mask together with is_causal, and values of another length than the
    # keys: the table leaves those to torch (checked, not required)
    def regular(case):
        return case[2][2].shape[2] == 6 and not (case[3]["is_causal"] and case[3]["attn_mask"] is not None)
    _count([c for c in cases if not regular(c)])
    accepted, covered = _count([c for c in cases if regular(c)])
    assert covered == accepted > 30, (accepted, covered)


def test_diff_agrees_with_torch():
    """diff as transformers' masks use it (position ids along the sequence): every dtype and layout, n and dim;
    prepend / append and n beyond the size are left to torch."""
    cases = [(call, rule, (x,), options)
             for call, rule in ((torch.diff, metaops.FUNCTIONS[torch.diff]), (_method("diff"), metaops.METHODS["diff"]))
             for x in _tensors() if x.dim()
             for options in ({}, {"dim": 0}, {"n": 2, "dim": -1}, {"n": 1, "dim": 1}, {"dim": 2})]
    def beyond(case):  # n above the size: torch returns an empty difference, the table leaves it to torch
        x, options = case[2][0], case[3]
        return -x.dim() <= options.get("dim", -1) < x.dim() and options.get("n", 1) > x.shape[options.get("dim", -1)]
    assert _count([c for c in cases if beyond(c)])[1] == 0
    accepted, covered = _count([c for c in cases if not beyond(c)])
    assert covered == accepted > 60, (accepted, covered)
    x = torch.arange(6.0).reshape(2, 3)
    joined = [(torch.diff, metaops.FUNCTIONS[torch.diff], (x.to(d),), {"dim": dim, end: e.to(d), "n": n})
              for d in (torch.int64, torch.float32, torch.bool) for dim, e in ((-1, x[:, :1].contiguous()), (0, x), (1, x[:, :2] * 2))
              for end in ("prepend", "append") for n in (1, 2)]
    accepted, covered = _count(joined)
    assert covered == accepted == 36, (accepted, covered)
    channels_last = torch.rand(1, 3, 2, 2).to(memory_format=torch.channels_last)
    views = [(torch.diff, metaops.FUNCTIONS[torch.diff], (v,), {"prepend": e}) for v, e in
             ((x.t(), x.t()[:, :1]), (x[:, :1].expand(2, 5), x[:, :2].t().contiguous().t()),
              (channels_last, channels_last))]
    accepted, covered = _count(views)  # ends and inputs of other layouts: cat's output is contiguous below 4-d
    assert covered == 2 and accepted == 3, (accepted, covered)
    for options in ({"append": x[:1, :2]}, {"prepend": x.double()}, {"n": 4}, {"n": 0}):
        # an end of other sizes or another dtype, n = 0 or beyond the size: left to torch
        assert _agrees(torch.diff, metaops.FUNCTIONS[torch.diff], (x,), options)[1] is False


def test_cumsum_agrees_with_torch():
    cases = [(call, rule, (x, dim), options)
             for call, rule in ((torch.cumsum, metaops.FUNCTIONS[torch.cumsum]), (_method("cumsum"), metaops.METHODS["cumsum"]))
             for x in _tensors() for dim in (0, -1, 1, 2)
             for options in ({}, {"dtype": torch.float64}, {"dtype": torch.int32})]
    accepted, covered = _count(cases)
    assert covered == accepted > 150, (accepted, covered)
    assert metaops.FUNCTIONS[torch.cumsum]((torch.empty(3, device="meta"), 0), {"dtype": "float"}) is None


def test_addmm_and_cat_agree_with_torch():
    floats = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    mats = [(torch.rand(3, 5), torch.rand(5, 4)), (torch.rand(5, 3).t(), torch.rand(4, 5).t()), (torch.rand(3, 5), torch.rand(6, 4))]
    biases = (torch.rand(4), torch.rand(1, 4), torch.rand(3, 4).t().contiguous().t(), torch.rand(3), torch.rand(2, 3, 4))
    cases = [(torch.addmm, metaops.FUNCTIONS[torch.addmm], (b.to(d), m1.to(d), m2.to(e)), options)
             for d, e in ((d, d) for d in floats) for (m1, m2) in mats for b in biases
             for options in ({}, {"beta": 0.5, "alpha": 2})]
    cases += [(torch.addmm, metaops.FUNCTIONS[torch.addmm], (torch.rand(4).double(), *mats[0]), {})]
    accepted, covered = _count(cases)
    assert covered == accepted > 40, (accepted, covered)
    x, y = torch.rand(2, 3), torch.rand(3, 2).t()
    joins = [(call, metaops.FUNCTIONS[call], (tensors,), options) for call in (torch.cat, torch.concat)
             for tensors in ([x, y], (x, y.double()), [x, x.int(), x.bool()], [x], [x, torch.rand(2, 4)], [x, torch.rand(3)],
                             [torch.rand(1, 3, 2, 2).to(memory_format=torch.channels_last)] * 2, [torch.rand(2, 3, 2, 2)] * 2)
             for options in ({}, {"dim": -1}, {"dim": 1}, {"dim": 2})]
    accepted, covered = _count(joins)
    assert covered == accepted - 8 > 30, (accepted, covered)  # the 8 channels-last joins are left to torch
    floats = [t for t in _tensors() if t.dtype.is_floating_point]
    spellings = ((torch.pow, metaops.FUNCTIONS[torch.pow]), (operator.pow, metaops.FUNCTIONS[operator.pow]),
                 (_method("pow"), metaops.METHODS["pow"]))
    accepted, covered = _count((call, rule, (x, e)) for call, rule in spellings for x in floats for e in (3.0, 2, -0.5, x))
    assert covered == accepted > 40, (accepted, covered)
    _count((call, rule, (x, torch.rand(3))) for call, rule in spellings for x in floats)  # another dtype: torch's


class _Binary(nn.Module):
    def forward(self, x, y):
        return F.relu(x - y) * 2


def _with_inputs(data, inputs):
    """The file with other recorded inputs (manifest checksum and header made consistent again)."""
    length = struct.unpack_from("<I", data, 10)[0]
    manifest = json.loads(zlib.decompress(data[HEADER_BYTES:HEADER_BYTES + length]))
    manifest["inputs"] = inputs
    packed = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    header = bytearray(data[:HEADER_BYTES])
    struct.pack_into("<II", header, 10, len(packed), zlib.crc32(packed))
    struct.pack_into("<I", header, 18, zlib.crc32(bytes(header[:18])))
    return bytes(header) + packed + data[HEADER_BYTES + length:]


@pytest.mark.parametrize("x, y, message", [
    ([2, 3], [4], "Attempting to broadcast a dimension of length 4 at -1! Mismatching argument at index 1 had "
                  "torch.Size([4]); but expected shape should be broadcastable to [2, 3]"),
    ([2, 3], [5, 3], "Attempting to broadcast a dimension of length 5 at -2!")])
def test_shapes_that_do_not_broadcast_are_refused_at_load_with_torchs_message(x, y, message):
    data = to_bytes(fxcompress.compile(_Binary(), [], example_inputs=(torch.rand(2, 3), torch.rand(3))))
    assert torch.equal(from_bytes(data)(torch.ones(2, 3), torch.ones(3)), torch.zeros(2, 3))
    bad = _with_inputs(data, [{"shape": x, "dtype": "float32"}, {"shape": y, "dtype": "float32"}])
    with pytest.raises(FormatError, match="graph node 'sub' .*fails on the recorded input shapes") as info:
        from_bytes(bad)
    assert "RuntimeError: " + message in str(info.value)  # torch's own meta message, as before the table
    bools = _with_inputs(data, [{"shape": [2, 3], "dtype": "bool"}, {"shape": [3], "dtype": "bool"}])
    with pytest.raises(FormatError, match="graph node 'sub' .*Subtraction, the `-` operator, with two bool"):
        from_bytes(bools)
