"""ScaleChannels never folds into a norm module whose affine weight has another use: one LayerNorm /
RMSNorm called twice, or its weight read elsewhere in the graph. Dividing it would change those uses too,
with nothing to compensate them, so the group is reported skipped (or, with insert_scales, scaled by a
product of its own) and the model computes what it did."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.passes.scale_channels import ScaleChannels

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


class NormTwice(nn.Module):
    """norm(fc(norm(x))): the second call reads the same weight, and no linear layer compensates it."""

    def __init__(self, norm: type, width: int = 32) -> None:
        super().__init__()
        self.norm, self.fc = norm(width), nn.Linear(width, width)

    def forward(self, x):
        return self.norm(self.fc(self.norm(x)))


class NormFeedsTwo(nn.Module):
    """fc2(norm(fc1(norm(x)))): each call feeds its own linear layer."""

    def __init__(self, norm: type, width: int = 32) -> None:
        super().__init__()
        self.norm = norm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(self.norm(x))))


class NormWeightReadAgain(nn.Module):
    """fc(norm(x)) + norm.weight: the weight is also read directly (a get_attr)."""

    def __init__(self, norm: type, width: int = 32) -> None:
        super().__init__()
        self.norm, self.fc = norm(width), nn.Linear(width, width)

    def forward(self, x):
        return self.fc(self.norm(x)) + self.norm.weight


def _outliers(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.weight[:4] = 20.0   # outlier channels: the scales are far from 1, a wrong fold is visible
    return model.eval()


def _compile(model: nn.Module, config: ScaleChannels):
    torch.manual_seed(1)
    x = torch.randn(4, 8, 32)
    data = [torch.randn(4, 8, 32) for _ in range(4)]
    gm = fxcompress.compile(model, [config], (x,), calibration_data=data)
    with torch.no_grad():
        reference, out = model(x), gm(x)
    return gm, float((out - reference).abs().max() / reference.abs().max())


CONFIGS = [ScaleChannels(method="smoothquant"), ScaleChannels(method="awq", alpha=0.5, group_size=None, clip=False)]


@pytest.mark.parametrize("config", CONFIGS, ids=["smoothquant", "awq"])
@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
@pytest.mark.parametrize("build, layer, readers", [(NormTwice, "fc", "norm_1"), (NormFeedsTwo, "fc1", "norm_1"),
                                                   (NormWeightReadAgain, "fc", "norm_weight")],
                         ids=["called twice", "feeds two layers", "weight read again"])
def test_a_norm_with_another_use_is_not_folded_into(build, layer, readers, norm, config):
    torch.manual_seed(0)
    model = _outliers(build(norm))
    gm, diff = _compile(model, config)
    assert diff < 1e-5
    report = fxcompress.history(gm)[-1].stats["layers"][layer]
    assert report["skipped"] == (f"norm's affine weight is also read by {readers}: "
                                 "dividing it would change those uses too")
    assert torch.equal(gm.get_submodule("norm").weight, model.norm.weight)


@pytest.mark.parametrize("norm", NORMS.values(), ids=NORMS.keys())
def test_insert_scales_takes_the_scales_a_shared_norm_refuses(norm):
    """With insert_scales the group is scaled by a product of its own before fc, and the norm stays whole."""
    torch.manual_seed(0)
    model = _outliers(NormTwice(norm))
    gm, diff = _compile(model, ScaleChannels(method="awq", alpha=0.5, group_size=None, clip=False,
                                             insert_scales=True))
    assert diff < 1e-5
    stats = fxcompress.history(gm)[-1].stats
    assert stats["scales_inserted"] == ["fc.weight_inverse_scale"]
    assert stats["layers"]["fc"]["producer"] == "fc.weight_inverse_scale"
    assert torch.equal(gm.get_submodule("norm").weight, model.norm.weight)
