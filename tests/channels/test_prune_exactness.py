"""PruneChannels on ops whose channel bookkeeping is easy to get wrong: the pruned model must equal
the original with exactly the removed channels zeroed, also at a batch size other than the
example's, or leave those channels whole (with the reason in the pass's statistics)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.passes import PruneChannels
from layer_cases import TiedHead


def _prune(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    return fxcompress.compile(model, [PruneChannels(**{"amount": 0.5, **options})], example_inputs=(x,))


def _zeroed_like(model: nn.Module, pruned: nn.Module, *layers: str, readers: tuple[str, ...] = ()) -> nn.Module:
    """A copy of `model` with the output channels each of `layers` lost in `pruned` zeroed (weight
    rows and bias, and the input columns of `readers`), as zeroing.zero_classes zeroes a class; the
    lost channels are found by matching the rows left (the layers read the model's input, so their
    rows are whole)."""
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name in layers:
            dense, cut = zeroed.get_submodule(name), pruned.get_submodule(name)
            kept = [any(torch.equal(row, r) for r in cut.weight) for row in model.get_submodule(name).weight]
            assert sum(kept) == cut.weight.shape[0]
            gone = torch.tensor([not k for k in kept])
            dense.weight[gone] = 0.0
            dense.bias[gone] = 0.0
            for reader in readers:
                zeroed.get_submodule(reader).weight[:, gone] = 0.0
    return zeroed


def _assert_same(pruned: nn.Module, zeroed: nn.Module, *inputs: torch.Tensor) -> None:
    for x in inputs:
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=1e-5)


def _kept(model: nn.Module, pruned: nn.Module, name: str) -> list[int]:
    """The output channels of layer `name` that `pruned` kept (its rows matched against the model's)."""
    rows = pruned.get_submodule(name).weight
    return [i for i, row in enumerate(model.get_submodule(name).weight) if any(torch.equal(row, r) for r in rows)]


def _frozen(pruned: nn.Module) -> dict:
    return fxcompress.history(pruned)[-1].stats["frozen"]


# ---- a reshape that merges channels with the batch ------------------------------------------------
class SpatialSoftmax(nn.Module):
    """A softmax over each channel's positions: channels folded into the batch dim and back."""

    def __init__(self, constant_channels: bool = False) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.constant_channels = constant_channels

    def forward(self, x):
        y = self.c1(x)
        b, c, h, w = y.shape
        rows = b * 8 if self.constant_channels else b * c  # the width written as a constant, or read
        z = F.softmax(y.reshape(rows, -1), dim=-1).reshape(b, c, h, w)
        return self.c2(z)


@pytest.mark.parametrize("batch", [2, 1])  # at batch 1 the shapes show no merge at all
def test_channels_merged_with_the_batch_keep_the_batch_read_at_run_time(batch):
    """`y.reshape(b * c, -1)` became `reshape(8, -1)` at batch 2: batch 4 differed, batch 3 crashed."""
    torch.manual_seed(0)
    model = SpatialSoftmax().eval()
    pruned = _prune(model, torch.randn(batch, 3, 5, 5))
    assert pruned.c1.out_channels == 4 and pruned.c2.in_channels == 4
    zeroed = _zeroed_like(model, pruned, "c1", readers=("c2",))  # a zero channel's softmax is uniform
    _assert_same(pruned, zeroed, *(torch.randn(n, 3, 5, 5) for n in (1, 2, 3, 4)))


@pytest.mark.parametrize("batch", [2, 1])
def test_channels_merged_with_the_batch_by_a_constant_width_stay(batch):
    """`b * 8` reads the batch but spells the width as a constant: it can be neither written nor kept."""
    torch.manual_seed(0)
    model = SpatialSoftmax(constant_channels=True).eval()
    pruned = _prune(model, torch.randn(batch, 3, 5, 5))
    assert pruned.c1.out_channels == 8
    assert _frozen(pruned)["c1"] == "reshape sizes channels with a size known only at run time"
    _assert_same(pruned, model, *(torch.randn(n, 3, 5, 5) for n in (1, 2, 3)))


# ---- a one-channel slice that broadcasts ----------------------------------------------------------
class Gate(nn.Module):
    """The head's output gated by channel 7 of y (a one-channel slice), whose filter is the weakest."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(5, 8), nn.Linear(8, heads)
        with torch.no_grad():
            self.a.weight[7] *= 0.01

    def forward(self, x):
        y = self.a(x)
        return (self.o(y) * torch.sigmoid(y[:, 7:8])).sum(1)


@pytest.mark.parametrize("heads, why", [
    (1, "mul combines channels with a tensor whose channels cannot be sliced"),  # o's one column cannot go
    (2, "mul combines channels with a tensor whose channels cannot be sliced (one channel broadcast over 2)"),
])
def test_a_one_channel_slice_that_broadcasts_keeps_its_channel(heads, why):
    """Channel 7 went and the slice became empty: the outputs were all zero (or the product failed)."""
    torch.manual_seed(0)
    model = Gate(heads).eval()
    pruned = _prune(model, torch.randn(4, 5))
    assert pruned.a.out_features == 4 and torch.equal(pruned.a.weight[-1], model.a.weight[7])
    assert _frozen(pruned)["a"] == why
    _assert_same(pruned, _zeroed_like(model, pruned, "a"), torch.randn(4, 5), torch.randn(3, 5))


# ---- softmax over an implicit dim -----------------------------------------------------------------
class ImplicitSoftmax(nn.Module):
    def __init__(self, softmax) -> None:
        super().__init__()
        self.a, self.o, self.softmax = nn.Linear(5, 8), nn.Linear(8, 2), softmax

    def forward(self, x):
        return self.o(self.softmax(self.a(x)))


@pytest.mark.parametrize("softmax", [nn.Softmax(), nn.LogSoftmax(), F.softmax, F.log_softmax],
                         ids=["Softmax", "LogSoftmax", "F.softmax", "F.log_softmax"])
def test_softmax_without_a_dim_normalizes_over_the_channels_torch_picks(softmax):
    """dim=None is dim 1 of a 2-D input (torch's _get_softmax_dim): the channels were pruned."""
    torch.manual_seed(0)
    model = ImplicitSoftmax(softmax).eval()
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        pruned = _prune(model, torch.randn(4, 5))
    assert pruned.a.out_features == 8
    assert "normalizes over a channel dimension" in _frozen(pruned)["a"]
    with pytest.warns(UserWarning):
        _assert_same(pruned, model, torch.randn(4, 5), torch.randn(3, 5))


# ---- round_to with frozen channels ----------------------------------------------------------------
class PartlyFrozen(nn.Module):
    """y's first `frozen` channels are summed into the output: they must stay."""

    def __init__(self, width: int, frozen: int) -> None:
        super().__init__()
        self.a, self.o, self.frozen = nn.Linear(5, width), nn.Linear(width, 2), frozen

    def forward(self, x):
        y = self.a(x)
        return self.o(y) + y[:, :self.frozen].sum(1, keepdim=True)


@pytest.mark.parametrize("amount", [0.5, 0.75, 0.9])
def test_round_to_holds_when_frozen_channels_cap_the_removal(amount):
    """8 channels, 3 frozen, round_to=2: 5 went at 0.75 and 0.9, leaving 3."""
    torch.manual_seed(0)
    model = PartlyFrozen(8, 3).eval()
    pruned = _prune(model, torch.randn(4, 5), amount=amount, round_to=2)
    assert pruned.a.out_features == 4
    _assert_same(pruned, _zeroed_like(model, pruned, "a"), torch.randn(3, 5))


def test_round_to_that_no_multiple_fits_removes_nothing():
    """6 channels, 5 frozen, round_to=4: keeping 8 is impossible, so the group keeps all 6 (not 5)."""
    torch.manual_seed(0)
    model = PartlyFrozen(6, 5).eval()
    pruned = _prune(model, torch.randn(4, 5), amount=0.5, round_to=4)
    assert pruned.a.out_features == 6
    assert fxcompress.history(pruned)[-1].stats["channels_removed"] == 0
    # the statistics said only why 5 channels were frozen, not that the sixth stayed too
    assert _frozen(pruned)["a"] == ("sum_1 reduces over a channel dimension; round_to=4: "
                                    "keeping at least 5 of its 6 channels (5 of them frozen) leaves no "
                                    "multiple of 4 below 6, so none are removed")


def test_round_to_wider_than_a_layer_is_reported_for_it():
    """No frozen channel: a's 6 channels cannot keep a multiple of 8, so a stays whole and says so;
    b (16 wide) loses half."""
    class TwoWidths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.o = nn.Linear(5, 6), nn.Linear(6, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.o(self.b(self.a(x)))

    torch.manual_seed(0)
    model = TwoWidths().eval()
    pruned = _prune(model, torch.randn(4, 5), round_to=8)
    assert (pruned.a.out_features, pruned.b.out_features) == (6, 8)
    assert _frozen(pruned) == {"a": "round_to=8: keeping at least 3 of its 6 channels leaves no multiple of 8 "
                                    "below 6, so none are removed",
                               "o": "reaches the model output (output)"}
    _assert_same(pruned, _zeroed_like(model, pruned, "b", readers=("o",)), torch.randn(3, 5))


# ---- F.group_norm with one channel per group ------------------------------------------------------
class ChannelwiseGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.o(F.group_norm(self.a(x), 8))


def test_functional_group_norm_with_one_channel_per_group_loses_groups():
    """The group count 8 stayed in the graph over 4 channels: the pruned model failed."""
    torch.manual_seed(0)
    model = ChannelwiseGroupNorm().eval()
    pruned = _prune(model, torch.randn(2, 3, 4, 4))
    assert pruned.a.out_channels == 4
    _assert_same(pruned, _zeroed_like(model, pruned, "a"), torch.randn(3, 3, 4, 4))


# ---- a weight tied under two module names ---------------------------------------------------------
class Tied(nn.Module):
    """b.weight is a.weight."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.a, self.b, self.o, self.o2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2), nn.Linear(6, 2)
        self.b.weight = self.a.weight
        self.use = use

    def forward(self, x):
        if self.use == "output":  # b's channels reach the model output
            return self.o(torch.relu(self.a(x))), self.b(x)
        if self.use == "chain":  # a's outputs are b's inputs: one tensor, both dims
            return self.o(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.o(torch.relu(self.a(x))) + self.o2(torch.relu(self.b(x)))  # two branches


def test_a_tied_weight_whose_other_name_is_frozen_stays_whole():
    """The tied tensor was cut for a while b's channels were frozen: a VerificationError on b."""
    torch.manual_seed(0)
    model = Tied("output").eval()
    pruned = _prune(model, torch.randn(2, 6))
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (6, 6)
    assert fxcompress.history(pruned)[-1].stats["channels_removed"] == 0
    x = torch.randn(3, 6)
    for got, expected in zip(pruned(x), model(x)):
        torch.testing.assert_close(got, expected)


def test_a_tied_weight_read_as_input_and_output_channels_stays_whole():
    """a's outputs are the tied tensor's rows, b's inputs its columns, which read x: nothing can go
    (it raised a PreconditionError: the tied tensor would be cut differently)."""
    torch.manual_seed(0)
    model = Tied("chain").eval()
    pruned = _prune(model, torch.randn(2, 6))
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (6, 6)
    _assert_same(pruned, model, torch.randn(3, 6))


def test_a_tied_weight_in_two_branches_loses_the_same_channels_under_both_names():
    """Nothing couples the branches but the tied tensor: scored apart (at random, so the rows are
    no tie-breaker) they were cut differently, a PreconditionError."""
    torch.manual_seed(0)
    model = Tied("branches").eval()
    pruned = _prune(model, torch.randn(2, 6), method="random")
    assert pruned.a.weight is pruned.b.weight and pruned.a.weight.shape == (3, 6)
    assert pruned.a.out_features == pruned.b.out_features == pruned.o.in_features == pruned.o2.in_features == 3
    _assert_same(pruned, _zeroed_like(model, pruned, "a", "b"), torch.randn(3, 6))


# ---- expand of a one-channel slice ----------------------------------------------------------------
class ExpandedSlice(nn.Module):
    """Channel 3 of y repeated over b's 8 channels."""

    def __init__(self, as_: bool) -> None:
        super().__init__()
        self.a, self.b, self.o = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 2)
        self.as_ = as_

    def forward(self, x):
        y, z = self.a(x), self.b(x)
        column = y[:, 3:4].expand_as(z) if self.as_ else y[:, 3:4].expand(-1, 8)
        return self.o(z + column) + y[:, :2]


def test_an_expanded_one_channel_slice_keeps_its_channel_and_the_channels_it_meets():
    """The expanded track kept one id for eight positions: a bare scipy ValueError in the walk."""
    torch.manual_seed(0)
    model = ExpandedSlice(as_=False).eval()
    pruned = _prune(model, torch.randn(4, 5))
    assert pruned.b.out_features == 8  # added to a channel repeated 8 times as written: none of it can go
    assert pruned.a.out_features == 5 and any(torch.equal(r, model.a.weight[3]) for r in pruned.a.weight)
    _assert_same(pruned, _zeroed_like(model, pruned, "a"), torch.randn(3, 5))


def test_a_one_channel_slice_expanded_as_a_tensor_follows_that_tensors_width():
    """expand_as reads z's width at run time: the repeated channel stays, and z loses channels, each
    position of the expansion going with z's channel there (the repeated value is o's input there)."""
    torch.manual_seed(0)
    model = ExpandedSlice(as_=True).eval()
    pruned = _prune(model, torch.randn(4, 5))
    assert pruned.b.out_features == 4 and pruned.o.in_features == 4
    assert pruned.a.out_features == 5 and any(torch.equal(r, model.a.weight[3]) for r in pruned.a.weight)
    zeroed = _zeroed_like(_zeroed_like(model, pruned, "a"), pruned, "b", readers=("o",))
    _assert_same(pruned, zeroed, torch.randn(3, 5))


# ---- view_as / reshape_as / expand_as: the shape comes from another tensor ------------------------
class SizedAs(nn.Module):
    """a's channels viewed (or expanded) as `other`: the input z, or b's output split into heads."""

    def __init__(self, op: str, other: str) -> None:
        super().__init__()
        self.a, self.b, self.o, self.o2 = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(8, 2)
        self.op, self.other = op, other

    def forward(self, x, z):
        y = self.a(x)
        if self.op == "expand_as":  # other: (batch, 3, 8), a's channels on its last dim
            other = z if self.other == "input" else self.b(x)[:, None, :].expand(-1, 3, -1)
            return self.o(y[:, None, :].expand_as(other).sum(1)) + self.o2(other.sum(1))
        other = z if self.other == "input" else self.b(x).view(-1, 2, 4)  # (batch, 2, 4): two heads of 4
        return self.o(getattr(y, self.op)(other).flatten(1)) + self.o2(other.flatten(1))


def _inputs(op: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 5), torch.randn(batch, 3, 8) if op == "expand_as" else torch.randn(batch, 2, 4)


@pytest.mark.parametrize("op", ["view_as", "reshape_as", "expand_as"])
def test_a_view_as_an_input_keeps_the_channels_it_views(op):
    """z's shape cannot shrink: a lost channels and the view failed (a VerificationError)."""
    torch.manual_seed(0)
    model = SizedAs(op, "input").eval()
    pruned = fxcompress.compile(model, [PruneChannels(amount=0.5)], example_inputs=_inputs(op, 4))
    assert pruned.a.out_features == 8
    what = "expands to" if op == "expand_as" else "takes"
    assert _frozen(pruned)["a"] == f"{op} {what} the shape of a tensor whose channels cannot be sliced alike"
    for batch in (3, 4):
        inputs = _inputs(op, batch)
        torch.testing.assert_close(pruned(*inputs), model(*inputs))


@pytest.mark.parametrize("op", ["view_as", "reshape_as", "expand_as"])
def test_a_view_as_another_layers_output_loses_the_same_channels_as_that_layer(op):
    """a and b were separate groups: at their own amounts (a half, b a quarter) a kept 4 channels and
    b 6, and the view of a's as b's failed. Each position of the view holds a's and b's channel
    there: they go together, at the amount of the first pattern that names one of them."""
    torch.manual_seed(0)
    model = SizedAs(op, "b").eval()
    pruned = fxcompress.compile(model, [PruneChannels(amount={"a": 0.5, "b": 0.25})], example_inputs=_inputs(op, 4))
    assert pruned.a.out_features == pruned.b.out_features == 4
    zeroed = _zeroed_like(model, pruned, "a", "b", readers=("o", "o2"))
    assert _kept(model, pruned, "a") == _kept(model, pruned, "b")  # the same positions of both
    for batch in (3, 4):
        inputs = _inputs(op, batch)
        torch.testing.assert_close(pruned(*inputs), zeroed(*inputs), atol=1e-5, rtol=1e-5)


# ---- cat / stack of a sequence one node computes ---------------------------------------------------
class JoinsASequence(nn.Module):
    def __init__(self, op: str) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 2)
        self.op = op

    def forward(self, x):
        y = self.a(x)
        if self.op == "cat":  # the halves swapped: a slice of chunk's tuple
            return self.o(torch.cat(y.chunk(2, -1)[::-1], -1))
        return self.o(torch.stack(y.unsqueeze(-1).unbind(-1), -1).squeeze(-1))


@pytest.mark.parametrize("op, why", [("cat", "getitem slices a tuple"),
                                     ("stack", "stack stacks a sequence computed in the graph")])
def test_cat_or_stack_of_a_computed_sequence_keeps_its_channels(op, why):
    """The rules read the tensors argument as a list: a bare TypeError ('Node' object is not iterable)."""
    torch.manual_seed(0)
    model = JoinsASequence(op).eval()
    pruned = _prune(model, torch.randn(4, 5))
    assert pruned.a.out_features == 8 and _frozen(pruned)["a"] == why
    _assert_same(pruned, model, torch.randn(3, 5))


# ---- an output head tied to the embedding table ----------------------------------------------------
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_head_tied_to_the_embedding_keeps_its_outputs_even_when_outputs_may_go(frontend):
    """prune_outputs=True let the traced head lose outputs, and so the table its rows: the token ids
    above the cut then read past the table (the exported graph kept them: the two front ends differed)."""
    torch.manual_seed(0)
    model, idx = TiedHead().eval(), torch.randint(0, 16, (2, 8))
    source = model if frontend == "fx" else torch.export.export(model, (idx,))
    pruned = fxcompress.compile(source, [PruneChannels(amount=0.5, prune_outputs=True)], (idx,), frontend=frontend)
    # the table's columns are fc's inputs, the head's inputs and so fc's outputs: one group, halved
    assert pruned.get_parameter("embed.weight").shape == (16, 4)
    assert pruned.get_parameter("lm_head.weight") is pruned.get_parameter("embed.weight")
    assert _frozen(pruned)["lm_head"] == "embed looks its rows up by index"
    every_token = torch.arange(16).reshape(2, 8)
    assert pruned(every_token).shape == model(every_token).shape
