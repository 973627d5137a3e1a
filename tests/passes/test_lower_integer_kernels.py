"""LowerToInteger's native backend choosing each layer's kernel (int8 or float) by measurement: float
layers inside an int8 chain, float runs carrying values, the record in stats, summary and files."""
import pytest
import torch
from torch.fx import Interpreter

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.kernels import timing
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger
from fxcompress.passes import lower_integer_native
from fxcompress.kernels import native
from fxcompress.kernels.native import NativeLayer, float_codes
from fxcompress.kernels import q8

pytestmark = pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
C_TIMES = {} if q8.c_library() is None else {"c_int8": 2.5}  # our C kernel is timed where a compiler builds it


def _fake_quant(model, x):
    activations = ActivationConfig(bits=7)  # 7 bits: exact on CPUs without VNNI too
    return fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                      activations=activations)],
                              example_inputs=(x[:2],), calibration_data=[x[i:i + 64] for i in range(0, len(x), 64)])


@pytest.fixture(scope="module")
def lenet5(trained_digits):
    """(data, fake-quant LeNet-5, its reference lowering, that lowering's logits on the test images), built once
    for the module: the tests only read them (compile copies its input)."""
    data = trained_digits.data
    fq = _fake_quant(trained_digits.model("lenet5"), data.train_x[:256])
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(data.train_x[:2],))
    with torch.no_grad():
        return data, fq, reference, reference(data.test_x)


def _inputs(gm, x):
    """The value each NativeLayer node reads, by module path."""
    seen = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), NativeLayer):
                seen[n.target] = self.env[n.args[0]]
            return super().run_node(n)

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


@pytest.mark.parametrize("floats, edges, boundaries", [("conv2", 0, 0), ("fc1|fc2", 1, 0),
                                                       ("conv1|conv2|fc1|fc2", 4, 1)])
def test_float_layers_inside_an_int8_chain_agree_with_the_reference(lenet5, floats, edges, boundaries):
    """A float layer between int8 ones reads and writes their uint8 codes; between float layers (or after
    the float input) the codes stay float32."""
    data, fq, _, expected = lenet5
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("int8",), float_select=floats)],
                            example_inputs=(data.train_x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    kernels = {name: layer["kernel"] for name, layer in stats["layers"].items()}
    names = ("conv1", "conv2", "fc1", "fc2")
    assert kernels == {name: "float" if name in floats.split("|") else "int8" for name in names}
    assert stats["float_code_edges"] == edges
    assert sum(n.target is float_codes for n in gm.graph.nodes) == boundaries
    for path, x in _inputs(gm, data.test_x[:4]).items():  # what each layer reads is what it was built for
        module = gm.get_submodule(path)
        assert x.dtype == (torch.float32 if module.input == "float_codes" else torch.uint8), path
    with torch.no_grad():
        got = gm(data.test_x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255
    assert (got.argmax(1) == data.test_y).float().mean().item() >= 0.85  # trained, not a constant


@pytest.fixture
def rigged(monkeypatch):
    """Kernel timing on a fake clock: int8 costs 1 ms on convolutions and 3 ms on linear layers, float 2 ms,
    our C kernel (linear layers only) 2.5 ms."""
    clock = {"now": 0.0}
    monkeypatch.setitem(timing.CLOCKS, "fake", lambda: clock["now"])
    real = lower_integer_native.choose_kernel

    def costing(seconds):
        def run(*args):
            clock["now"] += seconds
        return run

    def choose(candidates, args, **options):
        conv = candidates["int8"].__self__.kind == "conv2d"
        costs = {"float": costing(0.002), "int8": costing(0.001 if conv else 0.003), "c_int8": costing(0.0025)}
        return real({k: costs[k] for k in candidates}, args, **{**options, "clock": "fake"})

    monkeypatch.setattr(lower_integer_native, "choose_kernel", choose)


def test_each_layer_runs_the_kernel_measured_faster_and_the_choice_is_recorded(lenet5, rigged, tmp_path):
    data, fq, _, expected = lenet5
    gm = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(data.train_x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["kernels"] == {"int8": 2, "float": 2, "c_int8": 0}
    assert stats["layers"]["conv1"]["times_ms"] == pytest.approx({"float": 2.0, "int8": 1.0})
    assert stats["layers"]["conv1"]["speedup"] == pytest.approx(2.0)
    assert stats["layers"]["fc1"] == {"module": "fc1.native", "kernel": "float", "speedup": 1.0, "input": "uint8",
                                      "times_ms": {"float": 2.0, "int8": 3.0, **C_TIMES},
                                      "output": "float_codes"}
    assert stats["float_code_edges"] == 1  # fc1 -> fc2: both float
    rows = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    assert (rows["conv2.native"]["kernel"], rows["conv2.native"]["latency_ms"]) == ("int8", pytest.approx(1.0))
    assert (rows["fc2.native"]["kernel"], rows["fc2.native"]["latency_ms"]) == ("float", pytest.approx(2.0))
    fxcompress.save(gm, tmp_path / "mixed.fxc")
    loaded = fxcompress.load(tmp_path / "mixed.fxc")
    for path in ("conv1.native", "conv2.native", "fc1.native", "fc2.native"):
        saved, back = gm.get_submodule(path), loaded.get_submodule(path)
        assert (back.kernel, back.input, back.kernel_choice) == (saved.kernel, saved.input, saved.kernel_choice)
    with torch.no_grad():
        got = gm(data.test_x)
        assert torch.equal(loaded(data.test_x), got)
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255


def test_a_model_of_float_layers_has_as_many_nodes_as_the_float_model(lenet5, trained_digits, tmp_path):
    data, fq, _, _ = lenet5
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("float",))], example_inputs=(data.train_x[:2],))
    float_model = torch.fx.symbolic_trace(trained_digits.model("lenet5"))
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    # conv, pool, conv, pool, flatten, fc, relu, fc: the input's boundary in, fc1's ReLU fused into its clamp
    assert len(calls) == len([n for n in float_model.graph.nodes if n.op not in ("placeholder", "output")]) == 8
    assert [n.target for n in calls].count(float_codes) == 1
    assert not any(isinstance(m, NativeLayer) and m._packed is not None for m in gm.modules())  # no oneDNN weight
    fxcompress.save(gm, tmp_path / "float.fxc")  # the boundary function is one a file may name
    with torch.no_grad():
        assert torch.equal(fxcompress.load(tmp_path / "float.fxc")(data.test_x), gm(data.test_x))


def test_a_float_selection_that_selects_nothing_names_the_layers(lenet5):
    data, fq, _, _ = lenet5
    with pytest.raises(ConfigError, match=r"float_select='conv3' selects none of the layers lowered: conv1, conv2, "
                                          r"fc1, fc2"):
        fxcompress.compile(fq, [LowerToInteger(float_select="conv3")], example_inputs=(data.train_x[:2],))


class ConvView(torch.nn.Module):
    """conv -> ReLU -> conv -> ReLU -> view -> linear: a float conv reading an int8 conv's channels-last
    codes writes channels-last float32 codes, which the view before the float linear layer must read."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).view(-1, 4 * 6 * 6))


def test_float_codes_through_a_view_from_a_channels_last_layer():
    x = torch.randn(64, 2, 6, 6)
    fq = _fake_quant(ConvView().eval(), x)
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("int8",), float_select="conv2|fc")], example_inputs=(x[:2],))
    assert fxcompress.history(gm)[-1].stats["float_code_edges"] == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["reshape"]
    with torch.no_grad():
        expected, got = reference(x), gm(x)
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255
