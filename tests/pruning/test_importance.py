"""Importance scores and exact lowest-k selection."""
import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch

from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.pruning.importance import (count_to_prune, group_dims, group_layout, group_scores, keep_highest,
                                           masked_scores, pruned_groups)

W = torch.tensor([[3.0, -4.0], [1.0, 0.0], [-2.0, 2.0]])


def test_group_dims_per_granularity_and_layer_kind():
    assert group_dims("element", "linear", 2) == (0, 1)
    assert group_dims("filter", "conv2d", 4) == (0,) and group_dims("channel", "conv2d", 4) == (1,)
    assert group_dims("filter", "conv_transpose2d", 4) == (1,) and group_dims("kernel", "conv1d", 3) == (0, 1)


def test_l1_l2_and_callable_scores():
    rows = (0,)
    assert group_scores(W, rows, "l1").flatten().tolist() == [7.0, 1.0, 4.0]
    assert group_scores(W, rows, "abs").flatten().tolist() == [7.0, 1.0, 4.0]
    assert group_scores(W, rows, "l2").flatten().tolist() == pytest.approx([5.0, 1.0, 8 ** 0.5])
    assert group_scores(W, (0, 1), "l2").equal(W.abs())
    assert group_scores(W, rows, lambda w: -w).flatten().tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(ConfigError, match="shaped like the weight \\(3, 2\\), got \\(3,\\)"):
        group_scores(W, rows, lambda w: w.sum(1))


def test_exact_count_even_with_ties():
    keep = keep_highest(torch.zeros(10), count_to_prune(0.35, 10))
    assert keep.sum() == 6
    assert count_to_prune(0.5, 3) == 2 and count_to_prune(1.0, 7) == 7  # round half to even, as torch


def test_groups_pruned_before_go_first():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert pruned_groups(mask, (0,)).flatten().tolist() == [False, True, False]
    scores = masked_scores(torch.ones(3, 2), mask, (0,), "l1")
    assert scores.flatten().tolist() == [2.0, float("-inf"), 1.0]


@given(rows=st.integers(1, 12), cols=st.integers(1, 12), sparsity=st.floats(0.0, 1.0),
       dims=st.sampled_from([(0, 1), (0,), (1,)]))
def test_selection_prunes_exactly_the_requested_groups(rows, cols, sparsity, dims):
    weight = torch.randn(rows, cols)
    scores = group_scores(weight, dims, "l1")
    keep = keep_highest(scores, count_to_prune(sparsity, scores.numel()))
    assert (~keep).sum().item() == round(sparsity * scores.numel())
    if (~keep).any() and keep.any():
        assert scores[~keep].max() <= scores[keep].min()  # nothing kept scores below anything pruned


def test_keep_highest_prunes_tied_scores_earliest_first():
    # it used torch.topk, whose ties on CPU fell on later weights (here index 4 and 7 of the zeros):
    # OWL with a magnitude importance and sensitivity then pruned other weights than InsertMasks does
    scores = torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0])
    assert keep_highest(scores, 2).tolist() == [True, False, False, True, True, True, True, True]
    many = torch.zeros(100_000)
    many[::3] = 1.0
    pruned = (~keep_highest(many, 40_000)).nonzero().flatten()
    expected = torch.sort(many, stable=True).indices[:40_000].sort().values
    assert torch.equal(pruned, expected)
    assert keep_highest(scores, 0).all() and not keep_highest(scores, 8).any()


def test_grouped_conv_channels_are_split_by_conv_group():
    # a depthwise conv's weight [4, 1, 3, 3]: its 4 input channels, not 1 column for the whole layer
    assert group_layout("channel", "conv2d", 4, "dw", 4) == ((0, 2), 4)
    assert group_layout("filter", "conv_transpose2d", 4, "up", 2) == ((0, 2), 2)
    assert group_layout("filter", "conv2d", 4, "dw", 4) == ((0,), 1)  # dim 0 already holds every filter
    assert group_layout("channel", "conv_transpose2d", 4, "up", 2) == ((0,), 1)
    assert group_layout("kernel", "conv2d", 4, "dw", 4) == ((0, 1), 1)
    weight = torch.arange(4 * 9, dtype=torch.float32).view(4, 1, 3, 3)
    seen = []
    scores = group_scores(weight, (0, 2), lambda w: seen.append(tuple(w.shape)) or w.abs(), split=4)
    assert seen == [(4, 1, 3, 3)]  # a callable sees the weight, not the split view
    assert scores.flatten().tolist() == weight.flatten(1).sum(1).tolist()
    with pytest.raises(PreconditionError, match="dw: conv groups must be a positive int"):
        group_layout("channel", "conv2d", 4, "dw", 0)
