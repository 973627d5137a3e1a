import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

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
                if m.running_mean is not None:  # track_running_stats=False has none
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                if m.weight is not None:  # affine=False has none
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


@pytest.mark.parametrize("groups", [1, 2])
def test_a_masked_transposed_convolution_folds_on_its_output_channels(groups):
    # it was kept ("folding scales dim 0"): the stored weight's output channels are dim 1, per group
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=groups), nn.BatchNorm2d(6)))
    x = torch.randn(2, 4, 5, 5)
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    zeros = {l.name: effective_weight(masked, l) == 0 for l in find_layers(masked)}
    gm = fxcompress.compile(masked, [FoldBatchNorm()], example_inputs=(x,))
    assert fxcompress.history(gm)[-1].stats["folded"] == {"0": "1"} and _norms(gm) == []
    for layer in find_layers(gm):
        assert torch.equal(effective_weight(gm, layer) == 0, zeros[layer.name])
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


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


def _fold(model: nn.Module, x: torch.Tensor, **kwargs):
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,), **kwargs)
    return gm, fxcompress.history(gm)[-1].stats


def _assert_same_outputs(model: nn.Module, gm: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> None:
    with torch.no_grad():
        expected, got = model(x), gm(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


_CONVS = {1: (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d),
          3: (nn.Conv3d, nn.ConvTranspose3d, nn.BatchNorm3d)}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups, bias, norm", [
    (1, True, {}), (2, True, {}), (4, False, {}),  # plain, grouped, depthwise without bias
    (1, False, {"affine": False}), (1, True, {"momentum": None}), (2, True, {"eps": 0.3})])
def test_convolutions_fold_as_torch_fuses_them_and_compute_what_they_did(dims, transposed, groups, bias, norm):
    torch.manual_seed(0)
    conv, conv_t, batch_norm = _CONVS[dims]
    layer = conv_t(4, 8 if groups < 4 else 4, 3, groups=groups, bias=bias) if transposed else \
        conv(4, 8 if groups < 4 else 4, 3, groups=groups, bias=bias)
    model = _randomize_statistics(nn.Sequential(layer, batch_norm(layer.out_channels, **norm)))
    x = torch.randn(2, 4, *[6] * dims)
    gm, stats = _fold(model, x)
    assert stats == {"folded": {"0": "1"}, "skipped": {}}
    _assert_same_outputs(model, gm, x)
    if not (transposed and groups > 1):  # torch's fusion is the reference where it is right
        fused = fuse_conv_bn_eval(model[0], model[1], transpose=transposed)
        torch.testing.assert_close(gm.get_submodule("0").weight, fused.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gm.get_submodule("0").bias, fused.bias, rtol=1e-6, atol=1e-7)


def test_a_grouped_transposed_convolution_folds_per_group_where_torch_fusion_breaks():
    # it was kept: torch's fusion scales dim 1 of the [in, out / groups, k] weight as if it held every
    # output channel (a shape error); each group's output channels are scaled by their own factors here
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)))
    with pytest.raises(RuntimeError):
        fuse_conv_bn_eval(model[0], model[1], transpose=True)
    x = torch.randn(2, 4, 5, 5)
    gm, stats = _fold(model, x)
    assert stats["folded"] == {"0": "1"} and _norms(gm) == []
    _assert_same_outputs(model, gm, x)


@pytest.mark.parametrize("bias, affine", [(True, True), (False, True), (True, False), (False, False)])
def test_a_linear_folds_as_torch_fuses_it_also_into_a_batchnorm_without_affine(bias, affine):
    # affine=False: torch's fuse_linear_bn_weights multiplies by the BatchNorm's weight, None; the pass
    # raised that TypeError
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7, affine=affine)))
    x = torch.randn(3, 5)
    gm, stats = _fold(model, x)
    assert stats == {"folded": {"0": "1"}, "skipped": {}}
    _assert_same_outputs(model, gm, x)
    if affine:
        fused = fuse_linear_bn_eval(model[0], model[1])
        torch.testing.assert_close(gm.get_submodule("0").weight, fused.weight, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gm.get_submodule("0").bias, fused.bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("model, x", [
    # unbatched: the conv's channels are dim 0, the BatchNorm normalizes dim 1 (a length / height / depth that
    # happens to equal the channel count); the fold scaled the wrong dim and changed the outputs silently
    (nn.Sequential(nn.Conv1d(4, 6, 1), nn.BatchNorm1d(6)), torch.randn(4, 6)),
    (nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm1d(6)), torch.randn(4, 6, 5)),
    (nn.Sequential(nn.Conv3d(4, 6, 1), nn.BatchNorm2d(6)), torch.randn(4, 6, 3, 3)),
    (nn.Sequential(nn.ConvTranspose1d(4, 6, 1), nn.BatchNorm1d(6)), torch.randn(4, 6)),
])
def test_an_unbatched_convolution_keeps_its_batchnorm(model, x):
    model = _randomize_statistics(model)
    gm, stats = _fold(model, x)
    assert stats["folded"] == {} and "unbatched" in stats["skipped"]["1"]
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


class ConvTwoNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.a(y) + self.b(y)


class NormAfterAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x) + x)


def test_a_conv_feeding_two_batchnorms_and_a_batchnorm_after_an_add_are_kept_with_reasons():
    x = torch.randn(2, 3, 4, 4)
    model = _randomize_statistics(ConvTwoNorms())
    gm, stats = _fold(model, x)
    assert stats == {"folded": {}, "skipped": {"a": "conv's un-normalized output is also read by b",
                                               "b": "conv's un-normalized output is also read by a"}}
    model = _randomize_statistics(NormAfterAdd())
    gm, stats = _fold(model, x)
    assert stats == {"folded": {}, "skipped": {"bn": "fed by add, which is not a conv / linear layer"}}
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


class OneNormManyCalls(nn.Module):
    """One BatchNorm module called after a conv (folds there), after an add and after a ReLU (kept at both)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x + 1) + self.bn(torch.relu(x))


def test_a_batchnorm_kept_at_several_calls_reports_every_reason():
    # the second reason overwrote the first in the statistics
    torch.manual_seed(0)
    model, x = _randomize_statistics(OneNormManyCalls()), torch.randn(2, 3, 4, 4)
    gm, stats = _fold(model, x)
    assert stats["folded"] == {"conv": "bn"}
    assert stats["skipped"] == {"bn": "fed by add, which is not a conv / linear layer; "
                                      "fed by relu, which is not a conv / linear layer"}
    _assert_same_outputs(model, gm, x)


class FunctionalNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mean", torch.zeros(3))
        self.register_buffer("var", torch.ones(3))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var)


class SubclassedNorm(nn.BatchNorm2d):
    """A subclass may override forward: kept as a leaf, it is not folded (matched by exact type)."""


@pytest.mark.parametrize("model, options, key, reason", [
    (FunctionalNorm(), {}, "batch_norm", "a functional batch_norm call, not a BatchNorm module"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), SubclassedNorm(3)), {"leaf_modules": ["1"]}, "1",
     "a SubclassedNorm, not exactly a BatchNorm1d / 2d / 3d"),
    # export keeps a BatchNorm without running statistics as F.batch_norm over the batch's own
    (nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)), {"frontend": "export"}, "_1",
     "normalizes with each batch's own statistics"),
])
def test_every_batch_norm_left_in_the_graph_is_reported(model, options, key, reason):
    # these were in neither "folded" nor "skipped"
    model, x = _randomize_statistics(model), torch.randn(2, 3, 4, 4)
    gm, stats = _fold(model, x, **options)
    assert stats["folded"] == {} and list(stats["skipped"]) == [key] and reason in stats["skipped"][key]
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


def test_a_sync_batchnorm_folds_like_a_batchnorm():
    # in eval mode it is F.batch_norm over its running statistics; it was neither folded nor reported
    torch.manual_seed(0)
    model, x = _randomize_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))), torch.randn(2, 3, 6, 6)
    gm, stats = _fold(model, x)
    assert stats == {"folded": {"0": "1"}, "skipped": {}}
    _assert_same_outputs(model, gm, x)


@pytest.mark.parametrize("model, x", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), torch.randn(2, 3, 6, 6)),
    (nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, momentum=None)), torch.randn(3, 5)),
    (nn.Sequential(nn.ConvTranspose2d(3, 4, 3, groups=1), nn.BatchNorm2d(4)), torch.randn(2, 3, 6, 6)),
])
def test_the_export_front_ends_batchnorms_fold(model, x):
    # export writes the transposed conv as a functional call: it was kept ("folding scales dim 0")
    torch.manual_seed(0)
    model = _randomize_statistics(model)
    gm, stats = _fold(model, x, frontend="export")
    assert len(stats["folded"]) == 1 and stats["skipped"] == {} and _norms(gm) == []
    _assert_same_outputs(model, gm, x)


class AddmmNorm(nn.Module):
    """Hugging Face's Conv1D form: addmm(bias, x, weight) with the weight stored [in, out]."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias, self.bn = nn.Parameter(torch.randn(6, 6)), nn.Parameter(torch.randn(6)), \
            nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(torch.addmm(self.bias, x, self.weight))


class BufferLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(6, 5))
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(F.linear(x, self.weight))


def test_functional_layers_fold_on_their_output_channels_or_say_why_not():
    # addmm was kept as "a transposed convolution"; its [in, out] weight folds on dim 1
    torch.manual_seed(0)
    model, x = _randomize_statistics(AddmmNorm()), torch.randn(4, 6)
    gm, stats = _fold(model, x)
    assert stats == {"folded": {"weight": "bn"}, "skipped": {}}
    _assert_same_outputs(model, gm, x)
    # a weight held as a buffer raised a bare AttributeError (gm.get_parameter)
    model, x = _randomize_statistics(BufferLinear()), torch.randn(4, 5)
    gm, stats = _fold(model, x)
    assert stats["folded"] == {} and "weight weight is held as a buffer" in stats["skipped"]["bn"]
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_double_and_half_precision_models_fold_in_their_dtype(dtype, rtol, masked):
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Flatten(),
                                                nn.Linear(8 * 16, 6), nn.BatchNorm1d(6))).to(dtype)
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    if masked:
        model = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    gm, stats = _fold(model, x)
    assert len(stats["folded"]) == 2 and stats["skipped"] == {}
    assert {p.dtype for p in gm.parameters()} == {dtype}
    _assert_same_outputs(model, gm, x, rtol=rtol)


def test_a_conv_in_training_mode_folds_into_an_eval_batchnorm_and_train_after_folding_adds_no_batchnorm():
    # only the BatchNorm's mode matters (a conv computes the same in both): the conv's was refused
    torch.manual_seed(0)
    model = _randomize_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                                nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))
    model[0].train()
    x = torch.randn(2, 3, 6, 6)
    gm, stats = _fold(model, x)
    assert stats["folded"] == {"0": "1"} and "no running statistics" in stats["skipped"]["4"]
    with torch.no_grad():
        folded = gm(x)
        gm.train()
        # in training mode the folded conv computes what it did (no BatchNorm behind it comes back), and the
        # kept BatchNorm normalizes with batch statistics as before
        torch.testing.assert_close(gm(x), folded, rtol=0, atol=0)
        by_hand = gm.get_submodule("4")(gm.get_submodule("3")(torch.relu(gm.get_submodule("0")(x))))
        torch.testing.assert_close(gm(x), by_hand, rtol=0, atol=0)
    assert _norms(gm) == ["4"] and gm.get_submodule("0").training
