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


class ConvCalledTwice(nn.Module):
    """The conv's second call reads its weight without a BatchNorm: folding would change that call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class TiedConvs(nn.Module):
    """Two conv modules holding one weight tensor under two names."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


@pytest.mark.parametrize("make", [ConvCalledTwice, TiedConvs])
@pytest.mark.parametrize("masked", [False, True])
def test_a_weight_with_another_reader_keeps_its_batchnorm_masked_or_not(make, masked):
    # masked, both calls read one mask node (ConvCalledTwice) or one chain under the tied name (TiedConvs):
    # the count of get_attr uses saw no sharing, the fold scaled the weight and changed the other call
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    model = _randomize_statistics(make())
    if masked:
        model = fxcompress.compile(model, [InsertMasks(sparsity=0.3)], example_inputs=(x,))
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    record = fxcompress.history(gm)[-1]
    assert not record.changed and record.stats["folded"] == {}
    (why,) = record.stats["skipped"].values()
    assert "shared with another call" in why
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


class EmbeddingNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.bn = nn.Embedding(10, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.embed(x))


@pytest.mark.parametrize("model, x, reason", [
    # torch's fusion scales a transposed weight's dim 1 as if ungrouped: a crash, not a fold
    (nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=4), nn.BatchNorm2d(4)), torch.randn(2, 4, 6, 6),
     "grouped ConvTranspose"),
    (nn.Sequential(nn.ConvTranspose2d(4, 8, 3, groups=2), nn.BatchNorm2d(8)), torch.randn(2, 4, 6, 6),
     "grouped ConvTranspose"),
    (EmbeddingNorm(), torch.randint(0, 10, (4,)), "fed by embedding embed, which has no bias"),  # AttributeError
])
def test_a_layer_torch_cannot_fuse_keeps_its_batchnorm(model, x, reason):
    model = _randomize_statistics(model)
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    record = fxcompress.history(gm)[-1]
    assert not record.changed and record.stats["folded"] == {}
    (why,) = record.stats["skipped"].values()
    assert reason in why
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


class KeywordCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(input=self.conv(input=x))


def test_modules_called_with_input_as_a_keyword_fold():
    torch.manual_seed(0)
    model, x = _randomize_statistics(KeywordCalls()), torch.randn(2, 3, 6, 6)
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))  # raised IndexError on node.args[0]
    assert fxcompress.history(gm)[-1].stats["folded"] == {"conv": "bn"} and _norms(gm) == []
    with torch.no_grad():
        assert torch.allclose(model(x), gm(x), atol=1e-5)


def test_a_masked_transposed_convolution_keeps_its_batchnorm_and_says_why():
    # it said the masked transposed convolution was "not a conv / linear layer"
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 5, 5)
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    gm = fxcompress.compile(masked, [FoldBatchNorm()], example_inputs=(x,))
    record = fxcompress.history(gm)[-1]
    assert not record.changed and "a transposed convolution called functionally" in record.stats["skipped"]["1"]
    with torch.no_grad():
        assert torch.equal(masked(x), gm(x))


def test_a_masked_embedding_keeps_its_batchnorm_and_says_it_is_an_embedding():
    # its functional call holds its output on the weight's dim 1, as a transposed convolution does: the
    # skip named it one
    model, x = _randomize_statistics(EmbeddingNorm()).eval(), torch.randint(0, 10, (4,))
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    gm = fxcompress.compile(masked, [FoldBatchNorm()], example_inputs=(x,))
    (why,) = fxcompress.history(gm)[-1].stats["skipped"].values()
    assert why.startswith("fed by embedding ") and "no bias to absorb" in why
    with torch.no_grad():
        assert torch.equal(masked(x), gm(x))
