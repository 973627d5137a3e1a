"""PruneChannels through the shape, scan and selection ops of the channel op tables (movedim,
unflatten, narrow, roll, flip, cumsum / cumprod, repeat / tile, repeat_interleave, tensor_split,
norm, var / std, topk, sort, F.normalize, logsumexp, pixel_shuffle / pixel_unshuffle, tensor
attributes), in the call forms users write: where an op keeps channels apart, the pruned model
equals the original with exactly the removed channels zeroed (also at another batch size); where
it mixes them (along the channel dim), they stay, with the reason in the pass's statistics."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.passes import PruneChannels

H, W = 4, 6


class Around(nn.Module):
    """a's channels (dim 1 of an image) through `op`, then flattened into o: o reads every position."""

    def __init__(self, op, width: int = 8) -> None:
        super().__init__()
        self.a, self.op, self.width = nn.Conv2d(3, width, 1), op, width
        with torch.no_grad():
            features = op(torch.zeros(2, width, H, W)).flatten(1).shape[1]
        self.o = nn.Linear(features, 3)

    def forward(self, x):
        return self.o(self.op(self.a(x)).flatten(1))


def _prune(model: nn.Module, **options) -> nn.Module:
    options = {"amount": 0.5, **options}
    return fxcompress.compile(model, [PruneChannels(**options)], example_inputs=(torch.randn(2, 3, H, W),))


def _kept(model: Around, pruned: nn.Module) -> list[int]:
    rows = pruned.a.weight
    kept = [i for i, row in enumerate(model.a.weight) if any(torch.equal(row, r) for r in rows)]
    assert len(kept) == rows.shape[0]
    return kept


def _zeroed(model: Around, pruned: nn.Module, where=None) -> tuple[nn.Module, int]:
    """`model` with a's removed channels zeroed (rows and bias) and o's columns at the positions
    they reach zeroed; the positions are where `where` (default: the op) puts a nonzero value of an
    indicator of the kept channels. Also returns the count of the positions kept."""
    kept = _kept(model, pruned)
    zeroed = copy.deepcopy(model)
    gone = [i for i in range(model.width) if i not in kept]
    alive = torch.zeros(1, model.width, H, W)
    alive[:, kept] = 1.0
    with torch.no_grad():
        zeroed.a.weight[gone] = 0.0
        zeroed.a.bias[gone] = 0.0
        mask = (where or model.op)(alive).flatten(1)[0] != 0
        zeroed.o.weight[:, ~mask] = 0.0
    return zeroed, int(mask.sum())


def _check_exact(model: Around, where=None, **options) -> nn.Module:
    torch.manual_seed(0)
    pruned = _prune(model, **options)
    assert pruned.a.out_channels < model.width  # it pruned
    zeroed, positions = _zeroed(model, pruned, where)
    assert pruned.o.in_features == positions
    for batch in (3, 2):
        x = torch.randn(batch, 3, H, W)
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)
    return pruned


def _check_frozen(model: Around, why: str) -> None:
    pruned = _prune(model)
    assert pruned.a.out_channels == model.width
    assert why in fxcompress.history(pruned)[-1].stats["frozen"]["a"]
    x = torch.randn(3, 3, H, W)
    torch.testing.assert_close(pruned(x), model(x))


def _cases(*ops):
    return pytest.mark.parametrize("op", [op for op, _ in ops], ids=[name for _, name in ops])


# ---- dims move, channels follow ---------------------------------------------------------------------
@_cases((lambda y: torch.movedim(y, 1, -1), "torch.movedim"), (lambda y: y.moveaxis(-3, 3), "x.moveaxis"),
        (lambda y: torch.moveaxis(y, (1, 2), (3, 1)), "torch.moveaxis-tuples"),
        (lambda y: y.movedim((1, -1), (-1, 2)), "x.movedim-tuples"),
        (lambda y: y.mT, "x.mT"), (lambda y: y.data, "x.data"))
def test_dims_moved_carry_their_channels(op):
    torch.manual_seed(0)
    _check_exact(Around(op).eval())


def test_a_transposed_matrix_carries_its_channels():
    """x.T read as no channels: o kept 8 inputs while a lost 4 (a VerificationError)."""
    class Matrix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.o(self.a(x).T.T)

    torch.manual_seed(0)
    model = Matrix().eval()
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(torch.randn(4, 5),))
    assert pruned.a.out_features == pruned.o.in_features == 4


def test_an_unknown_tensor_attribute_freezes_the_channels():
    _check_frozen(Around(lambda y: y.real).eval(), "unsupported attribute .real")


# ---- unflatten: a view of one dim ---------------------------------------------------------------------
@_cases((lambda y: y.unflatten(1, (2, 4)), "x.unflatten-heads"), (lambda y: torch.unflatten(y, 1, (2, -1)), "torch.unflatten-1"),
        (lambda y: y.unflatten(-3, (-1, 4)), "x.unflatten-negative"), (nn.Unflatten(1, (2, 4)), "nn.Unflatten"),
        (lambda y: torch.unflatten(y, -1, (2, 3)), "torch.unflatten-spatial"),
        (lambda y: y.unflatten(1, (8, 1)), "x.unflatten-unit"))
@pytest.mark.parametrize("attention", ["head_dims", "heads"])
def test_unflatten_splits_channels_as_a_view_and_its_sizes_are_rewritten(op, attention):
    torch.manual_seed(0)
    model = Around(op).eval()
    pruned = _check_exact(model, attention=attention)
    assert pruned.a.out_channels == 4


def test_unflatten_sizes_computed_in_the_graph_freeze_the_channels():
    _check_frozen(Around(lambda y: y.unflatten(1, (2, y.size(1) // 2))).eval(),
                  "unflatten sizes channels with a size computed in the graph")


# ---- narrow: a slice ----------------------------------------------------------------------------------
@_cases((lambda y: torch.narrow(y, 1, 2, 5), "torch.narrow-channels"), (lambda y: y.narrow(-3, -6, 4), "x.narrow-negative"),
        (lambda y: y.narrow(3, 1, 4), "x.narrow-spatial"), (lambda y: torch.narrow(y, -1, 0, 2), "torch.narrow-last"))
def test_narrow_slices_channels_with_rewritten_bounds(op):
    torch.manual_seed(0)
    _check_exact(Around(op).eval())


def test_narrow_with_computed_bounds_freezes_the_channels():
    _check_frozen(Around(lambda y: y.narrow(1, 0, y.size(1) // 2)).eval(), "narrow narrows channels with computed bounds")


# ---- roll, flip, cumsum / cumprod -----------------------------------------------------------------------
@_cases((lambda y: torch.roll(y, 2, -1), "torch.roll"), (lambda y: y.roll((1, 2), (2, 3)), "x.roll-tuples"),
        (lambda y: torch.flip(y, (1,)), "torch.flip-channels"), (lambda y: y.flip(1, 3), "x.flip-varargs"),
        (lambda y: y.flip(-1), "x.flip-spatial"), (lambda y: torch.cumsum(y, -1), "torch.cumsum"),
        (lambda y: y.cumsum(dim=2), "x.cumsum"), (lambda y: torch.cumprod(y, 3), "torch.cumprod"),
        (lambda y: y.cumprod(-2), "x.cumprod"))
def test_roll_flip_and_scans_keep_channels_apart(op):
    torch.manual_seed(0)
    _check_exact(Around(op).eval())


@pytest.mark.parametrize("op, why", [
    (lambda y: y.roll(1, 1), "roll rolls a channel dimension"),
    (lambda y: torch.roll(y, 3), "roll rolls a channel dimension"),  # no dims: the flattened tensor rolls
    (lambda y: y.cumsum(1), "cumsum accumulates along a channel dimension"),
    (lambda y: torch.cumprod(y, -3), "cumprod accumulates along a channel dimension"),
], ids=["x.roll", "torch.roll-flat", "x.cumsum", "torch.cumprod"])
def test_roll_and_scans_along_the_channels_freeze_them(op, why):
    _check_frozen(Around(op).eval(), why)


# ---- repeat / tile / repeat_interleave -----------------------------------------------------------------
@_cases((lambda y: y.repeat(1, 2, 1, 1), "x.repeat-channels"), (lambda y: y.repeat(1, 3, 2, 1), "x.repeat-mixed"),
        (lambda y: torch.tile(y, (2, 1, 1)), "torch.tile-short"), (lambda y: y.tile(1, 1, 2), "x.tile"),
        (lambda y: torch.repeat_interleave(y, 2, dim=1), "torch.repeat_interleave"),
        (lambda y: y.repeat_interleave(3, -1), "x.repeat_interleave-spatial"),
        (lambda y: y.repeat_interleave(2, dim=-3), "x.repeat_interleave-channels"))
def test_repeats_of_channels_hold_the_kept_ones(op):
    torch.manual_seed(0)
    _check_exact(Around(op).eval())


def test_tiled_channels_added_to_a_wider_layer_go_with_both_copies():
    """a's channels tiled twice meet b's 16: b's channels c and c + 8 go with a's c."""
    class Tiled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.o = nn.Linear(5, 8), nn.Linear(5, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.o(self.a(x).repeat(1, 2) + self.b(x))

    torch.manual_seed(0)
    model = Tiled().eval()
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(torch.randn(4, 5),))
    assert (pruned.a.out_features, pruned.b.out_features, pruned.o.in_features) == (4, 8, 8)
    kept_a = [i for i, row in enumerate(model.a.weight) if any(torch.equal(row, r) for r in pruned.a.weight)]
    kept_b = [i for i, row in enumerate(model.b.weight) if any(torch.equal(row, r) for r in pruned.b.weight)]
    assert kept_b == kept_a + [i + 8 for i in kept_a]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for layer, kept in ((zeroed.a, kept_a), (zeroed.b, kept_b)):
            gone = [i for i in range(layer.out_features) if i not in kept]
            layer.weight[gone], layer.bias[gone] = 0.0, 0.0
    x = torch.randn(3, 5)
    torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op, why", [
    (lambda y: y.repeat_interleave(2).view(y.size(0), -1), "repeat_interleave repeats the flattened channels"),
    (lambda y: torch.repeat_interleave(y, 2, dim=1, output_size=16),
     "repeat_interleave repeats channels by counts or to a size given in the graph"),
], ids=["no-dim", "output_size"])
def test_repeat_interleave_of_flattened_channels_or_to_a_written_size_freezes_them(op, why):
    _check_frozen(Around(op).eval(), why)


# ---- tensor_split: a split -------------------------------------------------------------------------------
def _three(y):
    t = torch.tensor_split(y, 3, dim=1)  # pieces of 3, 3 and 2 channels
    return torch.cat([t[2], t[0] * 2, t[1]], 1)


@_cases((_three, "torch.tensor_split-sections"),
        (lambda y: y.tensor_split((2, 5), 1)[2] * y.tensor_split((2, 5), 1)[1], "x.tensor_split-indices"),
        (lambda y: y.tensor_split(2, -1)[0] * y.tensor_split(2, -1)[1], "x.tensor_split-spatial"))
def test_tensor_split_pieces_are_rewritten_as_split_sizes(op):
    torch.manual_seed(0)
    _check_exact(Around(op).eval())


# ---- reductions and normalizations along a dim ------------------------------------------------------------
@pytest.mark.parametrize("op, where", [
    (lambda y: torch.norm(y, dim=-1), None),
    (lambda y: y.norm(2, dim=(2, 3), keepdim=True), None),
    (lambda y: y.norm(p=1, dim=2), None),
    (lambda y: torch.linalg.vector_norm(y, 3, (-1, -2)), None),
    (lambda y: torch.var(y, -1), lambda t: t.sum(-1)),
    (lambda y: y.std(dim=(2, 3), keepdim=True), lambda t: t.sum((2, 3), keepdim=True)),
    (lambda y: torch.std(y, 3, True, True), lambda t: t.sum(3, keepdim=True)),
    (lambda y: y.var(-1, correction=0), lambda t: t.sum(-1)),
    (lambda y: torch.logsumexp(y, -1), lambda t: t.sum(-1)),
    (lambda y: y.logsumexp((2, 3), keepdim=True), lambda t: t.sum((2, 3), keepdim=True)),
    (lambda y: F.normalize(y, dim=-1), None),
    (lambda y: F.normalize(y, p=1.0, dim=2), None),
], ids=["torch.norm", "x.norm-dims", "x.norm-p", "torch.linalg.vector_norm", "torch.var", "x.std", "torch.std-unbiased", "x.var-correction",
        "torch.logsumexp", "x.logsumexp", "F.normalize", "F.normalize-p"])
def test_reductions_and_normalizations_over_other_dims_keep_channels_apart(op, where):
    torch.manual_seed(0)
    _check_exact(Around(op).eval(), where)


@pytest.mark.parametrize("op, why", [
    (lambda y: y.norm(dim=1), "norm reduces over a channel dimension"),
    (lambda y: torch.norm(y, 2, 1, True), "norm reduces over a channel dimension"),
    (lambda y: torch.linalg.vector_norm(y, dim=1), "linalg_vector_norm reduces over a channel dimension"),
    (lambda y: y.var(1), "var reduces over a channel dimension"),
    (lambda y: torch.std(y, (1, 2)), "std reduces over a channel dimension"),
    (lambda y: torch.logsumexp(y, -3), "logsumexp reduces over a channel dimension"),
    (lambda y: F.normalize(y), "normalize normalizes over a channel dimension"),  # dim=1 by default
    (lambda y: F.normalize(y, dim=-3), "normalize normalizes over a channel dimension"),
], ids=["x.norm", "torch.norm", "torch.linalg.vector_norm", "x.var", "torch.std", "torch.logsumexp", "F.normalize-default", "F.normalize"])
def test_reductions_and_normalizations_over_the_channels_freeze_them(op, why):
    _check_frozen(Around(op).eval(), why)


def test_std_of_every_dim_freezes_the_channels():
    """torch.std(x, unbiased): a bool where the dims go; the statistic is of the whole tensor."""
    class Whole(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x)
            return self.o(y / torch.std(y, False))

    torch.manual_seed(0)
    model = Whole().eval()
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(torch.randn(4, 5),))
    assert pruned.a.out_features == 8
    assert fxcompress.history(pruned)[-1].stats["frozen"]["a"] == "std reduces over a channel dimension"


# ---- topk and sort ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("op, where", [
    (lambda y: torch.topk(y, 2, dim=-1).values, None),
    (lambda y: y.topk(3, 2)[0], None),
    (lambda y: y.topk(2).indices.float(), lambda t: t.topk(2).values),  # a zero channel's indices are not zero
    (lambda y: torch.sort(y, dim=-1).values, None),
    (lambda y: y.sort(2, descending=True)[1].float(), lambda t: t.sort(2).values),
    (lambda y: y.sort()[0] - y.topk(1)[0], lambda t: t.sort()[0] + t.topk(1)[0]),
], ids=["torch.topk", "x.topk", "x.topk-indices", "torch.sort", "x.sort-indices", "x.sort-and-topk"])
def test_topk_and_sort_along_other_dims_keep_channels_apart(op, where):
    torch.manual_seed(0)
    _check_exact(Around(op).eval(), where)


@pytest.mark.parametrize("op, why", [
    (lambda y: torch.topk(y, 2, dim=1).values, "topk selects the top k along a channel dimension"),
    (lambda y: y.topk(3, -3)[1].float(), "topk selects the top k along a channel dimension"),
    (lambda y: y.sort(1).values, "sort sorts along a channel dimension"),
    (lambda y: torch.sort(y, dim=-3)[0], "sort sorts along a channel dimension"),
], ids=["torch.topk", "x.topk-indices", "x.sort", "torch.sort"])
def test_topk_and_sort_along_the_channels_freeze_them(op, why):
    _check_frozen(Around(op).eval(), why)


# ---- pixel shuffle ------------------------------------------------------------------------------------------
@_cases((lambda y: F.pixel_shuffle(y, 2), "F.pixel_shuffle"), (lambda y: torch.pixel_shuffle(y, 2), "torch.pixel_shuffle"),
        (nn.PixelShuffle(2), "nn.PixelShuffle"))
def test_pixel_shuffle_prunes_whole_blocks_of_r_squared_channels(op):
    torch.manual_seed(0)
    model = Around(op, width=16).eval()
    pruned = _check_exact(model)
    kept = _kept(model, pruned)
    assert len(kept) == 8 and all(kept[i:i + 4] == list(range(kept[i], kept[i] + 4)) and kept[i] % 4 == 0
                                  for i in range(0, 8, 4))


@_cases((lambda y: F.pixel_unshuffle(y, 2), "F.pixel_unshuffle"),
        (lambda y: torch.pixel_unshuffle(y, 2), "torch.pixel_unshuffle"), (nn.PixelUnshuffle(2), "nn.PixelUnshuffle"))
def test_pixel_unshuffle_repeats_each_channel_r_squared_times(op):
    torch.manual_seed(0)
    pruned = _check_exact(Around(op).eval())
    assert pruned.a.out_channels == 4 and pruned.o.in_features == 4 * 4 * (H // 2) * (W // 2)


def test_a_pixel_shuffle_between_convs_rewrites_nothing_but_the_widths():
    """A sub-pixel upsampler (ESPCN): conv to 4 r² channels, shuffle, conv."""
    class Upsampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.shuffle, self.o = nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(4, 3, 3)

        def forward(self, x):
            return self.o(torch.relu(self.shuffle(self.a(x))))

    torch.manual_seed(0)
    model = Upsampler().eval()
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=(torch.randn(2, 3, 5, 5),))
    assert (pruned.a.out_channels, pruned.o.in_channels) == (8, 2)
    kept = [i for i, row in enumerate(model.a.weight) if any(torch.equal(row, r) for r in pruned.a.weight)]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        gone = [i for i in range(16) if i not in kept]
        zeroed.a.weight[gone], zeroed.a.bias[gone] = 0.0, 0.0
    x = torch.randn(3, 3, 5, 5)
    torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)
