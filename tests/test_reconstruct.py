"""Least-squares reconstruction and the data-driven channel selections (ThiNet greedy, He et al. lasso)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.analyses.channels import ChannelGroup
from fxcompress.passes import PruneChannels
from fxcompress.reconstruct import (Sampling, _Capture, _greedy_order, _lasso_scores, _outputs, _solve_into,
                                    _windows, calibration_batch)
from fxcompress.zoo import ZOO


def _group(n: int) -> ChannelGroup:
    return ChannelGroup(0, (), np.arange(n), np.arange(n), None, (), ())


def test_least_squares_recovers_a_linear_layer_and_its_bias():
    true = nn.Linear(6, 3)
    x = torch.randn(200, 6, dtype=torch.float64)
    y = true(x.float()).double().detach()
    fitted = nn.Linear(6, 3)
    _solve_into(fitted, x, y)
    torch.testing.assert_close(fitted.weight, true.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, true.bias, atol=1e-4, rtol=1e-4)


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


def test_calibration_items_are_concatenated_into_one_batch():
    batch = calibration_batch([torch.ones(2, 3), torch.zeros(1, 3)])
    assert len(batch) == 1 and batch[0].shape == (3, 3)
    pairs = calibration_batch([(torch.ones(2, 3), torch.ones(2)), (torch.ones(1, 3), torch.ones(1))])
    assert [t.shape[0] for t in pairs] == [3, 3]


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


@pytest.mark.parametrize("name", ["vgg_bn", "resnet", "densenet"])
def test_reconstruction_brings_outputs_back_toward_the_unpruned_model(name):
    ctor, make = ZOO[name]
    model, x = ctor().eval(), torch.cat([make() for _ in range(4)])
    calibration = [make() for _ in range(16)]
    expected = model(x)

    def error(reconstruct):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, max_samples=1024)],
                                example_inputs=(make(),), calibration_data=calibration)
        return ((gm(x) - expected).norm() / expected.norm()).item(), gm

    plain, _ = error(False)
    rebuilt, gm = error(True)
    assert rebuilt < 0.5 * plain
    assert fxcompress.history(gm)[-1].stats["reconstructed"]


def _all_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every output position's row (a full copy, fine for the small tests here)."""
    windows = _windows(m, x)
    return windows.flatten(windows.dim() + 1 - m.weight.dim()).flatten(0, -2)


def _input(m: nn.Module, size: int = 10) -> torch.Tensor:
    return torch.randn(8, m.in_channels, *[size] * len(m.kernel_size), dtype=torch.float64)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
                                  lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                  lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2),
                                  lambda: nn.Conv3d(4, 6, 3, padding="same", padding_mode="circular", groups=2)])
def test_least_squares_recovers_grouped_and_nd_convs(make):
    true, fitted = make().double(), make().double()
    x = _input(true, 6 if isinstance(true, nn.Conv3d) else 10)
    _solve_into(fitted, _all_rows(true, x), _outputs(true, true(x)).flatten(0, -2).detach())
    torch.testing.assert_close(fitted.weight, true.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fitted.bias, true.bias, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("m", [nn.Conv2d(4, 6, 3, stride=2, padding=1),
                               nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2),
                               nn.Conv2d(4, 4, 5, padding=2, groups=4),
                               nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)])
def test_rows_are_the_unfolded_input(m):
    x = _input(m)
    if isinstance(m, nn.Conv1d):  # F.unfold is 2-d only: a conv1d is a conv2d of height 1
        patches = F.unfold(x.unsqueeze(2), (1, *m.kernel_size), (1, *m.dilation), (0, *m.padding), (1, *m.stride))
    else:
        patches = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
    assert torch.equal(_all_rows(m, x), patches.transpose(1, 2).reshape(-1, patches.shape[1]))


def _captured(m: nn.Module, x: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The (input rows, outputs, picks) that the capture samples from a one-layer model."""
    gm = torch.fx.symbolic_trace(nn.Sequential(m))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    seen = {}
    capture = _Capture(gm, {node.name: m}, Sampling(samples),
                       before=lambda n, _, rows: seen.update(rows=rows),
                       after=lambda n, _, y: seen.update(outputs=y))
    capture.run(x)
    return seen["rows"], seen["outputs"], capture.picks[node.name]


@pytest.mark.parametrize("options", [dict(padding="same"), dict(padding="valid", stride=(1, 2, 1)),
                                     dict(padding=(1, 0, 2), stride=2),
                                     dict(padding="same", padding_mode="reflect"),
                                     dict(padding=1, padding_mode="replicate", stride=(2, 1, 1)),
                                     dict(padding=(2, 1, 1), padding_mode="circular")])
def test_conv3d_rows_reproduce_the_convolution_at_the_picked_positions(options):
    m = nn.Conv3d(3, 5, (3, 2, 3), dilation=(1, 2, 1), **options).double()  # even kernel: uneven "same"
    x = torch.randn(2, 3, 7, 8, 6, dtype=torch.float64)
    rows, outputs, picks = _captured(m, x, samples=64)
    assert rows.shape == (64, 3 * 3 * 2 * 3) and outputs.shape == (64, 5)
    torch.testing.assert_close(rows @ m.weight.reshape(5, -1).T + m.bias, outputs, atol=1e-5, rtol=0)
    assert torch.equal(outputs, m(x).movedim(1, -1).reshape(-1, 5)[picks])  # the positions picks names


def test_only_max_samples_rows_are_gathered_and_the_same_positions_are_reused():
    m = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)  # 512 output positions
    rows, outputs, picks = _captured(m, x, samples=100)
    assert rows.shape == (100, 27) and outputs.shape == (100, 4)
    assert len(np.unique(picks)) == 100 and picks.max() < 512
    assert _captured(m, x, samples=100)[2].tolist() == picks.tolist()  # same seed, same positions
    assert _captured(m, x, samples=4096)[0].shape[0] == 512  # never more rows than positions


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(2, 8, 3, padding=1)
        self.conv2 = nn.Conv3d(8, 4, 3, padding="same", padding_mode="replicate")

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


class ReflectNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, (3, 2), padding="same", padding_mode="reflect")

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("model, shape", [(Conv3dNet, (4, 2, 6, 6, 6)), (ReflectNet, (4, 3, 10, 10))])
def test_conv3d_and_padded_consumers_are_reconstructed(model, shape):
    model = model().eval()
    calibration = [torch.randn(shape) for _ in range(4)]
    x = torch.cat(calibration)
    expected = model(x)

    def error(reconstruct):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("conv1",))],
                                example_inputs=(calibration[0],), calibration_data=calibration)
        return ((gm(x) - expected).norm() / expected.norm()).item(), gm

    plain, _ = error(False)
    rebuilt, gm = error(True)
    assert fxcompress.history(gm)[-1].stats["reconstructed"] == ["conv2"]
    assert rebuilt < 0.95 * plain


class GroupedConsumers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)  # its inputs shrink in every group
        self.head = nn.Conv1d(16, 8, 3)

    def forward(self, x):
        x = self.conv2(F.relu(self.conv1(x)))
        return self.head(x.mean(dim=2))


def test_grouped_and_1d_consumers_are_reconstructed():
    model, x = GroupedConsumers().eval(), torch.randn(8, 3, 12, 12)
    calibration = [torch.randn(8, 3, 12, 12) for _ in range(8)]
    expected = model(x)

    def error(reconstruct):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("conv1",))],
                                example_inputs=(x[:2],), calibration_data=calibration)
        return ((gm(x) - expected).norm() / expected.norm()).item(), gm

    plain, _ = error(False)
    rebuilt, gm = error(True)
    assert "conv2" in fxcompress.history(gm)[-1].stats["reconstructed"]
    assert rebuilt < 0.7 * plain


def test_a_masked_output_keeps_its_zeros_and_the_rest_is_fitted_exactly():
    torch.manual_seed(0)
    true = torch.randn(6, 12, dtype=torch.float64)
    allowed = torch.rand(6, 12) > 0.5
    allowed[0] = allowed[1]  # two outputs share a pattern: one solve for both
    true[~allowed] = 0.0
    x = torch.randn(400, 12, dtype=torch.float64)
    fitted = nn.Linear(12, 6, bias=False).double()
    _solve_into(fitted, x, x @ true.T, support=allowed)
    assert torch.equal(fitted.weight[~allowed], torch.zeros(int((~allowed).sum()), dtype=torch.float64))
    torch.testing.assert_close(fitted.weight, true, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["element", "filter"])
def test_masked_consumers_are_reconstructed_within_their_masks(granularity):
    from fxcompress.layers import effective_weight, find_layers
    from fxcompress.passes import InsertMasks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    x = torch.cat(calibration)
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.5, granularity=granularity)],
                                example_inputs=(calibration[0],))
    expected = masked(x)

    def prune(reconstruct):
        gm = fxcompress.compile(masked, [PruneChannels(amount=0.5, reconstruct=reconstruct, select=("0",))],
                                example_inputs=(calibration[0],), calibration_data=calibration)
        return gm, ((gm(x) - expected).norm() / expected.norm()).item()

    plain, plain_error = prune(False)
    rebuilt, error = prune(True)
    assert fxcompress.history(rebuilt)[-1].stats["reconstructed"] == ["2"]
    assert error < 0.9 * plain_error
    layers = {l.name: l for l in find_layers(rebuilt)}
    mask = rebuilt.get_buffer("2.weight_mask")
    assert mask.shape == (8, 8, 3, 3) and bool((mask == 0).any())
    assert torch.equal(effective_weight(rebuilt, layers["2"])[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert not torch.equal(rebuilt.get_parameter("2.weight"), plain.get_parameter("2.weight"))  # really refitted
