"""load runs the rebuilt graph once on meta tensors of the inputs the file records, so a graph whose ops
cannot take their arguments is a FormatError naming the node at load, not a PyTorch error at the first
forward: a Linear whose in_features changed together with its weight, a view with a wrong size constant,
a swapped argument. Every lowered module kind runs on meta tensors with the shapes of its real forward."""
import functools
import operator
import struct
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.analyses.shapes import propagate_shapes
from fxcompress.errors import FormatError
from fxcompress.execution import locate_failure
from fxcompress.fileformat import register_function
from fxcompress.fileformat.container import HEADER_BYTES, from_bytes, to_bytes
from fxcompress.fileformat.allowlist import fxcompress_modules
from fxcompress.fileformat.dryrun import FUNCTION_RULES, MODULE_RULES, UNKNOWN, dry_run, record_inputs
from fxcompress.fileformat.metaops import rule_for
from fxcompress.passes import (ActivationConfig, InsertFakeQuant, InsertMasks, LowerDynamicInt8, LowerToEncoded,
                               LowerToInteger, LowerToSparse, LowerWeightOnly)

from fxcompress.encoded.module import EncodedWeight
from fxcompress.kernels.dynamic import DynamicInt8Linear
from fxcompress.kernels.native import NativeAdd, NativeCat, NativeLayer, QuantizeToCodes, float_codes, relu_codes
from fxcompress.kernels.sparse import SparseLayer
from fxcompress.kernels.weight_only import WeightOnlyLinear
from fxcompress.quant.integer import IntegerAdd, IntegerCat, IntegerLayer, QuantizeInput, dequantize_codes
from fxcompress.quant.modules import ActivationQuant, GridWeight, KMeansWeight

from .hostile import read_manifest, tensor_data, with_manifest


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(24, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), 24))))


def _mlp_file():
    x = torch.randn(3, 2, 12)
    gm = fxcompress.compile(Mlp().eval(), [], example_inputs=(x,))
    return to_bytes(gm), gm, x


def _refused(data, node):
    with pytest.raises(FormatError, match="fails on the recorded input shapes") as info:
        from_bytes(data)
    assert f"graph node {node!r}" in str(info.value), str(info.value)
    return str(info.value)


def _retile(manifest, data, replaced):
    """The manifest's tensor table and data region with the named tensors' bytes replaced (offsets, lengths
    and checksums recomputed): an edit an attacker makes consistently."""
    old, region, offset = tensor_data(data), [], 0
    for entry in manifest["tensors"]:
        if "same_as" in entry:
            continue
        if entry["name"] in replaced:
            tensor = replaced[entry["name"]]
            raw = tensor.numpy().tobytes()
            entry.update(shape=list(tensor.shape), length=len(raw), crc32=zlib.crc32(raw))
        else:
            raw = old[entry["offset"]:entry["offset"] + entry["length"]]
        entry["offset"] = offset
        region.append(raw)
        offset += len(raw)
    manifest["data_bytes"] = offset
    return with_manifest(data, manifest, b"".join(region))


def test_the_file_records_each_input_and_loads_with_the_same_outputs():
    data, gm, x = _mlp_file()
    assert read_manifest(data)["inputs"] == [{"shape": [3, 2, 12], "dtype": "float32"}]
    loaded = from_bytes(data)
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    assert record_inputs(loaded) == read_manifest(data)["inputs"]  # saving the loaded model records them again


def test_a_linear_changed_consistently_in_the_module_table_is_refused_at_load():
    """fc1 becomes Linear(20, 32) with a weight of that shape: the table is consistent, the input is not."""
    data, _, _ = _mlp_file()
    manifest = read_manifest(data)
    next(m for m in manifest["modules"] if m["path"] == "fc1")["config"]["in_features"] = 20
    message = _refused(_retile(manifest, data, {"fc1.weight": torch.randn(32, 20)}), "fc1")
    assert "call_module fc1 (Linear)" in message and "float32[3, 24]" in message and "RuntimeError" in message


def test_a_view_with_a_wrong_size_constant_is_refused_at_load():
    data, _, _ = _mlp_file()
    manifest = read_manifest(data)
    view = next(n for n in manifest["graph"] if n["target"] == "view")
    view["args"]["t"][2] = 25
    message = _refused(with_manifest(data, manifest), view["name"])
    assert "call_method .view()" in message and "shape '[3, 25]' is invalid" in message


class _Attention(nn.Module):
    """Heads split, attended and joined with `view` only: CPU attention returns its output stored
    transposed, so the `view` after `transpose` works there (HF GPT-2 exported by torch.export reads so)."""

    def forward(self, x):
        b, n, _ = x.size()
        heads = x.view(b, n, 4, 8).permute(0, 2, 1, 3)
        out = F.scaled_dot_product_attention(heads, heads, heads, torch.ones(n, n, dtype=torch.bool))
        return out.transpose(1, 2).view(b, n, 32)


def test_a_view_that_works_on_the_cpu_kernels_layout_is_not_refused(tmp_path):
    x = torch.randn(2, 8, 32)
    gm = fxcompress.compile(_Attention(), [], (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would mean the file records no inputs
        fxcompress.save(gm, tmp_path / "attention.fxc")
    assert read_manifest((tmp_path / "attention.fxc").read_bytes())["inputs"] == [{"shape": [2, 8, 32],
                                                                                   "dtype": "float32"}]
    torch.testing.assert_close(fxcompress.load(tmp_path / "attention.fxc")(x), gm(x), rtol=0, atol=0)


def test_a_swapped_argument_is_refused_at_load():
    """view(x, size, 24) becomes view(size, x, 24): every name still resolves, the forward cannot run."""
    data, _, _ = _mlp_file()
    manifest = read_manifest(data)
    view = next(n for n in manifest["graph"] if n["target"] == "view")
    arguments = view["args"]["t"]
    arguments[0], arguments[1] = arguments[1], arguments[0]
    assert "AttributeError: 'int' object has no attribute 'view'" in _refused(with_manifest(data, manifest),
                                                                               view["name"])


def test_recorded_input_shapes_that_the_graph_cannot_take_are_refused():
    data, _, _ = _mlp_file()
    manifest = read_manifest(data)
    manifest["inputs"][0]["shape"] = [3, 2, 13]
    _refused(with_manifest(data, manifest), "view")


@pytest.mark.parametrize("inputs, match", [([], "one recorded input for each"), ([{"shape": [-1], "dtype": "float32"}],
                         "shape must be"), ([{"shape": [2], "dtype": "complex64"}], "dtype"),
                         ([{"shape": [2 ** 30] * 3, "dtype": "float32"}], "shape must be"), ([{"x": 1}], "not a recorded"),
                         ([{"default": True}], "has none"), ("nope", "one recorded input")])
def test_malformed_recorded_inputs_are_format_errors(inputs, match):
    data, _, _ = _mlp_file()
    manifest = read_manifest(data)
    manifest["inputs"] = inputs
    with pytest.raises(FormatError, match=f"manifest: inputs.*{match}"):
        from_bytes(with_manifest(data, manifest))


def _with_version(data, version):
    header = bytearray(data[:HEADER_BYTES])
    struct.pack_into("<H", header, 8, version)
    struct.pack_into("<I", header, 18, zlib.crc32(bytes(header[:18])))
    return bytes(header) + data[HEADER_BYTES:]


def test_version_1_files_load_without_a_dry_run_and_version_2_needs_its_inputs():
    data, _, x = _mlp_file()
    manifest = read_manifest(data)
    next(n for n in manifest["graph"] if n["target"] == "view")["args"]["t"][2] = 25
    del manifest["inputs"]
    old = _with_version(with_manifest(data, manifest), 1)  # as written before inputs were recorded
    loaded = from_bytes(old)
    with pytest.raises(RuntimeError, match="invalid for input"):  # what such a file did: fail at the forward
        loaded(x)
    with pytest.raises(FormatError, match="exactly the keys"):
        from_bytes(_with_version(old, 2))  # version 2 without inputs
    with pytest.raises(FormatError, match="exactly the keys"):
        from_bytes(_with_version(data, 1))  # version 1 with inputs


def test_a_graph_that_carries_no_shapes_records_none_and_save_checks_what_it_records():
    x = torch.randn(3, 2, 12)
    traced = torch.fx.symbolic_trace(Mlp().eval())
    assert read_manifest(to_bytes(traced))["inputs"] is None
    torch.testing.assert_close(from_bytes(to_bytes(traced))(x), traced(x), rtol=0, atol=0)
    assert read_manifest(to_bytes(traced, example_inputs=x))["inputs"] == [{"shape": [3, 2, 12], "dtype": "float32"}]
    with pytest.raises(FormatError, match="cannot save: .*graph node 'view'"):
        to_bytes(traced, example_inputs=(torch.randn(3, 25),))
    gm = fxcompress.compile(Mlp().eval(), [], example_inputs=(x,))
    gm.fc1 = nn.Linear(20, 32)  # edited after compile: the shapes it carries no longer run
    with pytest.warns(UserWarning, match="records no input shapes"):
        assert read_manifest(to_bytes(gm))["inputs"] is None


def _numpy_scale(x):
    """A trusted function of the loading program that cannot run on meta tensors (it reads the data)."""
    return x * float(x.abs().max().item() > 0)


def test_registered_functions_that_cannot_run_on_meta_leave_their_output_unknown():
    register_function(_numpy_scale, "tests.dry_run.numpy_scale")

    graph = torch.fx.Graph()  # x -> _numpy_scale(x) -> view(2, 6) -> add 1
    scaled = graph.call_function(_numpy_scale, (graph.placeholder("x"),))
    graph.output(graph.call_function(operator.add, (graph.call_method("view", (scaled, 2, 6)), 1)))
    traced = torch.fx.GraphModule(nn.Module(), graph)
    x = torch.randn(3, 5)  # not the recorded shape: 15 values cannot be viewed as 2 x 6
    data = to_bytes(traced, example_inputs=(torch.randn(2, 6),))
    assert dry_run(from_bytes(data), [{"shape": [2, 6], "dtype": "float32"}])["add"] is UNKNOWN
    with pytest.raises(RuntimeError):  # what the dry run could not see stays the forward's to find
        from_bytes(data)(x)


def test_a_split_into_millions_of_pieces_is_left_unknown_not_made():
    class Unbind(nn.Module):
        def forward(self, x):
            return x.unbind(1)[0] + 1

    data = to_bytes(torch.fx.symbolic_trace(Unbind()), example_inputs=(torch.randn(2, 3),))
    manifest = read_manifest(data)
    manifest["inputs"][0]["shape"] = [2, 1 << 40]
    values = dry_run(from_bytes(with_manifest(data, manifest)), manifest["inputs"])
    assert values["unbind"] is UNKNOWN and values["add"] is UNKNOWN


# ---- every module kind fxcompress lowers to runs on meta tensors as its forward does -----------------

class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.conv2(y) + y)
        y = torch.cat([y, self.conv3(y)], 1)
        return self.fc2(F.relu(self.fc1(torch.flatten(y, 1))))


CALIBRATED = [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                              activations=ActivationConfig(bits=8, joins=True))]
# kind -> (the compiles, the module types they must leave in the model)
KINDS = {
    "kmeans": ([[InsertMasks(sparsity=0.5), InsertFakeQuant(method="kmeans", bits=4)]], {KMeansWeight}),
    "grids_and_activations": ([CALIBRATED], {GridWeight, ActivationQuant}),
    "encoded": ([[InsertMasks(sparsity=0.5), InsertFakeQuant(method="kmeans", bits=4)], [LowerToEncoded()]],
                {EncodedWeight}),
    "integer_reference": ([CALIBRATED, [LowerToInteger(backend="reference")]],
                          {QuantizeInput, IntegerLayer, IntegerAdd, IntegerCat}),
    "integer_native": ([CALIBRATED, [LowerToInteger(backend="native", repeats=1)]], {NativeLayer, NativeAdd, NativeCat}),
    "sparse": ([[InsertMasks(sparsity=0.9)], [LowerToSparse(min_sparsity=0.0, repeats=1)]], {SparseLayer}),
    "weight_only": ([[InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)],
                     [LowerWeightOnly(repeats=1)]], {WeightOnlyLinear}),
    "dynamic_int8": ([[LowerDynamicInt8(repeats=1)]], {DynamicInt8Linear}),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_lowered_module_kind_runs_on_meta_with_its_real_shapes(kind):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4)
    gm = Residual().eval()
    steps, made = KINDS[kind]
    for passes in steps:
        gm = fxcompress.compile(gm, passes, example_inputs=(x,), calibration_data=[(x,)])
    assert made <= {type(m) for m in gm.modules()}
    data = to_bytes(gm)
    loaded = from_bytes(data)
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    values = dry_run(loaded, read_manifest(data)["inputs"])
    real = propagate_shapes(loaded, (x,)).meta
    compared = 0
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            assert (tuple(value.shape), value.dtype) == (tuple(real[name].shape), real[name].dtype), name
            compared += 1
    assert compared == len(values)  # every node has a meta tensor: none unknown, none skipped
    manifest = read_manifest(data)
    manifest["inputs"][0]["shape"] = [2, 4, 4, 4]  # four channels where the first conv takes three
    failing = locate_failure(loaded, (torch.rand(2, 4, 4, 4),))
    assert failing is not None
    _refused(with_manifest(data, manifest), failing.name)


def test_the_native_boundary_runs_on_meta_as_it_runs():
    """QuantizeToCodes (float in, uint8 codes out; one C call where it can) keeps its real shape and dtype."""
    graph = torch.fx.Graph()
    graph.output(graph.call_module("q", (graph.placeholder("x"),)))
    root = nn.Module()
    root.q = QuantizeToCodes(0.05, 3, 255)
    gm = torch.fx.GraphModule(root, graph)
    x = torch.randn(2, 7)
    value = dry_run(from_bytes(to_bytes(gm, example_inputs=(x,))), [{"shape": [2, 7], "dtype": "float32"}])["q"]
    assert (value.shape, value.dtype) == (gm(x).shape, gm(x).dtype) == ((2, 7), torch.uint8)


def test_every_module_type_a_file_may_name_has_a_meta_rule():
    """A new kernel module must say how it runs on meta tensors (its forward may call C on data pointers)."""
    assert set(fxcompress_modules().values()) <= set(MODULE_RULES), set(fxcompress_modules().values()) - set(MODULE_RULES)



# A fresh process that loads integer-lowered files (either backend) must not import torch._dynamo (1-3 s): on meta
# tensors torch runs `/`, `+`, `*`, `clamp`, `cat` and their in-place forms through its Python references, whose
# wrapper imports it, and the native modules' forward (input quantizer, add, cat, float_codes) made exactly those
# calls, as the reference modules' did.
_FRESH_LOAD = """
import sys
import fxcompress
for path in sys.argv[1:]:
    fxcompress.load(path)
print("torch._dynamo" in sys.modules)
"""


class ReluModules(nn.Module):
    """relu as nn.ReLU modules (one in place) and the `.relu()` method: the reference lowering keeps each on the
    int32 codes between integer layers."""
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)
        self.conv3, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(torch.flatten(self.conv3(y).relu(), 1))


# the module types each backend's LeNet-5 and residual model must leave in the files (so the test loads them all)
_INTEGER_BACKENDS = {"native": {QuantizeToCodes, NativeLayer, NativeAdd, NativeCat},
                     "reference": {QuantizeInput, IntegerLayer, IntegerAdd, IntegerCat}}


@pytest.mark.parametrize("backend", sorted(_INTEGER_BACKENDS))
def test_a_fresh_process_loads_integer_files_without_importing_dynamo(tmp_path, backend):
    """Either backend: the reference modules' forwards made the same calls on int64 / float64 tensors, and the
    reference graph keeps relu on int32 codes."""
    import subprocess
    import sys
    from fxcompress.zoo import ZOO

    make_model, make_input = ZOO["lenet5"]
    paths, made = [], set()
    models = [(make_model(), make_input()), (Residual(), torch.rand(2, 3, 4, 4))]
    if backend == "reference":  # relu modules and methods on int32 codes: metaops' table, not torch's references
        models.append((ReluModules(), torch.rand(2, 3, 4, 4)))
    for model, x in models:
        torch.manual_seed(0)
        gm = fxcompress.compile(model.eval(), CALIBRATED, example_inputs=(x,), calibration_data=[(x,)])
        options = {"repeats": 1} if backend == "native" else {}
        gm = fxcompress.compile(gm, [LowerToInteger(backend=backend, **options)], example_inputs=(x,))
        made |= {type(m) for m in gm.modules()}
        if isinstance(model, ReluModules):  # the relus stay on the codes the integer layers return
            relus = [n for n in gm.graph.nodes if n.target == "relu" or n.op == "call_module"
                     and isinstance(gm.get_submodule(n.target), nn.ReLU)]
            assert len(relus) == 3 and all(isinstance(gm.get_submodule(n.args[0].target), IntegerLayer)
                                           for n in relus), gm.graph
        paths.append(tmp_path / f"{len(paths)}.fxc")
        fxcompress.save(gm, paths[-1])
    assert _INTEGER_BACKENDS[backend] <= made
    done = subprocess.run([sys.executable, "-c", _FRESH_LOAD, *map(str, paths)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"], f"loading {backend} integer files imported torch._dynamo"


def _on_meta(value):
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def _same_metadata(rule, call, *inputs):
    """The dry run's rule on meta copies of `inputs` against the real call on them: shape, strides, dtype."""
    real, meta = call(*inputs), rule(*map(_on_meta, inputs))
    assert (meta.shape, meta.stride(), meta.dtype) == (real.shape, real.stride(), real.dtype), \
        [(t.dtype, t.shape, t.stride()) for t in inputs if isinstance(t, torch.Tensor)]


# inputs of the layouts and dtypes the native modules' torch ops take: dense, channels-last, sliced, expanded
_LAYOUTS = [torch.randn(2, 3, 5, 5), torch.randn(2, 5, 5, 3).permute(0, 3, 1, 2), torch.randn(4, 6)[:, ::2],
            torch.randn(1, 1, 3).expand(2, 4, 3), torch.randn(3, 7, dtype=torch.float64)]
_CODES = [torch.randint(0, 255, (2, 3, 5, 5), dtype=torch.uint8),
          torch.randint(0, 255, (2, 5, 5, 3), dtype=torch.uint8).permute(0, 3, 1, 2),
          torch.randint(0, 255, (3, 5, 5), dtype=torch.uint8), torch.randint(0, 255, (4, 6), dtype=torch.uint8)[:, ::2]]


def test_the_native_boundary_rule_gives_the_forwards_shape_strides_and_dtype():
    """The dry run's QuantizeToCodes rule computes the forward's torch ops by table: the same metadata as those ops
    on CPU tensors (the C call writes the same), for each input dtype and layout they take."""
    inputs = [*_LAYOUTS, torch.randint(0, 9, (3, 7)), torch.randn(3, 7).bool()]
    for channels_last in (False, True):
        module = QuantizeToCodes(0.05, 3, 255, channels_last)
        for x in inputs:
            _same_metadata(functools.partial(MODULE_RULES[QuantizeToCodes], module, {}), module, x)


def test_the_native_add_and_cat_rules_give_the_forwards_shape_strides_and_dtype():
    for output, relu in ((None, False), (None, True), ((0.1, 7), False)):
        add = NativeAdd((0.05, 3), (0.02, 9), output, low=7 if relu else 0, relu=relu)
        for a in _CODES:
            for b in (a, a.contiguous(), a[:1]):
                if a.dim() == 3 and b.dim() != 3:
                    continue
                _same_metadata(functools.partial(MODULE_RULES[NativeAdd], add, {}), add, a, b)
        for dim in (0, 1):
            cat = NativeCat([(0.05, 3), (0.1, 7), (0.02, 9)], output, dim)
            for a in _CODES:
                _same_metadata(functools.partial(MODULE_RULES[NativeCat], cat, {}), cat, a, a.contiguous(), a)


def test_the_native_function_rules_give_the_functions_shape_strides_and_dtype():
    for x in _LAYOUTS:
        for zero_point in (0, 3):
            _same_metadata(lambda v: FUNCTION_RULES[float_codes](v, 0.05, zero_point, 255),
                           lambda v: float_codes(v, 0.05, zero_point, 255), x)
    for x in [*_CODES, *_LAYOUTS]:
        for zero_point in (3, 3.0):
            _same_metadata(lambda v: FUNCTION_RULES[relu_codes](v, zero_point), lambda v: relu_codes(v, zero_point), x)


def test_the_native_rules_refuse_what_the_forward_refuses():
    """Operands that do not broadcast still fail the load (the table leaves them to torch's own meta run)."""
    add = NativeAdd((0.05, 3), (0.02, 9), (0.1, 7))
    with pytest.raises(RuntimeError):
        MODULE_RULES[NativeAdd](add, {}, *map(_on_meta, (_CODES[0], _CODES[3])))
    cat = NativeCat([(0.05, 3), (0.1, 7)], (0.1, 7), 1)
    with pytest.raises(RuntimeError):
        MODULE_RULES[NativeCat](cat, {}, *map(_on_meta, (_CODES[0], _CODES[3])))
    with pytest.raises(TypeError):
        FUNCTION_RULES[float_codes](_on_meta(_LAYOUTS[0]), "0.05", 0, 255)


def test_the_native_rules_in_place_steps_fail_where_torch_does():
    """A number torch cannot convert (a file writes float_codes' zero-point) fails the table's in-place step as it
    fails torch's own meta run; the numbers it converts give the tensor itself."""
    from fxcompress.fileformat.dryrun import _in_place
    for number in (3, 0.5, float("nan"), -(1 << 63), (1 << 64) - 1, -(1 << 63) - 1, 1 << 64, 1 << 70):
        for method, numbers in (("add_", (number,)), ("clamp_", (0, number)), ("clamp_min_", (number,))):
            x = torch.empty(2, 3, device="meta")
            try:
                expected = getattr(x, method)(*numbers)
            except Exception as exc:  # noqa: BLE001 - whatever torch raises, the rule raises too
                with pytest.raises(type(exc)):
                    _in_place(torch.empty(2, 3, device="meta"), method, *numbers)
            else:
                got = _in_place(x, method, *numbers)
                assert got is x and (got.shape, got.dtype) == (expected.shape, expected.dtype)


def _meta_state(module):
    """The module's tensors on meta, as the dry run hands them to a rule."""
    return {name: _on_meta(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _filled_integer_layer(kind, weight_shape, requantize, **options):
    torch.manual_seed(0)
    layer = IntegerLayer(kind, weight_shape, requantize, weight_dtype="int8", **options)
    layer.weight.copy_(torch.randint(-127, 128, weight_shape, dtype=torch.int8))
    layer.bias.copy_(torch.randint(-1000, 1000, (weight_shape[0],), dtype=torch.int32))
    if requantize:
        layer.multiplier.fill_(1 << 30)
        layer.shift.fill_(40)
        layer.low.fill_(-128)
        layer.high.fill_(127)
    return layer


def _filled_join(module):
    module.multipliers.fill_(1 << 30)
    for name in ("shift", "shifts"):
        if hasattr(module, name):
            getattr(module, name).fill_(32)
    module.low.fill_(-128)
    module.high.fill_(127)
    module.scales.copy_(torch.linspace(0.01, 0.05, len(module.scales), dtype=torch.float64))
    return module


# centered int32 codes in the layouts the reference graph hands its modules: dense, channels-last, sliced, expanded
_CENTERED = [torch.randint(-128, 128, (2, 3, 5, 5), dtype=torch.int32),
             torch.randint(-128, 128, (2, 5, 5, 3), dtype=torch.int32).permute(0, 3, 1, 2),
             torch.randint(-128, 128, (3, 5, 5), dtype=torch.int32),
             torch.randint(-128, 128, (4, 12), dtype=torch.int32)[:, ::2],
             torch.randint(-128, 128, (1, 1, 6), dtype=torch.int32).expand(2, 4, 6)]


def _reference_rule(module, *inputs, cpu_layout=True):
    """The dry run's rule for a reference module on meta copies of `inputs`: the metadata of the forward on the
    CPU tensors (shape and dtype only where `cpu_layout` is False) and exactly that of the forward itself run on
    the meta copies, which is what the dry run ran before the rule."""
    from fxcompress.fileformat.dryrun import _own_forward
    state = _meta_state(module)
    rule = functools.partial(MODULE_RULES[type(module)], module, state)
    if cpu_layout:
        _same_metadata(rule, module, *inputs)
    else:
        real, meta = module(*inputs), rule(*map(_on_meta, inputs))
        assert (meta.shape, meta.dtype) == (real.shape, real.dtype)
    _same_metadata(rule, lambda *meta: _own_forward(module, state, *meta), *map(_on_meta, inputs))


def test_the_reference_module_rules_give_the_forwards_shape_strides_and_dtype():
    """Each reference module's rule computes its forward's ops by table on the module's meta tensors: the same
    metadata as the forward itself on CPU tensors, for each input dtype and layout it takes."""
    for x in [*_LAYOUTS, torch.randint(0, 9, (3, 7)), torch.randn(3, 7).bool()]:
        _reference_rule(QuantizeInput(0.05, 3, 0, 255), x)
    conv_options = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}
    for requantize in (True, False):
        linear = _filled_integer_layer("linear", [5, 6], requantize)
        for x in (_CENTERED[3], _CENTERED[4], _CENTERED[4].contiguous()):
            _reference_rule(linear, x)
        conv = _filled_integer_layer("conv2d", [4, 3, 3, 3], requantize, **conv_options)
        for x in _CENTERED[:3]:
            # a channels-last input: torch's meta convolution writes a contiguous output where the CPU one keeps
            # channels-last (the dry run ran that meta kernel before too; it checks sizes, not strides)
            _reference_rule(conv, x, cpu_layout=x.is_contiguous())
        add = _filled_join(IntegerAdd(requantize))
        for a in _CENTERED:
            for b in (a, a.contiguous(), a[:1]):
                _reference_rule(add, a, b)
        for dim in (0, 1):
            cat = _filled_join(IntegerCat(3, dim, requantize))
            for a in _CENTERED:
                _reference_rule(cat, a, a.contiguous(), a)


def test_the_reference_function_rules_give_the_functions_shape_strides_and_dtype():
    """What the reference graph calls on codes (relu, the respelled clamps) and the dequantization either backend
    inserts before a float reader: the same metadata as the function on CPU tensors."""
    codes = [*_CENTERED, *_CODES, _CENTERED[0].to(torch.int64), _CENTERED[0].to(torch.int8)]
    for x in codes:
        for zero_point in (0, 3):
            _same_metadata(lambda v: FUNCTION_RULES[dequantize_codes](v, 0.05, zero_point),
                           lambda v: dequantize_codes(v, 0.05, zero_point), x)
        for relu in (F.relu, torch.relu):  # by metaops' table, which covers integer codes
            _same_metadata(lambda v: rule_for("call_function", relu)((v,), {}), relu, x)
        _same_metadata(lambda v: rule_for("call_method", "relu")((v,), {}), torch.Tensor.relu, x)
        for low, high in ((-6, 6), (0, 127)):
            _same_metadata(lambda v: rule_for("call_function", torch.clamp)((v, low, high), {}),
                           lambda v: torch.clamp(v, low, high), x)
            _same_metadata(lambda v: rule_for("call_method", "clamp")((v,), {"min": low}), lambda v: v.clamp(min=low), x)
    meta = _on_meta(_CENTERED[0])
    assert rule_for("call_function", F.relu)((meta,), {"inplace": True}) is meta  # in place: the codes themselves
    assert not set(FUNCTION_RULES) & {F.relu, torch.relu, torch.clamp}  # the table's ops need no rule of their own
    # bounds outside the codes' dtype are refused by the CPU kernel: the table leaves them to torch's own meta run
    for dtype in (torch.int8, torch.uint8):
        x = torch.empty(2, 3, dtype=dtype, device="meta")
        assert rule_for("call_function", torch.clamp)((x, -300, 300), {}) is None
        with pytest.raises(RuntimeError, match="without overflow"):
            torch.clamp(torch.zeros(2, 3, dtype=dtype), -300, 300)


def test_the_reference_rules_refuse_what_the_forward_refuses():
    """Operands that do not fit still fail the load: the rules leave them to torch's own meta run."""
    add = _filled_join(IntegerAdd(True))
    with pytest.raises(RuntimeError):
        MODULE_RULES[IntegerAdd](add, _meta_state(add), *map(_on_meta, (_CENTERED[0], _CENTERED[3])))
    cat = _filled_join(IntegerCat(2, 1, True))
    with pytest.raises(RuntimeError):
        MODULE_RULES[IntegerCat](cat, _meta_state(cat), *map(_on_meta, (_CENTERED[0], _CENTERED[3])))
    linear = _filled_integer_layer("linear", [5, 7], True)
    with pytest.raises(RuntimeError):
        MODULE_RULES[IntegerLayer](linear, _meta_state(linear), _on_meta(_CENTERED[3]))
    with pytest.raises(TypeError):
        MODULE_RULES[QuantizeInput](QuantizeInput("0.05", 3, 0, 255), {}, _on_meta(_LAYOUTS[0]))
    # relu and clamp calls torch refuses are declined by the table, so torch's own run refuses them as before
    assert rule_for("call_function", torch.relu)(("codes",), {}) is None
    assert rule_for("call_function", torch.clamp)((_on_meta(_CENTERED[0]), -6, "6"), {}) is None
    with pytest.raises(TypeError):
        torch.clamp(_on_meta(_CENTERED[0]), -6, "6")
