"""frontends.experts: a grouped product over a stored experts tensor becomes one linear layer per expert."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.frontends.experts import grouped_mm
from fxcompress.layers import find_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks


class Experts(nn.Module):
    """Two experts, routed by a sort of each row's expert id, as transformers 5 runs them; `out_first` stores
    the matrices (experts, out, in) and multiplies their transpose, otherwise (experts, in, out) as they are."""

    def __init__(self, out_first: bool = True, shared: bool = False) -> None:
        super().__init__()
        shape = (2, 12, 8) if out_first else (2, 8, 12)
        self.weight = nn.Parameter(torch.randn(*shape))
        self.out_first, self.shared = out_first, shared

    def forward(self, x):
        ids = (x[:, 0] > 0).long()  # each row's expert
        order, perm = torch.sort(ids)
        offs = torch.cumsum(torch.histc(order.float(), bins=2, min=0, max=1), 0, dtype=torch.int32)
        weight = self.weight.transpose(-2, -1) if self.out_first else self.weight
        y = grouped_mm(x[perm], weight, offs)
        y = torch.empty_like(y).index_put_((perm,), y)  # back to the rows' order
        return y + self.weight.sum() if self.shared else y


def test_each_expert_becomes_a_linear_layer_with_the_same_values():
    torch.manual_seed(0)
    for out_first in (True, False):
        model = Experts(out_first).eval()
        x = torch.randn(16, 8)
        gm = fxcompress.compile(model, [], example_inputs=(x,), frontend="export")
        assert [layer.name for layer in find_layers(gm)] == ["weight.0", "weight.1"]
        assert [tuple(m.weight.shape) for m in gm.weight] == [(12, 8), (12, 8)]
        assert not [n for n in gm.graph.nodes if n.target is grouped_mm]
        other = torch.randn(7, 8)  # another batch, other rows per expert
        torch.testing.assert_close(gm(other), model(other), rtol=0, atol=1e-6)


def test_passes_reach_each_expert_and_the_file_keeps_them():
    torch.manual_seed(0)
    model, x = Experts().eval(), torch.randn(16, 8)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5), InsertFakeQuant(bits=4, method="kmeans")],
                            example_inputs=(x,), calibration_data=[x], frontend="export")
    assert {layer.name for layer in find_layers(gm)} == {"weight.0", "weight.1"}
    assert len({k for k, _ in gm.named_buffers() if k.endswith("_mask")}) == 2
    from fxcompress.fileformat.container import from_bytes, to_bytes
    loaded = from_bytes(to_bytes(gm, example_inputs=(x,)))
    assert torch.equal(loaded(x), gm(x))


def test_a_stacked_tensor_read_elsewhere_stays_whole():
    torch.manual_seed(0)
    model, x = Experts(shared=True).eval(), torch.randn(16, 8)
    gm = fxcompress.compile(model, [], example_inputs=(x,), frontend="export")
    assert not find_layers(gm) and gm.weight.shape == (2, 12, 8)
    assert any(n.target is grouped_mm for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-5)


class _ExpertLoop(nn.Module):
    """Experts stacked in one tensor and run one at a time on a slice of it (JetMoE's form): F.linear(x, W[e])."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 6, 8))

    def forward(self, x):
        return sum(torch.nn.functional.linear(x, self.weight[e]) for e in range(3))


def test_a_linear_over_one_slice_of_a_stacked_tensor_is_no_layer_of_that_tensor():
    # read as a layer, the 3-D tensor took a mask of its own shape and the graph failed (`t()` of a 3-D weight)
    torch.manual_seed(0)
    model, x = _ExpertLoop().eval(), torch.randn(4, 8)
    gm = fxcompress.compile(model, [], example_inputs=(x,), frontend="export")
    assert not find_layers(gm)
    torch.testing.assert_close(gm(x), model(x))
    with pytest.raises(ConfigError, match="selects no layer"):
        fxcompress.compile(gm, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
