"""LowerToInteger's native backend (oneDNN int8 kernels) against the reference backend, its oracle."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Interpreter

import fxcompress
from fxcompress.errors import ConfigError, FormatError, PreconditionError
from fxcompress.passes import ActivationConfig, FoldBatchNorm, InsertFakeQuant, LowerToInteger
from fxcompress.kernels import native, q8
from fxcompress.quant.integer import IntegerLayer
from fxcompress.kernels.native import (NativeAdd, NativeCat, NativeLayer, QuantizeToCodes, max_pool2d_codes,
                                     relu_codes)
from fxcompress.zoo import LeNet300100

MODELS = ("lenet5", "resnet")  # conftest's DIGITS_MODELS, trained once per session (trained_digits)


@pytest.fixture
def digits(trained_digits):
    return trained_digits.data


def _fake_quant(model, x, weight_bits=8, activation_bits=8, symmetric=True, adds=True):
    calibration = [x[i:i + 64] for i in range(0, len(x), 64)]
    activations = ActivationConfig(bits=activation_bits, joins=adds)
    passes = [FoldBatchNorm(), InsertFakeQuant(method="linear", bits=weight_bits, symmetric=symmetric,
                                               per_channel=True, activations=activations)]
    return fxcompress.compile(model, passes, example_inputs=(x[:2],), calibration_data=calibration)


def _lower(fq, x, **options):
    return fxcompress.compile(fq, [LowerToInteger(**options)], example_inputs=(x[:2],))


CALIBRATION = 256  # training images calibrating every fake-quant model of the trained digits models


class Built:
    """The trained digits models fake-quantized (on the first CALIBRATION training images), lowered and run
    on the test images, each configuration built once for the module: the tests only read these models
    (compile copies its input; a test that changes a model deep-copies it first)."""

    def __init__(self, trained) -> None:
        self.trained, self.x = trained, trained.data.train_x[:CALIBRATION]
        self._fq, self._lowered, self._outputs = {}, {}, {}

    def fake_quant(self, name, weight_bits=8, activation_bits=8, adds=True):
        key = (name, weight_bits, activation_bits, adds)
        if key not in self._fq:
            self._fq[key] = _fake_quant(self.trained.model(name), self.x, weight_bits, activation_bits, adds=adds)
        return self._fq[key]

    def lowered(self, name, weight_bits=8, activation_bits=8, adds=True, **options):
        key = (name, weight_bits, activation_bits, adds, tuple(sorted(options.items())))
        if key not in self._lowered:
            self._lowered[key] = _lower(self.fake_quant(name, weight_bits, activation_bits, adds), self.x, **options)
        return self._lowered[key]

    def reference_outputs(self, name, weight_bits=8, activation_bits=8):
        """The reference backend's logits on the test images."""
        key = (name, weight_bits, activation_bits)
        if key not in self._outputs:
            with torch.no_grad():
                self._outputs[key] = self.lowered(name, weight_bits, activation_bits, backend="reference")(
                    self.trained.data.test_x)
        return self._outputs[key]


@pytest.fixture(scope="module")
def built(trained_digits):
    return Built(trained_digits)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("weight_bits, activation_bits", [(8, 7), (7, 8)])
@pytest.mark.parametrize("kernel", ("int8", "float"))  # c_int8 runs linear layers only: tests/kernels/test_q8.py
def test_trained_models_agree_with_the_reference(built, digits, name, weight_bits, activation_bits, kernel):
    """Every layer on oneDNN's int8 kernel, or every layer on the float kernel (codes in and out)."""
    fast = built.lowered(name, weight_bits, activation_bits, kernels=(kernel,))
    stats = fxcompress.history(fast)[-1].stats
    assert stats["backend"] == "native" and stats["kernels"][kernel] == stats["integer_layers"]
    assert any(isinstance(m, NativeLayer) for m in fast.modules())
    assert not any(isinstance(m, IntegerLayer) for m in fast.modules())
    expected = built.reference_outputs(name, weight_bits, activation_bits)
    with torch.no_grad():
        got = fast(digits.test_x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    step = (expected.max() - expected.min()).item() / 255  # one step of an 8-bit grid over the logits
    assert (expected - got).abs().max().item() <= step
    assert (got.argmax(1) == digits.test_y).float().mean().item() >= 0.85  # trained, not a constant


@pytest.mark.parametrize("name", MODELS)
def test_eight_bit_activations_and_weights_run_int8_only_with_vnni(built, digits, name):
    """u8 x s8 products summed in pairs pass int16 at 8 / 8 bits: oneDNN's int8 is exact only where the CPU
    has VNNI; elsewhere a layer that could saturate runs the float kernel or ours, and int8 alone is refused."""
    fq, chosen = built.fake_quant(name), built.lowered(name)
    stats = fxcompress.history(chosen)[-1].stats
    expected = built.reference_outputs(name)
    with torch.no_grad():
        got = chosen(digits.test_x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255
    assert stats["backend"] == "native" and stats["native_refused"] == {}
    for name, layer in stats["layers"].items():  # int8 only where no pair of products can pass int16
        module = chosen.get_submodule(layer["module"])
        assert layer["kernel"] != "int8" or native.saturation_free(module.weight, module.input_qmax), name
    if not native.vnni():
        assert any(layer["kernel"] != "int8" for layer in stats["layers"].values())
        with pytest.raises(PreconditionError, match=r"backend='native'\) cannot run .* could pass int16"):
            _lower(fq, built.x, backend="native", kernels=("int8",))


def _dtypes(gm, x):
    seen = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            seen[n] = value.dtype if isinstance(value, torch.Tensor) else None
            return value

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


def test_each_kernel_is_a_node_and_codes_between_layers_are_uint8(built, digits):
    x = digits.train_x[:128]
    gm = built.lowered("lenet5", activation_bits=7, kernels=("int8",))
    nodes = list(gm.graph.nodes)
    modules = [type(gm.get_submodule(n.target)) for n in nodes if n.op == "call_module"]
    assert modules == [QuantizeToCodes, NativeLayer, NativeLayer, NativeLayer, NativeLayer]
    assert [n.target for n in nodes if n.op == "call_function"] == [max_pool2d_codes, max_pool2d_codes,
                                                                    torch.flatten]
    assert not any(n.target in (F.relu, torch.relu) for n in nodes)  # fc1's ReLU is fused into its kernel
    assert gm.get_submodule("fc1.native").post_op == "hardtanh"  # ReLU and the 7-bit grid's top, one clamp
    dtypes = _dtypes(gm, x)
    inner = [n for n in nodes if n.op not in ("placeholder", "output")][:-1]
    assert [dtypes[n] for n in inner] == [torch.uint8] * 7
    assert dtypes[nodes[-2]] == torch.float32


def test_a_boundary_read_only_by_convolutions_writes_channels_last_codes():
    """The input boundary writes the layout oneDNN's convolution reads (no reorder inside each call); one a
    linear layer reads through a flatten keeps the input's layout. The outputs are the same either way."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(144, 5))
    dense = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    for model, laid_out in ((conv, 1), (dense, 0)):
        x = torch.rand(64, 3, 8, 8)
        # 7-bit activations: oneDNN's int8 convolution runs them exactly on a CPU without VNNI too
        gm = _lower(_fake_quant(model, x, activation_bits=7), x, kernels=("int8",))
        assert fxcompress.history(gm)[-1].stats["boundaries_channels_last"] == laid_out
        boundary = next(m for m in gm.modules() if isinstance(m, QuantizeToCodes))
        assert boundary.channels_last == bool(laid_out)
        assert boundary(x[:2]).is_contiguous(memory_format=torch.channels_last) == bool(laid_out)
        plain = copy.deepcopy(gm)
        next(m for m in plain.modules() if isinstance(m, QuantizeToCodes)).channels_last = False
        with torch.no_grad():
            assert torch.equal(gm(x), plain(x))


def test_residual_adds_stay_integer_and_agree_with_the_reference(built, digits):
    x = built.x
    gm = built.lowered("resnet", activation_bits=7, kernels=("int8",))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["integer_adds"] == 2 and stats["float_to_integer_boundaries"] == 2  # the input and fc's
    adds = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), NativeAdd)]
    assert len(adds) == 2
    assert not any(n.target in (F.relu, torch.relu) for n in gm.graph.nodes)  # both block ReLUs fused
    dtypes = _dtypes(gm, x)
    assert dtypes[adds[0]] == torch.uint8 and all(dtypes[a] == torch.uint8 for a in adds[0].args)
    assert dtypes[adds[1]] == torch.float32  # the last add dequantizes before the average pool
    expected = built.reference_outputs("resnet", activation_bits=7)
    with torch.no_grad():
        got = gm(digits.test_x)
    without_adds = built.lowered("resnet", activation_bits=7, adds=False)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255
    assert fxcompress.history(without_adds)[-1].stats["integer_adds"] == 0


def test_a_copy_and_a_pickle_run_the_same(built, digits, tmp_path):
    x = digits.train_x[:128]
    gm = built.lowered("lenet5", activation_bits=7)
    with torch.no_grad():
        expected = gm(x)
        assert torch.equal(copy.deepcopy(gm)(x), expected)  # the packed weights are remade, never copied
        path = tmp_path / "native.pt"
        torch.save(gm, path)
        assert torch.equal(torch.load(path, weights_only=False)(x), expected)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_lowered_models_with_integer_joins_save_and_load_exactly(built, digits, tmp_path, name, backend):
    x = digits.train_x[:128]
    gm = built.lowered(name, activation_bits=7, backend=backend)
    kinds = {type(m).__name__ for m in gm.modules()}
    assert ("NativeLayer" in kinds) == (backend == "native")
    if name == "resnet":  # the residual adds stay integer, and the file holds them
        assert {"NativeAdd" if backend == "native" else "IntegerAdd"} <= kinds
    fxcompress.save(gm, tmp_path / "lowered.fxc")
    loaded = fxcompress.load(tmp_path / "lowered.fxc")
    assert {type(m).__name__ for m in loaded.modules()} == kinds
    assert sorted(loaded.state_dict()) == sorted(gm.state_dict())  # non-persistent buffers stay so (weight_zero_point)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_a_native_layer_from_a_file_is_checked_before_it_runs():
    with pytest.raises(ConfigError, match="kind must be one of"):
        NativeLayer("conv3d", [4, 4], 1.0, 0, "uint8")
    with pytest.raises(ConfigError, match="output one of"):
        NativeLayer("linear", [4, 4], 1.0, 0, "int32")


def test_files_with_the_earlier_float32_bias_load_as_int32_or_are_refused_by_module(built, digits, tmp_path):
    """Files of earlier versions held each NativeLayer's bias as its float32 value: where that value is the
    integer bias times the accumulator scale exactly, it loads as those integers; otherwise FormatError."""
    x = digits.train_x[:128]
    gm = built.lowered("lenet5", activation_bits=7)
    layers = {name: m for name, m in gm.named_modules() if isinstance(m, NativeLayer)}
    assert all(m.bias.dtype == torch.int32 for m in layers.values()) and any(m.bias.any() for m in layers.values())
    with torch.no_grad():
        expected = gm(x)
    old = copy.deepcopy(gm)
    for m in old.modules():
        if isinstance(m, NativeLayer):
            m.bias = m.float_bias().clone()  # what earlier versions stored
    fxcompress.save(old, tmp_path / "old.fxc")
    loaded = fxcompress.load(tmp_path / "old.fxc")
    for name, m in layers.items():
        assert torch.equal(loaded.get_submodule(name).bias, m.bias)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    name = next(iter(layers))
    broken = old.get_submodule(name)
    broken.bias = broken.bias + 0.37 * broken.accumulator_scale().float()  # no integer times the scale
    fxcompress.save(old, tmp_path / "bad.fxc")
    with pytest.raises(FormatError, match=rf"module '{name}': tensor 'bias' is float32"):
        fxcompress.load(tmp_path / "bad.fxc")
    broken.bias, broken.weight_scale = layers[name].bias.clone(), broken.weight_scale[:1].clone()
    fxcompress.save(old, tmp_path / "shape.fxc")
    with pytest.raises(FormatError, match=rf"module '{name}': tensor 'weight_scale' is float32\[1\]"):
        fxcompress.load(tmp_path / "shape.fxc")
    broken.weight_scale, broken.weight = layers[name].weight_scale.clone(), broken.weight.to(torch.int32)
    fxcompress.save(old, tmp_path / "dtype.fxc")
    with pytest.raises(FormatError, match=rf"module '{name}': tensor 'weight' is int32\["):
        fxcompress.load(tmp_path / "dtype.fxc")


@pytest.mark.parametrize("kind, kernel", [("conv2d", "int8"), ("conv2d", "float"), ("linear", "int8"),
                                          ("linear", "float"), ("linear", "c_int8")])
def test_a_layer_holds_its_weight_once_and_gives_the_codes_back_exactly(kind, kernel):
    """After a call, oneDNN's packed weight or the float kernel's weight is the only copy of the codes (our C
    kernel's padded weight, viewed); `weight`, state_dict, copies, `.to` and files still see the exact codes."""
    torch.manual_seed(0)
    shape, options = ([16, 8, 3, 3], {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}) \
        if kind == "conv2d" else ([24, 40], {})
    # codes below 128: without VNNI, oneDNN's uint8 x int8 pair sums saturate in int16 above them (the kernels
    # would then differ by more than a code for a reason this test is not about)
    x = torch.randint(0, 128, (2, 8, 9, 9) if kind == "conv2d" else (3, 40), dtype=torch.uint8)
    layer = NativeLayer(kind, shape, 0.02, 3, "uint8", 0.05, 2, (0.0, None), kernel=kernel, **options)
    if kernel in layer.kernel_refusals([kernel]):
        pytest.skip(layer.kernel_refusals([kernel])[kernel])
    codes = torch.randint(-127, 128, shape, dtype=torch.int8)
    codes[0] = 0  # an all-zero channel (the float kernel's weight is 0 there) comes back too
    layer.weight.copy_(codes)
    layer.weight_scale.copy_(torch.rand(shape[0]) / 100 + 1e-4)
    fresh = copy.deepcopy(layer)
    expected = fresh(x)
    assert torch.equal(layer(x), expected)
    held = layer._buffers.get("weight")
    if kernel == "c_int8":  # the buffer is the kernel's own padded weight, viewed
        assert held.untyped_storage().data_ptr() == layer._c.weight.untyped_storage().data_ptr()
    else:
        assert held is None and layer.held_bytes() < fresh.held_bytes() + codes.numel() // 2
    assert torch.equal(layer.weight, codes)
    assert torch.equal(layer.state_dict()["weight"], codes)  # registered again for the readers of buffers
    assert torch.equal(layer(x), expected)
    assert kernel == "c_int8" or "weight" not in layer._buffers  # ... and dropped again by the next call
    for other in (copy.deepcopy(layer), layer.to(torch.device("cpu"))):
        assert torch.equal(other.weight, codes) and torch.equal(other(x), expected)
    replaced = NativeLayer(**{**layer.config(), "kernel": "float" if kernel != "float" else "int8"})
    replaced.load_state_dict(layer.state_dict())
    assert torch.equal(replaced.weight, codes)
    assert (replaced(x).int() - expected.int()).abs().max() <= 1  # another kernel: within a code
    assert "weight" not in replaced._buffers
    with pytest.raises(AttributeError):  # no plain attribute silently set beside the codes the kernel holds
        replaced.weight = codes.clone()


@pytest.mark.parametrize("kind", ("conv2d", "linear"))
@pytest.mark.parametrize("output", ("uint8", "float32", "float_codes"))
def test_an_int8_layer_calls_onednn_straight_after_its_first_call(kind, output, monkeypatch):
    """From the second eager call on, an int8 layer on uint8 codes calls oneDNN's op with arguments made once
    (same result); codes held in float32 keep the full path (a cast on either side); hold_buffers sends the next
    call through the full path, which drops the codes again."""
    if not native.available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    torch.manual_seed(0)
    shape, options = ([16, 8, 3, 3], {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1]}) \
        if kind == "conv2d" else ([24, 40], {})
    x = torch.randint(0, 128, (2, 8, 9, 9) if kind == "conv2d" else (3, 40), dtype=torch.uint8)
    grid = (1.0, 0) if output == "float32" else (0.05, 2)  # dequantizing: real values out
    layer = NativeLayer(kind, shape, 0.02, 3, output, *grid, (0.0, None), kernel="int8", **options)
    layer.weight.copy_(torch.randint(-127, 128, shape, dtype=torch.int8))
    layer.weight_scale.copy_(torch.rand(shape[0]) / 100 + 1e-4)
    expected = copy.deepcopy(layer)._forward(x)
    assert torch.equal(layer(x), expected)
    shortcut = output != "float_codes"
    assert (layer._call is not None) == shortcut
    full_path = []
    original = NativeLayer._forward
    monkeypatch.setattr(NativeLayer, "_forward", lambda self, x: full_path.append(1) or original(self, x))
    assert torch.equal(layer(x), expected) and len(full_path) == (0 if shortcut else 1)
    layer.hold_buffers()
    assert "weight" in layer._buffers and layer._call is None
    assert torch.equal(layer(x), expected) and "weight" not in layer._buffers
    assert (layer._call is not None) == shortcut


def test_a_native_model_saved_after_running_holds_its_codes_in_the_file(built, digits, tmp_path):
    x = digits.train_x[:64]
    gm = copy.deepcopy(built.lowered("resnet", activation_bits=7))
    with torch.no_grad():
        expected = gm(x)
    layers = [m for m in gm.modules() if isinstance(m, NativeLayer)]
    assert any("weight" not in m._buffers for m in layers)  # dropped: the kernels' forms hold them
    fxcompress.save(gm, tmp_path / "ran.fxc")
    loaded = fxcompress.load(tmp_path / "ran.fxc")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for (name, m), twin in zip(((n, m) for n, m in gm.named_modules() if isinstance(m, NativeLayer)),
                               (m for m in loaded.modules() if isinstance(m, NativeLayer))):
        assert torch.equal(twin.weight, m.weight), name


def test_native_layer_matches_the_reference_layer_on_strided_grouped_convs():
    torch.manual_seed(0)
    x = torch.randint(0, 128, (2, 8, 11, 11), dtype=torch.uint8)
    codes = torch.randint(-127, 128, (12, 4, 3, 3), dtype=torch.int32)
    options = {"stride": [2, 1], "padding": [1, 0], "dilation": [1, 2], "groups": 2}
    reference = IntegerLayer("conv2d", [12, 4, 3, 3], requantize=False, **options)
    reference.weight.copy_(codes)
    reference.bias.copy_(torch.randint(-5000, 5000, (12,)))
    weight_scale, input_scale, input_zero = torch.rand(12, dtype=torch.float64) / 100 + 1e-3, 0.02, 60
    reference.output_scale.copy_(weight_scale * input_scale)
    fast = NativeLayer("conv2d", [12, 4, 3, 3], input_scale, input_zero, "float32", **options)
    fast.weight.copy_(codes.to(torch.int8))
    fast.weight_scale.copy_(weight_scale.float())
    fast.bias.copy_(reference.bias)
    expected = reference(x.to(torch.int32) - input_zero)
    got = fast(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # the weight was packed for this input's shape: inputs of other shapes and layouts compute the same
    assert fast._packed is not None
    other = torch.randint(0, 128, (5, 8, 13, 9), dtype=torch.uint8)
    expected = reference(other.to(torch.int32) - input_zero)
    for x in (other, other.contiguous(memory_format=torch.channels_last)):
        assert torch.allclose(fast(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_refusals_name_the_layer_and_the_default_keeps_the_reference(digits):
    x = torch.rand(64, 1, 28, 28)
    asymmetric = _fake_quant(LeNet300100().eval(), x, activation_bits=7, symmetric=False)
    default = _lower(asymmetric, x)
    refused = fxcompress.history(default)[-1].stats["native_refused"]
    assert fxcompress.history(default)[-1].stats["backend"] == "reference" and "fc1" in refused
    assert "beyond int8 with zero-point 0" in refused["fc1"]
    with pytest.raises(PreconditionError, match=r"'fc1': its centered weight codes span \[-?\d+, \d+\], beyond int8"):
        _lower(asymmetric, x, backend="native")
    conv1d = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 3)).eval()
    fq = _fake_quant(conv1d, torch.rand(64, 2, 8), activation_bits=7)
    with pytest.raises(PreconditionError, match="'0': conv1d has no native kernel"):
        _lower(fq, torch.rand(4, 2, 8), backend="native")


def test_saturation_is_refused_on_a_cpu_without_vnni(monkeypatch):
    monkeypatch.setattr(native, "vnni", lambda: False)
    codes = torch.tensor([[127, -127, 3], [64, 1, -63]])
    assert not native.saturation_free(codes, 255)          # 127 + 127 at input code 255 passes 32767
    assert native.saturation_free(codes, 127)              # 254 * 127 = 32258 does not
    assert native.saturation_free(codes[1:], 255)          # 64 + 63 at 255: 32385
    monkeypatch.setattr(native, "vnni", lambda: True)
    assert native.saturation_free(codes, 255)


class ModuleForms(nn.Module):
    """ReLU and max pooling as modules, a second ReLU on codes (not fused) and a view into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(F.relu(self.pool(self.relu(self.conv(x)))).view(-1, 64))


def test_module_forms_a_relu_on_codes_and_view_run_natively():
    x = torch.randn(64, 1, 8, 8)
    fq = _fake_quant(ModuleForms().eval(), x, activation_bits=7)
    reference, gm = _lower(fq, x, backend="reference"), _lower(fq, x, kernels=("int8",))
    assert fxcompress.history(gm)[-1].stats["backend"] == "native"
    functions = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert functions == [max_pool2d_codes]  # the ReLU after the pool reads codes whose zero is code 0: erased
    assert gm.get_submodule("conv.native").output_zero_point == 0
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["reshape"]  # view of channels-last codes
    with torch.no_grad():
        expected, got = reference(x), gm(x)
    assert torch.equal(expected.argmax(1), got.argmax(1))
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255


def test_relu_on_codes_clamps_at_the_zero_point():
    codes = torch.tensor([0, 9, 10, 11, 255], dtype=torch.uint8)
    assert relu_codes(codes, 10).tolist() == [10, 10, 10, 11, 255]
    assert relu_codes(codes, 10).dtype == torch.uint8


class Concat(nn.Module):
    """An inception-style join: two branches (one through a ReLU) concatenated on channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 6, 1)
        self.c, self.fc = nn.Conv2d(10, 3, 3, padding=1), nn.Linear(3 * 64, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], 1)
        return self.fc(torch.flatten(F.relu(self.c(y)), 1))


def test_concatenations_stay_integer_and_agree_with_the_reference():
    x = torch.randn(128, 2, 8, 8)
    fq = _fake_quant(Concat().eval(), x, activation_bits=7)
    reference, gm = _lower(fq, x, backend="reference"), _lower(fq, x, kernels=("int8",))
    assert fxcompress.history(gm)[-1].stats["integer_cats"] == 1
    (cat,) = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), NativeCat)]
    dtypes = _dtypes(gm, x)
    assert dtypes[cat] == torch.uint8 and [dtypes[a] for a in cat.args] == [torch.uint8] * 2
    assert fxcompress.history(gm)[-1].stats["float_to_integer_boundaries"] == 1  # the input only
    with torch.no_grad():
        expected, got = reference(x), gm(x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.99
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255


def test_a_residual_add_onto_a_grid_runs_in_one_c_pass_within_a_code_of_the_torch_ops():
    """q8.add is NativeAdd's torch ops in one pass (no fused multiply-add: at most one code apart on ties of
    the rounding) on any layout both operands share; other layouts keep the torch ops."""
    if q8.c_library() is None:
        pytest.skip("no C compiler on this machine")
    gen = torch.Generator().manual_seed(3)
    add = NativeAdd((0.031, 3), (0.017, 60), (0.04, 5), low=5, high=250)
    a, b = (torch.randint(0, 256, (2, 16, 9, 7), generator=gen, dtype=torch.uint8) for _ in range(2))
    torch_ops = torch.add(a * add.ka, b, alpha=add.kb).add_(add.offset).round_().clamp_(5, 250).to(torch.uint8)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = add(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout))
        assert got.is_contiguous(memory_format=layout) and int(got.min()) == 5 and int(got.max()) == 250
        diff = (got.int() - torch_ops.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    mixed = add(a, b.contiguous(memory_format=torch.channels_last))  # layouts differ: the torch ops
    assert torch.equal(mixed, torch_ops)


def test_the_c_add_rounds_float32_steps_exactly_in_its_vector_body_and_its_tail():
    """q8.add is float32 a * ka + b * kb + offset, rounded half to even, clamped: code for code, whether sixteen
    at a time (the AVX-512 body), eight (AVX2) or one by one (1003 = 62 * 16 + 8 + 3 codes); ties included."""
    if q8.c_library() is None:
        pytest.skip("no C compiler on this machine")
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randint(0, 256, (1003,), generator=gen, dtype=torch.uint8) for _ in range(2))
    cases = [(0.5, 0.25, -3.0, 0, 255), (0.031, 0.017, 40.37, 5, 250), (2.5, -1.5, 0.5, 0, 255)]
    for ka, kb, offset, low, high in cases:
        steps = (a.numpy().astype(np.float32) * np.float32(ka) + b.numpy().astype(np.float32) * np.float32(kb)) \
            + np.float32(offset)
        expected = np.clip(np.rint(steps), low, high).astype(np.uint8)
        got = q8.add(a, b, ka, kb, offset, low, high)
        assert got is not None and np.array_equal(got.numpy(), expected)
    ties = (a.numpy().astype(np.float32) * np.float32(0.5) + b.numpy().astype(np.float32) * np.float32(0.25)) % 1
    assert (ties == 0.5).any()  # the first case has exact halves to round


@pytest.mark.parametrize("relu", [False, True])
def test_a_dequantizing_residual_add_runs_in_one_c_pass_as_the_torch_ops(relu):
    """q8.add_values: NativeAdd's real sum (ReLU fused) in one pass, within float32 rounding of its torch ops."""
    if q8.c_library() is None:
        pytest.skip("no C compiler on this machine")
    gen = torch.Generator().manual_seed(4)
    add = NativeAdd((0.031, 120), (0.017, 60), None, relu=relu)
    a, b = (torch.randint(0, 256, (2, 16, 9, 7), generator=gen, dtype=torch.uint8) for _ in range(2))
    torch_ops = torch.add(a * add.ka, b, alpha=add.kb).add_(add.offset)
    torch_ops = torch_ops.clamp_min(0.0) if relu else torch_ops
    assert bool((torch_ops < 0).any()) != relu  # the ReLU had negatives to clear
    for layout in (torch.contiguous_format, torch.channels_last):
        got = add(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout))
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=layout)
        assert q8.add_values(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout), add.ka, add.kb,
                             add.offset, relu) is not None  # the C pass, not the torch ops
        torch.testing.assert_close(got, torch_ops, rtol=1e-6, atol=1e-6)


class ImageOps(nn.Module):
    """Every native op an image meets: convolutions, a residual add of codes, max pooling on codes and a linear
    layer over the last dim; its output is an image too, so an unbatched input keeps every dim its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.fc(self.pool(F.relu(self.conv(h) + h)))


@pytest.mark.parametrize("kernel", ("int8", "float"))
def test_an_unbatched_image_gets_what_it_gets_in_a_batch(kernel, tmp_path):
    """A (C, H, W) image, which torch's Conv2d takes: oneDNN's convolution read it as 1-d signals and raised
    "negative dimension" (and the quantized max pooling refused a 3-D tensor). Called first, the image also
    chooses the layout oneDNN packs the weight for; called after a batch, it passes the prepared shortcut; a
    model loaded from a file runs it too."""
    if kernel == "int8" and not native.available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    fq = _fake_quant(ImageOps().eval(), x, activation_bits=7)  # 7-bit codes: int8 is exact without VNNI too
    reference, lowered = _lower(fq, x, backend="reference"), _lower(fq, x, kernels=(kernel,))
    assert lowered.get_submodule("stem.native").kernel == kernel
    image_first = copy.deepcopy(lowered)  # nothing built yet: its first input is the image
    fxcompress.save(lowered, tmp_path / "image.fxc")
    loaded = fxcompress.load(tmp_path / "image.fxc")
    with torch.no_grad():
        expected = reference(x)
        batched = lowered(x)
        got = [lowered(x[i]) for i in range(3)]
        got_first = [image_first(x[i]) for i in range(3)]
        assert torch.equal(image_first(x), batched) and torch.equal(lowered(x), batched)
        assert torch.equal(loaded(x[0]), got[0])
    step = (expected.max() - expected.min()).item() / 255
    assert (expected - batched).abs().max().item() <= step
    for i in range(3):
        assert got[i].shape == expected[i].shape == (8, 4, 5)
        assert torch.equal(got[i], batched[i]) and torch.equal(got_first[i], batched[i])
        assert (got[i] - reference(x[i])).abs().max().item() <= step


@pytest.mark.parametrize("kernel", ("int8", "float", "c_int8"))
def test_a_linear_layer_takes_a_vector_as_a_batch_of_one_row(kernel):
    """torch's Linear takes a 1-D vector: so does each native kernel (c_int8 quantizing the float input itself),
    giving what a batch of one row gets (the float kernel's products of one row and of 64 may round apart)."""
    if kernel == "int8" and not native.available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    if kernel == "c_int8" and q8.c_library() is None:
        pytest.skip("no C compiler on this machine to build our int8 kernel")
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    fq = _fake_quant(mlp, x, activation_bits=7)
    reference, lowered = _lower(fq, x, backend="reference"), _lower(fq, x, kernels=(kernel,))
    assert {m.kernel for m in lowered.modules() if isinstance(m, NativeLayer)} == {kernel}
    with torch.no_grad():
        expected = reference(x)
        vectors = [lowered(x[i]) for i in range(3)]
        rows = [lowered(x[i:i + 1])[0] for i in range(3)]
    step = (expected.max() - expected.min()).item() / 255
    for i, vector in enumerate(vectors):
        assert vector.shape == (5,) and torch.equal(vector, rows[i])
        assert (vector - expected[i]).abs().max().item() <= step


def test_an_input_of_a_rank_no_kernel_reads_is_refused_naming_the_layer(tmp_path):
    """A 2-D or 5-D input to a native convolution: a PreconditionError naming the layer by its module path
    (before, oneDNN's own error, naming neither), whether or not the layer has its shortcut prepared, and in a
    model loaded from a file."""
    if not native.available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    lowered = _lower(_fake_quant(ImageOps().eval(), x, activation_bits=7), x, kernels=("int8",))
    fxcompress.save(lowered, tmp_path / "image.fxc")
    loaded = fxcompress.load(tmp_path / "image.fxc")
    wanted = r"NativeLayer stem\.native \(conv2d\): reads 4-D codes \(N, C, H, W\) or an unbatched 3-D image"
    with torch.no_grad():
        for model in (lowered, loaded):
            with pytest.raises(PreconditionError, match=wanted + r".* got a 2-D input of shape \[8, 8\]"):
                model(x[0, 0])
            model(x[:2])  # the shortcut prepared: it serves 4-D inputs only
            with pytest.raises(PreconditionError, match=wanted + r".* got a 2-D input of shape \[8, 8\]"):
                model(x[0, 0])
            with pytest.raises(PreconditionError, match=wanted + r".* got a 5-D input"):
                model(x[None])
    layer = lowered.get_submodule("fc.native")  # a linear layer reads any rank but 0
    with pytest.raises(PreconditionError, match=r"NativeLayer fc\.native \(linear\): .* at least 1 dim \(\.\.\., 4\)"):
        layer(torch.tensor(3, dtype=torch.uint8))
