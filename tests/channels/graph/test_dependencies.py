"""ChannelGraph: coupled groups, index maps and frozen reasons, inspectable before any change."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress

from fxcompress.channels import ChannelGraph
from fxcompress.inspection import channel_graph
from fxcompress.errors import ConfigError
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.tracing import trace
from fxcompress.zoo import ZOO, DenseNetSmall, ResNetSmall


def _graph(model: nn.Module, *inputs) -> ChannelGraph:
    gm = trace(model.eval())
    return PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph)


def _group_of(cg: ChannelGraph, producer: str):
    return next(g for g in cg.groups if producer in g.producers)


def test_residual_adds_couple_every_conv_feeding_the_stream():
    cg = _graph(ResNetSmall(), torch.randn(1, 3, 32, 32))
    stream = _group_of(cg, "layer2.0.shortcut.0")
    assert set(stream.producers) == {"layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"}
    assert set(stream.consumers) == {"layer2.1.conv1", "fc"}
    assert len(stream.classes) == 32 and len(stream.prunable) == 32
    inner = _group_of(cg, "layer1.0.conv1")
    assert inner.producers == ("layer1.0.conv1",) and inner.consumers == ("layer1.0.conv2",)


def test_concatenation_maps_channels_at_their_offsets():
    cg = _graph(DenseNetSmall(), torch.randn(1, 3, 32, 32))
    stem = cg.labels[cg.slots[("stem.weight", 0)]]
    first = cg.labels[cg.slots[("block1.0.conv.weight", 0)]]
    consumer = cg.labels[cg.slots[("block1.1.conv.weight", 1)]]  # reads cat(stem, first)
    np.testing.assert_array_equal(consumer, np.concatenate([stem, first]))
    assert len(set(stem) | set(first)) == 24  # independent channels, not merged by the cat


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 4)

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        q = self.q(x).view(b, t, 3, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 3, 4).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.out((att @ q).transpose(1, 2).reshape(b, t, 12))


def test_head_split_couples_the_same_position_of_every_head_and_q_with_k():
    cg = _graph(Heads(), torch.randn(2, 5, 8))
    q, k = cg.labels[cg.slots[("q.weight", 0)]], cg.labels[cg.slots[("k.weight", 0)]]
    np.testing.assert_array_equal(q.reshape(3, 4), np.broadcast_to(q[:4], (3, 4)))  # head dims across heads
    np.testing.assert_array_equal(q, k)  # q·k contracts the head dim
    assert len(set(q)) == 4
    assert cg.edits and {e.kind for e in cg.edits.values()} == {"sizes"}


def test_whole_head_mode_couples_each_head_and_is_cached_apart_from_the_default():
    ctx = PassContext(example_inputs=(torch.randn(2, 5, 8),), gm=trace(Heads().eval()))
    dims, heads = ctx.get(ChannelGraph), ctx.get(ChannelGraph, attention="heads")
    assert heads is not dims and ctx.get(ChannelGraph, attention="head_dims") is dims
    assert ctx.get(ChannelGraph, attention="heads") is heads
    assert ctx.analyses.computed == ["ShapeInfo", "ChannelGraph(attention='head_dims')",
                                     "ChannelGraph(attention='heads')"]
    assert (dims.attention, heads.attention) == ("head_dims", "heads")
    q, k = heads.labels[heads.slots[("q.weight", 0)]], heads.labels[heads.slots[("k.weight", 0)]]
    np.testing.assert_array_equal(q.reshape(3, 4), np.repeat(q[::4], 4).reshape(3, 4))  # a head's block
    assert len(set(q)) == 3 and np.array_equal(q, k)
    splits = [e for e in heads.edits.values() if e.fixed]
    assert len(splits) == 2 and all(len(e.ids[2]) == 3 and e.fixed == {3: 4} for e in splits)  # head_dim stays
    assert "group 0 [q (+1)]: 3/3 prunable" in str(heads) and "group 0 [q (+1)]: 4/4 prunable" in str(dims)


def test_an_unknown_attention_mode_names_the_field():
    with pytest.raises(ConfigError, match="ChannelGraph.attention"):
        channel_graph(Heads(), torch.randn(2, 5, 8), attention="rows")


def test_flatten_maps_each_channel_to_a_block_of_features():
    cg = _graph(ZOO["lenet5"][0](), torch.randn(1, 1, 28, 28))
    conv2 = cg.labels[cg.slots[("conv2.weight", 0)]]
    fc1_in = cg.labels[cg.slots[("fc1.weight", 1)]]
    np.testing.assert_array_equal(fc1_in, np.repeat(conv2, 16))


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1), nn.LayerNorm(6)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.logcumsumexp(self.a(x), 1)
        z = self.norm(self.b(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.c(z + torch.ones(6, 1, 1))


def test_unknown_ops_and_layer_norm_freeze_with_reasons_and_groups_print():
    cg = _graph(Frozen(), torch.randn(1, 3, 4, 4))
    assert "logcumsumexp" in _group_of(cg, "a").frozen
    assert "layer norm" in _group_of(cg, "b").frozen and not len(_group_of(cg, "b").prunable)
    text = str(cg)
    assert "group 0 [a]" in text and "frozen: unsupported function logcumsumexp" in text
    assert "producers: b" in text


def test_an_input_of_full_width_in_a_binary_op_freezes_the_channels():
    class AddInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x, offset):
            return self.b(F.relu(self.a(x)) + offset)

    cg = _graph(AddInput(), torch.randn(1, 3, 4, 4), torch.randn(6, 1, 1))
    assert "cannot be sliced" in _group_of(cg, "a").frozen
    broadcast = _graph(AddInput(), torch.randn(1, 3, 4, 4), torch.randn(1, 1, 1))
    assert _group_of(broadcast, "a").frozen is None  # a size-1 dim broadcasts: nothing to slice


def test_elements_grow_linearly_along_a_concatenation_chain():
    layer = type(ZOO["densenet"][0]().block1[0])
    depth = 40
    model = nn.Sequential(*[layer(16 + 4 * i, 4) for i in range(depth)])
    cg = _graph(model, torch.randn(1, 16, 4, 4))
    # per layer: BN weight, bias, mean, var and the conv's input dim (5 x width) plus 4 new channels;
    # the concatenations create none, except 16 frozen ones standing for the model input's channels
    assert len(cg.labels) == sum(5 * (16 + 4 * i) + 4 for i in range(depth)) + 16


def test_channel_graph_of_a_plain_model_changes_nothing():
    model = ResNetSmall().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = str(channel_graph(model, torch.randn(1, 3, 32, 32)))
    assert text.startswith("group 0 [stem.0 (+2)]: 16/16 prunable")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ReadsWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # a size argument: rewritten
        z = self.b(y)
        return self.c(z * z.size(1) ** -0.5)  # a scale computed from a width: would change


def test_widths_read_into_size_arguments_are_fine_but_into_arithmetic_are_inexact():
    cg = _graph(ReadsWidth(), torch.randn(1, 3, 4, 4))
    shuffled, scaled = _group_of(cg, "a"), _group_of(cg, "b")
    assert shuffled.frozen is None and len(shuffled.prunable) == 4
    assert "computes with the width" in scaled.frozen
    assert not len(scaled.prunable) and len(scaled.inexact) == 8


class ReadsSlicedWidths(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y = y.reshape(y.size()[:2] + (-1,))  # a slice holding the width, into rewritten sizes
        y = self.b(y.reshape(y.shape[:2] + x.shape[-2:]))  # two slices joined: the width stays in place
        return self.c(y * y.size()[1:][0] ** -0.5)  # the width, picked from a slice, scales: would change


def test_slices_of_sizes_keep_each_width_in_its_place():
    model = ReadsSlicedWidths().eval()
    cg = _graph(model, torch.randn(1, 3, 4, 4))
    reshaped, scaled = _group_of(cg, "a"), _group_of(cg, "b")
    assert reshaped.frozen is None and len(reshaped.prunable) == 8
    assert "computes with the width" in scaled.frozen and len(scaled.inexact) == 8
    edits = [e for e in cg.edits.values() if e.kind == "sizes"]
    assert [(sorted(e.ids), e.spread) for e in edits] == [([1], 3), ([1], 4)]

    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(torch.randn(1, 3, 4, 4),))
    assert (pruned.a.out_channels, pruned.b.in_channels, pruned.b.out_channels) == (4, 4, 8)
    assert pruned(torch.randn(2, 3, 5, 7)).shape == (2, 2, 5, 7)


def test_same_as_tells_a_recomputed_graph_from_one_of_a_pruned_model():
    x = torch.randn(1, 1, 28, 28)
    model = ZOO["lenet5"][0]().eval()
    cg = _graph(model, x)
    assert cg.same_as(_graph(model, x))
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(x,))
    assert not cg.same_as(_graph(pruned, x))


class _DepthwiseAfterLinear(nn.Module):
    """A pointwise linear layer over channels-last features, then a depthwise conv (random models' seed 122)."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise, self.depthwise = nn.Linear(3, 8), nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.pointwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(torch.relu(self.depthwise(x)))


def test_a_depthwise_conv_whose_weight_grid_keeps_its_channels_keeps_its_groups():
    """A per-tensor fake-quant grid ties every output channel of a weight (pruning one moves the grid), so the
    depthwise conv's output channels are kept, and with them its groups and the channels feeding them (the
    walk used to crash on the depthwise conv's missing output channels, found by random models)."""
    from fxcompress.passes import InsertFakeQuant
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    fq = fxcompress.compile(_DepthwiseAfterLinear().eval(), [InsertFakeQuant(method="linear", bits=8)],
                            example_inputs=(x,))
    pruned = fxcompress.compile(fq, [PruneChannels(amount=0.5)], example_inputs=(x,))
    shapes = {name: tuple(p.shape) for name, p in pruned.named_parameters()}
    assert shapes["pointwise.weight"][0] == 8 and shapes["depthwise.weight"][0] == 16  # kept
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), fq(x))
