import json

import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import PreconditionError
from fxcompress.layers import WeightTransform
from fxcompress.quant import ActivationQuant, GridWeight, KMeansWeight
from fxcompress.quant.quantizers import as_rows, from_rows


def pruned(shape=(12, 30), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[w.abs() < 0.6] = 0.0
    return w


@pytest.mark.parametrize("axis", [None, 0])
def test_centroid_gradient_is_the_sum_of_its_members_gradients(axis):
    w = pruned()
    module = KMeansWeight.fit(w, 3, axis=axis)
    x = torch.randn(7, 30)
    target = torch.randn(7, 12)

    F.mse_loss(F.linear(x, module(w)), target, reduction="sum").backward()
    leaf = module(w).detach().requires_grad_()  # the same weight as a free tensor: dL/dW per weight
    F.mse_loss(F.linear(x, leaf), target, reduction="sum").backward()

    codes, grad = module.codes.long(), leaf.grad
    for group in range(module.groups):
        rows = slice(None) if axis is None else group
        for c in range(module.size):
            members = codes[rows] == c + 1  # code 0 is the fixed zero
            expected = grad[rows][members].sum()
            assert module.codebook.grad[group, c] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert w.grad is None  # the float weight does not train while the codes stand in for it


@pytest.mark.parametrize("shape, axis", [((12, 30), None), ((12, 30), 0), ((6, 4, 3, 3), 0), ((6, 4, 3, 3), 1)])
@pytest.mark.parametrize("fix_zeros", [True, False])
def test_codes_decode_through_the_table_and_the_codebook_gradient_has_its_layout(shape, axis, fix_zeros):
    w = pruned(shape)
    module = KMeansWeight.fit(w, 3, axis=axis, fix_zeros=fix_zeros)
    assert module.fixed_zero == fix_zeros
    rows = as_rows(module.codes, axis).long()
    expected = from_rows(module.table().gather(1, rows), w.shape, axis)  # code c of group g is table()[g, c]
    assert torch.equal(module(w), expected)
    assert module.positions().dtype == torch.int32  # 4 bytes a weight on every forward, not int64's 8 (three times)
    (module(w) * torch.randn(shape)).sum().backward()
    # the layout DistributedDataParallel's gradient buckets expect: no strided gradient to copy
    assert module.codebook.grad.stride() == module.codebook.stride() and module.codebook.grad.is_contiguous()


def test_pruned_weights_stay_zero_through_training_steps():
    w = pruned()
    module = KMeansWeight.fit(w, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x, target = torch.randn(16, 30), torch.randn(16, 12)
    codes = module.codes.clone()
    for _ in range(5):
        optimizer.zero_grad()
        F.mse_loss(F.linear(x, module(w)), target).backward()
        optimizer.step()
    assert torch.all(module(w)[w == 0] == 0)
    assert torch.equal(module.codes, codes)  # assignments stay fixed
    assert torch.unique(module(w)).numel() <= 4


def test_switching_off_gives_the_float_weight_back():
    w = pruned()
    for module in (KMeansWeight.fit(w, 2), GridWeight(3), GridWeight(3, "fixed_point")):
        assert isinstance(module, WeightTransform) and module.bits in (2, 3)
        assert not torch.equal(module(w), w)
        module.enabled = False
        assert module(w) is w
        module.enabled = True
        assert not torch.equal(module(w), w)


def rebuilt(module):
    config = json.loads(json.dumps(module.config()))  # the file format stores it as JSON
    clone = type(module)(**config)
    clone.load_state_dict(module.state_dict())
    return clone


@pytest.mark.parametrize("make", [
    lambda w: KMeansWeight.fit(w, 4), lambda w: KMeansWeight.fit(w, 2, axis=0, init="kmeans++"),
    lambda w: KMeansWeight.fit(w + 1.0, 3), lambda w: GridWeight(5, symmetric=True, axis=0),
    lambda w: GridWeight(6, "fixed_point", int_bits=2),
])
def test_weight_modules_rebuild_from_config_and_state(make):
    w = pruned()
    module = make(w)
    assert torch.equal(rebuilt(module)(w), module(w))


@pytest.mark.parametrize("observer, options", [("minmax", {}), ("moving_average", {"momentum": 0.3}),
                                               ("percentile", {"percentile": 99.0, "bins": 64})])
def test_activation_quant_rebuilds_from_config_and_state(observer, options):
    module = ActivationQuant(6, False, observer, options)
    module.calibrating = True
    for seed in range(3):
        module(torch.randn(200, generator=torch.Generator().manual_seed(seed)) * (seed + 1))
    module.calibrating = False
    x = torch.randn(100) * 2
    assert torch.equal(rebuilt(module)(x), module(x))


def test_recluster_follows_the_float_weight_and_keeps_the_parameter():
    w = pruned()
    module = KMeansWeight.fit(w, 2)
    parameter = module.codebook
    moved = w * 1.5
    module.recluster(moved)
    assert module.codebook is parameter
    assert torch.all(module(moved)[moved == 0] == 0)
    nonzero = moved[moved != 0]
    for c, centroid in enumerate(module.codebook.detach()[0]):  # a k-means fixed point of the new weights
        assert float(centroid) == pytest.approx(float(moved[module.codes == c + 1].mean()), rel=1e-5)
    assert (module(moved)[moved != 0] - nonzero).abs().max() < (KMeansWeight.fit(w, 2)(moved)[moved != 0]
                                                                 - nonzero).abs().max()
    with pytest.raises(PreconditionError, match="no zeros"):
        module.recluster(moved + 100.0)


def test_activation_quant_observes_only_when_asked():
    module = ActivationQuant(4)
    x = torch.linspace(-1, 3, 50)
    assert torch.equal(module.eval()(x), x)  # nothing observed yet: pass through
    module.calibrating = True
    module(x)
    module.calibrating = False
    assert module.observer.range() == (-1.0, 3.0)
    grid = module.grid()
    assert (module(x) - x).abs().max() <= grid.scale / 2 * (1 + 1e-5)
    module(x * 10)  # eval mode: no update
    assert module.observer.range() == (-1.0, 3.0)
    module.train()(x * 10)  # training with observing on: QAT follows the data
    assert module.observer.range() == (-10.0, 30.0)
    module.observing = False
    module(x * 100)
    assert module.observer.range() == (-10.0, 30.0)
    module.enabled = False
    assert module(x) is x


def test_activation_quant_gradient_is_clipped_straight_through():
    module = ActivationQuant(8)
    module.calibrating = True
    module(torch.tensor([0.0, 1.0]))
    module.calibrating = False
    module.observing = False  # frozen: training below must not widen the range
    x = torch.tensor([-0.5, 0.25, 0.5, 2.0], requires_grad=True)
    module(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("shape, axis", [((12, 30), None), ((12, 30), 0), ((6, 4, 3, 3), 0), ((6, 4, 3, 3), 1)])
@pytest.mark.parametrize("fix_zeros", [True, False])
def test_forward_without_autograd_gathers_block_by_block_the_same_values(shape, axis, fix_zeros, monkeypatch):
    from fxcompress.quant import modules
    w = pruned(shape, seed=3)
    module = KMeansWeight.fit(w, 3, axis=axis, fix_zeros=fix_zeros)
    with torch.no_grad():
        module.codebook.add_(torch.randn(module.codebook.shape))  # trained centroids: every entry distinct
    expected = module(w)  # the autograd path: one whole-layer gather
    assert expected.requires_grad
    for block in (7, 30, 1 << 18):  # several blocks, cutting rows; one row a block; the whole layer at once
        monkeypatch.setattr(modules, "_GATHER_BLOCK", block)
        with torch.no_grad():
            got = module(w)
        assert torch.equal(got, expected.detach()), block
        assert got.shape == w.shape and not got.requires_grad


@pytest.mark.parametrize("config", [dict(), dict(axis=0), dict(axis=0, group_size=4), dict(method="fixed_point"),
                                    dict(method="fixed_point", axis=0), dict(axis=1)])
def test_grid_count_is_the_number_of_scales_grid_makes(config):
    weight = torch.randn(6, 8)
    quantizer = GridWeight(4, **config)
    assert quantizer.grid_count(weight.shape) == quantizer.grid(weight).scale.numel()
