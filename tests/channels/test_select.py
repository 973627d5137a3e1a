"""The data-driven channel selections (ThiNet greedy, He et al. lasso) and how they choose."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.channels import ChannelGroup
from fxcompress.channels.select import _greedy_order, _lasso_scores
from fxcompress.passes import PruneChannels


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
