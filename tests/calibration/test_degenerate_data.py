"""Calibration data no statistics can be taken from are refused by name, never compressed from: batches
that bring a layer no token (a pruner would find every input dead and zero the weights) and inputs holding
NaN / Inf (NaN norms sort anywhere: Wanda would keep or drop channels at random)."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import PreconditionError
from fxcompress.passes import InsertFakeQuant, InsertMasks, SparseGPT
from fxcompress.pruning.owl import OWL

PASSES = {
    "SparseGPT": lambda: SparseGPT(sparsity=0.5),
    "InsertFakeQuant": lambda: InsertFakeQuant(method="linear", bits=4, per_channel=True, rounding="gptq"),
    "InsertMasks": lambda: InsertMasks(sparsity=0.5, importance="wanda"),
    "InsertMasks OWL": lambda: InsertMasks(sparsity=0.5, importance="wanda", profile=OWL()),
}


class Selected(nn.Module):
    """fc2 reads only the rows whose sum is above a threshold: calibration data can bring fc1 tokens and
    fc2 none."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h[h.sum(-1) > 1e6])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


@pytest.mark.parametrize("make", PASSES.values(), ids=PASSES.keys())
def test_batches_with_no_tokens_are_an_error_naming_the_layer(make):
    model = _model()
    config = make()
    owner = type(config).__name__
    with pytest.raises(PreconditionError, match=rf"{owner}: no calibration token reaches the input of layer '0'"):
        fxcompress.compile(model, [config], (torch.randn(4, 32),), calibration_data=[torch.empty(0, 32)])


@pytest.mark.parametrize("make", PASSES.values(), ids=PASSES.keys())
def test_a_later_layer_that_no_token_reaches_is_named(make):
    """fc1 is calibrated on its tokens; fc2 gets none, and the error names fc2, not the model's input."""
    torch.manual_seed(0)
    model = Selected().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert model.fc1(x).sum(-1).max() < 1e6   # no row reaches fc2
    with pytest.raises(PreconditionError, match=r"no calibration token reaches the input of layer 'fc2'"):
        fxcompress.compile(model, [make()], (x,), calibration_data=[x, torch.randn(4, 32)])


def test_an_empty_batch_among_others_adds_nothing_and_is_accepted():
    """Only a layer with no token at all is refused: an empty batch beside full ones changes no statistic."""
    model = _model()
    x, batches = torch.randn(4, 32), [torch.randn(16, 32) for _ in range(2)]
    plain = fxcompress.compile(model, [SparseGPT(sparsity=0.5)], (x,), calibration_data=batches)
    padded = fxcompress.compile(model, [SparseGPT(sparsity=0.5)], (x,), calibration_data=[*batches, torch.empty(0, 32)])
    for name in ("0", "2"):
        assert torch.equal(padded.get_submodule(name).weight, plain.get_submodule(name).weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("make", PASSES.values(), ids=PASSES.keys())
def test_non_finite_calibration_inputs_are_an_error_naming_the_layer_and_channels(make, bad):
    model = _model()
    x = torch.randn(4, 32)
    poisoned = torch.randn(4, 32)
    poisoned[0, 3] = poisoned[2, 17] = bad
    config = make()
    owner = type(config).__name__
    with pytest.raises(PreconditionError, match=rf"{owner}: the input of layer '0' holds NaN / Inf in 2 of 32 "
                                                rf"channels \(3, 17\)"):
        fxcompress.compile(model, [config], (x,), calibration_data=[x, poisoned])
