"""LowerToInteger through clamps with constant bounds (ReLU6, hardtanh, clamp): a layer requantizes through
them onto the next grid and the clamp runs on codes (fused into the layer's kernel where it follows it), so a
MobileNet-style block keeps uint8 channels-last codes from its input boundary to its last layer instead of
dequantizing around every ReLU6."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Interpreter

import fxcompress
from fxcompress.kernels import native, q8
from fxcompress.kernels.native import NativeAdd, NativeLayer, QuantizeToCodes
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger

CLAMPS = {  # how a model may spell its clamp (each a pair: after the stem / the depthwise conv, after the add)
    "ReLU6 modules": (nn.ReLU6(), nn.ReLU6()),
    "F.relu6": (F.relu6, F.relu6),
    "F.hardtanh": (lambda h: F.hardtanh(h, 0.0, 2.0), lambda h: F.hardtanh(h, -1.0, 1.5)),
    "torch.clamp, clamp method": (lambda h: torch.clamp(h, 0, 3), lambda h: h.clamp(min=0.25)),
}


class Block(nn.Module):
    """A MobileNetV2-style block: a stem, a depthwise conv and a pointwise projection added back, a linear head."""

    def __init__(self, clamps) -> None:
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw, self.head = nn.Conv2d(16, 16, 1), nn.Linear(16 * 8 * 8, 10)
        self.clamp, self.after_add = clamps
        if isinstance(self.clamp, nn.Module):  # modules are registered as children: they trace as call_module
            self.act, self.act_add = self.clamp, self.after_add

    def forward(self, x):
        h = self.clamp(self.dw(self.clamp(self.stem(x))))
        h = self.after_add(h + self.pw(h))
        return self.head(torch.flatten(F.max_pool2d(h, 2), 1))


@functools.cache
def _reference(spelling):
    """(input, fake-quant model, its reference lowering, that lowering's output), built once per spelling for
    the module: the tests only read them (compile copies its input)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    fq = fxcompress.compile(Block(CLAMPS[spelling]).eval(), [InsertFakeQuant(
        method="linear", bits=8, symmetric=True, per_channel=True, activations=ActivationConfig(bits=7, joins=True))],
        example_inputs=(x[:2],), calibration_data=[x[:32], x[32:]])
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    with torch.no_grad():
        return x, fq, reference, reference(x)


def _lowered(spelling, **options):
    x, fq, reference, expected = _reference(spelling)
    return x, fq, reference, expected, fxcompress.compile(fq, [LowerToInteger(**options)], example_inputs=(x[:2],))


def _reads(gm, x):
    """What each module node of `gm` reads, by module path."""
    seen = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            if n.op == "call_module":
                seen[n.target] = [self.env[a] for a in n.args if a in self.env]
            return super().run_node(n)

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


def _within_one_step(expected, got):
    step = (expected.max() - expected.min()).item() / 255
    return (expected - got).abs().max().item() <= step


@pytest.mark.parametrize("spelling", list(CLAMPS))
def test_reference_requantizes_through_clamps_as_the_fake_quant_model_rounds(spelling, tmp_path):
    x, fq, reference, got = _reference(spelling)
    stats = fxcompress.history(reference)[-1].stats
    assert stats["requantized"] == 3 and stats["dequantized"] == ["head"]  # every conv stays on codes
    assert stats["float_to_integer_boundaries"] == 1  # the input only: no float op between the layers
    with torch.no_grad():
        expected = fq(x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.95
    assert _within_one_step(expected, got)
    if spelling != "F.hardtanh":  # one spelling makes the file round trip below (a file's first load costs)
        return
    fxcompress.save(reference, tmp_path / "m.fxc")  # the clamps on codes are ops a file may name
    with torch.no_grad():
        assert torch.equal(fxcompress.load(tmp_path / "m.fxc")(x), got)


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
@pytest.mark.parametrize("spelling", list(CLAMPS))
def test_native_fuses_clamps_and_keeps_channels_last_codes_between_layers(spelling, tmp_path):
    x, _, _, expected, gm = _lowered(spelling, backend="native", kernels=("int8",))
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert not [n for n in ops if n.target in (F.relu6, F.hardtanh, torch.clamp, "clamp")]  # all fused
    assert not any(isinstance(m, nn.Hardtanh) for m in gm.modules())
    modules = dict(gm.named_modules())
    assert sum(isinstance(m, QuantizeToCodes) for m in modules.values()) == 1
    for path in ("stem.native", "dw.native"):  # the clamp's upper bound (ReLU6's 6) is the kernel's clamp
        layer = modules[path]
        assert layer.output == "uint8" and layer.post_op == "hardtanh", (path, layer.clamp)
    for path, args in _reads(gm, x[:8]).items():  # codes between native modules are uint8 and channels-last
        if isinstance(modules[path], (NativeLayer, NativeAdd)) and path != "stem.native":
            for value in args:
                assert value.dtype == torch.uint8, path
                if value.dim() == 4:
                    assert value.is_contiguous(memory_format=torch.channels_last), path
    with torch.no_grad():
        got = gm(x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.95
    assert _within_one_step(expected, got)
    if spelling != "F.hardtanh":
        return
    fxcompress.save(gm, tmp_path / "m.fxc")  # the fused clamps are the layers' configuration
    with torch.no_grad():
        assert torch.equal(fxcompress.load(tmp_path / "m.fxc")(x), got)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 48), nn.Linear(48, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(F.hardtanh(self.fc2(F.relu6(self.fc1(x))), 0.25, 0.75))


@pytest.mark.skipif(q8.c_library() is None, reason="no C compiler builds our C kernel here")
def test_clamps_fused_into_our_c_kernel_give_the_reference_bit_for_bit():
    torch.manual_seed(0)
    x = torch.randn(256, 64) * 2
    fq = fxcompress.compile(Mlp().eval(), [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                           activations=ActivationConfig(bits=8))],
                            example_inputs=(x[:2],), calibration_data=[x[:128], x[128:]])
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("c_int8",))], example_inputs=(x[:2],))
    modules = dict(gm.named_modules())
    assert [modules[p].kernel for p in ("fc1.native", "fc2.native", "fc3.native")] == ["c_int8"] * 3
    low, _ = modules["fc2.native"].code_range()  # hardtanh(0.25, 0.75) as codes: the grid holds 0 below 0.25
    assert modules["fc2.native"].output_zero_point < low
    with torch.no_grad():
        assert torch.equal(reference(x), gm(x))


class _InfiniteBound(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.clamp(self.conv(x), 0.0, float("inf")).mean((2, 3)))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_a_clamp_with_an_infinite_bound_is_a_clamp_with_none(backend, tmp_path):
    """clamp(x, 0, inf) is ReLU: its upper bound is no bound (its code was an infinite integer: OverflowError)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    fq = fxcompress.compile(_InfiniteBound().eval(), [InsertFakeQuant(
        method="linear", bits=8, symmetric=True, per_channel=True, activations=ActivationConfig())],
        example_inputs=(x,), calibration_data=[x])
    gm = fxcompress.compile(fq, [LowerToInteger(backend=backend, repeats=1)], example_inputs=(x,))
    if backend == "native":
        assert gm.get_submodule("conv.native").clamp == (0.0, None)
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    assert float((got - expected).abs().max()) <= 0.02 * float(expected.abs().max())
    fxcompress.save(gm, tmp_path / "m.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "m.fxc")(x), got)
