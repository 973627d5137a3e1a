"""Files the fuzzing audit (tests/fileformat/fuzz_harness.py) found loading, then failing at their first
forward with an error other than FormatError. Each is the minimised form of what it found: load's dry run
now refuses it, naming the node. The common cause: torch's meta kernels compute shapes without the checks
the CPU kernels make (dtypes that must agree, a bias's size, a stride's length), and a module with no forward
raises NotImplementedError, which the dry run reads as a missing meta kernel rather than a refusal."""
import functools
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, FormatError, PreconditionError
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.fileformat.graphdata import conforms
from fxcompress.kernels.weight_only import WeightOnlyLinear
from fxcompress.passes import (ActivationConfig, InsertFakeQuant, InsertMasks, LowerToInteger, LowerToSparse,
                               LowerWeightOnly)
from fxcompress.quant.modules import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.zoo import ZOO

from .hostile import read_manifest, tensor_data, with_manifest


def _file(model, x):
    gm = torch.fx.symbolic_trace(model.eval())
    return to_bytes(gm, example_inputs=(x,))


@functools.cache
def _integer_file(backend, **options):
    """(file, input, output) of a small conv model lowered to integers (`backend` and LowerToInteger's options)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    passes = [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                              activations=ActivationConfig(bits=8, joins=True))]
    gm = fxcompress.compile(model, passes, example_inputs=(x,), calibration_data=[x])
    gm = fxcompress.compile(gm, [LowerToInteger(backend=backend, repeats=1, **options)], example_inputs=(x,),
                            calibration_data=[x])
    return to_bytes(gm, example_inputs=(x,)), x, gm(x)


def _with_inputs_dtype(data, dtype):
    manifest = read_manifest(data)
    manifest["inputs"][0]["dtype"] = dtype
    return with_manifest(data, manifest)


class FunctionalLinear(nn.Module):
    """The encoded lowering's form: the weight comes from a node, the product is F.linear."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(4, 2, 3, 3)), nn.Parameter(torch.randn(4))
        self.other = nn.Parameter(torch.randn(10, 5))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b) + self.other.sum()


@pytest.mark.parametrize("dtype", ["bool", "int8", "int64", "float16"])
@pytest.mark.parametrize("model, x, node", [
    (nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4), "graph node '_0' \\(call_module 0 \\(Linear\\)\\)"),
    (FunctionalLinear(), torch.randn(2, 4), "graph node 'linear' \\(call_function torch.nn.functional.linear\\)"),
    (nn.Sequential(nn.Conv2d(2, 4, 3, bias=False)), torch.randn(1, 2, 5, 5),
     "graph node '_0' \\(call_module 0 \\(Conv2d\\)\\)"),
])
def test_an_input_dtype_the_layer_cannot_multiply_is_refused(model, x, node, dtype):
    """Found as the recorded input's dtype changed: meta linear and conv (without a bias, which they compare) take
    a bool input and a float weight."""
    data = _with_inputs_dtype(_file(model, x), dtype)
    with pytest.raises(FormatError, match=f"manifest: {node}: fails on the recorded input shapes.*refuses these "
                                          "dtypes"):
        from_bytes(data)
    with pytest.raises((RuntimeError, NotImplementedError)):  # what the file's first forward did
        model(torch.zeros(x.shape, dtype=getattr(torch, dtype)))


def test_relu_of_a_bool_tensor_is_refused():
    """Found in weight-only and dynamic int8 models given a bool input: their layers pass it on, relu refuses it."""
    data = _with_inputs_dtype(_file(nn.Sequential(nn.ReLU()), torch.randn(2, 3)), "bool")
    with pytest.raises(FormatError, match="graph node '_0' .*ReLU.*Boolean inputs not supported for relu"):
        from_bytes(data)


def test_the_same_dtypes_still_load_and_run():
    """float16 throughout is a dtype the CPU kernels take: the probe refuses nothing that runs."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3)).half().eval()
    x = torch.randn(1, 2, 5, 5).half()
    torch.testing.assert_close(from_bytes(_file(model, x))(x), model(x))


def test_a_convolution_bias_of_another_size_is_refused():
    """Found as a get_attr of a bias retargeted to another parameter: meta conv2d does not look at the bias."""
    data = _file(FunctionalConv(), torch.randn(1, 2, 5, 5))
    manifest = read_manifest(data)
    next(n for n in manifest["graph"] if n["target"] == "b")["target"] = "other"
    with pytest.raises(FormatError, match="graph node 'conv2d' .*needs a bias of 4 elements, got \\[10, 5\\]"):
        from_bytes(with_manifest(data, manifest))


@pytest.mark.parametrize("field, value, match", [
    ("stride", [1, 1, 1, 1], "expected stride to be a single integer value or a list of 1 or 2 values"),
    ("padding", [1, 1, 1], "expected padding to be a single integer value or a list of 1 or 2 values"),
    ("padding", [-1, 0], "padding \\(-1, 0\\) is not supported \\(each entry must be at least 0\\)"),
    ("dilation", [-1, 1], "dilation \\(-1, 1\\) is not supported \\(each entry must be at least 1\\)"),
    ("dilation", [1, 0], "dilation \\(1, 0\\) is not supported"),
])
def test_a_convolution_configured_for_other_dimensions_or_negative_sizes_is_refused(field, value, match):
    """Found as a layer's stride list lengthened and a dilation made -1: meta conv2d ignores the extra entries and
    takes a negative dilation or padding, the CPU kernel refuses them."""
    data = _file(nn.Sequential(nn.Conv2d(2, 4, 3)), torch.randn(1, 2, 5, 5))
    manifest = read_manifest(data)
    next(m for m in manifest["modules"] if m["type"] == "Conv2d")["config"][field] = value
    with pytest.raises(FormatError, match=f"graph node '_0' .*{match}"):
        from_bytes(with_manifest(data, manifest))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Module()  # a container: the module table rebuilds it as a plain nn.Module
        self.inner.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.inner.fc(x)


def test_call_module_of_a_container_is_refused():
    """Found as a call_module target cut to its parent path, or a layer's module type changed to container."""
    data = _file(Block(), torch.randn(2, 4))
    manifest = read_manifest(data)
    next(n for n in manifest["graph"] if n["op"] == "call_module")["target"] = "inner"
    with pytest.raises(FormatError, match="graph node 'inner_fc': call_module target 'inner' is a container"):
        from_bytes(with_manifest(data, manifest))


def test_a_sparse_layer_given_inputs_of_another_dtype_is_refused():
    """Found as the recorded input of a sparse-lowered model made float64 or int8: the rule converted the input
    to the layer's dtype, which no kernel but scipy's does (ours raised PreconditionError, F.unfold
    NotImplementedError)."""
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.9)], example_inputs=(x,))
    gm = fxcompress.compile(gm, [LowerToSparse(min_sparsity=0.0, kernels=("torch_csr",), repeats=1)],
                            example_inputs=(x,))
    data = to_bytes(gm, example_inputs=(x,))
    for dtype in ("float64", "int8"):
        with pytest.raises(FormatError, match="\\(SparseLayer\\)\\): fails .*reads torch.float32 inputs, got torch"):
            from_bytes(_with_inputs_dtype(data, dtype))
    torch.testing.assert_close(from_bytes(data)(x), gm(x))


def test_a_native_layer_stride_for_other_dimensions_is_refused():
    """Found as a native conv's stride lengthened to four entries: oneDNN refused it at the first call."""
    data, _, _ = _integer_file("native")
    manifest = read_manifest(data)
    layer = next(m for m in manifest["modules"] if m["type"].endswith(".NativeLayer"))
    layer["config"]["stride"] = [1, 1, 1, 1]
    with pytest.raises(FormatError, match="\\(NativeLayer\\)\\): fails .*expected stride to be .* a list of 2 values"):
        from_bytes(with_manifest(data, manifest))


def test_a_constant_of_the_wrong_type_for_a_torch_module_forward_is_refused():
    """Found as MultiheadAttention's need_weights=False made []: the meta run (its slow path) only asks whether it
    is true; on the CPU, eval and no_grad take the fast path, whose C++ op takes a bool only (a TypeError)."""
    make_model, make_input = ZOO["transformer"]
    x = make_input()
    data = _file(make_model(), x)
    manifest = read_manifest(data)
    node = next(n for n in manifest["graph"] if ["need_weights", False] in n["kwargs"].get("d", []))
    node["kwargs"]["d"] = [[k, [] if k == "need_weights" else v] for k, v in node["kwargs"]["d"]]
    with pytest.raises(FormatError, match=f"graph node '{node['name']}': argument 'need_weights' of "
                                          "MultiheadAttention is \\[\\], not a bool"):
        from_bytes(with_manifest(data, manifest))


@pytest.mark.parametrize("activation", [nn.GELU(), nn.SiLU(), nn.Hardswish()])
def test_an_activation_of_an_integer_tensor_is_refused(activation):
    """Found as a relu after an integer layer's int32 output retargeted to gelu: meta gelu takes an int tensor."""
    data = _with_inputs_dtype(_file(nn.Sequential(activation), torch.randn(2, 3)), "int32")
    with pytest.raises(FormatError, match=f"graph node '_0' .*{type(activation).__name__}.*refuses these dtypes"):
        from_bytes(data)


def test_an_integer_layer_padding_for_other_dimensions_is_refused():
    """Found as a reference integer conv's padding made a list of 24 zeros: its forward runs on meta tensors,
    whose conv2d ignores the extra entries."""
    data, _, _ = _integer_file("reference")
    manifest = read_manifest(data)
    layer = next(m for m in manifest["modules"] if m["type"].endswith(".IntegerLayer"))
    layer["config"]["padding"] = [0] * 24
    with pytest.raises(FormatError, match="\\(IntegerLayer\\)\\): fails .*expected padding to be a single integer "
                                          "value or a list of 1 or 2 values"):
        from_bytes(with_manifest(data, manifest))


@functools.cache
def _fake_quant_file():
    """(file, input) of a small model with linear weight grids, a k-means codebook and an observed activation grid."""
    torch.manual_seed(0)
    x = torch.randn(2, 6)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    gm = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, activations=ActivationConfig(bits=8))],
                            example_inputs=(x,), calibration_data=[x])
    gm.add_submodule("kmeans", KMeansWeight.fit(torch.randn(3, 4), 3))  # a module the file rebuilds, unused
    data = to_bytes(gm, example_inputs=(x,))
    torch.testing.assert_close(from_bytes(data)(x), gm(x))  # the grid made at load is the one forward makes
    return data, x


@pytest.mark.parametrize("kind", ["ActivationQuant", "GridWeight", "KMeansWeight"])
@pytest.mark.parametrize("bits", [-8, 0, 17, 10 ** 6, True, 4.0])
def test_a_grid_of_impossible_bits_is_refused_when_its_module_is_built(kind, bits):
    """Found as an observed ActivationQuant's bits made -8: its constructor kept them, its forward's grid failed
    (ValueError: negative shift count). The constructors of the three fake-quant modules check bits (1..16, as
    InsertFakeQuant takes them), so the file is refused naming the module before anything runs."""
    data, _ = _fake_quant_file()
    manifest = read_manifest(data)
    entry = next(m for m in manifest["modules"] if m["type"].endswith(f".{kind}"))
    entry["config"]["bits"] = bits
    with pytest.raises(FormatError, match=f"module '{entry['path']}': {kind}\\(.*\\) cannot be built \\((ConfigError: "
                                          f"{kind}.bits must be|.*config 'bits')|module '{entry['path']}': config 'bits' "
                                          f"is .*, not a int"):
        from_bytes(with_manifest(data, manifest))


@pytest.mark.parametrize("make", [
    lambda bits: ActivationQuant(bits), lambda bits: GridWeight(bits), lambda bits: GridWeight(bits, "fixed_point"),
    lambda bits: KMeansWeight([2, 3], bits, 4),
])
def test_the_fake_quant_constructors_check_bits(make):
    for bits in (1, 8, 16):
        assert make(bits).bits == bits
    for bits in (0, -8, 17, True, 2.5, "8", None):
        with pytest.raises(ConfigError, match=r"(ActivationQuant|GridWeight|KMeansWeight)\.bits must be"):
            make(bits)


def test_a_symmetric_grid_needs_two_bits_from_its_constructor():
    """A symmetric linear grid of 1 bit has no room for -s, 0 and +s (linear_grid refused it at the first call)."""
    for make in (lambda: ActivationQuant(1, symmetric=True), lambda: GridWeight(1, symmetric=True)):
        with pytest.raises(ConfigError, match=r"\.bits must be in \[2, 16\], got 1"):
            make()
    assert GridWeight(1, "fixed_point", symmetric=True).bits == 1  # symmetry is a linear grid's option only


@functools.cache
def _int8pack_file():
    """(file, input, output) of a layer lowered to symmetric 8-bit weight-only codes and set to the int8pack kernel."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, per_channel=True, symmetric=True)],
                            example_inputs=(x,))
    gm = fxcompress.compile(fq, [LowerWeightOnly(repeats=1)], example_inputs=(x,))
    (layer,) = [m for m in gm.modules() if isinstance(m, WeightOnlyLinear)]
    assert not layer.refusals(["int8pack"])
    layer.kernel, layer._run = "int8pack", None
    return to_bytes(gm, example_inputs=(x,)), x, gm(x)


def _with_tensor(data, suffix, change):
    """`data` with the tensor whose name ends with `suffix` replaced by `change(tensor)` (same dtype and size),
    its checksum recomputed."""
    manifest, segment = read_manifest(data), bytearray(tensor_data(data))
    entry = next(t for t in manifest["tensors"] if t["name"].endswith(suffix))
    start, length = entry["offset"], entry["length"]
    old = torch.frombuffer(bytes(segment[start:start + length]), dtype=getattr(torch, entry["dtype"]))
    segment[start:start + length] = change(old.clone()).numpy().tobytes()
    entry["crc32"] = zlib.crc32(bytes(segment[start:start + length]))
    return with_manifest(data, manifest, bytes(segment))


def test_int8pack_codes_that_leave_int8_are_refused_at_load():
    """Found as an int8pack layer's zero-points set to 0: every check of shapes and dtypes passed, the file loaded,
    and the first forward raised PreconditionError (codes minus zero-point do not fit int8). The kernel is the
    file's choice, and whether it can run is in the file's tensors: load refuses it naming the layer."""
    data, x, expected = _int8pack_file()
    loaded = from_bytes(data)
    assert loaded.get_submodule("0.weight_only").kernel == "int8pack"
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    for tampered in (_with_tensor(data, ".zero", lambda z: z.zero_()),  # u - 0 reaches 254
                     _with_tensor(data, ".codes", lambda u: u.fill_(255))):  # 255 - 127 = 128
        with pytest.raises(FormatError, match="WeightOnlyLinear 0.weight_only: kernel 'int8pack' cannot run these "
                                              "tensors: codes minus zero-point do not fit int8"):
            from_bytes(tampered)
    manifest = read_manifest(data)  # the codes of another kernel still load (whose refusals are the machine's)
    next(m for m in manifest["modules"] if m["type"].endswith(".WeightOnlyLinear"))["config"]["kernel"] = "float"
    lenient = from_bytes(_with_tensor(with_manifest(data, manifest), ".zero", lambda z: z.zero_()))
    assert lenient(x).shape == expected.shape


def test_int8pack_of_grouped_codes_is_refused_at_load():
    """The other int8pack refusal is the file's too: groups of input channels (one scale per output channel only)."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    fq = fxcompress.compile(nn.Sequential(nn.Linear(64, 32)).eval(),
                            [InsertFakeQuant(method="linear", bits=8, group_size=32, symmetric=True)], example_inputs=(x,))
    gm = fxcompress.compile(fq, [LowerWeightOnly(repeats=1, kernels=("c_gemv",))], example_inputs=(x,))
    layer = gm.get_submodule("0.weight_only")
    layer.kernel, layer.kernel_choice, layer._run = "int8pack", None, None  # set by hand: no measurement
    with pytest.raises(PreconditionError, match="kernel 'int8pack' cannot run here"):
        gm(x)  # what a loaded file did at its first forward
    with pytest.raises(FormatError, match="WeightOnlyLinear 0.weight_only: kernel 'int8pack' cannot run these tensors: "
                                          "one scale per output channel only"):
        from_bytes(to_bytes(gm))


def test_a_native_float_kernel_given_inputs_of_another_float_dtype_is_refused():
    """Found as a native model's recorded input made float16 / float64 / bfloat16: the codes made of it keep its
    dtype, and the first layer, on the float kernel, reads float32 values (and uint8 codes) only; the rule let
    any dtype through, F.conv2d refused it at the first call."""
    data, x, expected = _integer_file("native", kernels=("float",))
    layers = [m["config"] for m in read_manifest(data)["modules"] if m["type"].endswith(".NativeLayer")]
    assert layers and all(c["kernel"] == "float" for c in layers)
    torch.testing.assert_close(from_bytes(data)(x), expected, rtol=0, atol=0)
    for dtype in ("float16", "float64", "bfloat16"):
        with pytest.raises(FormatError, match="\\(NativeLayer\\)\\): fails .*reads uint8 codes or float32 values"):
            from_bytes(_with_inputs_dtype(data, dtype))


@pytest.mark.parametrize("value, annotation, fits", [
    (2 ** 63 - 1, int, True), (2 ** 63, int, False), (-2 ** 63, int, True), (2 ** 100, float, False),
    (1e30, float, True), (7, float, True),
])
def test_conforms_takes_integers_torch_can_hold(value, annotation, fits):
    assert conforms(value, annotation) is fits


def test_a_native_scale_too_large_for_torch_is_refused():
    """Found as a native layer's input_scale made the JSON integer 2 ** 100: an int, finite, so it conformed to
    `float`; at the first call it met a tensor (OverflowError: int too big to convert)."""
    data, _, _ = _integer_file("native", kernels=("float",))
    manifest = read_manifest(data)
    layer = next(m for m in manifest["modules"] if m["type"].endswith(".NativeLayer"))
    layer["config"]["input_scale"] = 2 ** 100
    with pytest.raises(FormatError, match=f"module '{layer['path']}': config 'input_scale' is 1267650600228229401496"):
        from_bytes(with_manifest(data, manifest))
