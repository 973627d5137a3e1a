"""Our C int8 linear kernel (NativeLayer kernel "c_int8", csrc/q8_linear.c) against the reference integer
arithmetic, code for code: random codes, saturation edges, zero-points, both requantization and
dequantization, ReLU, batch 1 and 33; LeNet-300-100 lowered onto it; files; machines without a compiler."""
import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.kernels import native, q8
from fxcompress.kernels.timing import remeasure
from fxcompress.kernels.native import NativeLayer, QuantizeToCodes
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger
from fxcompress.quant.integer import IntegerLayer, fixed_point_multiplier
from fxcompress.zoo import LeNet300100

needs_c = pytest.mark.skipif(q8.c_library() is None, reason="no C compiler on this machine to build csrc/q8_linear.c")
pytestmark = needs_c


def pair(weight, x_zero, input_qmax, requantize, relu, y_zero=0, seed=0):
    """A c_int8 NativeLayer and the reference IntegerLayer computing the same layer."""
    gen = torch.Generator().manual_seed(seed)
    out, columns = weight.shape
    weight_scale = torch.rand(out, generator=gen) * 0.01 + 1e-3
    in_scale, out_scale = 0.02, 0.05
    accumulator = in_scale * weight_scale.double()
    bias = torch.randint(-5000, 5000, (out,), generator=gen, dtype=torch.int32)
    layer = NativeLayer("linear", [out, columns], in_scale, x_zero, "uint8" if requantize else "float32",
                        output_scale=out_scale, output_zero_point=y_zero, clamp=(0.0, None) if relu else None,
                        kernel="c_int8", input_qmax=input_qmax)
    layer.weight.copy_(weight)
    layer.weight_scale.copy_(weight_scale)
    layer.bias.copy_(bias)  # the reference's integer bias, as the lowering stores it
    reference = IntegerLayer("linear", [out, columns], requantize=requantize, weight_dtype="int8")
    reference.weight.copy_(weight)
    reference.bias.copy_(bias)
    if requantize:
        multiplier, shift = fixed_point_multiplier(accumulator / out_scale)
        reference.multiplier.copy_(multiplier)
        reference.shift.copy_(shift)
        reference.low.fill_(-y_zero)
        reference.high.fill_(255 - y_zero)
    else:
        reference.output_scale.copy_(accumulator)
    return layer, reference


def expected(reference, x, x_zero, requantize, relu, y_zero=0):
    """The reference on raw codes: centered in, the ReLU after it on its centered (or real) output, raw out."""
    y = reference(x.to(torch.int32) - x_zero)
    if relu:
        y = y.clamp_min(0)
    return (y + y_zero).to(torch.uint8) if requantize else y


@pytest.mark.parametrize("rows", [1, 3, 33])  # 3: the two-row tile and the one-row tile after it
@pytest.mark.parametrize("requantize, relu", [(True, True), (True, False), (False, False), (False, True)])
@pytest.mark.parametrize("input_qmax", [255, 127])
def test_random_codes_agree_with_the_reference_exactly(rows, requantize, relu, input_qmax):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randint(-128, 128, (37, 203), generator=gen, dtype=torch.int8)
    x = torch.randint(0, input_qmax + 1, (rows, 203), generator=gen, dtype=torch.uint8)
    for x_zero, y_zero in ((0, 0), (19, 101)):
        layer, reference = pair(weight, x_zero, input_qmax, requantize, relu, y_zero)
        got = layer(x)
        assert layer._c.raw == (input_qmax == 127)  # vpmaddubsw only where no pair of products passes int16
        assert torch.equal(got, expected(reference, x, x_zero, requantize, relu, y_zero)), (x_zero, y_zero)
    if requantize:  # the requantized codes span the grid: the clamps were exercised, not a constant output
        assert int(got.min()) == (y_zero if relu else 0) and int(got.max()) == 255


@pytest.mark.parametrize("input_qmax, code", [(255, 255), (127, 127)])
def test_saturation_edges_and_a_long_reduction(input_qmax, code):
    """Largest codes times -128 / 127 weights over 4099 columns: every int16 pair at its limit (exactly
    32512 = 127 * 256 on the raw path), the int32 accumulator at hundreds of millions."""
    weight = torch.full((5, 4099), -128, dtype=torch.int8)
    weight[1] = 127
    weight[2, ::2] = 127
    weight[3] = torch.randint(-128, 128, (4099,), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    x = torch.full((3, 4099), code, dtype=torch.uint8)
    x[1, ::3] = 0
    layer, reference = pair(weight, 0, input_qmax, requantize=False, relu=False)
    got = layer(x)
    want = expected(reference, x, 0, False, False)
    assert torch.equal(got, want)
    assert float(want.abs().max()) > 4099 * 100 * 100 * float(layer.accumulator_scale().min())  # a large sum


def test_three_dimensional_inputs_and_bad_inputs():
    weight = torch.randint(-128, 128, (6, 40), generator=torch.Generator().manual_seed(2), dtype=torch.int8)
    layer, reference = pair(weight, 3, 255, requantize=True, relu=False, y_zero=7)
    x = torch.randint(0, 256, (2, 5, 40), dtype=torch.uint8)
    assert torch.equal(layer(x), expected(reference, x, 3, True, False, 7))
    with pytest.raises(ConfigError, match=r"reads torch.uint8 \[\.\.\., 40\], got torch.float32 \(2, 5, 40\)"):
        layer(x.float())


def test_the_input_boundary_in_one_call_matches_the_torch_ops():
    x = torch.randn(4000) * 4
    x[:6] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 300.0]) * 0.0137  # ties round half to even, as torch.round
    for scale, zero, qmax in ((0.0137, 3, 255), (1 / 255, 0, 127), (0.1, 60, 127)):
        boundary = QuantizeToCodes(scale, zero, qmax)
        want = torch.clamp(torch.round(x / scale) + zero, 0, qmax).to(torch.uint8)
        assert torch.equal(boundary(x), want)
        assert torch.equal(boundary(x.reshape(40, 100).t()), want.reshape(40, 100).t())  # strided: torch's ops
        images = x.reshape(2, 5, 20, 20).contiguous(memory_format=torch.channels_last)  # a float layer's output
        codes = boundary(images)
        assert q8.quantize(images, scale, zero, qmax) is not None  # one C pass, not the torch ops' four
        assert torch.equal(codes, want.reshape(2, 5, 20, 20)) and codes.is_contiguous(memory_format=torch.channels_last)
        nchw = x.reshape(2, 10, 20, 10)  # a model's input, read by convolutions: channels-last codes, one pass
        laid_out = QuantizeToCodes(scale, zero, qmax, channels_last=True)(nchw)
        assert laid_out.is_contiguous(memory_format=torch.channels_last) and not laid_out.is_contiguous()
        assert torch.equal(laid_out, want.reshape(2, 10, 20, 10))
    nan = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]).reshape(1, 4, 1, 1)
    assert QuantizeToCodes(0.1, 3, 255, channels_last=True)(nan).flatten().tolist() == [0, 255, 0, 13]


def test_an_integer_bias_float32_could_not_hold_runs_exactly_and_bad_configs_are_refused():
    weight = torch.ones(2, 16, dtype=torch.int8)
    layer, reference = pair(weight, 3, 255, requantize=False, relu=False)
    big = torch.tensor([10 ** 8 + 1, -(10 ** 8) - 3], dtype=torch.int32)  # float32 keeps neither (24-bit mantissa)
    assert not torch.equal(big.float().to(torch.int64), big.to(torch.int64))
    layer.bias.copy_(big)
    reference.bias.copy_(big)
    x = torch.randint(0, 256, (5, 16), dtype=torch.uint8)
    assert layer.c_refusal() is None
    assert torch.equal(layer(x), reference(x.to(torch.int32) - 3))  # bit for bit: the int32 bias as it is
    with pytest.raises(ConfigError, match="c_int8 runs linear layers"):
        NativeLayer("conv2d", [2, 1, 3, 3], 0.1, 0, "uint8", kernel="c_int8")
    with pytest.raises(ConfigError, match="input one of"):
        NativeLayer("linear", [2, 3], 0.1, 0, "uint8", kernel="int8", input="int8")
    with pytest.raises(ConfigError, match="input_qmax=300"):
        NativeLayer("linear", [2, 3], 0.1, 0, "uint8", kernel="c_int8", input_qmax=300)


@pytest.fixture(scope="module")
def lenet300(trained_digits):
    """LeNet-300-100 on the 8x8 digits (40 full-batch Adam steps: about 96% on the test set), fake-quantized
    (8-bit weights, 7-bit activations: the native backend runs on CPUs without VNNI too) and lowered to the
    reference backend."""
    data = trained_digits.data
    torch.manual_seed(0)
    model = LeNet300100(in_features=64)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data.train_x), data.train_y).backward()
        optimizer.step()
    model.eval()
    x = data.train_x[:256]
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                    activations=ActivationConfig(bits=7))],
                            example_inputs=(x[:2],), calibration_data=[x[i:i + 64] for i in range(0, 256, 64)])
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    return data, fq, reference, model


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_lenet300_on_our_kernel_is_the_reference_bit_for_bit_and_survives_a_file(lenet300, tmp_path):
    data, fq, reference, _ = lenet300
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("c_int8",))], example_inputs=(data.train_x[:2],))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["kernels"] == {"int8": 0, "float": 0, "c_int8": 3} and stats["float_code_edges"] == 0
    assert stats["float_to_integer_boundaries"] == stats["boundaries_fused"] == 1
    # flatten -> three layers -> logits: the input's quantization inside the first layer's call, nothing between
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [n.target for n in calls] == [torch.flatten, "fc1.native", "fc2.native", "fc3.native"]
    assert [gm.get_submodule(f"fc{i}.native").input for i in (1, 2, 3)] == ["float32", "uint8", "uint8"]
    with torch.no_grad():
        want, got = reference(data.test_x), gm(data.test_x)
        assert torch.equal(got, want)
        assert torch.equal(gm(data.test_x.double()), reference(data.test_x.double()))  # quantized as unfused
        rows = data.test_x[:6].flatten(1)
        assert torch.equal(gm.fc1.native(rows.reshape(2, 3, 64)), gm.fc1.native(rows).reshape(2, 3, 300))
    assert (got.argmax(1) == data.test_y).float().mean().item() >= 0.85  # trained, not a constant
    fxcompress.save(gm, tmp_path / "c.fxc")
    loaded = fxcompress.load(tmp_path / "c.fxc")
    assert [loaded.get_submodule(f"fc{i}.native").kernel for i in (1, 2, 3)] == ["c_int8"] * 3
    assert loaded.fc1.native.input_qmax == 127
    with torch.no_grad():
        assert torch.equal(loaded(data.test_x), want)


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_our_kernel_is_timed_beside_the_others_and_absent_without_a_compiler(lenet300, monkeypatch, tmp_path):
    data, fq, reference, _ = lenet300
    x = data.train_x[:2]
    gm = fxcompress.compile(fq, [LowerToInteger(repeats=3)], example_inputs=(x,))
    layers = fxcompress.history(gm)[-1].stats["layers"]
    assert all(set(layer["times_ms"]) == {"int8", "float", "c_int8"} for layer in layers.values())
    with torch.no_grad():
        want, got = reference(data.test_x), gm(data.test_x)
    assert (want.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    assert (want - got).abs().max().item() <= (want.max() - want.min()).item() / 255
    forced = fxcompress.compile(fq, [LowerToInteger(kernels=("c_int8",))], example_inputs=(x,))
    fxcompress.save(forced, tmp_path / "c.fxc")
    monkeypatch.setattr(q8, "c_library", lambda: None)  # a machine without a C compiler
    gm = fxcompress.compile(fq, [LowerToInteger(repeats=1)], example_inputs=(x,))
    assert all("c_int8" not in layer["times_ms"] for layer in fxcompress.history(gm)[-1].stats["layers"].values())
    with pytest.raises(PreconditionError, match=r"no kernel of kernels=\('c_int8',\) can run layer 'fc1' "
                                                 r"\(c_int8: no C compiler"):
        fxcompress.compile(fq, [LowerToInteger(kernels=("c_int8",))], example_inputs=(x,))
    loaded = fxcompress.load(tmp_path / "c.fxc")  # the file opens; running it names the kernel and the way out
    with pytest.raises(PreconditionError, match=r"kernel 'c_int8' cannot run here \(no C compiler.*\); lower "
                                                 r"again, or remeasure"):  # fc1, which reads the float input
        loaded(data.test_x)
    with pytest.raises(PreconditionError, match=r"cannot run here \(no C compiler.*\); lower again, or remeasure"):
        loaded.fc2.native(torch.zeros(1, 300, dtype=torch.uint8))
    chosen = remeasure(loaded, (x,), repeats=1)  # the way out: every layer, fc1 too, onto a kernel this machine has
    assert {c["kernel"] for c in chosen.values()} <= {"int8", "float"} and len(chosen) == 3
    with torch.no_grad():
        got = loaded(data.test_x)
    assert (want - got).abs().max().item() <= (want.max() - want.min()).item() / 255


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_remeasure_chooses_again_among_the_kernels_each_native_layer_can_run_where_it_stands(lenet300):
    data, fq, reference, _ = lenet300
    x = data.test_x
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("c_int8",))], example_inputs=(x[:2],))
    with torch.no_grad():
        want = reference(x)
    assert gm.fc1.native.input == "float32"  # fc1 quantizes the model's input inside our kernel's call
    chosen = remeasure(gm, (x[:33],), {NativeLayer: ("int8",)}, repeats=1)  # only oneDNN's allowed
    # fc1 moves too: it quantizes the float input onto the same codes first, then runs oneDNN's kernel
    assert {path: c["kernel"] for path, c in chosen.items()} == {"fc1.native": "int8", "fc2.native": "int8",
                                                                 "fc3.native": "int8"}
    assert gm.fc2.native.kernel == "int8" and set(gm.fc2.native.kernel_choice.times_ms) == {"int8"}
    with torch.no_grad():
        got = gm(x)
    assert (want - got).abs().max().item() <= (want.max() - want.min()).item() / 255  # oneDNN: within a step
    remeasure(gm, (x[:33],), {NativeLayer: ("float",)}, repeats=1)
    with torch.no_grad():
        got = gm(x)
    assert gm.fc1.native.kernel == "float" and (want - got).abs().max().item() <= (want.max() - want.min()).item() / 255
    chosen = remeasure(gm, (x[:1],), repeats=3)  # every kernel: each layer times all three at batch 1
    assert [set(c["times_ms"]) for c in chosen.values()] == [{"int8", "float", "c_int8"}] * 3
    remeasure(gm, (x[:33],), {NativeLayer: ("c_int8",)}, repeats=1)
    with torch.no_grad():
        assert torch.equal(gm(x), want)  # back on our kernel: the reference bit for bit again
    with pytest.raises(ConfigError, match="no kernel named 'fp16'"):
        gm.fc2.native.kernel_refusals(["fp16"])


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_layers_chosen_float_can_move_to_int8_kernels_when_measured_again(lenet300, tmp_path):
    """A run of float layers passes its codes as float32; measured again (another batch size or machine), any of
    them may move to an int8 kernel, which casts those integer codes at its edges: nothing else changes."""
    data, fq, reference, _ = lenet300
    x = data.test_x
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("float",))], example_inputs=(x[:2],))
    assert [(m.input, m.output) for m in (gm.fc1.native, gm.fc2.native, gm.fc3.native)] == \
        [("float_codes", "float_codes"), ("float_codes", "float_codes"), ("float_codes", "float32")]
    with torch.no_grad():
        want = reference(x)
    chosen = remeasure(gm, (x[:1],), repeats=1)  # every kernel fits every layer, float codes or not
    assert all(set(c["times_ms"]) == {"int8", "float", "c_int8"} for c in chosen.values())
    remeasure(gm, (x[:33],), {NativeLayer: ("c_int8",)}, repeats=1)
    assert {m.kernel for m in (gm.fc1.native, gm.fc2.native, gm.fc3.native)} == {"c_int8"}
    with torch.no_grad():
        assert torch.equal(gm(x), want)  # our C kernel is the reference bit for bit, float32 codes between
    remeasure(gm, (x[:33],), {NativeLayer: ("int8",)}, repeats=1)
    assert gm.fc2.native.kernel == "int8"
    with torch.no_grad():
        got = gm(x)
    step = (want.max() - want.min()).item() / 255
    assert (want - got).abs().max().item() <= step  # oneDNN rounds requantization its own way: within a step
    assert (want.argmax(1) == got.argmax(1)).float().mean().item() >= 0.995
    fxcompress.save(gm, tmp_path / "moved.fxc")
    loaded = fxcompress.load(tmp_path / "moved.fxc")
    assert (loaded.fc2.native.kernel, loaded.fc2.native.input) == ("int8", "float_codes")
    with torch.no_grad():
        assert torch.equal(loaded(x), got)


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_torch_export_runs_our_kernel_as_a_custom_op(lenet300):
    data, fq, reference, _ = lenet300
    gm = fxcompress.compile(fq, [LowerToInteger(kernels=("c_int8",))], example_inputs=(data.train_x[:2],))
    exported = torch.export.export(gm, (data.test_x[:4],))
    assert sum(n.target is torch.ops.fxcompress.q8_linear.default for n in exported.graph.nodes) == 3
    with torch.no_grad():
        assert torch.equal(exported.module()(data.test_x[:4]), reference(data.test_x[:4]))


@pytest.mark.skipif(not native.available(), reason="this torch build has no oneDNN int8 kernels")
def test_eight_bit_activations_run_natively_on_our_kernel_bit_for_bit(lenet300):
    """8-bit activations times 8-bit weights may pass int16 in oneDNN's kernel on a CPU without VNNI; ours
    multiplies int16 pairs into int32 (vpmaddwd), so forced onto it the model is the reference exactly."""
    data, _, _, model = lenet300  # the same trained weights with 8-bit activations
    x = data.train_x[:256]
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                    activations=ActivationConfig(bits=8))],
                            example_inputs=(x[:2],), calibration_data=[x[i:i + 64] for i in range(0, 256, 64)])
    reference = fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x[:2],))
    gm = fxcompress.compile(fq, [LowerToInteger(backend="native", kernels=("c_int8",))], example_inputs=(x[:2],))
    assert not gm.fc2.native.c_packed().raw  # input codes up to 255: the int16 path
    with torch.no_grad():
        assert torch.equal(gm(data.test_x), reference(data.test_x))


def test_the_op_of_a_traced_graph_calls_its_layer_and_computes_any_other_arguments_itself(monkeypatch):
    """A compiled graph passes a layer's own tensors to `fxcompress::q8_linear`: the op finds that layer's
    packed arguments and makes the one ctypes call; other tensors (a copy) go through the checked path."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(-128, 128, (9, 40), generator=gen, dtype=torch.int8)
    layer, reference = pair(weight, 7, 255, requantize=True, relu=True)
    x = torch.randint(0, 256, (3, 40), generator=gen, dtype=torch.uint8)
    want = expected(reference, x, 7, requantize=True, relu=True)
    p = layer.c_packed()
    args = (p.weight, p.bias, p.mult, p.shift, p.scale, p.in_features, p.x_zero, p.y_zero, p.low, p.high, p.relu,
            p.raw, p.x_scale, p.x_qmax)
    checked = []
    monkeypatch.setattr(q8, "eager", lambda *a: checked.append(1) or EAGER(*a))
    assert torch.equal(torch.ops.fxcompress.q8_linear(x, *args), want) and not checked  # found: one ctypes call
    copies = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args)
    assert torch.equal(torch.ops.fxcompress.q8_linear(x, *copies), want) and checked == [1]
    lower = args[:8] + (p.low + 50,) + args[9:]  # the same tensors and another clamp: not that layer
    assert torch.equal(torch.ops.fxcompress.q8_linear(x, *lower), want.clamp_min(50)) and checked == [1, 1]


EAGER = q8.eager
