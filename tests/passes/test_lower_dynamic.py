"""LowerDynamicInt8 against torch.ao's quantize_dynamic."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.kernels.dynamic import DynamicInt8Linear, fbgemm_available
from fxcompress.kernels.timing import remeasure
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerDynamicInt8


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 48)).eval()


def lower(model, x, passes=(), **options):
    return fxcompress.compile(model, [*passes, LowerDynamicInt8(repeats=2, **options)], example_inputs=(x,))


def rounding_sigma(model, x):
    """Per output, the standard deviation of the error from rounding each layer's input onto a 7-bit
    grid of its range and each weight onto an 8-bit grid of its row: independent errors uniform within
    half a step have variance step^2 / 12, summed over the products they enter; the first layer's
    variance reaches the output through the second layer's squared weights (ReLU adds none)."""
    fc1, fc2 = model[0], model[2]
    with torch.no_grad():
        h = torch.relu(fc1(x))
        first = _layer_variance(fc1.weight, x)
        return (_layer_variance(fc2.weight, h) + first @ (fc2.weight ** 2).t()).sqrt()


def _layer_variance(weight, inputs):
    x_step = (inputs.amax().clamp(min=0) - inputs.amin().clamp(max=0)) / 127
    w_step = weight.abs().amax(dim=1) / 127
    return ((weight ** 2).sum(dim=1) * x_step ** 2 + (inputs ** 2).sum(dim=1, keepdim=True) * w_step ** 2) / 12


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no fbgemm")
def test_close_to_torch_ao_quantize_dynamic():
    model, x = mlp(), torch.randn(1, 96)
    gm = lower(model, x, kernels=("fbgemm",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao is deprecated; its dynamic quantization is still the reference
        reference = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig})
    ours, theirs, exact = gm(x), reference(x), model(x)
    # Both round the weights per channel (ours on [-127, 127], torch.ao's on [-128, 127] with a step of
    # max|w| / 127.5) and each layer's input on a 7-bit grid of its range at run time (the same fbgemm
    # kernel), so each differs from the float model by a sum of rounding errors whose standard deviation
    # sigma follows from the weights and inputs (rounding_sigma; about 0.8% of the largest output here).
    # Tolerance: 5 sigma per output from the float model, 5 sqrt(2) sigma between the two (independent
    # weight roundings). A dropped bias, a transposed weight or an unscaled output misses it by far.
    sigma = rounding_sigma(model, x)
    assert bool(((ours - exact).abs() <= 5 * sigma).all())
    assert bool(((theirs - exact).abs() <= 5 * sigma).all())
    assert bool(((ours - theirs).abs() <= 5 * 2 ** 0.5 * sigma).all())
    assert float(sigma.max()) < 0.01 * float(exact.detach().abs().max())  # a real constraint, not a free pass


def test_fake_quant_weights_are_the_ones_lowered(tmp_path):
    model, x = mlp(), torch.randn(2, 96)
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)],
                            example_inputs=(x,))
    gm = lower(fq, x)
    stats = fxcompress.history(gm)[-1].stats
    assert {s["weights"] for s in stats["layers"].values()} == {"fake-quant grid"}
    for path, module in gm.named_modules():
        if isinstance(module, DynamicInt8Linear):
            module.kernel, module._run = "float", None  # no activation rounding: the fake-quant layer itself
    torch.testing.assert_close(gm(x), fq(x), rtol=1e-5, atol=1e-5)
    fxcompress.save(gm, tmp_path / "dyn.fxc")
    loaded = fxcompress.load(tmp_path / "dyn.fxc")
    assert torch.equal(loaded(x), gm(x))
    assert not list(loaded.parameters())  # int8 codes, scales and biases are buffers; no float weight


def test_a_masked_model_lowers_its_masked_weights(tmp_path):
    """Masks are a weight chain without a grid: the layer quantizes the weight the chain computes, so pruned
    weights stay zero codes (it used to refuse every masked layer)."""
    model, x = mlp(), torch.randn(2, 96)
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.7)], example_inputs=(x,))
    gm = lower(masked, x)
    stats = fxcompress.history(gm)[-1].stats
    assert set(stats["layers"]) == {"0", "2"}
    assert {s["weights"] for s in stats["layers"].values()} == {"symmetric 8-bit per channel (here) of the weight "
                                                                "its chain computes"}
    masks = dict(masked.named_buffers())
    for layer in ("0", "2"):
        module = gm.get_submodule(f"{layer}.dynamic_int8")
        pruned = masks[f"{layer}.weight_mask"] == 0
        assert bool(pruned.any()) and bool((module.weight[pruned] == 0).all())  # pruned weights are zero codes
        module.kernel, module._run = "float", None  # no activation rounding: the 8-bit weights alone
    expected = masked(x)
    assert (gm(x) - expected).abs().max().item() <= 0.01 * expected.abs().max().item()
    fxcompress.save(gm, tmp_path / "dyn.fxc")
    assert torch.equal(fxcompress.load(tmp_path / "dyn.fxc")(x), gm(x))


def test_layers_with_other_grids_are_skipped_with_the_reason():
    model, x = mlp(), torch.randn(2, 96)
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, select="0")], example_inputs=(x,))
    gm = lower(fq, x)
    stats = fxcompress.history(gm)[-1].stats
    assert "not a symmetric linear grid" in stats["skipped"]["0"]
    assert stats["layers"]["2"]["weights"] == "symmetric 8-bit per channel (here)"
    kernels = {s["kernel"] for s in stats["layers"].values()}
    assert kernels <= {"float", "fbgemm", "int_mm"}


def test_summary_shows_each_lowered_layer_with_its_kernel():
    model, x = mlp(), torch.randn(2, 96)
    gm = lower(model, x)
    rows = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    module = gm.get_submodule("0.dynamic_int8")
    assert rows["0.dynamic_int8"]["kernel"] == module.kernel
    assert rows["0.dynamic_int8"]["compressed_bytes"] == 96 * 128 + 128 * 4 + 128 * 4  # int8 codes, scales, bias


def test_remeasure_chooses_again_among_the_allowed_kernels():
    model, x = mlp(), torch.randn(2, 96)
    gm = lower(model, x)
    chosen = remeasure(gm, (x,), {DynamicInt8Linear: ()}, repeats=1)  # only the float kernel allowed
    assert set(chosen) == {"0.dynamic_int8", "2.dynamic_int8"}
    assert all(c["kernel"] == "float" and set(c["times_ms"]) == {"fp32", "float"} for c in chosen.values())
    first = gm.get_submodule("0.dynamic_int8")
    torch.testing.assert_close(first(x), torch.nn.functional.linear(x, first.dequantize(), first.bias))


def test_a_model_converted_after_lowering_runs_in_its_new_dtype():
    """`.double()` converted the float32 scales and bias every kernel reads: each raised torch's own error."""
    x = torch.randn(16, 96)
    gm = lower(mlp(), x)
    expected = gm(x)
    gm.double()
    assert all(m.weight_scale.dtype == torch.float32 for m in gm.modules() if isinstance(m, DynamicInt8Linear))
    out = gm(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, rtol=1e-5, atol=1e-5)
