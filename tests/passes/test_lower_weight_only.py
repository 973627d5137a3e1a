"""LowerWeightOnly: fake-quant linear layers become integer codes run by a measured kernel."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.kernels.timing import remeasure
from fxcompress.kernels.weight_only import WeightOnlyLinear
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerWeightOnly


class Block(nn.Module):
    """A linear layer, a GPT-2 style addmm layer ([in, out] weight) and a head."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(128, 256)
        self.proj_weight = nn.Parameter(torch.randn(256, 64) * 0.05)
        self.proj_bias = nn.Parameter(torch.randn(64))
        self.head = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        h = torch.addmm(self.proj_bias, h, self.proj_weight)
        return self.head(h)


def quantized(passes, x=None):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 128) if x is None else x
    return fxcompress.compile(model, passes, example_inputs=(x,)), x


def lowered(fq, x, **options):
    return fxcompress.compile(fq, [LowerWeightOnly(repeats=2, **options)], example_inputs=(x,))


@pytest.mark.parametrize("config", [dict(bits=4, group_size=32), dict(bits=4, group_size=64, symmetric=True),
                                    dict(bits=8, per_channel=True, symmetric=True), dict(bits=8)])
def test_outputs_equal_the_fake_quant_model(config):
    fq, x = quantized([InsertFakeQuant(method="linear", **config)])
    gm = lowered(fq, x)
    modules = [m for m in gm.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(modules) == 3
    # no float weight is left: only the codes, scales, zero-points and biases
    assert not [name for name, p in gm.named_parameters()]
    assert all(t.numel() < 64 * 32 for t in gm.buffers() if t.is_floating_point())  # scales and biases only
    for batch in (x, torch.randn(5, 128)):
        torch.testing.assert_close(gm(batch), fq(batch), rtol=1e-5, atol=1e-5)
    stats = fxcompress.history(gm)[-1].stats
    assert len(stats["layers"]) == 3 and not stats["skipped"]
    for layer in stats["layers"].values():
        assert layer["kernel"] in layer["times_ms"] and "float" in layer["times_ms"]
        assert layer["held_bytes"] < layer["fp32_bytes"] / 3


def test_lowered_model_saves_and_loads_with_its_kernel(tmp_path):
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    fxcompress.save(gm, tmp_path / "w4.fxc")
    loaded = fxcompress.load(tmp_path / "w4.fxc")
    assert torch.equal(loaded(x), gm(x))
    before = {n: (m.kernel, m.times_ms) for n, m in gm.named_modules() if isinstance(m, WeightOnlyLinear)}
    after = {n: (m.kernel, m.times_ms) for n, m in loaded.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert before == after and len(before) == 3
    assert (tmp_path / "w4.fxc").stat().st_size < sum(p.numel() * 4 for p in Block().parameters()) / 4


def test_masked_weights_lower_with_their_zeros():
    fq, x = quantized([InsertMasks(sparsity=0.5), InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    torch.testing.assert_close(gm(x), fq(x), rtol=1e-5, atol=1e-5)


def test_kmeans_codebook_on_a_grid_lowers_and_a_trained_one_is_skipped_with_the_reason():
    fq, x = quantized([InsertFakeQuant(method="kmeans", bits=4, per_channel=True)])
    quant = fq.get_submodule("fc.weight_quant")
    step = torch.tensor(0.01)
    with torch.no_grad():  # centroids snapped onto multiples of one step: an exact uniform grid
        quant.codebook.copy_(torch.round(quant.codebook / step) * step)
    gm = lowered(fq, x)
    stats = fxcompress.history(gm)[-1].stats
    assert list(stats["layers"]) == ["fc"]
    assert "not a uniform grid" in stats["skipped"]["head"]
    torch.testing.assert_close(gm(x), fq(x), rtol=1e-5, atol=1e-5)


def test_layers_it_cannot_lower_are_named_with_the_reason():
    fq, x = quantized([InsertFakeQuant(method="fixed_point", bits=8, select="fc"),
                       InsertFakeQuant(method="linear", bits=4, group_size=32, select="head")])
    gm = lowered(fq, x)
    skipped = fxcompress.history(gm)[-1].stats["skipped"]
    assert "fixed_point grid" in skipped["fc"] and "no fake-quant" in skipped["proj_weight"]
    with pytest.raises(PreconditionError, match="LowerWeightOnly: no layer to lower.*fc"):
        lowered(quantized([])[0], x)


def test_summary_shows_each_lowered_layer_with_its_kernel():
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    rows = {row["layer"]: row for row in fxcompress.summary(gm).rows}
    modules = dict(gm.named_modules())
    for path in ("fc.weight_only", "head.weight_only"):
        assert rows[path]["kernel"] == modules[path].kernel
        assert rows[path]["latency_ms"] == modules[path].kernel_choice.ms
        assert rows[path]["compressed_bytes"] == modules[path].held_bytes()
    assert rows["fc.weight_only"]["macs"] == 2 * 128 * 256


def test_a_loaded_model_is_measured_again_and_keeps_its_outputs(tmp_path):
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    fxcompress.save(gm, tmp_path / "w4.fxc")
    loaded = fxcompress.load(tmp_path / "w4.fxc")
    chosen = remeasure(loaded, (x,), {WeightOnlyLinear: ()}, repeats=1)  # nothing but the float kernel allowed
    assert set(chosen) == {"fc.weight_only", "proj_weight_weight_only", "head.weight_only"}
    assert all(c["kernel"] == "float" and set(c["times_ms"]) == {"fp32", "float"} for c in chosen.values())
    torch.testing.assert_close(loaded(x), fq(x), rtol=1e-5, atol=1e-5)
    again = remeasure(loaded, (torch.randn(1, 128),), repeats=1)
    modules = dict(loaded.named_modules())
    # the returned times are the statistics' (rounded to 6 decimals of a millisecond), the layer keeps them unrounded
    assert all(modules[path].kernel == c["kernel"] and modules[path].times_ms == pytest.approx(c["times_ms"], abs=1e-6)
               for path, c in again.items())
    torch.testing.assert_close(loaded(x), fq(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="no layer with a measured kernel"):
        remeasure(fq, (x,))


def test_statistics_quote_the_float_layer_it_replaced():
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=64)])
    stats = fxcompress.history(lowered(fq, x))[-1].stats["layers"]
    for layer in stats.values():
        times = layer["times_ms"]
        assert layer["speedup"] == pytest.approx(times["fp32"] / times[layer["kernel"]], rel=1e-3)
        assert layer["kernel"] != "fp32" and layer["packing"] == "blocks"


def test_torch_export_traces_the_c_kernel_as_one_op():
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    modules = [m for m in gm.modules() if isinstance(m, WeightOnlyLinear)]
    if modules[0].refusals(["c_gemv"]):
        pytest.skip(modules[0].refusals(["c_gemv"])["c_gemv"])
    for module in modules:
        module.kernel, module._run = "c_gemv", None
    expected = gm(x)
    exported = torch.export.export(gm, (x,))
    ops = [n for n in exported.graph.nodes if "weight_only_gemv" in str(n.target)]
    assert len(ops) == 3
    torch.testing.assert_close(exported.module()(x), expected)  # torch.compile traces through the same op


@pytest.mark.parametrize("kernel", ["float", "c_gemv", "int8pack", "fbgemm_fp16"])
@pytest.mark.parametrize("pruned", [slice(3, 9), slice(None)])  # six rows, the whole layer
def test_pruned_rows_and_a_pruned_layer_give_exactly_their_bias(kernel, pruned):
    """A group of zero weights keeps a step borrowed from other groups (1 for a layer of zeros); the C kernel's
    s * (sum u x - z sum x) cancels its two terms only up to rounding, so those zeros came out as noise of 1e-3
    of the outputs. Lowered with step 0 they are exact zeros in every kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight[pruned] = 0
    x = torch.randn(4, 64)
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, per_channel=True, symmetric=True)],
                            example_inputs=(x,))
    gm = lowered(fq, x)
    (layer,) = [m for m in gm.modules() if isinstance(m, WeightOnlyLinear)]
    if layer.refusals([kernel]):
        pytest.skip(f"{kernel} cannot run here: {layer.refusals([kernel])}")
    layer.kernel, layer._run = kernel, None
    with torch.no_grad():
        got, expected = gm(x), fq(x)
    assert torch.equal(got[:, pruned], model[0].bias[pruned].expand(4, -1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_model_converted_after_lowering_computes_as_the_fake_quant_model(dtype):
    """`.double()` converted the scales the C kernel reads as float32 (outputs of 1e21, silently) and made
    torch's kernels raise their own errors; the lowered layers keep their float32 scales and take any float input."""
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    for module in gm.modules():
        if isinstance(module, WeightOnlyLinear):
            module.kernel, module._run = "c_gemv" if not module.refusals(["c_gemv"]) else module.kernel, None
    gm.to(dtype)
    # computed in float32 (the codes' own grid, not one recomputed from converted weights), rounded to the
    # dtype after each layer
    expected = fq(x.to(dtype).float())
    tolerance = 1e-5 if dtype == torch.float64 else 1e-2
    out = gm(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_a_kernel_that_cannot_run_names_the_layer():
    fq, x = quantized([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    gm = lowered(fq, x)
    gm.fc.weight_only.kernel, gm.fc.weight_only._run = "int8pack", None  # grouped codes: int8pack refuses them
    with pytest.raises(PreconditionError, match="WeightOnlyLinear fc.weight_only: kernel 'int8pack' cannot run here"):
        gm(x)
