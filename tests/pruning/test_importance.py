"""Importance scores and exact lowest-k selection."""
import pytest
from hypothesis import given
from hypothesis import strategies as st
import torch

from fxcompress.errors import ConfigError
from fxcompress.pruning.importance import (count_to_prune, group_dims, group_scores, keep_highest, masked_scores,
                                           pruned_groups)

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
