import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import PreconditionError
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerToInteger
from fxcompress.passes.fake_quant import ActivationConfig
from fxcompress.zoo import ZOO, ResNetSmall, VGGBN


def _randomize_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine values far from the identity, so a wrong fold shows."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _norms(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", [n for n in ZOO if _norms(ZOO[n][0]())])
def test_every_zoo_model_with_batchnorm_folds_to_the_same_outputs(name):
    torch.manual_seed(0)
    make, inputs = ZOO[name]
    model, x = _randomize_statistics(make()), inputs()
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    stats = fxcompress.history(gm)[-1].stats
    assert set(stats["folded"].values()) | set(stats["skipped"]) == set(_norms(model))  # each one accounted for
    assert set(_norms(gm)) == set(stats["skipped"])
    if name != "densenet":  # pre-activation (BatchNorm -> ReLU -> conv): nothing feeds its BatchNorms directly
        assert stats["folded"], name
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert torch.allclose(expected, got, atol=1e-5 * max(1.0, expected.abs().max().item())), name


def test_conv_transpose_linear_and_conv3d_fold():
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(
        nn.ConvTranspose2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Unflatten(1, (3, 2)), nn.Conv3d(3, 4, 1, bias=False), nn.BatchNorm3d(4), nn.Flatten(),
        nn.Linear(4 * 2 * 15 * 15, 8), nn.BatchNorm1d(8)))
    x = torch.randn(4, 3, 7, 7)
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    assert fxcompress.history(gm)[-1].stats["folded"] == {"0": "1", "4": "5", "7": "8"}
    assert _norms(gm) == [] and gm.get_submodule("4").bias is not None  # a bias appears where there was none
    with torch.no_grad():
        assert torch.allclose(model(x), gm(x), atol=1e-5)


class TwoReaders(nn.Module):
    """The conv's raw output is read twice, so folding the BatchNorm would change the other reader."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class FeaturesOnDimOne(nn.Module):
    """BatchNorm1d over dim 1 of a 3-D linear output normalizes tokens, not the linear's features."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 5), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_masked_layers_fold_and_pruned_weights_stay_zero():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    masked = fxcompress.compile(_randomize_statistics(VGGBN()), [InsertMasks(sparsity=0.6)], example_inputs=(x,))
    zeros = {l.name: effective_weight(masked, l) == 0 for l in find_layers(masked)}
    gm = fxcompress.compile(masked, [FoldBatchNorm()], example_inputs=(x,))
    stats = fxcompress.history(gm)[-1].stats
    assert stats["skipped"] == {} and _norms(gm) == [] and len(stats["folded"]) == len(_norms(masked))
    for layer in find_layers(gm):
        assert torch.equal(effective_weight(gm, layer) == 0, zeros[layer.name]), layer.name  # same zeros exactly
        assert layer.bias is not None  # a folded conv without bias gets one
    with torch.no_grad():
        expected = masked(x)
        assert torch.allclose(expected, gm(x), atol=1e-5 * expected.abs().max().item())


class SharedConv(nn.Module):
    """One conv module called twice, each call with its own BatchNorm: folding either would change both."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


@pytest.mark.parametrize("model, x, reason", [
    (SharedConv(), torch.randn(2, 3, 4, 4), "shared with another call"),
    (TwoReaders(), torch.randn(2, 3, 8, 8), "also read by add"),
    (FeaturesOnDimOne(), torch.randn(2, 4, 5), "normalizes dim 1"),
    (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), torch.randn(2, 3, 4, 4), "ReLU"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), torch.randn(2, 3, 4, 4),
     "no running statistics"),
])
def test_a_pair_that_cannot_fold_is_kept_and_the_reason_reported(model, x, reason):
    model = model.eval()
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    record = fxcompress.history(gm)[-1]
    assert not record.changed and record.stats["folded"] == {}
    assert record.stats["skipped"] and all(reason in why for why in record.stats["skipped"].values())
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


def test_a_fake_quantized_weight_keeps_its_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    quantized = fxcompress.compile(_randomize_statistics(VGGBN()), [InsertFakeQuant(bits=4)], example_inputs=(x,))
    gm = fxcompress.compile(quantized, [FoldBatchNorm()], example_inputs=(x,))
    skipped = fxcompress.history(gm)[-1].stats["skipped"]
    assert skipped and all("fold BatchNorm before quantizing" in why for why in skipped.values())
    with torch.no_grad():
        assert torch.equal(quantized(x), gm(x))


def test_training_mode_is_refused_by_module_path():
    with pytest.raises(PreconditionError, match=r"but stem.1 is in training mode.*model.eval\(\)"):
        fxcompress.compile(ResNetSmall().train(), [FoldBatchNorm()], example_inputs=(torch.randn(2, 3, 32, 32),))


def test_folding_first_leaves_fewer_float_boundaries_in_integer_lowering():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)  # the boundaries are counted on the graph: two small calibration batches do
    calibration = [x[i:i + 2] for i in range(0, len(x), 2)]
    quantize = InsertFakeQuant(method="linear", bits=8, activations=ActivationConfig(bits=8))
    boundaries = {}
    for fold in (False, True):
        passes = [FoldBatchNorm()] * fold + [quantize, LowerToInteger()]
        gm = fxcompress.compile(_randomize_statistics(ResNetSmall()), passes, example_inputs=(x[:2],),
                                calibration_data=calibration)
        boundaries[fold] = fxcompress.history(gm)[-1].stats["float_to_integer_boundaries"]
    assert boundaries[True] < boundaries[False]
