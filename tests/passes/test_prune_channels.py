"""Small models for the op families the zoo lacks, shared by the channel-pruning tests."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.channels import ATTENTION_MODES, ChannelGraph
from zeroing import pick_half, zero_classes


class TransposedNet(nn.Module):
    """Encoder-decoder: strided conv, transposed conv (plain and grouped), instance norm."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, 2, 1)
        self.norm = nn.InstanceNorm2d(16, affine=True)
        self.up = nn.ConvTranspose2d(16, 12, 2, 2)
        self.up_grouped = nn.ConvTranspose2d(12, 8, 3, 1, 1, groups=4)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = F.relu(self.norm(self.down(x)))
        return self.out(F.relu(self.up_grouped(F.relu(self.up(x)))))


class GroupedNet(nn.Module):
    """Grouped convs (ResNeXt / RegNet style), group norm, depthwise with a channel multiplier, PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.act = nn.PReLU(24)
        self.depthwise = nn.Conv2d(24, 48, 3, padding=1, groups=24)
        self.bn = nn.BatchNorm2d(48)
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = self.act(self.grouped(F.relu(self.gn(self.stem(x)))))
        x = F.relu(self.bn(self.depthwise(x)))
        return self.head(x.mean(dim=(2, 3)))


class SplitShuffleNet(nn.Module):
    """ShuffleNetV2-style units: chunk, split, cat, channel shuffle by view-transpose-view and by module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8))
        self.mid = nn.Conv2d(16, 24, 1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(16, 8, 3, padding=1)
        self.shuffle = nn.ChannelShuffle(2)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        p, q = torch.split(self.mid(x), [8, 16], dim=1)
        x = self.shuffle(torch.cat([self.left(p), self.right(q)], 1))
        return self.head(x[:, :, 1:-1, 1:-1])


class LayoutNet(nn.Module):
    """Channels-last blocks (permute, linear over channels, permute back), interpolation and padding,
    a layer-scale parameter, an embedding feeding a linear, a stack, and flatten into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.pointwise = nn.Linear(12, 20)
        self.scale = nn.Parameter(torch.rand(20, 1, 1) + 0.5)
        self.embed = nn.Embedding(10, 20)
        self.proj = nn.Conv2d(20, 6, 3)
        self.fc = nn.Linear(6 * 8 * 8, 7)

    def forward(self, x, tokens):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = F.gelu(self.pointwise(x)).permute(0, 3, 1, 2)
        x = self.scale * x + self.embed(tokens).mean(dim=1)[:, :, None, None]
        x = F.interpolate(F.max_pool2d(x, 2), scale_factor=2.0, mode="nearest")
        x = F.pad(x, (1, 1, 1, 1))
        x = torch.stack([x, 2 * x], 0).sum(0)
        x = F.avg_pool2d(F.relu(self.proj(x)), 2)
        return self.fc(x.flatten(1))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention without a layer norm in front (so its heads can go), a fused qkv
    projection with F.scaled_dot_product_attention, and a transformer MLP."""

    def __init__(self, dim: int = 24, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(10, dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = self.mha(h, h, h, need_weights=False)[0]
        b, t = x.size(0), x.size(1)
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, 6).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 24)
        y = self.proj(y)
        return self.head(self.mlp(y).mean(dim=1))


class HandAttention(nn.Module):
    """Multi-head self-attention written out: q/k/v projections viewed as (num_heads, head_dim) by
    constants, then matmul and softmax with a constant scale, or F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 32, num_heads: int = 4, sdpa: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.sdpa = num_heads, dim // num_heads, sdpa
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t = x.size(0), x.size(1)
        q, k, v = (p(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5, -1), v)
        return self.out(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class UNet(nn.Module):
    """Two levels of a U-Net: strided down convs, up-sampling to the skip's size read from its shape
    (`size=skip.shape[-2:]`, `size=skip.size()[2:]`: odd sizes, so no scale factor would do), and a
    concatenation with the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, 2, 1)
        self.bottom = nn.Conv2d(16, 16, 3, 2, 1)
        self.up2, self.dec2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8 + 16, 16, 3, padding=1)
        self.up1, self.dec1 = nn.Conv2d(16, 8, 1), nn.Conv2d(8 + 8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        skip1 = F.relu(self.enc1(x))
        skip2 = F.relu(self.enc2(skip1))
        y = F.relu(self.bottom(skip2))
        y = F.interpolate(self.up2(y), size=skip2.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.dec2(torch.cat([y, skip2], 1)))
        y = F.interpolate(self.up1(y), size=skip1.size()[2:], mode="nearest")
        return self.out(F.relu(self.dec1(torch.cat([y, skip1], 1))))


class HFSelfAttention(nn.Module):
    """Hugging Face's BERT self-attention: heads split and merged by sizes computed from the input's
    size (`x.size()[:-1] + (heads, head_size)`), then an output projection."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.all_head_size = heads, dim // heads, dim
        self.query, self.key, self.value, self.dense = (nn.Linear(dim, dim) for _ in range(4))

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden):
        q, k, v = (self.transpose_for_scores(p(hidden)) for p in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size)
        context = torch.matmul(scores.softmax(dim=-1), v).permute(0, 2, 1, 3).contiguous()
        context = context.view(context.size()[:-2] + (self.all_head_size,))
        return self.dense(context)


class ChannelCumsumNet(nn.Module):
    """A cumulative sum along the channels between two convs (its output positions mix channels): that group must freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.cumsum(self.a(x), dim=1)
        return self.c(F.relu(self.b(x)))


EXTRA = {
    "transposed": (TransposedNet, lambda: (torch.randn(2, 3, 16, 16),)),
    "grouped": (GroupedNet, lambda: (torch.randn(2, 3, 12, 12),)),
    "split_shuffle": (SplitShuffleNet, lambda: (torch.randn(2, 3, 10, 10),)),
    "layout": (LayoutNet, lambda: (torch.randn(2, 3, 16, 16), torch.randint(0, 10, (2, 5)))),
    "attention": (AttentionNet, lambda: (torch.randn(2, 6, 10),)),
    "hand_attention": (HandAttention, lambda: (torch.randn(2, 6, 32),)),
    "hand_sdpa": (lambda: HandAttention(sdpa=True), lambda: (torch.randn(2, 6, 32),)),
    "channel_cumsum": (ChannelCumsumNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "unet": (UNet, lambda: (torch.randn(2, 3, 10, 10),)),
    "hf_attention": (HFSelfAttention, lambda: (torch.randn(2, 6, 32),)),
}


def randomize_norm_stats(module: nn.Module) -> None:
    """Non-trivial BN statistics, so the equivalence tests also check that they are sliced right."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


def zero_heads(gm: nn.Module, projections: tuple[str, ...], heads: list[int], head_dim: int) -> None:
    """Zero the output rows (weight and bias) of whole heads of the q/k/v projections."""
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    with torch.no_grad():
        for name in projections:
            layer = gm.get_submodule(name)
            layer.weight[rows] = 0.0
            layer.bias[rows] = 0.0


# ---- tests ---------------------------------------------------------------------------------------
import pytest  # noqa: E402

import fxcompress  # noqa: E402
from fxcompress.errors import ConfigError, PreconditionError  # noqa: E402
from fxcompress.layers import find_layers, insert_on_weight  # noqa: E402
from fxcompress.pass_base import PassContext  # noqa: E402
from fxcompress.passes.prune_channels import PruneChannels  # noqa: E402
from fxcompress.tracing import trace  # noqa: E402
from fxcompress.zoo import ZOO, DenseNetSmall, GPT2Block, gpt2_tokens  # noqa: E402

MODELS = {**{name: (ctor, lambda make=make: (make(),)) for name, (ctor, make) in ZOO.items()}, **EXTRA}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _traced(name: str):
    ctor, make_inputs = MODELS[name]
    gm = trace(ctor().eval())
    randomize_norm_stats(gm)
    return gm, make_inputs()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_removing_zeroed_channels_leaves_outputs_equal(name):
    """Zero a random half of every prunable group, let l1 prune exactly those: outputs must not move."""
    gm, inputs = _traced(name)
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph)
    zero_classes(gm, cg, pick_half(cg))
    expected = gm(*inputs)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method="l1")], example_inputs=inputs)
    assert _params(pruned) < _params(gm)
    torch.testing.assert_close(pruned(*inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("method", ["l2", "random"])
def test_every_zoo_model_prunes_at_half(name, method):
    gm, inputs = _traced(name)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method=method)], example_inputs=inputs)
    stats = fxcompress.history(pruned)[-1].stats
    assert stats["params_after"] == _params(pruned) < _params(gm) == stats["params_before"]
    assert pruned(*inputs).shape == gm(*inputs).shape
    assert torch.isfinite(pruned(*inputs)).all()


def test_physical_shapes_and_module_attributes_follow():
    gm, inputs = _traced("grouped")
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    grouped, dw, bn = pruned.grouped, pruned.depthwise, pruned.bn
    assert grouped.out_channels == grouped.weight.shape[0] == 12 and grouped.groups == 4
    assert dw.groups == dw.in_channels == 12 and dw.out_channels == 24 == bn.num_features
    assert bn.running_mean.shape == (24,) and pruned.act.num_parameters == 12
    assert pruned.head.in_features == 24


def test_attention_heads_and_split_sizes_are_rewritten():
    gm, inputs = _traced("attention")
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    mha = pruned.mha
    assert (mha.num_heads, mha.head_dim, mha.embed_dim) == (2, 6, 12)
    assert mha.in_proj_weight.shape == (36, 12)
    assert pruned.qkv.out_features == 36 and pruned.proj.in_features == 12


def test_frozen_groups_are_reported_with_the_reason():
    gm, inputs = _traced("channel_cumsum")
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    frozen = fxcompress.history(pruned)[-1].stats["frozen"]
    assert "cumsum" in frozen["a"] and "output" in frozen["c"]
    assert pruned.a.out_channels == 8 and pruned.b.out_channels == 4


def test_layer_norm_freezes_the_residual_stream_but_not_the_mlp():
    gm, inputs = _traced("transformer")
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    frozen = fxcompress.history(pruned)[-1].stats["frozen"]
    assert any("layer norm" in reason for reason in frozen.values())
    assert pruned.embed.out_features == 32 and pruned.get_submodule("mlp.0").out_features == 32


@pytest.mark.parametrize("attention", ATTENTION_MODES)
@pytest.mark.parametrize("name", ["transformer", "gpt_block"])
def test_prune_normalized_also_shrinks_the_residual_stream_and_its_layer_norms(name, attention):
    gm, inputs = _traced(name)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, prune_normalized=True, attention=attention)],
                                example_inputs=inputs)
    norms = [m for m in pruned.modules() if isinstance(m, nn.LayerNorm)]
    assert all(m.normalized_shape == (16,) == tuple(m.weight.shape) for m in norms)
    assert pruned.embed.out_features == 16 and _params(pruned) < 0.4 * _params(gm)
    assert not any("layer norm" in r for r in fxcompress.history(pruned)[-1].stats["frozen"].values())
    assert torch.isfinite(pruned(*inputs)).all()


def _views(gm: nn.Module) -> list[tuple]:
    """The size arguments of every view / reshape, in graph order."""
    return [n.args[1:] for n in gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")]


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_whole_heads_of_hand_written_attention_go_exactly(sdpa):
    gm = trace(HandAttention(sdpa=sdpa).eval())
    x = torch.randn(2, 6, 32)
    zero_heads(gm, ("q", "k", "v"), [1, 3], head_dim=8)
    expected = gm(x)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention="heads")], example_inputs=(x,))
    torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    alive = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])  # heads 0 and 2, head_dim unchanged
    for name in ("q", "k", "v"):
        assert torch.equal(pruned.get_submodule(name).weight, gm.get_submodule(name).weight[alive])
        assert torch.equal(pruned.get_submodule(name).bias, gm.get_submodule(name).bias[alive])
    assert torch.equal(pruned.out.weight, gm.out.weight[:, alive]) and torch.equal(pruned.out.bias, gm.out.bias)
    sizes = _views(pruned)
    assert [s[2:] for s in sizes[:3]] == [(2, 8)] * 3 and sizes[3][2] == 16  # num_heads 4 -> 2, head_dim 8
    per_head = 3 * (8 * 32 + 8) + 32 * 8  # q, k, v rows with biases, out-projection columns
    assert _params(gm) - _params(pruned) == 2 * per_head
    if sdpa:
        assert not any(n.kwargs.get("scale") for n in pruned.graph.nodes)  # head_dim kept: no scale to pin


@pytest.mark.parametrize("sdpa", [False, True], ids=["matmul", "sdpa"])
def test_the_default_attention_mode_still_prunes_head_dims(sdpa):
    gm = trace(HandAttention(sdpa=sdpa).eval())
    x = torch.randn(2, 6, 32)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=(x,))
    assert [s[2:] for s in _views(pruned)[:3]] == [(4, 4)] * 3  # every head keeps, head_dim 8 -> 4
    assert pruned.q.out_features == pruned.v.out_features == pruned.out.in_features == 16


def test_whole_heads_in_a_transformer_block_with_residual_mlp_and_layer_norm():
    """GPTBlock: pre-norm attention (view(b, t, heads, d // heads)) and MLP on a layer-normed residual
    stream. Heads 0 and 2 and half the MLP are zero: exactly those go, the stream stays."""
    gm, inputs = _traced("gpt_block")
    zero_heads(gm, ("attn.q", "attn.k", "attn.v"), [0, 2], head_dim=8)
    with torch.no_grad():
        gm.fc.weight[64:] = 0.0
        gm.fc.bias[64:] = 0.0
    expected = gm(*inputs)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention="heads", prune_normalized=False)],
                                example_inputs=inputs)
    torch.testing.assert_close(pruned(*inputs), expected, atol=1e-5, rtol=1e-5)
    alive = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    assert torch.equal(pruned.attn.q.weight, gm.attn.q.weight[alive])
    assert torch.equal(pruned.attn.out.weight, gm.attn.out.weight[:, alive])
    assert [s[2:] for s in _views(pruned)[:3]] == [(2, 8)] * 3
    assert pruned.embed.out_features == 32 and pruned.fc.out_features == 64  # the stream is frozen by the norms
    heads = 2 * (3 * (8 * 32 + 8) + 32 * 8)
    mlp = 64 * (32 + 1) + 32 * 64
    assert _params(gm) - _params(pruned) == heads + mlp
    stats = fxcompress.history(pruned)[-1].stats
    assert stats["groups_pruned"] == 2 and "layer norm" in stats["frozen"]["embed (+2)"]
    rows = {r["layer"]: r for r in fxcompress.summary(pruned).rows}
    assert rows["attn.q"]["weight_shape"] == (16, 32) and rows["attn.out"]["weight_shape"] == (32, 16)


def test_keep_select_min_channels_and_round_to():
    gm, inputs = _traced("vgg_bn")
    kept = fxcompress.compile(gm, [PruneChannels(amount=0.5, keep=(r"features\.3",), select=(nn.Conv2d,))],
                              example_inputs=inputs)
    assert kept.get_submodule("features.3").out_channels == 16 and kept.get_submodule("features.3").in_channels == 16  # both sides kept
    assert kept.get_submodule("features.7").out_channels == 16 and kept.get_submodule("classifier.1").out_features == 64  # linear not selected
    rounded = fxcompress.compile(gm, [PruneChannels(amount=0.7, round_to=8, min_channels=8)], example_inputs=inputs)
    assert [rounded.get_submodule(f"features.{i}").out_channels for i in (0, 7, 14)] == [8, 16, 24]
    tiny = fxcompress.compile(gm, [PruneChannels(amount=0.99)], example_inputs=inputs)
    assert all(m.out_channels >= 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))


def test_per_layer_amounts_and_global_ranking():
    gm, inputs = _traced("lenet5")
    by_layer = fxcompress.compile(gm, [PruneChannels(amount={"conv1": 0.5, "fc1": 0.2})], example_inputs=inputs)
    assert (by_layer.conv1.out_channels, by_layer.conv2.out_channels, by_layer.fc1.out_features) == (10, 50, 400)
    assert fxcompress.history(by_layer)[-1].stats["channels_removed"] == 10 + 100
    with torch.no_grad():
        gm.conv2.weight[:25] *= 1e-3  # globally, the weak half of conv2 goes first
    ranked = fxcompress.compile(gm, [PruneChannels(amount=0.05, global_=True)], example_inputs=inputs)
    assert ranked.conv2.out_channels < 50


def test_callable_method_scores_each_prunable_channel():
    gm, inputs = _traced("lenet300")

    def prefer_last(gm, graph, group):
        return np.arange(len(group.prunable), dtype=float)

    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method=prefer_last)], example_inputs=inputs)
    torch.testing.assert_close(pruned.fc1.weight, gm.fc1.weight[150:][:, :])

    def wrong(gm, graph, group):
        return [1.0]

    with pytest.raises(ConfigError, match="PruneChannels.method"):
        fxcompress.compile(gm, [PruneChannels(method=wrong)], example_inputs=inputs)


def test_masks_on_the_weight_chain_are_sliced_with_the_weight():
    gm, inputs = _traced("lenet5")
    for layer in find_layers(gm):
        owner = gm.get_submodule(layer.name)
        owner.register_buffer("weight_mask", (torch.rand_like(owner.weight) > 0.3).float())
        insert_on_weight(gm, layer, lambda graph, w, name=layer.name: graph.call_function(
            torch.mul, (w, graph.get_attr(f"{name}.weight_mask"))))
    gm.recompile()
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    assert pruned.conv2.weight_mask.shape == pruned.conv2.weight.shape == (25, 10, 5, 5)
    assert pruned.fc1.weight_mask.shape == pruned.fc1.weight.shape


@pytest.mark.parametrize("field, value", [("amount", 1.0), ("amount", -0.1), ("amount", True), ("amount", "0.5"),
                                          ("amount", {"fc": 2.0}), ("amount", {"(": 0.5}), ("amount", {3: 0.5}),
                                          ("amount", {}), ("method", "l3"), ("method", 3),
                                          ("min_channels", 0), ("min_channels", 1.5), ("round_to", 0),
                                          ("round_to", True), ("select", "conv"), ("select", ("[",)),
                                          ("select", (int,)), ("keep", ("(",)), ("keep", ("fc", 3)),
                                          ("seed", -1), ("seed", 2 ** 32), ("seed", 1.0), ("max_samples", 8),
                                          ("max_samples", 100.0), ("reconstruct", 1), ("global_", 0),
                                          ("prune_normalized", "yes"), ("attention", "rows")])
def test_bad_configuration_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"PruneChannels\.{field}\b"):
        PruneChannels(**{field: value})


@pytest.mark.parametrize("config, culprit, listed", [
    (dict(select=("conv3",)), r"select: 'conv3' matches none of the prunable layers", "conv1"),
    (dict(select=("fc2",)), r"select: .fc2. matches none.*it matches \[.fc2.\]: frozen", "fc1"),
    (dict(select=(nn.Conv1d,)), r"select: Conv1d matches none", "conv2"),
    (dict(keep=("conv_1",)), r"keep: 'conv_1' matches none of the layers", "fc2"),
    (dict(amount={"conv1": 0.5, "fc9": 0.5}), r"amount: 'fc9' matches none", "fc1"),
    (dict(amount={"fc1": 0.5}, select=(nn.Conv2d,)), r"amount: 'fc1' matches none of the selected", "conv2"),
])
def test_patterns_that_match_no_layer_name_the_pattern_and_the_layers(config, culprit, listed):
    gm, inputs = _traced("lenet5")
    with pytest.raises(ConfigError, match=culprit) as raised:
        fxcompress.compile(gm, [PruneChannels(**config)], example_inputs=inputs)
    assert f"'{listed}'" in str(raised.value)


def test_data_driven_methods_need_calibration_data():
    gm, inputs = _traced("lenet300")
    with pytest.raises(PreconditionError, match="calibration_data"):
        fxcompress.compile(gm, [PruneChannels(method="greedy")], example_inputs=inputs)


TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "efficientnet_b0",
               "regnet_x_400mf", "shufflenet_v2_x1_0", "squeezenet1_0", "vgg11_bn", "convnext_tiny", "vit_b_16"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_prune_at_half_exactly(name):
    """Random init (weights=None, nothing downloads). Zeroed channels are removed without changing the
    outputs, so the propagation is right on real architectures too; parameters drop."""
    models = pytest.importorskip("torchvision.models", reason="torchvision (the vision extra) is not installed")
    small = {"image_size": 32} if name.startswith("vit") else {}
    gm = trace(getattr(models, name)(weights=None, **small).eval())
    randomize_norm_stats(gm)
    inputs = (torch.randn(1, 3, 32 if small else 64, 32 if small else 64),)
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph)
    zero_classes(gm, cg, pick_half(cg))
    expected = gm(*inputs)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], example_inputs=inputs)
    assert _params(pruned) < 0.75 * _params(gm)
    torch.testing.assert_close(pruned(*inputs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["lenet5", "resnet", "mobilenetv2"])
def test_channel_pruning_after_insert_masks_keeps_the_masks_of_surviving_weights(name):
    from fxcompress.passes import InsertMasks

    gm, inputs = _traced(name)
    masked = fxcompress.compile(gm, [InsertMasks(sparsity=0.5)], example_inputs=inputs)
    cg = PassContext(example_inputs=inputs, gm=masked).get(ChannelGraph)
    removed = pick_half(cg)
    zero_classes(masked, cg, removed)
    expected = masked(*inputs)
    pruned = fxcompress.compile(masked, [PruneChannels(amount=0.5)], example_inputs=inputs)
    torch.testing.assert_close(pruned(*inputs), expected, atol=1e-5, rtol=1e-5)
    owners = [pruned.get_submodule(layer.name) for layer in find_layers(pruned)]
    assert all(m.weight_mask.shape == m.weight.shape for m in owners) and owners


def test_amount_applies_to_each_layer_of_a_dense_block():
    """A DenseNet block is one coupled group holding every layer's new channels; each layer loses
    its half even when one layer's filters are all weaker (here the stem, scaled down)."""
    torch.manual_seed(0)
    model = DenseNetSmall().eval()
    with torch.no_grad():
        model.stem.weight.mul_(0.01)
    x = torch.randn(2, 3, 32, 32)
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(x,))
    convs = {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {name: pruned.get_submodule(name).out_channels for name in convs} == {
        name: c - c // 2 for name, c in convs.items()}


def _zeroed_and_pruned(name: str, attention: str = "head_dims"):
    """(dense model with a random half of each prunable group zeroed, that model pruned at 0.5, inputs)."""
    gm, inputs = _traced(name)
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph, attention=attention)
    zero_classes(gm, cg, pick_half(cg))
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention=attention)], example_inputs=inputs)
    return gm, pruned, inputs


def test_a_unet_with_sizes_read_from_the_skip_prunes_at_half_exactly():
    gm, pruned, (x,) = _zeroed_and_pruned("unet")
    widths = {name: pruned.get_submodule(name).out_channels for name in ("enc1", "enc2", "bottom", "up2", "dec2")}
    assert widths == {"enc1": 4, "enc2": 8, "bottom": 8, "up2": 4, "dec2": 8}
    assert pruned.dec2.in_channels == 4 + 8 and pruned.dec1.in_channels == 4 + 4 and pruned.out.in_channels == 4
    for shape in (x.shape, (1, 3, 13, 7)):  # the up-sampled sizes still come from the skip at run time
        other = torch.randn(shape)
        assert pruned(other).shape == (shape[0], 2, *shape[2:])
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


def _size_arguments(gm: nn.Module) -> list[list]:
    """Every view's sizes, computed items shown as the node's name."""
    return [[s.name if isinstance(s, torch.fx.Node) else s for s in n.args[1]]
            for n in gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")]


@pytest.mark.parametrize("attention, split", [("head_dims", [4, 4]), ("heads", [2, 8])])
def test_hugging_face_attention_sizes_computed_from_the_input_are_rewritten(attention, split):
    if attention == "heads":
        gm, (x,) = _traced("hf_attention")
        zero_heads(gm, ("query", "key", "value"), [1, 2], head_dim=8)
        pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention="heads")], example_inputs=(x,))
    else:
        gm, pruned, (x,) = _zeroed_and_pruned("hf_attention")
    sizes = _size_arguments(pruned)
    assert [s[2:] for s in sizes[:3]] == [split] * 3 and sizes[3][2] == 16  # heads / head_dim, merged width
    assert all(isinstance(item, str) for s in sizes for item in s[:2])  # batch and length: read at run time
    assert pruned.query.out_features == pruned.dense.in_features == 16 and _params(pruned) < _params(gm)
    for other in (x, torch.randn(3, 9, 32)):
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_block_prunes_zeroed_heads_exactly():
    """HF's Conv1D (addmm, weight [in, out]) prunes as a linear layer: the MLP's c_fc columns with
    c_proj's rows; the tied embedding / LM head pair and the residual stream stay (layer norms), and
    the outputs do not move."""
    gm = trace(GPT2Block().eval())
    (x,) = inputs = (gpt2_tokens(),)
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph, attention="heads")
    zero_classes(gm, cg, pick_half(cg))
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention="heads")], example_inputs=inputs)
    assert tuple(pruned.c_fc.weight.shape) == (32, 64) and tuple(pruned.c_proj.weight.shape) == (64, 32)
    assert pruned.lm_head.weight is pruned.wte.weight
    for other in (x, torch.randint(0, 50, (3, 5))):
        torch.testing.assert_close(pruned(other), gm(other), atol=1e-5, rtol=1e-5)


def test_gpt2_embedding_dim_prunes_with_its_tied_head_and_every_consumer():
    """prune_normalized=True unfreezes the residual stream (not exact: the layer norms' statistics
    change): the embedding dim of the token and position tables goes with the tied LM head's columns,
    the layer norms and every Conv1D reading or writing it, and the head stays tied."""
    gm = trace(GPT2Block().eval())
    (x,) = inputs = (gpt2_tokens(),)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, attention="heads", prune_normalized=True)],
                                example_inputs=inputs)
    assert tuple(pruned.wte.weight.shape) == (50, 16) and tuple(pruned.wpe.weight.shape) == (16, 16)
    assert pruned.lm_head.weight is pruned.wte.weight and pruned.wte.embedding_dim == 16
    assert tuple(pruned.c_fc.weight.shape) == (16, 64) and tuple(pruned.c_proj.weight.shape) == (64, 16)
    assert tuple(pruned.ln_f.weight.shape) == (16,) and pruned.attn.c_proj.weight.shape[1] == 16
    for other in (x, torch.randint(0, 50, (3, 5))):
        assert pruned(other).shape == gm(other).shape and torch.isfinite(pruned(other)).all()


class HeadlessEncoder(nn.Module):
    """Its output is a layer's channels, as a headless encoder returns its hidden states."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_prune_outputs_cuts_the_output_width_and_leaves_the_kept_outputs_exact():
    torch.manual_seed(0)
    model, x = HeadlessEncoder().eval(), torch.randn(4, 8)
    kept_by_default = fxcompress.compile(model, [PruneChannels(amount=0.5)], x)
    assert kept_by_default.fc2.weight.shape[0] == 12  # the output stays unless asked
    assert "reaches the model output" in str(fxcompress.history(kept_by_default)[0].stats["frozen"])
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, select=("fc2",), prune_outputs=True)], x)
    assert gm.fc2.weight.shape == (6, 16)
    kept = [int((model.fc2.bias == b).nonzero()) for b in gm.fc2.bias]  # the surviving output channels
    assert len(set(kept)) == 6
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x)[:, kept], rtol=0, atol=1e-6)  # a narrower GEMM rounds differently


@pytest.mark.parametrize("name", ["resnet", "gpt_block", "transformer"])
def test_every_layer_whose_inputs_shrank_is_reconstructed_or_reported(name):
    """With reconstruct, each layer whose input channels were removed is in `reconstructed` or, with its reason,
    in `not_reconstructed` (a layer left out showed only by its absence: the transformer's attention), never
    both."""
    ctor, make = ZOO[name]
    torch.manual_seed(0)
    model = ctor().eval()
    gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=True, prune_normalized=True,
                                                  max_samples=256)],
                            example_inputs=(make(),), calibration_data=[make(), make()])
    stats = fxcompress.history(gm)[-1].stats
    unpruned = fxcompress.compile(model, [], example_inputs=(make(),))
    widths = {l.name: unpruned.get_parameter(l.weight).shape[1] for l in find_layers(unpruned)}
    shrank = {l.name for l in find_layers(gm) if l.name in widths and l.kind != "embedding"
              and gm.get_parameter(l.weight).shape[1] < widths[l.name]}
    shrank |= {path for path, m in gm.named_modules() if isinstance(m, nn.MultiheadAttention)  # no `find_layers` layer
               and m.in_proj_weight.shape[1] < unpruned.get_submodule(path).in_proj_weight.shape[1]}
    assert shrank and set(stats["reconstructed"]) | set(stats["not_reconstructed"]) == shrank
    if name == "transformer":  # nn.MultiheadAttention: its rows are no one layer's input windows
        assert stats["not_reconstructed"] == {
            "attn": "a MultiheadAttention, not a linear or conv layer whose input rows can be gathered"}
    assert not set(stats["reconstructed"]) & set(stats["not_reconstructed"])
    assert all(isinstance(why, str) and why for why in stats["not_reconstructed"].values())
