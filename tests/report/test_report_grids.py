"""The report's weight pictures for every quantized layer kind: per-channel and group-wise linear grids
mark the levels of one representative grid (the channel or group of median step) and count weights per
level over all of them; layers lowered to integer, oneDNN int8, weight-only and dynamic int8 modules get
a histogram too, their weights read back from the run-time module (and, for an integer layer whose
scale is folded away, from the reference model's grid)."""
import re

import pytest
import torch

import fxcompress
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import (ActivationConfig, InsertFakeQuant, LowerDynamicInt8, LowerToInteger,
                               LowerWeightOnly)
from fxcompress.quant.integer import IntegerLayer
from fxcompress.kernels.native import available as native_available
from fxcompress.report import layer_weights, write_report
from fxcompress.zoo import LeNet5

X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))]


@pytest.fixture(scope="module")
def per_channel():
    """LeNet-5 (8x8) with 8-bit symmetric per-channel weights and 7-bit activations (integer-lowerable)."""
    torch.manual_seed(0)
    return fxcompress.compile(LeNet5(image_size=8).eval(),
                              [InsertFakeQuant(method="linear", bits=8, per_channel=True, symmetric=True,
                                               activations=ActivationConfig(bits=7))],
                              example_inputs=(X,), calibration_data=CALIBRATION)


@pytest.fixture(scope="module")
def group_wise():
    """LeNet-5 (8x8): its linear layers on 4-bit asymmetric grids, one per 20 input features of each output."""
    torch.manual_seed(0)
    return fxcompress.compile(LeNet5(image_size=8).eval(), [InsertFakeQuant(method="linear", bits=4, per_channel=True,
                                                                            group_size=20, types=("linear",))],
                              example_inputs=(X,))


@pytest.fixture(scope="module")
def integer(per_channel):
    """per_channel lowered by LowerToInteger on a backend, made once per backend: two tests read the same one."""
    made = {}

    def lower(backend):
        if backend not in made:
            made[backend] = fxcompress.compile(per_channel, [LowerToInteger(backend=backend)], example_inputs=(X,))
        return made[backend]
    return lower


def _fake_quant_weights(gm):
    return {layer.name: effective_weight(gm, layer) for layer in find_layers(gm)}


def _on_levels(values, levels):
    """Every value lies on one of the levels (to float rounding of the step)."""
    distance = (values.reshape(-1, 1) - levels.reshape(1, -1)).abs().min(dim=1).values
    return bool((distance <= 1e-6 * levels.abs().max()).all())


def test_a_per_channel_grid_marks_the_levels_of_its_median_channel(per_channel):
    for weights in layer_weights(per_channel):
        grid = weights.grid
        steps = grid.scale.flatten()
        row = int(steps.argsort()[(len(steps) - 1) // 2])
        assert grid.scale.shape == (weights.after.shape[0], 1) and steps[row] == steps.median()
        assert torch.allclose(weights.centroids, torch.arange(-127, 128).float() * steps[row])
        assert _on_levels(weights.after[row], weights.centroids)  # that channel's weights sit on the marks
        other = int(steps.argmax())  # another channel's weights do not, unless it shares the step
        assert steps[other] == steps[row] or not _on_levels(weights.after[other], weights.centroids)
        assert weights.marks == f"255 levels of channel {row}" and "median step" in weights.caption
        # the counts per level are the codes of every channel: they rebuild the weight exactly
        assert torch.allclose(grid.dequantize().reshape(weights.after.shape), weights.after, atol=1e-7)


def test_a_group_wise_grid_marks_one_group_and_counts_every_group(group_wise):
    fc1 = next(w for w in layer_weights(group_wise) if w.name == "fc1")
    grid = fc1.grid
    assert grid.group_size == 20 and grid.scale.shape == (500, 10)
    index = int(grid.scale.flatten().argsort()[(grid.scale.numel() - 1) // 2])
    row, group = divmod(index, 10)
    assert fc1.marks == f"16 levels of group {row}/{group}"
    assert f"inputs {20 * group}-{20 * group + 19}" in fc1.caption
    assert _on_levels(fc1.after[row, 20 * group:20 * group + 20], fc1.centroids)
    assert torch.allclose(grid.dequantize(), fc1.after, atol=1e-7)
    convs = [w for w in layer_weights(group_wise) if w.name.startswith("conv")]
    assert all(w.grid is None and w.centroids is None for w in convs)  # not quantized: nothing to mark


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_integer_lowered_layers_get_their_weights_read_back(per_channel, integer, backend):
    if backend == "native" and not native_available():
        pytest.skip("this torch build has no oneDNN int8 kernels")
    lowered = integer(backend)
    assert find_layers(lowered) == []  # no layer is left in float form: all four come from the table
    expected = _fake_quant_weights(per_channel)
    alone = {w.name: w for w in layer_weights(lowered)}
    referenced = {w.name: w for w in layer_weights(lowered, reference=per_channel)}
    assert list(alone) == list(referenced) == ["conv1", "conv2", "fc1", "fc2"]
    for name, weight in expected.items():
        assert torch.allclose(referenced[name].after, weight, atol=1e-7)
        assert torch.equal(referenced[name].before, layer_weights(per_channel)[list(expected).index(name)].before)
        assert referenced[name].grid is not None and referenced[name].centroids.numel() >= 255
        if backend == "reference":  # codes only: the scale is folded into the requantization
            codes = lowered.get_submodule(f"{name}.integer").weight
            assert isinstance(lowered.get_submodule(f"{name}.integer"), IntegerLayer)
            assert alone[name].codes_only and torch.equal(alone[name].after, codes.float())
            assert alone[name].centroids is None and "folded" in alone[name].caption
        else:  # oneDNN's layer keeps codes and scales: the real weights without a reference
            assert torch.allclose(alone[name].after, weight, atol=1e-7) and alone[name].grid is not None


def test_weight_only_and_dynamic_int8_layers_get_their_weights_read_back(group_wise):
    lowered = fxcompress.compile(group_wise, [LowerWeightOnly()], example_inputs=(X,))
    expected = _fake_quant_weights(group_wise)
    weights = {w.name: w for w in layer_weights(lowered, reference=group_wise)}
    assert torch.equal(weights["fc1"].after, expected["fc1"])  # bit-identical to the fake-quant weight
    assert weights["fc1"].grid.group_size == 20 and weights["fc1"].centroids.numel() == 16
    dense = LeNet5(image_size=8).eval()
    dynamic = fxcompress.compile(dense, [LowerDynamicInt8()], example_inputs=(X,))
    fc2 = next(w for w in layer_weights(dynamic, reference=dense) if w.name == "fc2")
    assert torch.equal(fc2.before, dense.fc2.weight.detach())
    assert (fc2.after - dense.fc2.weight).abs().max() <= fc2.grid.scale.max() / 2 + 1e-7  # within half a step


def test_the_report_draws_lowered_layers_with_their_caption(per_channel, integer, tmp_path):
    pytest.importorskip("matplotlib")
    lowered = integer("reference")
    # the two largest of the four integer layers (each picture costs a second of matplotlib)
    files = write_report(lowered, tmp_path / "r.html", reference=per_channel, draw_graph=False, max_histograms=2)
    page = files.html.read_text()
    assert files.pictures == 1 + 2  # the bars and the two histograms
    assert 'alt="weights of conv2"' in page and 'alt="weights of fc1"' in page
    assert len(re.findall(r"<figcaption>Marked: the 255 grid levels of output channel \d+", page)) == 2


def test_lowered_layers_deep_in_the_model_keep_their_layer_names():
    from torch import nn

    from fxcompress.passes import InsertMasks, LowerToSparse
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10)).eval()
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.7)], example_inputs=(X,))
    expected = _fake_quant_weights(masked)
    for source, lowering in ((masked, LowerToSparse()), (model, LowerDynamicInt8())):
        lowered = fxcompress.compile(source, [lowering], example_inputs=(X,))
        weights = {w.name: w for w in layer_weights(lowered, reference=source)}
        assert list(weights) == ["1.0", "2"]  # the layers' paths, wherever the pass put its module
        assert all(weights[n].before is not None for n in weights)  # so the reference's layers were found
        if isinstance(lowering, LowerToSparse):
            assert all(torch.equal(weights[n].after, expected[n]) for n in expected)  # sparse keeps the floats
