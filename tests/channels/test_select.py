"""The data-driven channel selections (ThiNet greedy, He et al. lasso) and how they choose."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.channels import ChannelGraph, ChannelGroup
from fxcompress.channels.select import _greedy_order, _lasso_scores, lowest
from fxcompress.pass_base import PassContext
from fxcompress.passes import PruneChannels
from fxcompress.tracing import trace


def _group(n: int) -> ChannelGroup:
    return ChannelGroup(0, (), np.arange(n), np.arange(n), None, (), ())


def test_greedy_prefers_a_channel_that_cancels_the_ones_already_removed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    z = np.stack([0.5 * a, -0.6 * a, 0.55 * b], 1)  # by norm alone, 0 and 2 would go
    order = _greedy_order(z, _group(3), 2, 0)
    assert set(np.argsort(order)[:2]) == {0, 1}


def test_lasso_scores_lowest_the_channels_that_contribute_nothing():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 6))
    z[:, [1, 4]] *= 1e-4
    scores = _lasso_scores(z, _group(6), 2, 0)
    assert set(np.argsort(scores)[:2]) == {1, 4}  # removed, not kept (the seed code had this backwards)


class DeadChannels(nn.Module):
    """Half of conv1's channels are large but always zero after the ReLU: data shows it, norms do not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[:4] *= 0.01
            self.conv1.weight[4:] *= 10
            self.conv1.bias[4:] = -1e4

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("method", ["greedy", "lasso"])
def test_data_driven_selection_removes_dead_channels_that_l1_keeps(method):
    model, x = DeadChannels().eval(), torch.randn(4, 3, 8, 8)
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    by_data = fxcompress.compile(model, [PruneChannels(method=method)], example_inputs=(x,),
                                 calibration_data=calibration)
    by_norm = fxcompress.compile(model, [PruneChannels(method="l1")], example_inputs=(x,))
    torch.testing.assert_close(by_data(x), model(x), atol=1e-5, rtol=1e-5)  # only dead channels went
    assert (by_norm(x) - model(x)).abs().max() > 1e-3


# ---- ties: equal scores are broken by channel index, the same way in every group -----------------
class EqualFilters(nn.Module):
    """a and b: every output filter the same (equal l1 and l2 norms), the biases 0..7 tell the
    channels apart. `residual`: a and b feed one sum (one group); else two groups."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.a, self.b, self.o, self.o2 = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(8, 2)
        self.residual = residual
        with torch.no_grad():
            for layer, sign in ((self.a, 1.0), (self.b, -1.0)):
                layer.weight.copy_(sign * torch.ones(5).expand(8, 5))
                layer.bias.copy_(torch.arange(8.0))

    def forward(self, x):
        if self.residual:
            return self.o(self.a(x) + self.b(x))
        return self.o(self.a(x)) + self.o2(self.b(x))


def _kept_channels(layer: nn.Linear) -> list[int]:
    return layer.bias.detach().long().tolist()


@pytest.mark.parametrize("method", ["l1", "l2"])
@pytest.mark.parametrize("residual", [False, True], ids=["two groups", "one group"])
def test_equal_scores_remove_the_lowest_channel_indices_first(method, residual):
    x = torch.randn(4, 5)
    pruned = fxcompress.compile(EqualFilters(residual).eval(), [PruneChannels(amount=0.5, method=method)],
                                example_inputs=(x,))
    assert _kept_channels(pruned.a) == _kept_channels(pruned.b) == [4, 5, 6, 7]


def test_lowest_breaks_ties_by_class_whatever_order_the_prunable_classes_come_in():
    """`lowest` ranks by (score, class), not by where a class sits in `prunable`."""
    gm = trace(EqualFilters(residual=False).eval())
    cg = PassContext(example_inputs=(torch.randn(4, 5),), gm=gm).get(ChannelGraph)
    group = next(g for g in cg.groups if "a" in g.producers)
    shuffled = ChannelGroup(group.index, group.slots, group.classes, group.prunable[::-1].copy(), None,
                            group.producers, group.consumers)
    scores = np.zeros(cg.labels.max() + 1)
    scores[group.prunable[-1]] = -1.0  # the one class scored below the ties goes first
    chosen = lowest(shuffled, scores, 3, cg, 1)
    assert chosen.tolist() == [group.prunable[-1], *sorted(group.prunable)[:2]]


def test_global_ranking_of_equal_scores_takes_its_budget_shared_between_the_groups():
    """Every normalized score tied at 1: the threshold took every class of every group, and each
    group went down to one channel instead of losing half."""
    x = torch.randn(4, 5)
    pruned = fxcompress.compile(EqualFilters(residual=False).eval(), [PruneChannels(amount=0.5, global_=True)],
                                example_inputs=(x,))
    assert _kept_channels(pruned.a) == _kept_channels(pruned.b) == [4, 5, 6, 7]
    assert fxcompress.history(pruned)[-1].stats["channels_removed"] == 8
