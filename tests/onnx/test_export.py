"""ONNX exports checked by onnx.checker and run by ONNX Runtime: named inputs, a dynamic batch, opsets,
and the int8 QDQ model of a fake-quant graph on ORT's int8 kernels.

Tolerances: the float model runs in ORT within 1e-5 (absolute, logits of order 1) of ours; the QDQ
model computes the same integer codes as our QDQ module on >= 98% of the inputs (5e-6: float32
summation order only; ORT requantizes by multiplying the accumulator, so a code at a rounding tie may
move by one) and every output stays within one 8-bit step of the logits' range of the fake-quant and the reference integer model
(the bias is rounded to the accumulator's scale, as LowerToInteger rounds it).
ONNX Runtime multiplies uint8 by int8 with vpmaddubsw on x86 CPUs without VNNI, which saturates in
int16 at 8 / 8 bits (its documentation says so): there the int8 tests quantize weights to 7 bits.
to_onnx_int8 itself refuses a file beyond one step of the QDQ module's last activation grids carried to the
outputs (`int8_check`); the tests here hold the outputs to tighter, statistical bounds on more inputs.
About 4 s on one core (two small models trained for 3 epochs on digits), and about 1 s for each clamp
test (a MobileNet-style block and clamp chains at three activation grids: random weights calibrated on
digits, since they check the export's arithmetic, not a trained model's accuracy). onnx and onnxruntime are
imported by a fixture, when the first test runs, not when the file is collected (about 1.3 s).
"""
import copy
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.onnx import export
from fxcompress.onnx import respellings
from fxcompress.onnx.qdq import QuantizeDequantize, quantize_dequantize
from fxcompress.errors import ConfigError, MissingDependencyError, PreconditionError
from fxcompress.passes import ActivationConfig, FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerToEncoded, LowerToInteger
from fxcompress.kernels import native
from fxcompress.quant import ActivationQuant, set_quantization
from fxcompress.zoo import LeNet5
from small_lenet import SmallLeNet


FLOAT_ATOL = 1e-5
INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "QLinearAdd"}
WEIGHT_BITS = 8 if native.vnni() else 7  # ORT's u8 x s8 kernels saturate at 8 / 8 bits without VNNI


MODELS = ("lenet5", "resnet")  # conftest's DIGITS_MODELS, trained once per session (trained_digits)


@pytest.fixture(scope="module", autouse=True)
def onnx_modules():
    """(onnx, onnxruntime), or every test of the file skips with the missing one's reason."""
    return (pytest.importorskip("onnx", reason="the onnx extra is not installed"),
            pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) is not installed"))


@pytest.fixture(scope="module")
def onnx(onnx_modules):
    return onnx_modules[0]


@pytest.fixture
def digits(trained_digits):
    return trained_digits.data


@pytest.fixture(scope="module")
def encoded():
    x = torch.randn(2, 1, 8, 8)
    torch.manual_seed(0)
    # LeNet-5's layer kinds at 3 K weights: the export's names, batch axis and agreement do not depend on the
    # size, and each to_onnx decodes the whole model first (0.2 s for LeNet-5's 131 K weights)
    model = SmallLeNet(conv1=(20, 5), conv2=(8, 3), hidden=32).eval()
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=5, method="kmeans"),
                                    LowerToEncoded()], example_inputs=(x,))
    return gm, x


def _session(path, optimized=None):
    import onnxruntime as ort  # present: the autouse fixture skipped the file otherwise
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns that an optimized model is machine-specific: known
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_float_model_has_named_inputs_a_dynamic_batch_and_runs_at_two_batch_sizes(encoded, tmp_path, onnx):
    gm, x = encoded
    export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["x"]  # the placeholder's name, not an auto-name
    assert [o.name for o in model.graph.output] == ["output"]
    assert _dims(model.graph.input[0]) == ["batch", 1, 8, 8] and _dims(model.graph.output[0]) == ["batch", 10]
    assert model.opset_import[0].version == export.DEFAULT_OPSET
    session, dense = _session(tmp_path / "m.onnx"), fxcompress.decode(gm)
    for batch in (1, 7):
        inputs = torch.randn(batch, 1, 8, 8)
        (got,) = session.run(None, {"x": inputs.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, dense(inputs).numpy(), rtol=0, atol=FLOAT_ATOL)


def test_chosen_names_opset_and_a_fixed_batch(encoded, tmp_path, onnx):
    gm, x = encoded
    export.to_onnx(gm, tmp_path / "m.onnx", (x,), input_names=["image"], output_names=["logits"],
                   dynamic_batch=False, opset=13)
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 13
    assert _dims(model.graph.input[0]) == [2, 1, 8, 8] and model.graph.output[0].name == "logits"
    session = _session(tmp_path / "m.onnx")
    assert session.run(["logits"], {"image": x.numpy()})[0].shape == (2, 10)
    with pytest.raises(Exception, match="dimension"):  # the batch is the example's when not dynamic
        session.run(None, {"image": torch.randn(3, 1, 8, 8).numpy()})


@pytest.mark.parametrize("options, match", [
    ({"input_names": ["a", "b"]}, r"input_names gives 2 names \['a', 'b'\] but the model has 1"),
    ({"input_names": "x"}, "input_names must be a list of strings"),
    ({"output_names": [""]}, r"output_names: \[''\] are not names"),
    ({"output_names": [3]}, r"output_names: \[3\] are not names"),
    ({"input_names": ["y"], "output_names": ["y"]}, r"\['y'\] name both an input and an output"),
    ({"opset": 9}, r"to_onnx.opset must be an int in \[13, 20\], got 9"),
    ({"dynamic_batch": "yes"}, "to_onnx.dynamic_batch"),
])
def test_bad_options_are_config_errors_naming_the_field(encoded, tmp_path, options, match):
    gm, x = encoded
    with pytest.raises(ConfigError, match=match):
        export.to_onnx(gm, tmp_path / "m.onnx", (x,), **options)
    assert not (tmp_path / "m.onnx").exists()


def test_repeated_names_and_wrong_inputs(encoded, tmp_path, onnx):
    gm, x = encoded

    class Two(nn.Module):
        def forward(self, a, b):
            return a + b, a * b

    two = fxcompress.compile(Two(), [], example_inputs=(x, x))
    with pytest.raises(ConfigError, match=r"output_names repeats \['o'\]"):
        export.to_onnx(two, tmp_path / "m.onnx", (x, x), output_names=["o", "o"])
    with pytest.raises(ConfigError, match="example_inputs holds 1 tensors but the model takes 2"):
        export.to_onnx(two, tmp_path / "m.onnx", (x,))
    export.to_onnx(two, tmp_path / "two.onnx", (x, x))
    model = onnx.load(str(tmp_path / "two.onnx"))
    assert [i.name for i in model.graph.input] == ["a", "b"]
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]


def test_missing_onnx_is_a_typed_error(encoded, tmp_path, monkeypatch):
    gm, x = encoded
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"to_onnx needs onnx: pip install 'fxcompress\[onnx\]'"):
        export.to_onnx(gm, tmp_path / "m.onnx", (x,))


_FAKE_QUANT: dict = {}


@pytest.fixture
def fake_quant(trained_digits):
    """The fake-quant form of a trained digits model, made once per (model, weight bits, activation bits)."""
    def make(name, weight_bits=WEIGHT_BITS, activation_bits=8):
        key = (name, weight_bits, activation_bits)
        if key not in _FAKE_QUANT:
            x = trained_digits.data.train_x[:256]
            quantize = InsertFakeQuant(method="linear", bits=weight_bits, symmetric=True, per_channel=True,
                                       activations=ActivationConfig(bits=activation_bits, joins=True))
            _FAKE_QUANT[key] = fxcompress.compile(trained_digits.model(name), [FoldBatchNorm(), quantize],
                                                  example_inputs=(x[:2],),
                                                  calibration_data=[x[i:i + 64] for i in range(0, 256, 64)])
        return _FAKE_QUANT[key]
    return make


@pytest.mark.parametrize("name", MODELS)
def test_int8_qdq_model_runs_on_ort_int8_kernels_and_agrees_with_ours(trained_digits, fake_quant, digits, name,
                                                                     tmp_path, onnx):
    fq = fake_quant(name)
    x = digits.test_x
    export.to_onnx_int8(fq, tmp_path / "q.onnx", (x[:2],))
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 2
    weights = {i.name: i for i in model.graph.initializer}
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights.values())  # int8 weight codes are stored
    assert not any(w.data_type == onnx.TensorProto.FLOAT and len(w.dims) == 4 for w in weights.values())
    session = _session(tmp_path / "q.onnx", optimized=tmp_path / "opt.onnx")
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    convs = sum(isinstance(m, nn.Conv2d) for m in trained_digits.model(name).modules())
    assert fused["QLinearConv"] == convs and fused["Conv"] == 0  # every conv runs on ORT's int8 kernel
    assert fused["QGemm"] + fused["QLinearMatMul"] + fused["MatMulInteger"] >= 1
    qdq = quantize_dequantize(fq)
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    for batch in (x[:1], x):
        (got,) = session.run(None, {"x": batch.numpy()})
        with torch.no_grad():
            ours, fake, integer = qdq(batch).numpy(), fq(batch).numpy(), reference(batch).numpy()
        step = (fake.max() - fake.min()) / 255  # one step of an 8-bit grid over the logits
        exact_rows = (np.abs(got - ours).max(1) <= 5e-6).mean()  # ORT rounds acc * (s_in s_w / s_out), we x / s
        assert exact_rows >= 0.98 and np.abs(got - ours).max() <= step
        assert np.abs(got - fake).max() <= step and np.abs(got - integer).max() <= step
    assert (got.argmax(1) == fake.argmax(1)).mean() >= 0.995 and (got.argmax(1) == integer.argmax(1)).mean() >= 0.995
    assert (got.argmax(1) == digits.test_y.numpy()).mean() >= 0.85  # trained, not a constant


def test_seven_bit_activation_grids_clip_their_codes_and_layers_stay_int8(fake_quant, digits, tmp_path, onnx):
    fq = fake_quant("lenet5", weight_bits=8, activation_bits=7)
    x = digits.test_x * 1.5  # beyond the calibrated range: the grid's clamp at code 127 must hold
    export.to_onnx(fq, tmp_path / "q.onnx", (x[:2],), quantized=True)
    model = onnx.load(str(tmp_path / "q.onnx"))
    codes = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    grids = sum(isinstance(m, ActivationQuant) for m in fq.modules())
    # every 7-bit grid clips its uint8 codes after QuantizeLinear (a layer whose output reaches a grid through
    # ReLU and max pooling has such a QDQ of its own): an integer Clip, so ORT still fuses each layer
    assert grids >= 4 and len(clips) >= grids and all(n.input[0] in codes for n in clips)
    session = _session(tmp_path / "q.onnx", optimized=tmp_path / "opt.onnx")
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["QLinearConv"] == 2 and fused["Conv"] + fused["FusedConv"] == 0
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ours = quantize_dequantize(fq)(x).numpy()
    assert (np.abs(got - ours).max(1) <= 5e-6).mean() >= 0.98  # codes at a rounding tie may move by one
    assert np.abs(got - ours).max() <= (ours.max() - ours.min()) / 255


def test_int8_export_refuses_what_qdq_cannot_hold(fake_quant, digits, tmp_path):
    x = digits.train_x[:64]
    model = LeNet5(1, 8).eval()
    kmeans = fxcompress.compile(model, [InsertFakeQuant(bits=4, method="kmeans")], example_inputs=(x,))
    with pytest.raises(PreconditionError, match="layer 'conv1' has a KMeansWeight weight"):
        export.to_onnx_int8(kmeans, tmp_path / "q.onnx", (x,))
    wide = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=12)], example_inputs=(x,))
    with pytest.raises(PreconditionError, match=r"layer 'conv1' has 12-bit weight codes \[0, 4095\]"):
        export.to_onnx_int8(wide, tmp_path / "q.onnx", (x,))
    switched_off = copy.deepcopy(fake_quant("lenet5"))
    set_quantization(switched_off, False, weights=False)  # the activation grids no longer apply
    with pytest.raises(PreconditionError, match="activation fake-quant 'conv1.input_quant' is disabled"):
        export.to_onnx_int8(switched_off, tmp_path / "q.onnx", (x,))
    with pytest.raises(PreconditionError, match="no activation or weight fake-quant"):
        export.to_onnx_int8(fxcompress.compile(model, [], example_inputs=(x,)), tmp_path / "q.onnx", (x,))


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_native_lowered_model_is_refused_by_module(fake_quant, digits, tmp_path):
    fq = fake_quant("lenet5", weight_bits=8, activation_bits=7)
    lowered = fxcompress.compile(fq, [LowerToInteger(backend="native")], example_inputs=(digits.train_x[:2],))
    with pytest.raises(PreconditionError, match="module 'conv1.input_quant' \\(QuantizeToCodes\\) runs oneDNN"):
        export.to_onnx(lowered, tmp_path / "m.onnx", (digits.train_x[:2],))


def _conv_bn(cin, cout, kernel, groups=1, relu6=True):
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6()] if relu6 else layers


class MobileNetBlock(nn.Module):
    """A stem and one of MobileNetV2's inverted residual blocks on 8x8 digits: 1x1 expansion, 3x3 depthwise and
    1x1 projection, each conv -> BN (folded) -> ReLU6 but the projection, then the residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, 8, 3))
        self.block = nn.Sequential(*_conv_bn(8, 32, 1), *_conv_bn(32, 32, 3, groups=32),
                                   *_conv_bn(32, 8, 1, relu6=False))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(F.adaptive_avg_pool2d(x + self.block(x), 1).flatten(1))


class ClampChain(nn.Module):
    """Convolutions each followed by a clamp spelled another way (ReLU6 module, F.hardtanh, a one-sided
    Tensor.clamp, torch.clamp at bounds off any grid); no biases, so our QDQ model is the fake-quant model."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin, 8, 3, padding=1, bias=False) for cin in (1, 8, 8, 8))
        self.relu6, self.fc = nn.ReLU6(), nn.Linear(8 * 8 * 8, 10, bias=False)

    def forward(self, x):
        x = F.hardtanh(self.convs[1](self.relu6(self.convs[0](x))), -0.5, 0.5)
        x = torch.clamp(self.convs[3](self.convs[2](x).clamp(min=-0.1)), -0.3, 0.25)
        return self.fc(x.flatten(1))


def _random_fake_quant(model, digits, activations):
    """`model` with random weights (BatchNorm statistics from the calibration batches) quantized with
    `activations`: the test checks the export's arithmetic, which needs no training."""
    torch.manual_seed(0)
    x = digits.train_x[:128]
    calibration = [x[:64], x[64:]]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # a cumulative average over the batches
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.4)
        for batch in calibration:
            model.train()(batch)
    quantize = InsertFakeQuant(method="linear", bits=WEIGHT_BITS, symmetric=True, per_channel=True,
                               activations=activations)
    return fxcompress.compile(model.eval(), [FoldBatchNorm(), quantize], example_inputs=(x[:2],),
                              calibration_data=calibration)


def _ort_int8(fq, x, tmp_path, onnx):
    """Our QDQ export of `fq` run by ONNX Runtime on `x`: its outputs, and the op counts of the exported
    model and of ORT's optimized one."""
    export.to_onnx_int8(fq, tmp_path / "q.onnx", (x[:2],))
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    session = _session(tmp_path / "q.onnx", optimized=tmp_path / "opt.onnx")
    (got,) = session.run(None, {"x": x.numpy()})
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    return got, Counter(n.op_type for n in model.graph.node), fused


def test_int8_qdq_keeps_mobilenet_relu6_chains_integer(digits, tmp_path, onnx):
    model = MobileNetBlock()
    fq = _random_fake_quant(model, digits, ActivationConfig(bits=8, joins=True))
    assert sum(isinstance(m, nn.ReLU6) for m in fq.modules()) == 3
    x = digits.test_x
    got, ops, fused = _ort_int8(fq, x, tmp_path, onnx)
    # each ReLU6's codes are its grid's ends (0 and >= 255 on a grid calibrated after it): the grid's own
    # saturation, so the export holds no Clip and every conv writes straight into QuantizeLinear
    assert ops["Clip"] == 0 and ops["Conv"] == 4 and fused["Clip"] == 0
    assert fused["QLinearConv"] == 4 and fused["Conv"] + fused["FusedConv"] == 0  # every conv on ORT's int8 kernel
    with torch.no_grad():
        ours = quantize_dequantize(fq)(x).numpy()
    step = (ours.max() - ours.min()) / 255  # one 8-bit step over the logits
    assert (np.abs(got - ours).max(1) <= 5e-6).mean() >= 0.98 and np.abs(got - ours).max() <= step
    assert (got.argmax(1) == ours.argmax(1)).mean() >= 0.995


@pytest.mark.parametrize("bits, symmetric", [(8, False), (7, False), (8, True)])
def test_clamps_run_on_codes_between_int8_convs_and_change_no_value(digits, tmp_path, onnx, bits, symmetric):
    """Asymmetric grids calibrated after a clamp saturate where it does (hardtanh's -0.5 rounds to the grid's
    first code), so the clamp goes; a 7-bit grid's range and a clamp inside a symmetric grid (ReLU6's 0)
    become the range of the codes the conv writes: a Clip of uint8 codes, or of int8 codes' values between
    DequantizeLinear and QuantizeLinear (ORT fuses int8 activations only in Q -> DQ pairs). Bias-free layers:
    our QDQ model equals the fake-quant model exactly, also beyond the calibrated range, where the clamps
    and grids saturate."""
    fq = _random_fake_quant(ClampChain(), digits, ActivationConfig(bits=bits, symmetric=symmetric))
    x = digits.test_x * 1.5
    got, ops, fused = _ort_int8(fq, x, tmp_path, onnx)
    with torch.no_grad():
        ours, fake = quantize_dequantize(fq)(x), fq(x)
    assert torch.equal(ours, fake)
    ours = ours.numpy()
    assert (np.abs(got - ours).max(1) <= 5e-6).mean() >= 0.98
    assert np.abs(got - ours).max() <= (ours.max() - ours.min()) / 255
    assert (got.argmax(1) == ours.argmax(1)).mean() >= 0.995
    assert fused["QLinearConv"] == 4 and fused["Conv"] + fused["FusedConv"] == 0
    if (bits, symmetric) == (8, False):  # every clamp is its grid's saturation
        assert ops["Clip"] == 0 and fused["DequantizeLinear"] == 0
    elif not symmetric:  # each uint8 grid clips its codes, an integer op between the int8 layers
        assert ops["Clip"] >= 5 and fused["DequantizeLinear"] == 0


class _OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)


def test_int8_export_of_a_channel_of_zero_weights_keeps_its_bias_fine(tmp_path, onnx):
    """A pruned channel's weight step is free (its codes are zero): its grid gives it the largest of the others,
    so its int32 bias is not rounded to a whole input step (0.37 of one off here with a step of 1)."""
    torch.manual_seed(0)
    model, x = _OneLinear().eval(), torch.rand(64, 6) * 4
    with torch.no_grad():
        model.fc.weight[1] = 0.0
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                    activations=ActivationConfig(bits=8))],
                            example_inputs=(x[:2],), calibration_data=[x])
    step = next(m for m in fq.modules() if isinstance(m, ActivationQuant)).grid().scale.item()
    with torch.no_grad():
        fq.get_parameter("fc.bias")[1] = 7.37 * step
    got, _, _ = _ort_int8(fq, x, tmp_path, onnx)
    assert abs(got[:, 1] - 7.37 * step).max() <= 0.01 * step
    with torch.no_grad():
        expected = fq(x).numpy()
    assert abs(got - expected).max() <= (expected.max() - expected.min()) / 255


class _TransposedConv(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.up, self.fc = nn.ConvTranspose2d(4, 6, 3, groups=groups), nn.Linear(6 * 10 * 10, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.up(x)).flatten(1))


@pytest.mark.parametrize("per_channel, groups", [(False, 1), (True, 1), (True, 2)])
def test_int8_export_of_a_transposed_conv_with_a_bias(tmp_path, onnx, per_channel, groups):
    """A transposed convolution's weight is (in, out / groups, ...): its bias's accumulator scales are one per
    output channel (they were taken from the weight's first dim, the inputs, and the export crashed), and its
    per-channel grid is on axis 1, where DequantizeLinear dequantizes it."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 8, 8)
    fq = fxcompress.compile(_TransposedConv(groups).eval(),
                            [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=per_channel,
                                             activations=ActivationConfig(bits=8))],
                            example_inputs=(x[:2],), calibration_data=[x[:8], x[8:]])
    assert fq.get_submodule("up.weight_quant").axis == (1 if per_channel else None)
    export.to_onnx_int8(fq, tmp_path / "q.onnx", (x[:2],))
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    session = _session(tmp_path / "q.onnx")
    for batch in (1, 5):
        other = torch.randn(batch, 4, 8, 8)
        (got,) = session.run(None, {"x": other.numpy()})
        with torch.no_grad():
            expected = fq(other).numpy()
        assert got.shape == expected.shape and abs(got - expected).max() <= (expected.max() - expected.min()) / 255


class _EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(10, 8), nn.Linear(8, 3)

    def forward(self, tokens):
        return self.fc(self.embed(tokens).mean(dim=1))


def test_int8_export_of_an_embedding_with_a_grid_per_column(tmp_path, onnx):
    """An embedding's per-channel grid is on its columns (axis 1): the table dequantizes on that axis and its rows
    are gathered from it (it was refused as not axis 0, which only conv and Gemm weights need for their bias)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 10, (16, 5))
    fq = fxcompress.compile(_EmbeddingBag().eval(),
                            [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                             activations=ActivationConfig(bits=8))],
                            example_inputs=(tokens[:2],), calibration_data=[tokens])
    assert fq.get_submodule("embed.weight_quant").axis == 1
    export.to_onnx_int8(fq, tmp_path / "q.onnx", (tokens[:2],))
    model = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(model, full_check=True)
    axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert 1 in axes
    (got,) = _session(tmp_path / "q.onnx").run(None, {"tokens": tokens.numpy()})
    with torch.no_grad():
        expected = fq(tokens).numpy()
    assert abs(got - expected).max() <= (expected.max() - expected.min()) / 255


class _TiedLM(nn.Module):
    """Token embedding, a conv-free body and a head tied to the embedding: every lowered linear form's shapes."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(32, 16), nn.Linear(16, 16), nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.fc(self.embed(tokens))))


def _lowered(form):
    from fxcompress.passes import LowerDynamicInt8, LowerToSparse, LowerWeightOnly
    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (2, 5))
    grid = InsertFakeQuant(method="linear", bits=4, symmetric=True, per_channel=True, group_size=8,
                           types=("linear", "embedding"))
    passes = {"sparse": [InsertMasks(sparsity=0.9), LowerToSparse(kernels=("scipy_csr",), repeats=1)],
              "weight-only": [grid, LowerWeightOnly(kernels=("int4pack",), repeats=1)],
              "dynamic int8": [LowerDynamicInt8(kernels=("fbgemm",), repeats=1)]}[form]
    return fxcompress.compile(_TiedLM().eval(), passes, example_inputs=(tokens,)), tokens


@pytest.mark.parametrize("form", ["sparse", "weight-only", "dynamic int8"])
def test_lowered_linear_forms_decode_to_float_layers_that_export(form, tmp_path):
    """decode replaces a lowered layer by the float layer it computes (to_onnx used to trace the kernels: an untyped
    RuntimeError from fbgemm's packed weight, an unsupported operator from the weight-only ones)."""
    gm, tokens = _lowered(form)
    kinds = {type(m).__name__ for m in gm.modules()}
    assert kinds & {"SparseLayer", "WeightOnlyLinear", "WeightOnlyEmbedding", "DynamicInt8Linear"}
    dense = fxcompress.decode(gm)
    assert not {type(m).__name__ for m in dense.modules()} & {"SparseLayer", "WeightOnlyLinear",
                                                               "WeightOnlyEmbedding", "DynamicInt8Linear"}
    with torch.no_grad():
        expected, got = gm(tokens), dense(tokens)
    # the sparse and weight-only kernels compute with these very weights; dynamic int8 also rounds its input
    tolerance = 0.05 if form == "dynamic int8" else 1e-5
    assert float((got - expected).abs().max()) <= tolerance * float(expected.abs().max())
    export.to_onnx(gm, tmp_path / "m.onnx", (tokens,))
    (onnx_out,) = _session(tmp_path / "m.onnx").run(None, {"tokens": tokens.numpy()})
    np.testing.assert_allclose(onnx_out, got.numpy(), rtol=0, atol=FLOAT_ATOL)


class _RoutedRows(nn.Module):
    """Rows sorted by a router and split at counts read from the data, as a mixture of experts splits them."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        order = torch.argsort(self.router(x)[:, 0])
        count = (self.router(x)[:, 0] < 0).sum().item()
        rows = x[order]
        return torch.cat([self.a(rows[:count]), self.b(rows[count:])])


def test_rows_split_at_counts_read_from_the_data_follow_the_data_in_the_file(tmp_path):
    """The exporter traces once: the row count became a constant of the example and another input ran on the
    example's split (a Mixtral's logits left the model's by 0.016 on other tokens). The count stays a tensor in
    the file (`row_groups`), so each input is split where its own router splits it."""
    import onnxruntime
    torch.manual_seed(0)
    example = torch.randn(8, 4)
    gm = fxcompress.compile(_RoutedRows().eval(), [], example_inputs=(example,))
    export.to_onnx(gm, tmp_path / "m.onnx", (example,))
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"))
    low_rows = set()
    for x in (example, -example, torch.randn(3, 4), torch.randn(20, 4) * 5):
        with torch.no_grad():
            expected = gm(x)
            low_rows.add(int((gm.router(x)[:, 0] < 0).sum()))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)
    assert len(low_rows) == 4  # each input split at another count than the example's


class _SizedByData(nn.Module):
    """A count read from the data used as the size of a new tensor: no tensor can stand for it in the export."""

    def forward(self, x):
        count = (x[:, 0] > 0).sum().item()
        return torch.cat([x[:count], x.new_zeros(count, x.shape[1])])


def test_sizes_read_from_the_data_for_anything_else_are_refused_not_fixed_at_the_example(tmp_path):
    gm = fxcompress.compile(_SizedByData(), [], example_inputs=(torch.randn(8, 4),))
    with pytest.raises(ConfigError, match="reads tensor values as sizes"):
        export.to_onnx(gm, tmp_path / "m.onnx", (torch.randn(8, 4),))
    assert not (tmp_path / "m.onnx").exists()


class _PackedSequences(nn.Module):
    """Hugging Face's packed-sequence detection (transformers 5's attention masks): the diff of position ids and
    the cumsum of a bool tensor, two calls the TorchScript exporter cannot write as torch makes them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        positions = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
        starts = torch.diff(positions, dim=-1, prepend=positions[:, :1] - 1) != 1
        sequence = starts.cumsum(-1)  # the method spelling: bool counted as int64
        return self.fc(x) * sequence.unsqueeze(-1) + torch.cumsum(x > 0, 1)


def test_calls_the_exporter_lacks_are_respelled_and_run_at_any_batch(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm = fxcompress.compile(_PackedSequences().eval(), [], example_inputs=(x,))
    export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    assert {"diff", "cumsum"} <= {getattr(n.target, "__name__", n.target) for n in gm.graph.nodes}  # gm untouched
    session = _session(tmp_path / "m.onnx")
    for batch in (2, 3):
        other = torch.randn(batch, 5, 6)
        (out,) = session.run(None, {"x": other.numpy()})
        np.testing.assert_allclose(out, gm(other).detach().numpy(), rtol=0, atol=FLOAT_ATOL)


def test_an_operator_the_exporter_lacks_is_a_config_error_naming_its_node(tmp_path):
    class Cumulative(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.logcumsumexp(self.fc(x), -1)

    gm = fxcompress.compile(Cumulative().eval(), [], example_inputs=(torch.randn(2, 4),))
    with pytest.raises(ConfigError, match=r"aten::logcumsumexp.*node 'logcumsumexp' \(.*test_export.py"):
        export.to_onnx(gm, tmp_path / "m.onnx", (torch.randn(2, 4),))
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", ["llama", "cohere", "mixtral", "jetmoe", "deepseek_v3", "qwen3_next"])
def test_transformers_models_run_in_onnx_runtime_at_other_batch_sizes_and_lengths(name, tmp_path, onnx):
    """transformers 5's Llama masks take torch.diff and a bool cumsum: the export failed with torch's untyped
    UnsupportedOperatorError before they were respelled; Cohere's rotary embedding repeats elements
    (repeat_interleave), which the exporter wrote so that ONNX Runtime failed at every batch size. Mixtures of
    experts were refused: Mixtral's rows per expert are read from the data (`tolist`, counted by histc, which ONNX
    lacks), JetMoE's too (`item`), and JetMoE sums each token's experts with index_add, which the exporter wrote
    as an assignment (one expert's rows lost). DeepSeek-V3 writes its keys into slices of an empty tensor, which
    the exporter lost (`writes_into_views_as_setitem`). Qwen3-Next's gated delta rule (tensor_split, eye, its
    chunked recurrence) at a symbolic length. Each batch below routes its tokens otherwise."""
    pytest.importorskip("transformers")
    from hfmodels import build, logits
    model, tokens, _ = build(name)
    gm = fxcompress.compile(model, [], example_inputs=(tokens,))
    export.to_onnx(gm, tmp_path / "model.onnx", (tokens,), output_names=["logits"],
                   dynamic_axes={"input_ids": {1: "length"}})
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [_dims(value) for value in (*graph.input, *graph.output)] == [["batch", "length"], ["batch", "length", 100]]
    session = _session(tmp_path / "model.onnx")
    for batch, length in ((1, 8), (2, 8), (3, 8), (3, 5), (1, 13)):
        other = torch.randint(3, 100, (batch, length))
        (out,) = session.run(["logits"], {"input_ids": other.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(out, logits(gm(other)).numpy(), rtol=0, atol=FLOAT_ATOL)


class _Flatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.reshape(x.shape[0], -1))


def test_a_graph_holding_the_example_batch_is_refused_a_symbolic_batch(tmp_path):
    """A program exported with static shapes writes the example's batch into its reshape: the file claimed a
    symbolic batch that ONNX Runtime then refused at run time with a reshape error."""
    x = torch.randn(2, 3, 4)
    program = torch.export.export(_Flatten().eval(), (x,))
    gm = fxcompress.compile(program, [], example_inputs=(x,))
    with pytest.raises(ConfigError, match=r"does not run a batch other than the example's \[2\].*dynamic_batch=False"):
        export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    assert not (tmp_path / "m.onnx").exists()
    export.to_onnx(gm, tmp_path / "m.onnx", (x,), dynamic_batch=False)
    (out,) = _session(tmp_path / "m.onnx").run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out, gm(x).detach().numpy(), rtol=0, atol=FLOAT_ATOL)
    free = fxcompress.compile(_Flatten().eval(), [], example_inputs=(x,))  # exported by compile: a free batch
    export.to_onnx(free, tmp_path / "free.onnx", (x,))
    (out,) = _session(tmp_path / "free.onnx").run(None, {"x": torch.randn(5, 3, 4).numpy()})
    assert out.shape == (5, 3)


def test_dynamic_axes_the_graph_holds_or_that_name_no_input_are_refused(tmp_path):
    x = torch.randn(2, 3, 4)
    gm = fxcompress.compile(_Flatten().eval(), [], example_inputs=(x,))  # its linear layer holds 3 * 4 features
    with pytest.raises(ConfigError, match=r"does not run the example grown along them .*hold the example's"):
        export.to_onnx(gm, tmp_path / "m.onnx", (x,), dynamic_axes={"x": {1: "rows"}})
    for axes, match in [({"y": {1: "rows"}}, "no input of the model"), ({"x": {3: "rows"}}, "axes of its 3 dims"),
                        ({"x": {1: ""}}, "axes of its 3 dims"), ([1], "must be a dict")]:
        with pytest.raises(ConfigError, match=match):
            export.to_onnx(gm, tmp_path / "m.onnx", (x,), dynamic_axes=axes)
    assert list(tmp_path.iterdir()) == []


def test_an_output_axis_that_follows_a_dynamic_input_axis_is_named_after_it(tmp_path, onnx):
    class PerRow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x), self.fc(x).sum(1)

    x = torch.randn(2, 3, 4)
    gm = fxcompress.compile(PerRow().eval(), [], example_inputs=(x,))
    export.to_onnx(gm, tmp_path / "m.onnx", (x,), dynamic_axes={"x": {1: "rows"}})
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [_dims(value) for value in (*graph.input, *graph.output)] == [["batch", "rows", 4], ["batch", "rows", 2],
                                                                         ["batch", 2]]
    other = torch.randn(5, 7, 4)
    got = _session(tmp_path / "m.onnx").run(None, {"x": other.numpy()})
    for a, b in zip(got, gm(other)):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=0, atol=FLOAT_ATOL)


def test_outputs_without_the_batch_first_are_refused_a_symbolic_batch(tmp_path):
    class Pooled(nn.Module):
        def forward(self, x):
            return x.sum(0)

    gm = fxcompress.compile(Pooled(), [], example_inputs=(torch.randn(2, 4),))
    with pytest.raises(ConfigError, match="outputs do not grow with it"):
        export.to_onnx(gm, tmp_path / "m.onnx", (torch.randn(2, 4),))
    export.to_onnx(gm, tmp_path / "m.onnx", (torch.randn(2, 4),), dynamic_batch=False)


def _counting_from_one(input, dim, dtype=None):
    return respellings.cumsum_counting(input, dim, dtype) + 1  # an exporter's translation that computes something else


def test_a_file_that_computes_otherwise_than_the_graph_is_refused_and_not_left(tmp_path, monkeypatch):
    """to_onnx runs the file it wrote in ONNX Runtime (at the example and one more batch row): the TorchScript exporter
    translates op by op and wrote transformers 5's Cohere wrongly (ONNX Runtime failed at every batch size)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    gm = fxcompress.compile(_PackedSequences().eval(), [], example_inputs=(x,))
    monkeypatch.setitem(respellings.ONNX_RESPELLINGS, torch.cumsum, _counting_from_one)
    with pytest.raises(ConfigError, match=r"output 'output' of the exported model on x \(2, 5, 6\) differs"):
        export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    assert list(tmp_path.iterdir()) == []  # neither the file nor the partial one beside it
    monkeypatch.setitem(respellings.ONNX_RESPELLINGS, torch.cumsum, respellings.cumsum_counting)
    export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("got, ok", [([1.0, NAN, INF], True), ([1.0005, NAN, INF], True), ([1.01, NAN, INF], False),
                                     ([1.0, 0.0, INF], False), ([NAN, NAN, INF], False)])
def test_the_runtime_check_compares_values_where_finite_and_non_finite_values_exactly(got, ok):
    from fxcompress.onnx.runtime_check import _same
    assert _same(np.array(got, dtype=np.float32), torch.tensor([1.0, NAN, INF])) is ok


class _WideBatchBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * 2 if x.shape[0] > 4 else self.fc(x)


def test_a_symbolic_axis_the_graph_takes_only_in_a_range_is_refused(tmp_path):
    """torch.export traced this model for batches of 1 to 4 (the graph checks them: `frontends.guards`); a file with
    a symbolic batch would compute that branch at every batch, so it is refused, and a fixed batch is written."""
    x = torch.randn(3, 4)
    gm = fxcompress.compile(_WideBatchBranch().eval(), [], example_inputs=(x,))
    with pytest.raises(ConfigError, match=r"input 'x' is symbolic along axis 0 \('batch'\).*sizes 1 to 4 there "
                                          "and runs a size of 5"):
        export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    assert not (tmp_path / "m.onnx").exists()
    export.to_onnx(gm, tmp_path / "m.onnx", (x,), dynamic_batch=False)
    session = _session(tmp_path / "m.onnx")
    (out,) = session.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(out, gm(x).detach().numpy(), rtol=0, atol=FLOAT_ATOL)


class _DilatedSame(nn.Module):
    """A TCN-style stack: dilated convolutions with padding="same", as a module (odd kernel: 2 zeros each side) and
    as F.conv1d (an even kernel at an odd dilation: 9 zeros, 4 before and 5 after, as torch pads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 6, 3, padding="same", dilation=2)
        self.kernel = nn.Parameter(torch.randn(6, 6, 4) * 0.2)
        self.fc = nn.Linear(6 * 16, 4)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.fc(torch.relu(F.conv1d(y, self.kernel, padding="same", dilation=3)).flatten(1))


@pytest.mark.parametrize("quantized", [False, True])
def test_dilated_convolutions_with_same_padding_run_in_onnx_runtime(tmp_path, onnx, quantized):
    """The exporter wrote padding="same" as auto_pad=SAME_UPPER, which ONNX Runtime refuses for a dilated
    convolution (float Conv and QLinearConv alike), so the export failed at every input; the exported copy takes
    explicit pads (`respellings.conv1d_same_padded`)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16)
    passes = [InsertFakeQuant(method="linear", bits=WEIGHT_BITS, symmetric=True, per_channel=True,
                              activations=ActivationConfig(bits=8))] if quantized else []
    gm = fxcompress.compile(_DilatedSame().eval(), passes, example_inputs=(x[:2],), calibration_data=[x])
    export.to_onnx(gm, tmp_path / "m.onnx", (x[:2],), quantized=quantized)
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert not [a for n in model.graph.node for a in n.attribute if a.name == "auto_pad"]
    session = _session(tmp_path / "m.onnx")
    for batch in (x[:2], torch.randn(5, 3, 16)):
        (got,) = session.run(None, {"x": batch.numpy()})
        with torch.no_grad():
            expected = gm(batch).numpy()
        if quantized:  # the bias rounded to the accumulator's scale: within one 8-bit step of the logits' range
            assert np.abs(got - expected).max() <= (expected.max() - expected.min()) / 255
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=FLOAT_ATOL)


class _FunctionalLinear(nn.Module):
    """A layer that is a parameter of the root read by F.linear (its layer is named after the parameter, 'w')."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(8, 6) * 0.3), nn.Parameter(torch.randn(8) * 0.1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.relu(F.linear(x, self.w, self.b)))


def test_int8_export_of_a_layer_that_is_a_parameter_read_by_a_functional_call(tmp_path, onnx):
    """Its Dequantize modules went inside the layer's name, a parameter that holds no submodule: torch's
    AttributeError ("`w` is not an nn.Module") came out of to_onnx_int8. They go beside it now."""
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    fq = fxcompress.compile(_FunctionalLinear().eval(),
                            [InsertFakeQuant(method="linear", bits=WEIGHT_BITS, symmetric=True, per_channel=True,
                                             activations=ActivationConfig(bits=8))],
                            example_inputs=(x[:2],), calibration_data=[x])
    qdq = quantize_dequantize(fq)
    assert {"w_weight_dequantize", "w_bias_dequantize", "fc.weight_dequantize"} <= dict(qdq.named_modules()).keys()
    got, ops, _ = _ort_int8(fq, x, tmp_path, onnx)
    assert ops["DequantizeLinear"] >= 4  # both weights and both biases stored as integer codes
    with torch.no_grad():
        expected = fq(x).numpy()
    assert np.abs(got - expected).max() <= (expected.max() - expected.min()) / 255


class _StridedCircular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.a(x)).flatten(1))


def test_convolutions_with_torch_default_arguments_keep_them_when_respelled(tmp_path, onnx):
    """torch.export writes a convolution without the arguments at torch's defaults (padding 0 after the circular
    pad here); its respelled twin must default to them too (a default of "same" made a strided one fail)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = fxcompress.compile(_StridedCircular().eval(), [], example_inputs=(x,), frontend="export")
    assert any(n.target is torch.conv2d and len(n.args) < 5 and "padding" not in n.kwargs for n in gm.graph.nodes)
    export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    other = torch.randn(5, 3, 8, 8)
    (got,) = _session(tmp_path / "m.onnx").run(None, {"x": other.numpy()})
    np.testing.assert_allclose(got, gm(other).detach().numpy(), rtol=0, atol=FLOAT_ATOL)


def _corrupting_export(corrupt):
    """torch.onnx.export, then `corrupt` applied to the written model: a file that computes otherwise than the
    graph it was exported from, as a wrong translation of the exporter would write it."""
    import onnx as onnx_module
    real = torch.onnx.export

    def export_then_corrupt(module, args, f, **options):
        real(module, args, f, **options)
        model = onnx_module.load(f)
        corrupt(model)
        onnx_module.save(model, f)
    return export_then_corrupt


def _weight_initializers(model):
    """(codes, scale) initializers of each int8 weight's DequantizeLinear, in the graph's order."""
    import onnx as onnx_module
    initializers = {i.name: i for i in model.graph.initializer}
    return [(initializers[n.input[0]], initializers[n.input[1]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in initializers
            and initializers[n.input[0]].data_type == onnx_module.TensorProto.INT8]


def _negate_first_weight(model):
    from onnx import numpy_helper
    codes, _ = _weight_initializers(model)[0]
    negated = np.clip(-numpy_helper.to_array(codes).astype(np.int16), -128, 127).astype(np.int8)
    codes.CopyFrom(numpy_helper.from_array(negated, codes.name))


def _scale_last_weight(model):
    from onnx import numpy_helper
    _, scale = _weight_initializers(model)[-1]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.5), scale.name))


@pytest.mark.parametrize("corrupt", [_negate_first_weight, _scale_last_weight])
def test_an_int8_file_that_computes_otherwise_than_the_qdq_graph_is_refused_and_not_left(fake_quant, digits, tmp_path,
                                                                                        monkeypatch, corrupt):
    """The int8 file was checked for its output shapes only: a first conv's weight codes of the other sign, or a last
    layer's weight scale 1.5 times too large, were saved silently. ORT's values are held within one step of the last
    activation grids of our QDQ module (`int8_check`), which the right file keeps (it is written after)."""
    monkeypatch.setattr(native, "vnni", lambda: True)  # no saturation hint: that is the next test's
    fq, x = fake_quant("lenet5"), digits.test_x[:2]
    monkeypatch.setattr(torch.onnx, "export", _corrupting_export(corrupt))
    with pytest.raises(ConfigError, match=r"output 'output' of the int8 exported model on x \(2, 1, 8, 8\) differs "
                                          r"from the QDQ graph's in ONNX Runtime at \(\d+, \d+\) by [\d.e+-]+, beyond "
                                          r"one step of its last activation grids") as refused:
        export.to_onnx_int8(fq, tmp_path / "q.onnx", (x,))
    assert "VNNI" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor the partial one beside it
    monkeypatch.undo()
    export.to_onnx_int8(fq, tmp_path / "q.onnx", (x,))
    assert [p.name for p in tmp_path.iterdir()] == ["q.onnx"]


@pytest.mark.parametrize("activation_bits, hint", [(8, True), (7, False)])
def test_an_int8_file_refused_on_a_cpu_without_vnni_says_to_quantize_activations_to_seven_bits(
        fake_quant, digits, tmp_path, monkeypatch, activation_bits, hint):
    """Without VNNI, ORT's uint8 x int8 kernels add pairs of products in int16 and saturate with 8-bit weights and
    8-bit activations: the value check refuses such a file, and its message says what to do. This CPU's kernels
    do not saturate (or, without VNNI, the file would be refused for real): a wrong file stands for the saturated
    one, with the CPU's VNNI detection answering no. With 7-bit activations no pair can pass int16: no hint."""
    monkeypatch.setattr(native, "vnni", lambda: False)
    fq, x = fake_quant("lenet5", weight_bits=8, activation_bits=activation_bits), digits.test_x[:2]
    monkeypatch.setattr(torch.onnx, "export", _corrupting_export(_scale_last_weight))
    with pytest.raises(ConfigError, match="differs from the QDQ graph's") as refused:
        export.to_onnx_int8(fq, tmp_path / "q.onnx", (x,))
    message = str(refused.value)
    assert ("this CPU has no VNNI" in message and "quantize activations to 7 bits" in message
            and "ActivationConfig(bits=7)" in message) is hint
    assert list(tmp_path.iterdir()) == []


class _GridThenLinear(nn.Module):
    """A layer reading a grid's codes, its output quantized by another grid or left float."""

    def __init__(self, quantized_output: bool) -> None:
        super().__init__()
        self.input_grid = QuantizeDequantize(0.1, 0, 0, 255, False)
        self.fc = nn.Linear(4, 3)
        self.output_grid = QuantizeDequantize(0.25, 128, 0, 255, False) if quantized_output else nn.Identity()

    def forward(self, x):
        return self.output_grid(self.fc(self.input_grid(x)))


@pytest.mark.parametrize("quantized_output", [True, False])
def test_the_int8_bound_is_one_step_of_the_last_grids_carried_to_the_output(quantized_output):
    """A quantized output may move by one step of its grid (a code at a rounding tie), a float one by one step of
    each input code carried through the layer (0.1 times the L1 norm of its weight row), each plus the float
    tolerance (1e-3 of the outputs' size, at least 1); twice that is refused, naming the element."""
    from fxcompress.onnx.int8_check import out_of_bounds
    torch.manual_seed(0)
    module, x = _GridThenLinear(quantized_output).eval(), torch.rand(2, 4) * 3
    with torch.no_grad():
        expected = module(x)
    step = torch.full((3,), 0.25) if quantized_output else 0.1 * module.fc.weight.detach().abs().sum(1)
    tolerance = 1e-3 * max(1.0, expected.abs().max().item())
    for factor, refused in ((0.99, False), (2.0, True)):
        got = expected.clone()
        got[1] += factor * step + tolerance * (1 if refused else 0)
        found = out_of_bounds(module, (x,), [got.numpy()], [expected])
        assert (found is not None) is refused
        if refused:
            assert found[0] == 0 and found[1].startswith("at (1, ")
    assert out_of_bounds(module, (x,), [expected.numpy()], [expected]) is None
