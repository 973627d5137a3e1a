"""Fixtures the calibration tests share."""
import pytest
import torch
from torch import nn

from calibration.tiny_lm import correlated_batches


@pytest.fixture(scope="module")
def layer():
    """One linear layer (256 -> 64) and calibration batches whose channels are strongly correlated."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 64)).eval(), correlated_batches()
