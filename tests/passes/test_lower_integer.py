import pytest
import torch
from torch.fx import Interpreter

import fxcompress
from fxcompress.errors import PreconditionError
from fxcompress.quant.integer import IntegerAdd, IntegerCat, IntegerLayer, QuantizeInput, fixed_point_multiplier, requantize
from fxcompress.passes import FoldBatchNorm, InsertFakeQuant, LowerToInteger
from fxcompress.passes.fake_quant import ActivationConfig
from fxcompress.quant import ActivationQuant
from fxcompress.zoo import LeNet5, LeNet300100, ResNetSmall


def _fake_quant(model, x, **options):
    options.setdefault("method", "linear")
    options.setdefault("bits", 8)
    options = {k: v for k, v in options.items() if v is not None}  # None: the pass's default (rules give them)
    calibration = [x[i:i + 16] for i in range(0, len(x), 16)]
    return fxcompress.compile(model.eval(), [InsertFakeQuant(activations=ActivationConfig(bits=8), **options)],
                              example_inputs=(x[:2],), calibration_data=calibration)


def _dtypes(gm, x):
    """The dtype of every node's value on input x."""
    seen = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor):
                seen[n.name] = value.dtype
            return value

    with torch.no_grad():
        Recorder(gm).run(x)
    return seen


@pytest.mark.parametrize("make, shape, per_channel", [
    (LeNet300100, (64, 1, 28, 28), True),
    (LeNet300100, (64, 1, 28, 28), False),
    (LeNet5, (64, 1, 28, 28), True),
])
def test_integer_model_computes_what_the_fake_quant_model_computes(make, shape, per_channel):
    x = torch.rand(shape)
    fq = _fake_quant(make(), x, per_channel=per_channel)
    gm = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))  # int32 codes
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    step = expected.abs().max().item() / 127
    assert (expected - got).abs().max().item() < 4 * step  # bias and requantization rounding only
    assert (expected.argmax(1) == got.argmax(1)).float().mean().item() >= 0.95
    stats = fxcompress.history(gm)[-1].stats
    assert stats["integer_layers"] == len([m for m in gm.modules() if isinstance(m, IntegerLayer)]) >= 3
    assert stats["float_to_integer_boundaries"] == 1
    # integer-only: every value between the input boundary and the dequantizing last layer is int32
    dtypes = _dtypes(gm, x)
    boundary = next(n for n in gm.graph.nodes
                    if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantizeInput))
    last = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), IntegerLayer)][-1]
    inside, names = False, []
    for n in gm.graph.nodes:
        if n is boundary:
            inside = True
        if inside and n is not last and n.op != "output":
            names.append(n.name)
            assert dtypes[n.name] == torch.int32, n.format_node()
        if n is last:
            break
    assert len(names) >= 4
    assert not any(isinstance(m, torch.nn.Parameter) for m in gm.parameters())  # no float weights left


def test_fixed_point_multiplier_and_rounding():
    real = torch.tensor([1e-6, 0.0123, 0.5, 0.999999999, 3.7], dtype=torch.float64)
    m0, shift = fixed_point_multiplier(real)
    assert bool(((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all())
    approx = m0.double() * torch.pow(2.0, -shift.double())
    assert torch.allclose(approx, real, rtol=2 ** -30, atol=0)
    acc = torch.randint(-2 ** 30, 2 ** 30, (1000,), dtype=torch.int64)
    for value, m, s in zip(real.tolist(), m0, shift):
        got = requantize(acc, m, s)
        exact = torch.floor(acc.double() * m.double() / 2.0 ** s.item() + 0.5)  # round half up
        assert torch.equal(got, exact.to(torch.int64))
        assert (got.double() - acc.double() * value).abs().max() <= 0.5 + abs(value) * 2 ** 31 * 2 ** -30


# ResNetSmall's inputs: it pools adaptively, so what its lowering does to boundaries, adds and rounding does not
# depend on the image size (16 x 16 runs a quarter of 32 x 32's float64 reference convolutions)
RESNET_INPUT = (32, 3, 16, 16)


def test_residual_network_lowers_with_float_boundaries():
    x = torch.rand(RESNET_INPUT)
    fq = _fake_quant(ResNetSmall(), x)
    gm = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["integer_layers"] == 11
    assert stats["float_to_integer_boundaries"] > 1  # BN and residual adds run in float between integer layers
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    assert torch.allclose(expected, got, atol=0.05 * expected.abs().max().item())


def test_kmeans_weights_are_refused():
    x = torch.rand(32, 1, 28, 28)
    fq = _fake_quant(LeNet300100(), x, method="kmeans", bits=4)
    with pytest.raises(PreconditionError, match="'fc1' shares weights by k-means"):
        fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x[:2],))


def test_group_wise_weights_are_refused_by_layer():
    x = torch.rand(32, 1, 28, 28)
    fq = _fake_quant(LeNet300100(), x, bits=4, per_channel=True, group_size=4, types=("linear",))
    with pytest.raises(PreconditionError, match=r"'fc1' \(fc1.weight_quant\): its group-wise weight grid "
                                                r"\(group_size=4\) has 300 output channel\(s\).*LowerWeightOnly"):
        fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x[:2],))


def test_group_wise_grids_with_one_group_per_channel_lower_as_per_channel_grids():
    """One group spanning each row is a per-channel grid: the same integer model, code for code."""
    x = torch.randn(64, 12)
    model = torch.nn.Sequential(torch.nn.Linear(12, 5))
    one_group, channel = (_fake_quant(model, x, per_channel=True, group_size=size) for size in (12, None))
    lowered = [fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
               for fq in (one_group, channel)]
    assert torch.equal(lowered[0].get_submodule("0.integer").weight, lowered[1].get_submodule("0.integer").weight)
    with torch.no_grad():
        assert torch.equal(lowered[0](x), lowered[1](x))
        assert (lowered[0](x) - one_group(x)).abs().max() < 0.05 * one_group(x).abs().max()  # not a constant
    with pytest.raises(PreconditionError, match="'0' .0.weight_quant.: its group-wise weight grid .group_size=4."):
        fxcompress.compile(_fake_quant(model, x, per_channel=True, group_size=4), [LowerToInteger()],
                           example_inputs=(x[:2],))


def test_uncalibrated_activations_are_refused():
    x = torch.rand(32, 1, 28, 28)
    fq = _fake_quant(LeNet300100(), x)
    fq.add_submodule("fc2.input_quant", ActivationQuant())  # a fresh observer that has seen nothing
    with pytest.raises(PreconditionError, match="observed nothing; compile with calibration_data"):
        fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))


def test_accumulator_overflow_is_refused():
    x = torch.rand(32, 1, 28, 28) * 100
    fq = _fake_quant(LeNet300100(), x, bits=16)
    with pytest.raises(PreconditionError, match=r"accumulator of \d+ \(>= 2\^31\)"):
        fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x[:2],))


def test_a_float_model_is_refused_as_nothing_to_lower():
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(PreconditionError, match="no layer has both a linear / fixed-point weight fake-quant and a "
                                                "calibrated activation grid on its input, so there is nothing to lower"):
        fxcompress.compile(LeNet300100(), [LowerToInteger()], example_inputs=(x,))


def test_kmeans_weights_without_activation_grids_are_refused():
    x = torch.rand(4, 1, 28, 28)
    fq = fxcompress.compile(LeNet300100().eval(), [InsertFakeQuant(bits=4)], example_inputs=(x,))
    with pytest.raises(PreconditionError, match="layer 'fc1' shares weights by k-means; its codebook is not an "
                                                "integer grid"):
        fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))


@pytest.mark.parametrize("method", ["linear", "fixed_point"])
def test_weight_grids_without_activation_grids_are_refused(method):
    x = torch.rand(4, 1, 28, 28)
    fq = fxcompress.compile(LeNet300100().eval(), [InsertFakeQuant(bits=8, method=method)], example_inputs=(x,))
    with pytest.raises(PreconditionError, match="layer 'fc1' has a weight fake-quant but no activation grid on its "
                                                r"input; quantize its input too with InsertFakeQuant\(\.\.\., "
                                                r"activations=ActivationConfig\(\)\)"):
        fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))


def test_layers_left_in_float_by_rules_stay_float_while_the_others_lower():
    x = torch.rand(32, 1, 28, 28)
    fq = _fake_quant(LeNet300100(), x, method=None, bits=None,
                     rules=[("fc[12]\\.weight", "linear", 8), ("fc3\\.weight", "float", 8)])
    gm = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["integer_layers"] == 2 and stats["dequantized"] == ["fc2"]
    assert isinstance(gm.get_submodule("fc3"), torch.nn.Linear) and gm.get_parameter("fc3.weight").dtype == torch.float32
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    assert (expected - got).abs().max().item() < 0.05 * expected.abs().max().item()


def test_a_quantized_layer_whose_output_is_never_read_is_dropped():
    class DeadBranch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)

        def forward(self, x):
            self.unused(x.relu())  # computed, never read
            return self.used(x)

    x = torch.randn(8, 3)
    fq = fxcompress.compile(DeadBranch().eval(), [InsertFakeQuant(method="linear", bits=8,
                                                                  activations=ActivationConfig(bits=8))],
                            example_inputs=(x,), calibration_data=[(x,)])
    gm = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))
    assert not hasattr(gm, "unused")
    assert sum(isinstance(m, IntegerLayer) for m in gm.modules()) == 1
    assert torch.allclose(gm(x), fq(x), atol=0.05 * fq(x).abs().max().item())


def test_residual_adds_stay_integer_when_their_operands_have_grids():
    x = torch.rand(RESNET_INPUT)
    calibration = [x[i:i + 16] for i in range(0, len(x), 16)]
    quantize = InsertFakeQuant(method="linear", bits=8, per_channel=True, activations=ActivationConfig(bits=8, joins=True))
    fq = fxcompress.compile(ResNetSmall().eval(), [FoldBatchNorm(), quantize], example_inputs=(x[:2],),
                            calibration_data=calibration)
    gm = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["backend"] == "reference" and stats["integer_adds"] == 4
    assert stats["float_to_integer_boundaries"] == 2  # the image and fc's input after the average pool
    adds = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), IntegerAdd)]
    dtypes = _dtypes(gm, x)
    assert [dtypes[n.name] for n in adds] == [torch.int32] * 3 + [torch.float32]  # the last one dequantizes
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    assert (expected - got).abs().max().item() < 0.05 * expected.abs().max().item()


def test_integer_add_rounds_the_real_sum_onto_the_output_grid():
    torch.manual_seed(0)
    a, b = torch.randint(-128, 128, (1000,), dtype=torch.int32), torch.randint(-100, 156, (1000,), dtype=torch.int32)
    scales, out_scale = torch.tensor([0.013, 0.0041], dtype=torch.float64), 0.021
    module = IntegerAdd(requantize=True)
    multipliers, shifts = fixed_point_multiplier(scales / out_scale)
    module.multipliers.copy_(multipliers << (shifts.max() - shifts))
    module.shift.fill_(int(shifts.max()))
    module.low.fill_(-50)
    module.high.fill_(60)
    got = module(a, b)
    real = (a.double() * scales[0] + b.double() * scales[1]) / out_scale
    exact = torch.clamp(torch.floor(real + 0.5), -50, 60)
    assert (got.double() - exact).abs().max().item() <= 1 and (got.double() == exact).float().mean() > 0.99
    assert got.dtype == torch.int32 and int(got.min()) == -50 and int(got.max()) == 60  # clamped to the grid


def test_concatenations_stay_integer_in_the_reference():
    class Concat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Conv2d(2, 6, 1)
            self.c = torch.nn.Conv2d(10, 3, 3, padding=1)

        def forward(self, x):
            return self.c(torch.cat([torch.relu(self.a(x)), self.b(x)], 1))

    x = torch.randn(32, 2, 8, 8)
    fq = fxcompress.compile(Concat().eval(), [InsertFakeQuant(method="linear", bits=8, activations=ActivationConfig(
        bits=8, joins=True))], example_inputs=(x[:2],), calibration_data=[x])
    gm = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["integer_cats"] == 1 and stats["float_to_integer_boundaries"] == 1
    (cat,) = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), IntegerCat)]
    assert _dtypes(gm, x)[cat.name] == torch.int32
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    assert (expected - got).abs().max().item() < 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("symmetric, bits, expected", [(True, 8, torch.int8), (False, 8, torch.int16),
                                                       (True, 12, torch.int16)])
def test_weight_codes_are_held_and_saved_in_the_narrowest_integer_type(tmp_path, symmetric, bits, expected):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)  # one calibration batch: the weights' types and the file's size do not depend on it
    fq = _fake_quant(LeNet5(), x, symmetric=symmetric, bits=bits, per_channel=True)
    gm = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    layers = [m for m in gm.modules() if isinstance(m, IntegerLayer)]
    assert layers and all(m.weight.dtype == expected for m in layers)
    held = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    saved_as_int32 = sum(m.weight.numel() * (4 - m.weight.element_size()) for m in layers)  # the bytes saved
    size = fxcompress.save(gm, tmp_path / "int.fxc")
    assert held <= size < held + 20_000 and saved_as_int32 >= 2 * sum(m.weight.numel() for m in layers)
    loaded = fxcompress.load(tmp_path / "int.fxc")
    assert all(m.weight.dtype == expected for m in loaded.modules() if isinstance(m, IntegerLayer))
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_a_weight_dtype_that_is_no_integer_storage_is_refused():
    with pytest.raises(fxcompress.errors.ConfigError, match="weight_dtype must be one of"):
        IntegerLayer("linear", [4, 4], requantize=False, weight_dtype="float64")


@pytest.mark.parametrize("grid", [{"symmetric": True}, {"method": "fixed_point"}])
@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_channel_of_zero_weights_keeps_its_bias_as_fine_as_the_others(backend, grid):
    """A pruned channel computes its bias alone. Its codes are zero whatever its weight step; the grids gave it a
    step of 1, and its bias was rounded to s_in * 1, a whole input step: here 0.37 of one off. It now takes the
    largest step of the other channels (quantizers._steps_of_empty_groups), as fine as theirs."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(6, 3).eval(), torch.rand(64, 6) * 4
    with torch.no_grad():
        model.weight[1] = 0.0
    fq = _fake_quant(model, x, per_channel=True, **grid)
    step = fq.get_submodule("linear_input_quant").grid().scale.item()
    bias = 7.37 * step
    with torch.no_grad():
        fq.get_parameter("bias")[1] = bias  # the fake-quant model adds it as is
    gm = fxcompress.compile(fq, [LowerToInteger(backend=backend)], example_inputs=(x[:2],))
    if fxcompress.history(gm)[-1].stats["backend"] != backend:
        pytest.skip("this torch build has no oneDNN int8 kernels")
    with torch.no_grad():
        expected, got = fq(x), gm(x)
    assert torch.allclose(expected[:, 1], torch.tensor(bias))
    assert (got[:, 1] - bias).abs().max().item() <= 0.01 * step
    assert (got - expected).abs().max().item() <= (expected.max() - expected.min()).item() / 255


def test_a_bias_beyond_int32_at_its_accumulator_scale_is_refused_by_layer():
    """A channel with one tiny weight has a tiny step, and its bias at s_in * step passes int32: refused (it used
    to wrap around to -2^31 silently, and the accumulator check took its absolute value, still negative)."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(6, 3).eval(), torch.rand(64, 6) * 4
    with torch.no_grad():
        model.weight[1] = 0.0
        model.weight[1, 0] = 1e-9
        model.bias[1] = 100.0
    fq = _fake_quant(model, x, symmetric=True, per_channel=True)
    with pytest.raises(PreconditionError, match=r"layer '.*' could reach an accumulator of \d+ \(>= 2\^31\)"):
        fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))


class _KeysWrittenInPlace(torch.nn.Module):
    """Keys assembled by writing into slices of an empty tensor (DeepSeek-V3's attention), which torch.export
    writes as views and `copy_` calls nothing reads."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4), torch.nn.Linear(8, 3)

    def forward(self, x):
        keys = x.new_empty(x.shape[0], 8)
        keys[:, :4] = self.a(x)
        keys[:, 4:] = self.b(x)
        return self.out(keys)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_writes_into_views_survive_the_lowering(backend):
    """The lowering's dead-code elimination was fx's, which erased the `copy_` calls: the lowered graph read the
    empty tensor, whatever memory it got (a DeepSeek-V3's logits changed from call to call)."""
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    fq = fxcompress.compile(_KeysWrittenInPlace().eval(), [InsertFakeQuant(method="linear", bits=8, symmetric=True,
                                                                            activations=ActivationConfig(bits=8))],
                            example_inputs=(x,), calibration_data=[(x,)], frontend="export")
    writes = [n for n in fq.graph.nodes if n.target == "copy_"]
    assert len(writes) == 2
    gm = fxcompress.compile(fq, [LowerToInteger(backend=backend, repeats=1)], example_inputs=(x,))
    assert len([n for n in gm.graph.nodes if n.target == "copy_"]) == 2
    assert torch.allclose(gm(x), fq(x), atol=0.05 * fq(x).abs().max().item())


class _TwoConvs(torch.nn.Module):
    """8 output channels on 8 x 8 images: channels on dim 0 of an unbatched input meet rows of the same size."""

    def __init__(self, middle=None):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.middle = middle or torch.nn.ReLU()

    def forward(self, x):
        return self.c2(self.middle(self.c1(x)))


def test_an_unbatched_image_gets_what_it_gets_in_a_batch_of_one():
    """An unbatched (C, H, W) input, which F.conv2d takes: the integer layer laid the bias and the per-channel
    multipliers along dim 1, its rows there, and returned another model's outputs (0.27 off outputs of 0.39)."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8)
    fq = _fake_quant(_TwoConvs(), x, per_channel=True, symmetric=True)
    gm = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    image = torch.rand(3, 8, 8)
    with torch.no_grad():
        got, batched, expected = gm(image), gm(image[None]), fq(image)
    assert got.shape == expected.shape == (8, 8, 8)
    assert torch.equal(got, batched[0])
    assert (got - expected).abs().max().item() < 4 * expected.abs().max().item() / 127


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_a_dropout_on_codes_is_gone_so_train_mode_runs(backend):
    """nn.Dropout between a layer and the next grid ran on integer codes: `model.train()` then crashed in torch
    (float dropout into an int32 / uint8 tensor), and a dropped uint8 code is the zero-point, not 0."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 8, 8)
    model = _TwoConvs(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.5)))
    fq = _fake_quant(model, x, symmetric=True)
    gm = fxcompress.compile(fq, [LowerToInteger(backend=backend, repeats=1)], example_inputs=(x[:2],))
    assert not any(isinstance(m, torch.nn.Dropout) for m in gm.modules())
    with torch.no_grad():
        evaluated = gm(x)
        assert (evaluated - fq(x)).abs().max().item() < 4 * fq(x).abs().max().item() / 127
        assert torch.equal(gm.train()(x), evaluated)  # an inference model: the same outputs in either mode
