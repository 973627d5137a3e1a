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
        # int8 codes (symmetric 8-bit) in both backends, an int32 bias, and what requantizes: reference
        # multipliers and shifts (int64 a channel) or output scales (float64), native weight scales (float32)
        # and zero-points (int32); the rows once left all of these out
        lowered = gm.get_submodule(row["layer"])
        requant = {"reference": {"multiplier": 8, "shift": 8, "output_scale": 8},
                   "native": {"weight_scale": 4, "weight_zero_point": 4}}[backend]
        per_channel = sum(size for name, size in requant.items() if hasattr(lowered, name)) * len(layer.bias)
        ranges = 16 if hasattr(lowered, "low") else 0  # the reference's int64 output range [low, high]
        held = layer.weight.numel() + layer.bias.numel() * 4 + per_channel + ranges
        assert per_channel > 0 and row["compressed_bytes"] == held and row["bits"] <= 8
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


def _two_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval(), torch.randn(4, 1, 8, 8)


# (InsertFakeQuant options, bytes of what decodes fc "1"'s 32x64 codes): a linear grid stores a scale per grid
# (per tensor, per output channel, per group of 16 inputs) and, when asymmetric, a one-byte zero-point per grid;
# fixed point with int_bits stores nothing (the format is its configuration); per-channel k-means one table of
# 2^bits fp32 centroids per channel. The estimate once added a 2^bits-entry fp32 codebook to every grid.
GRID_DECODING = [
    (dict(method="linear", bits=4), 4 + 1),
    (dict(method="linear", bits=4, per_channel=True), 32 * (4 + 1)),
    (dict(method="linear", bits=4, per_channel=True, group_size=16), 32 * 4 * (4 + 1)),
    (dict(method="linear", bits=4, per_channel=True, group_size=16, symmetric=True), 32 * 4 * 4),
    (dict(method="linear", bits=4, per_channel=True, group_size=16, scale_dtype="float16"), 32 * 4 * (2 + 1)),
    (dict(method="fixed_point", bits=8, int_bits=2), 0),
    (dict(method="kmeans", bits=4, per_channel=True, fix_zeros=False), 32 * 16 * 4),
]


@pytest.mark.parametrize("options, decoding", GRID_DECODING, ids=[str(o) for o, _ in GRID_DECODING])
def test_a_grid_or_codebook_estimate_counts_what_decodes_the_codes(options, decoding):
    from fxcompress.passes import InsertFakeQuant
    model, x = _two_linears()
    gm = fxcompress.compile(model, [InsertFakeQuant(select="1", **options)], example_inputs=(x,))
    row = next(r for r in fxcompress.summary(gm).rows if r["layer"] == "1")
    # a grid rounds a few weights to zero: storing the rest with 5-bit indices would be larger than dense codes
    assert row["sparsity"] < 0.2
    codes = 32 * 64 * options["bits"] // 8
    assert row["compressed_bytes"] == codes + decoding + 4 * 32  # + the fp32 bias
    assert row["exact"] == "no"


def test_a_sparse_estimate_is_taken_only_where_it_is_smaller_than_dense_codes():
    from fxcompress.passes import InsertFakeQuant, InsertMasks
    model, x = _two_linears()
    passes = [InsertMasks(sparsity=0.9, select="1"), InsertFakeQuant(method="kmeans", bits=4, select="1")]
    gm = fxcompress.compile(model, passes, example_inputs=(x,))
    row = next(r for r in fxcompress.summary(gm).rows if r["layer"] == "1")
    centroids = gm.get_submodule(next(n for n, m in gm.named_modules() if type(m).__name__ == "KMeansWeight"))
    kept = int(gm.get_buffer("1.weight_mask").sum())
    assert row["nonzeros"] == kept == round(0.1 * 2048)  # k-means keeps pruned weights at its fixed zero
    sparse = math.ceil(kept * (4 + 5) / 8)  # 4-bit codes and 5-bit relative indices (fc)
    assert sparse < 32 * 64 * 4 // 8
    assert row["compressed_bytes"] == sparse + centroids.codebook.numel() * 4 + 4 * 32


def test_a_layer_called_twice_counts_its_bias_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.out(self.fc(torch.relu(self.fc(x))))

    model = Twice().eval()
    table = fxcompress.summary(fxcompress.compile(model, [], example_inputs=(torch.randn(3, 16),)))
    assert table.totals["params"] == sum(p.numel() for p in model.parameters()) == 16 * 16 + 16 + 4 * 16 + 4
    assert table.totals["compressed_bytes"] == 4 * table.totals["params"]  # dense fp32: once each
    [second] = [r for r in table.rows if "(tied to fc)" in r["layer"]]
    assert second["params"] == 0 and second["compressed_bytes"] == 0


def test_the_history_of_a_saved_file_claims_no_times(tmp_path):
    from fxcompress.passes import InsertMasks
    model, x = _two_linears()
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    assert fxcompress.history(gm)[0].seconds > 0 and "changed=True in " in fxcompress.format_history(gm)
    fxcompress.save(gm, tmp_path / "m.fxc")  # deterministic by default: the seconds are zeroed
    loaded = fxcompress.load(tmp_path / "m.fxc")
    first = fxcompress.format_history(loaded).splitlines()[0]
    assert first.endswith("changed=True") and " in 0.000s" not in fxcompress.format_history(loaded)
    fxcompress.save(gm, tmp_path / "timed.fxc", deterministic=False)
    assert fxcompress.format_history(fxcompress.load(tmp_path / "timed.fxc")) == fxcompress.format_history(gm)
