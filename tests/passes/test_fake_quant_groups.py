"""Group-wise linear weight grids: one scale / zero-point per run of input channels of each output row."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertFakeQuant
from fxcompress.quant import GridWeight
from fxcompress.quant.quantizers import linear_grid
from fxcompress.zoo import LeNet5


class MLP(nn.Module):
    def __init__(self, widths=(64, 96, 32)):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(widths[0], widths[1]), nn.Linear(widths[1], widths[2])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class AddmmLayer(nn.Module):
    """GPT-2's Conv1D: a stored [in, out] weight used by torch.addmm."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 48))
        self.bias = nn.Parameter(torch.randn(48))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def compiled(passes, model=None, x=None):
    torch.manual_seed(0)
    model = (model or MLP()).eval()
    x = torch.randn(4, 64) if x is None else x
    return fxcompress.compile(model, passes, example_inputs=(x,)), model, x


@pytest.mark.parametrize("group_size", [32, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_each_group_has_its_own_min_max_grid(group_size, symmetric):
    gm, model, _ = compiled([InsertFakeQuant(method="linear", bits=4, group_size=group_size, symmetric=symmetric)])
    for layer in find_layers(gm):
        weight = model.get_submodule(layer.name).weight.detach()
        quant = gm.get_submodule(f"{layer.weight}_quant")
        grouped = quant.grouped(weight)
        out, columns = weight.shape
        assert grouped.codes.shape == (out, columns) and grouped.scale.shape == (out, columns // group_size)
        assert grouped.group_size == group_size
        blocks = weight.reshape(out, -1, group_size)
        low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        if symmetric:
            assert torch.equal(grouped.zero_point, torch.zeros_like(grouped.zero_point))
            assert torch.allclose(grouped.scale, torch.maximum(-low, high) / 7)
            assert (grouped.qmin, grouped.qmax) == (-7, 7)
        else:
            assert torch.allclose(grouped.scale, (high - low) / 15)
            assert (grouped.qmin, grouped.qmax) == (0, 15)
        assert int(grouped.codes.min()) >= grouped.qmin and int(grouped.codes.max()) <= grouped.qmax
        fake = effective_weight(gm, layer)
        # the round trip codes -> scales / zero-points -> values is the fake-quant weight, bit for bit
        assert torch.equal(grouped.dequantize(), fake)
        # every weight within half a step of its group's grid, and each group holds at most 16 levels
        step = grouped.scale.repeat_interleave(group_size, dim=1)
        assert bool(((fake - weight).abs() <= step / 2 + 1e-6).all())
        per_group = fake.reshape(out, -1, group_size)
        assert max(torch.unique(g).numel() for g in per_group.reshape(-1, group_size)) <= 16
        # and groups really differ: one grid per row would not give these scales
        assert torch.unique(grouped.scale[0]).numel() == columns // group_size


def test_one_group_per_row_is_the_per_channel_grid():
    grouped_gm, _, x = compiled([InsertFakeQuant(method="linear", bits=4, group_size=64, types=("linear",),
                                                 select="fc1")])
    channel_gm, _, _ = compiled([InsertFakeQuant(method="linear", bits=4, per_channel=True, select="fc1")])
    assert torch.equal(grouped_gm(x), channel_gm(x))


def test_per_channel_and_per_tensor_grids_read_as_one_group_per_row():
    weight = torch.randn(8, 12)
    for axis in (None, 0):
        module = GridWeight(8, "linear", symmetric=True, axis=axis)
        grouped = module.grouped(weight)
        assert grouped.group_size == (96 if axis is None else 12)
        assert torch.equal(grouped.dequantize().reshape(8, 12), module(weight))


def test_addmm_weights_group_their_input_dimension():
    torch.manual_seed(0)
    gm, model, x = compiled([InsertFakeQuant(method="linear", bits=4, group_size=16)], model=AddmmLayer())
    quant = gm.get_submodule("weight_quant")
    grouped = quant.grouped(model.weight.detach())
    assert grouped.codes.shape == (48, 64) and grouped.scale.shape == (48, 4)  # rows are output channels
    expected = torch.addmm(model.bias, x, grouped.dequantize().t())
    assert torch.equal(gm(x), expected)
    column = model.weight.detach()[:16, 0]  # input channels 0..15 of output channel 0: the first group
    assert torch.allclose(grouped.scale[0, 0], (column.max().clamp(min=0) - column.min().clamp(max=0)) / 15)


def test_grouped_grids_save_and_load(tmp_path):
    gm, _, x = compiled([InsertFakeQuant(method="linear", bits=4, group_size=32)])
    fxcompress.save(gm, tmp_path / "grouped.fxc")
    loaded = fxcompress.load(tmp_path / "grouped.fxc")
    assert loaded.get_submodule("fc1.weight_quant").group_size == 32
    assert torch.equal(loaded(x), gm(x))


def test_refusals_name_the_field_and_the_layer():
    with pytest.raises(ConfigError, match="group_size"):
        InsertFakeQuant(method="linear", bits=4, group_size=0)
    with pytest.raises(ConfigError, match="group_size.*kmeans"):
        InsertFakeQuant(method="kmeans", bits=4, group_size=32)
    with pytest.raises(ConfigError, match=r"group_size: layer 'fc1'.*group_size=48 does not divide.*64 input"):
        compiled([InsertFakeQuant(method="linear", bits=4, group_size=48)])
    with pytest.raises(ConfigError, match=r"group_size=5.*'conv1' is a conv2d"):
        compiled([InsertFakeQuant(method="linear", bits=4, group_size=5)], model=LeNet5(),
                 x=torch.randn(1, 1, 28, 28))
    with pytest.raises(ConfigError, match="group_size"):
        GridWeight(4, "fixed_point", axis=0, group_size=32)
    with pytest.raises(ConfigError, match="does not divide"):
        linear_grid(torch.randn(4, 10), 4, axis=0, group_size=4)
