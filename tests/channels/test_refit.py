"""Least-squares reconstruction of the layers whose input channels were removed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.channels.capture import _outputs, _windows
from fxcompress.channels.refit import _solve_into
from fxcompress.passes import PruneChannels
from fxcompress.zoo import ZOO


def test_least_squares_recovers_a_linear_layer_and_its_bias():
    true = nn.Linear(6, 3)
    x = torch.randn(200, 6, dtype=torch.float64)
    y = true(x.float()).double().detach()
    fitted = nn.Linear(6, 3)
    _solve_into(fitted, x, y)
    torch.testing.assert_close(fitted.weight, true.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, true.bias, atol=1e-4, rtol=1e-4)


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


def _every_position(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input rows, outputs) of a layer at every output position, as the capture lays them out."""
    windows = _windows(m, x)
    return windows.flatten(windows.dim() + 1 - m.weight.dim()).flatten(0, -2), _outputs(m, m(x)).flatten(0, -2)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
                                  lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
                                  lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2),
                                  lambda: nn.Conv3d(4, 6, 3, padding="same", padding_mode="circular", groups=2)])
def test_least_squares_recovers_grouped_and_nd_convs(make):
    true, fitted = make().double(), make().double()
    size = 6 if isinstance(true, nn.Conv3d) else 10
    x = torch.randn(8, true.in_channels, *[size] * len(true.kernel_size), dtype=torch.float64)
    rows, outputs = _every_position(true, x)
    _solve_into(fitted, rows, outputs.detach())
    torch.testing.assert_close(fitted.weight, true.weight, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fitted.bias, true.bias, atol=1e-6, rtol=1e-6)


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


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding="valid"),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 4))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        features = self.body(x)
        return self.head(features) + features @ self.head.weight  # the head's weight read twice: tied


@pytest.mark.parametrize("method", ["greedy", "lasso"])
def test_functional_layers_of_the_export_front_end_are_measured_and_refitted_as_modules_are(method):
    """The export front end writes layers as F.linear / F.conv2d over stored parameters that no nn.Linear owns;
    channel selection and reconstruction read them through module views of those parameters (they fell back to
    l1 and refitted nothing there), and give what they give on the fx trace's module calls."""
    torch.manual_seed(0)
    model, x = _ConvNet().eval(), torch.randn(64, 3, 8, 8)
    results = {}
    for frontend in ("fx", "export"):
        gm = fxcompress.compile(model, [PruneChannels(amount=0.5, method=method, reconstruct=True)],
                                example_inputs=(x,), calibration_data=[x], frontend=frontend)
        stats = fxcompress.history(gm)[-1].stats
        assert not stats.get("scored_by_l1")
        results[frontend] = (sorted(stats["reconstructed"]), gm(x))
    assert results["export"][0] == results["fx"][0] == ["body.2", "body.5", "body.7"]  # not the tied head
    torch.testing.assert_close(results["export"][1], results["fx"][1], rtol=1e-5, atol=1e-6)
