import math

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.layers import WeightTransform, find_layers, insert_on_weight
from fxcompress.zoo import LeNet5, LeNet300100


class PackedWeight(WeightTransform):
    """Stands for an encoded weight: no input, reports its exact storage."""

    bits = 3

    def __init__(self, weight):
        super().__init__()
        self.register_buffer("value", weight.clone())

    def forward(self):
        return self.value

    def storage_bytes(self):
        return {"indices": 7, "codebook": 32}


class Rounder(WeightTransform):
    bits = 4

    def forward(self, w):
        return torch.round(w * 8) / 8


def test_dense_lenet300_rows_and_totals():
    gm = fxcompress.compile(LeNet300100().eval(), [], example_inputs=torch.randn(1, 784))
    s = fxcompress.summary(gm)
    rows = {r["layer"]: r for r in s.rows}
    assert rows["fc1"]["params"] == 784 * 300 + 300 and rows["fc1"]["weight_shape"] == (300, 784)
    assert rows["fc1"]["macs"] == 784 * 300 and rows["fc1"]["sparsity"] == 0.0
    assert s.totals["params"] == 266610 and s.totals["dense_bytes"] == 4 * 266610
    assert s.totals["ratio"] == pytest.approx(1.0)
    text = str(s)
    assert "fc1" in text and "compression ratio 1.00x" in text
    md = s.to_markdown()
    assert md.splitlines()[0].startswith("| layer | op |") and "| fc3 | linear |" in md


def test_conv_macs_and_sparsity_after_zeroing():
    model = LeNet5().eval()
    with torch.no_grad():
        model.conv2.weight[:25] = 0  # half the filters
    gm = fxcompress.compile(model, [], example_inputs=torch.randn(1, 1, 28, 28))
    rows = {r["layer"]: r for r in fxcompress.summary(gm).rows}
    assert rows["conv1"]["macs"] == 20 * 24 * 24 * 25
    assert rows["conv2"]["macs"] == 50 * 8 * 8 * 20 * 25
    assert rows["conv2"]["sparsity"] == 0.5 and rows["conv2"]["nonzeros"] == 25 * 20 * 25
    assert rows["conv2"]["macs_effective"] == rows["conv2"]["macs"] // 2
    # estimate: nonzeros at 32 bits + 8-bit relative indices + fp32 bias
    assert rows["conv2"]["compressed_bytes"] == math.ceil(12500 * 40 / 8) + 4 * 50
    assert rows["conv2"]["exact"] == "no"


def test_exact_bytes_and_bits_come_from_the_weight_chain():
    model = LeNet300100().eval()
    gm = fxcompress.compile(model, [], example_inputs=torch.randn(1, 784))
    layer = find_layers(gm)[2]  # fc3
    gm.add_submodule("fc3.weight_encoded", PackedWeight(model.fc3.weight.detach()))
    insert_on_weight(gm, layer, lambda g, w: g.call_module("fc3.weight_encoded", ()))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    row = next(r for r in fxcompress.summary(gm, torch.randn(1, 784)).rows if r["layer"] == "fc3")
    assert row["bits"] == 3 and row["exact"] == "yes"
    assert row["bytes_indices"] == 7 and row["bytes_codebook"] == 32 and row["bytes_bias"] == 4 * 10  # fp32 bias
    assert row["compressed_bytes"] == 7 + 32 + 40


def test_sqnr_of_a_quantizing_transform():
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    gm = fxcompress.compile(model, [], example_inputs=torch.randn(2, 64))
    gm.add_submodule("0.quant", Rounder())
    insert_on_weight(gm, find_layers(gm)[0], lambda g, w: g.call_module("0.quant", (w,)))
    gm.recompile()
    (row,) = fxcompress.summary(gm).rows
    w = model[0].weight.detach().double()
    q = torch.round(w * 8) / 8
    expected = 10 * math.log10(w.pow(2).sum() / (w - q).pow(2).sum())
    assert row["bits"] == 4 and row["sqnr_db"] == pytest.approx(expected, rel=1e-4)


def test_other_parameters_are_counted():
    from fxcompress.zoo import TransformerBlock
    model = TransformerBlock().eval()
    gm = fxcompress.compile(model, [], example_inputs=torch.randn(2, 8, 16))
    s = fxcompress.summary(gm)
    assert s.totals["params"] == sum(p.numel() for p in model.parameters())
    assert any(r["layer"] == "(other parameters)" for r in s.rows)


def test_summary_shows_history():
    gm = fxcompress.compile(LeNet300100().eval(), [], example_inputs=torch.randn(1, 784))
    assert "(no passes applied)" in str(fxcompress.summary(gm))


@pytest.fixture(scope="module")
def calibrated_lenet5():
    """(model, 8-bit per-channel fake-quant with 7-bit activations, inputs): calibrated once, lowered by
    each backend's test (compile copies it, so neither changes it)."""
    from fxcompress.passes import ActivationConfig, InsertFakeQuant
    torch.manual_seed(0)
    model, x = LeNet5(1, 8).eval(), torch.rand(16, 1, 8, 8)
    fq = fxcompress.compile(model, [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                    activations=ActivationConfig(bits=7))],
                            example_inputs=(x[:2],), calibration_data=[x])
    return model, fq, x


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_integer_lowered_layers_are_rows_with_the_bytes_they_hold(backend, calibrated_lenet5):
    from fxcompress.passes import LowerToInteger
    model, fq, x = calibrated_lenet5
    gm = fxcompress.compile(fq, [LowerToInteger(backend=backend)], example_inputs=(x[:2],))
    rows = {row["layer"].partition(".")[0]: row for row in fxcompress.summary(gm).rows}
    assert set(rows) == {"conv1", "conv2", "fc1", "fc2"}
    for name, row in rows.items():
        layer = model.get_submodule(name)
        assert row["layer"] == f"{name}.{backend}" if backend == "native" else row["layer"].startswith(name)
        assert row["params"] == layer.weight.numel() + layer.bias.numel()
        assert row["weight_shape"] == tuple(layer.weight.shape)
        held = layer.weight.numel() + layer.bias.numel() * 4  # int8 codes (symmetric 8-bit) in both backends
        assert row["compressed_bytes"] == held and row["bits"] <= 8
    float_macs = {row["layer"]: row["macs"] for row in fxcompress.summary(fq).rows}
    assert {name: row["macs"] for name, row in rows.items()} == float_macs and all(float_macs.values())


@pytest.mark.parametrize("lowering", ["dynamic_int8", "weight_only"])
def test_a_weight_only_or_dynamic_int8_layer_counts_in_the_total_sparsity(lowering):
    """Its row counts the zeros of the weight it computes with; the total divides the zeros of every
    counted row by those rows' weights (it once added this layer's weights, and none of its zeros)."""
    from fxcompress.passes import InsertFakeQuant, LowerDynamicInt8, LowerWeightOnly
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # half of each layer pruned by hand
        for layer in (model[1], model[3]):
            layer.weight[:, ::2] = 0
    x = torch.randn(4, 1, 8, 8)
    if lowering == "dynamic_int8":
        gm = fxcompress.compile(model, [LowerDynamicInt8(select="3", repeats=1)], example_inputs=(x,))
    else:
        passes = [InsertFakeQuant(method="linear", bits=8, select="3"), LowerWeightOnly(repeats=1)]
        gm = fxcompress.compile(model, passes, example_inputs=(x,))
    table = fxcompress.summary(gm)
    [row] = [r for r in table.rows if r["layer"] == f"3.{lowering}"]
    lowered = gm.get_submodule(f"3.{lowering}")
    zeros = int((lowered.dequantize_rows(0, 10) == 0).sum())
    assert zeros >= 160 and row["nonzeros"] == 320 - zeros and row["sparsity"] == zeros / 320
    first = gm.get_submodule("1").weight
    expected = (int((first == 0).sum()) + zeros) / (first.numel() + 320)
    assert table.totals["sparsity"] == pytest.approx(expected, abs=1e-12) and expected >= 0.5
