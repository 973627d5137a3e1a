"""Residual adds taken into the convolution before them: ActivationConfig(fuse_adds=True) leaves that
convolution's output unrounded (the sum is rounded once, as PT2E's x86 lowering models it), the reference
backend gives the float add the real values of the other operand's codes, and the native backend runs the
add inside oneDNN's int8 convolution (its sum post-op)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Interpreter

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.kernels import native, timing
from fxcompress.kernels.native import NativeAdd, NativeLayer
from fxcompress.passes import ActivationConfig, FoldBatchNorm, InsertFakeQuant, LowerToInteger
from fxcompress.quant import ActivationQuant
from fxcompress.quant.integer import dequantize_codes
from fxcompress.zoo import ResNetSmall

needs_onednn = pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
# oneDNN's int8 kernel is exact at 8-bit activations only with VNNI (u8 x s8 pairs pass int16 without it); the
# sum post-op takes 8-bit grids only (it clamps at a ReLU, nowhere else)
needs_vnni = pytest.mark.skipif(not (native.available() and native.vnni()), reason="needs oneDNN int8 with VNNI")


def _fake_quant(model, x, fuse_adds=True, activation_bits=8):
    activations = ActivationConfig(bits=activation_bits, joins=True, fuse_adds=fuse_adds)
    passes = [FoldBatchNorm(), InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                               activations=activations)]
    return fxcompress.compile(model, passes, example_inputs=(x[:2],),
                              calibration_data=[x[i:i + 32] for i in range(0, len(x), 32)])


@pytest.fixture(scope="module")
def resnet():
    """ResNetSmall (random weights, BatchNorm statistics that are not the identity) fake-quantized with and
    without fuse_adds, and its inputs."""
    torch.manual_seed(0)
    model = ResNetSmall().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(96, 3, 32, 32)
    return x, _fake_quant(model, x), _fake_quant(model, x, fuse_adds=False)


def _quantized_operands(gm, add):
    return [isinstance(a, torch.fx.Node) and a.op == "call_module"
            and isinstance(gm.get_submodule(a.target), ActivationQuant) for a in add.args]


def test_a_fused_add_reads_its_convolution_unrounded_and_the_other_operand_on_its_grid(resnet):
    _, fused, plain = resnet
    adds = lambda gm: [n for n in gm.graph.nodes if n.op == "call_function" and n.name.startswith("add")]  # noqa: E731
    # ResNetSmall: two identity blocks and a downsample block whose sum meets the next block's input grid, and a
    # last block whose sum goes through average pooling (no grid: both operands keep theirs)
    assert [_quantized_operands(plain, a) for a in adds(plain)] == [[True, True]] * 4
    got = [_quantized_operands(fused, a) for a in adds(fused)]
    assert got == [[False, True], [False, True], [True, False], [True, True]]
    # of the downsample block's two convolutions, the later in the graph (the shortcut) takes the add
    downsample = adds(fused)[2]
    assert downsample.args[1].target == "layer2.0.shortcut.0" or "shortcut" in downsample.args[1].name
    assert sum(isinstance(m, ActivationQuant) for m in fused.modules()) == \
        sum(isinstance(m, ActivationQuant) for m in plain.modules()) - 3


def test_fuse_adds_needs_joins():
    with pytest.raises(ConfigError, match="fuse_adds=True .* joins=True"):
        ActivationConfig(fuse_adds=True)


def _values_read_by_float_adds(gm, x):
    """The dtype of every operand of a float add node, in one run."""
    seen = []

    class Recorder(Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and n.name.startswith("add"):
                seen.extend(self.env[a].dtype for a in n.args)
            return super().run_node(n)

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


def test_the_reference_gives_a_float_add_the_real_values_of_codes(resnet):
    """The identity's codes reach the add that stays a float op: it reads their real values (before, it read the
    centered int32 codes themselves and the model's logits were off by more than their range)."""
    x, fused, _ = resnet
    reference = fxcompress.compile(fused, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    assert sum(n.target is dequantize_codes for n in reference.graph.nodes) == 3
    assert set(_values_read_by_float_adds(reference, x[:4])) == {torch.float32}
    with torch.no_grad():
        expected, got = fused(x), reference(x)
    scale = (expected.max() - expected.min()).item()
    assert (expected - got).abs().max().item() <= 0.01 * scale
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.99


@needs_vnni
def test_native_runs_each_fused_add_inside_its_convolution(resnet, tmp_path):
    x, fused, _ = resnet
    reference = fxcompress.compile(fused, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    gm = fxcompress.compile(fused, [LowerToInteger(kernels=("int8",))], example_inputs=(x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["residual_adds_fused"] == 3 and stats["integer_adds"] == 1  # the last add dequantizes, on codes
    summing = {name for name, layer in stats["layers"].items() if layer.get("residual")}
    assert len(summing) == 3 and not summing & set(stats["dequantized"])  # they write codes: requantized
    assert stats["requantized"] + len(stats["dequantized"]) == stats["integer_layers"]
    accumulating = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"
                    and isinstance(gm.get_submodule(n.target), NativeLayer) and gm.get_submodule(n.target).accumulate}
    assert sorted(accumulating) == ["layer1.0.conv2.native", "layer1.1.conv2.native", "layer2.0.shortcut.0.native"]
    # what each reads as its residual is written fresh by a kernel and read by nothing after: summed in place
    assert all(m.accumulate_in_place and m.output == "uint8" and m.post_op == "relu" for m in accumulating.values())
    for path, module in accumulating.items():  # timed as it runs, fused: the record and summary's latency say so
        record = stats["layers"][path.removesuffix(".native")]
        assert record["residual"] and list(record["times_ms"]) == ["int8"] and record["times_ms"]["int8"] > 0
        assert module.kernel_choice.times_ms == pytest.approx(record["times_ms"], abs=1e-6)  # records: 6 decimals
    rows = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    assert all(rows[path]["latency_ms"] == pytest.approx(m.kernel_choice.ms) for path, m in accumulating.items())
    assert not any(n.op == "call_function" and (n.name.startswith("add") or n.target in (F.relu, torch.relu)
                                                or n.target is dequantize_codes) for n in gm.graph.nodes)
    assert sum(isinstance(m, NativeAdd) for m in gm.modules()) == 1
    with torch.no_grad():
        expected, got = reference(x), gm(x)
    step = (expected.max() - expected.min()).item() / 255
    assert (expected - got).abs().max().item() <= step
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.99
    # each holds its weight once, in oneDNN's packed form, as the other layers do
    assert all("weight" not in m._buffers and torch.equal(m.weight, m._codes_from_form("int8"))
               for m in accumulating.values())
    fxcompress.save(gm, tmp_path / "fused.fxc")
    loaded = fxcompress.load(tmp_path / "fused.fxc")
    assert sum(isinstance(m, NativeLayer) and m.accumulate is not None for m in loaded.modules()) == 3
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
        again = copy.deepcopy(gm)
        chosen = timing.remeasure(again, (x[:1],), repeats=1)  # other layers may change kernels at batch 1
        assert all(chosen[path]["kernel"] == "int8" and chosen[path]["times_ms"]["int8"] > 0 for path in accumulating)
        assert (again(x) - expected).abs().max().item() <= step


@needs_vnni
def test_the_trained_resnet_agrees_with_the_reference_with_its_add_fused(trained_digits):
    """The issue's agreement, on real data: predictions equal on >= 99.5% of the test digits, logits within one
    step of an 8-bit grid over their range."""
    data = trained_digits.data
    fq = _fake_quant(trained_digits.model("resnet"), data.train_x[:256])
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(data.train_x[:2],))
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("int8",))], example_inputs=(data.train_x[:2],))
    assert fxcompress.history(gm)[-1].stats["residual_adds_fused"] == 1  # layer1's; layer2's sum is pooled
    with torch.no_grad():
        expected, got = reference(data.test_x), gm(data.test_x)
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255
    assert (got.argmax(1) == data.test_y).float().mean().item() >= 0.85  # trained, not a constant


class ReadAfter(nn.Module):
    """A residual block whose input is read again after its add, by `side`."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head, self.side = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.stem(x))
        out = F.relu(self.conv2(F.relu(self.conv1(h))) + h)
        return self.head(out) + self.side(h)


def _assert_summed_in_a_copy(model: nn.Module, x: torch.Tensor, batches: list[torch.Tensor]) -> None:
    """Its one fused layer sums in a copy, and the model agrees with the reference within one output step on each
    batch."""
    fq = _fake_quant(model.eval(), x)
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("int8",))], example_inputs=(x[:2],))
    (layer,) = [m for m in gm.modules() if isinstance(m, NativeLayer) and m.accumulate is not None]
    assert not layer.accumulate_in_place
    with torch.no_grad():
        for batch in batches:
            expected, got = reference(batch), gm(batch)
            assert (expected - got).abs().max().item() <= (expected.max() - expected.min()).item() / 255


@needs_vnni
def test_a_residual_read_after_the_add_is_summed_in_a_copy():
    # had the sum overwritten h's codes, `side` would read the block's output instead
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    _assert_summed_in_a_copy(ReadAfter(), x, [x])


class AddsItsInput(nn.Module):
    """relu(conv(x) + x): the residual is the convolution's own input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(F.relu(self.conv(h) + h))


@needs_vnni
def test_a_convolution_adding_its_own_input_sums_in_a_copy():
    """Found by random models: summed in place, oneDNN wrote conv(h) + h over the h it was still reading (here
    at batch 2, one channel of 8 x 8: 16 to 82 output steps off; other shapes happened to come out right)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    _assert_summed_in_a_copy(AddsItsInput(), x, list(x.split(2)))  # the batch size the layer was packed for


@needs_vnni
def test_the_fused_form_exports_and_compiles(resnet):
    x, fused, _ = resnet
    gm = fxcompress.compile(fused, [LowerToInteger(kernels=("int8",))], example_inputs=(x[:2],))
    with torch.no_grad():
        expected = gm(x[:4])
        exported = torch.export.export(gm, (x[:4],)).module()(x[:4])
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)(x[:4])
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)


@needs_onednn
def test_the_accumulating_layer_adds_the_residual_before_its_one_rounding():
    """NativeLayer(accumulate=...) on its own: codes of round(relu(conv + residual) / s_out) within one code
    of the float64 formula; a copy leaves the residual as it was, in place it holds the sum after."""
    torch.manual_seed(0)
    layer = NativeLayer("conv2d", [8, 8, 3, 3], 0.02, 3, "uint8", output_scale=0.05, output_zero_point=0,
                        clamp=(0.0, None), stride=[1, 1], padding=[1, 1], dilation=[1, 1], accumulate=(0.04, 7))
    layer.weight.copy_(torch.randint(-60, 61, (8, 8, 3, 3), dtype=torch.int8))
    layer.weight_scale.copy_(torch.rand(8) * 0.01 + 0.002)
    layer.bias.copy_(torch.randint(-500, 500, (8,), dtype=torch.int32))
    x = torch.randint(0, 120, (2, 8, 6, 6), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    residual = torch.randint(0, 256, (2, 8, 6, 6), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    kept = residual.clone()
    got = layer(x, residual)
    assert torch.equal(residual, kept)  # summed in a copy
    real = F.conv2d((x.double() - 3) * 0.02, layer.weight.double() * layer.weight_scale.double().view(-1, 1, 1, 1),
                    layer.bias.double() * layer.accumulator_scale(), 1, 1) + (kept.double() - 7) * 0.04
    codes = torch.clamp(torch.round(torch.relu(real) / 0.05), 0, 255)
    assert (got.double() - codes).abs().max().item() <= 1 and (got.double() == codes).float().mean() > 0.99
    assert torch.equal(layer(x, residual), got)  # the second call, through the prepared arguments
    in_place = NativeLayer(**{**layer.config(), "accumulate_in_place": True})
    in_place.load_state_dict(layer.state_dict())
    summed = in_place(x, residual)
    assert torch.equal(summed, got) and torch.equal(residual, got)  # the residual's memory holds the sum
    with pytest.raises(ConfigError, match="called without a residual"):
        NativeLayer(**layer.config())(x)
    with pytest.raises(ConfigError, match="sum post-op"):
        NativeLayer("linear", [4, 4], 0.1, 0, "uint8", accumulate=(0.1, 0))
    with pytest.raises(ConfigError, match="sum post-op"):
        NativeLayer(**{**layer.config(), "kernel": "float"})
    assert layer.kernel_refusals(("float", "int8")) == {"float": "it adds a residual inside oneDNN's int8 kernel "
                                                                 "(the sum post-op)"}


class SumsInPlace(nn.Module):
    """A residual block whose input nothing reads after its add: the convolution sums into the input's codes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu(self.stem(x))
        return self.head(F.relu(self.conv2(F.relu(self.conv1(h))) + h))


@needs_vnni
@pytest.mark.parametrize("make, in_place", [(SumsInPlace, True), (ReadAfter, False)])
def test_an_unbatched_image_sums_its_residual_as_in_a_batch(make, in_place):
    """A (C, H, W) image through a convolution that adds its residual inside oneDNN's kernel: what the same image
    gets in a batch, within one output step of the reference (before, oneDNN raised "negative dimension"). In
    place, the sum goes into the residual's memory through the batch-of-one view, as a batch's does."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    fq = _fake_quant(make().eval(), x)
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("int8",))], example_inputs=(x[:2],))
    (layer,) = [m for m in gm.modules() if isinstance(m, NativeLayer) and m.accumulate is not None]
    assert layer.accumulate_in_place == in_place
    image_first = copy.deepcopy(gm)  # nothing built yet: its first input is the image
    with torch.no_grad():
        expected, batched = reference(x), gm(x)
        got = [gm(x[i]) for i in range(3)]
        got_first = [image_first(x[i]) for i in range(3)]
        assert torch.equal(gm(x), batched) and torch.equal(image_first(x), batched)
    step = (expected.max() - expected.min()).item() / 255
    for i in range(3):
        assert got[i].shape == (4, 8, 8)
        assert torch.equal(got[i], batched[i]) and torch.equal(got_first[i], batched[i])
        assert (got[i] - reference(x[i])).abs().max().item() <= step


@needs_vnni
def test_an_unbatched_image_exports_and_compiles():
    """Traced, the batch of one is ops in the graph (the accumulating layer sums by ops there) and gives what the
    eager model gives."""
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    gm = fxcompress.compile(_fake_quant(SumsInPlace().eval(), x), [LowerToInteger(kernels=("int8",))],
                            example_inputs=(x[:2],))
    with torch.no_grad():
        expected = gm(x[0])
        exported = torch.export.export(gm, (x[0],)).module()(x[0])
        torch._dynamo.reset()
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)(x[0])
    assert expected.shape == (4, 8, 8)
    torch.testing.assert_close(exported, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=0, atol=1e-5)
