"""Reconstruction of masked models (after InsertMasks): a mask that keeps everything changes nothing,
a mask with zeros keeps them, and a trained masked network keeps its accuracy."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcompress
from fxcompress.datasets import load_digits
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertMasks, PruneChannels
from fxcompress.pruning.masks import get_mask
from fxcompress.training import evaluate, train

# each example compiles a model three times; an eighth of the profile's examples keeps CI fast
EXAMPLES = max(5, settings().max_examples // 8)


class Chain(nn.Module):
    """Convs of the given widths (a residual add wherever two neighbours have the same width), then a
    linear head: every refitted layer feeds another refitted layer."""

    def __init__(self, channels: int, widths: list[int], kernels: list[int], side: int, classes: int) -> None:
        super().__init__()
        ins = [channels, *widths[:-1]]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, padding=k // 2) for i, o, k in zip(ins, widths, kernels))
        self.residual = [i == o for i, o in zip(ins, widths)]
        self.head = nn.Linear(widths[-1] * side * side, classes)

    def forward(self, x):
        for conv, residual in zip(self.convs, self.residual):
            y = F.relu(conv(x))
            x = x + y if residual else y
        return self.head(x.flatten(1))


@st.composite
def chains(draw):
    depth = draw(st.integers(2, 4))
    channels, side = draw(st.integers(1, 3)), draw(st.integers(4, 6))
    model = Chain(channels, draw(st.lists(st.integers(4, 8), min_size=depth, max_size=depth)),
                  draw(st.lists(st.sampled_from([1, 3]), min_size=depth, max_size=depth)), side,
                  draw(st.integers(2, 5)))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    for p in model.parameters():  # the seed above draws the weights, independently of the shapes
        nn.init.normal_(p, std=0.5)
    calibration = [torch.randn(32, channels, side, side) for _ in range(2)]
    return model.eval(), calibration, draw(st.sampled_from([0.25, 0.5]))


def _prune(model, calibration, amount):
    return fxcompress.compile(model, [PruneChannels(amount=amount, reconstruct=True)],
                              example_inputs=(calibration[0],), calibration_data=calibration)


@settings(max_examples=EXAMPLES)
@given(chains())
def test_an_all_ones_mask_refits_exactly_like_no_mask(case):
    model, calibration, amount = case
    masked = fxcompress.compile(model, [InsertMasks(sparsity=0.0)], example_inputs=(calibration[0],))
    assert all(get_mask(masked, layer) is not None for layer in find_layers(masked))
    plain, refitted = _prune(model, calibration, amount), _prune(masked, calibration, amount)
    refitted_layers = fxcompress.history(refitted)[-1].stats["reconstructed"]
    assert refitted_layers and refitted_layers == fxcompress.history(plain)[-1].stats["reconstructed"]
    for name, weight in plain.named_parameters():
        torch.testing.assert_close(refitted.get_parameter(name), weight, atol=1e-5, rtol=1e-4, msg=name)
    x = torch.cat(calibration)
    torch.testing.assert_close(refitted(x), plain(x), atol=1e-4, rtol=1e-4)


@settings(max_examples=EXAMPLES)
@given(chains(), st.sampled_from(["element", "filter", "channel"]), st.sampled_from([0.3, 0.6]))
def test_a_mask_with_zeros_keeps_them_exactly_through_the_refit(case, granularity, sparsity):
    model, calibration, amount = case
    masked = fxcompress.compile(model, [InsertMasks(sparsity=sparsity, granularity=granularity)],
                                example_inputs=(calibration[0],))
    refitted = _prune(masked, calibration, amount)
    changed = set(fxcompress.history(refitted)[-1].stats["reconstructed"])
    assert changed
    for layer in find_layers(refitted):
        pruned = get_mask(refitted, layer) == 0
        stored = refitted.get_parameter(layer.weight)
        assert torch.equal(stored[pruned], torch.zeros_like(stored[pruned])), layer.name
        assert torch.equal(effective_weight(refitted, layer)[pruned], torch.zeros_like(stored[pruned])), layer.name


class ResidualCNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * 16, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(F.relu(self.down(x)).flatten(1))


def test_a_trained_masked_residual_cnn_keeps_its_accuracy_through_reconstruction():
    data = load_digits()
    model = ResidualCNN()
    train(model, data, 3, lr=3e-3)
    dense = evaluate(model, data.test_x, data.test_y)
    assert dense > 0.9
    calibration = [data.train_x[i:i + 128] for i in range(0, 512, 128)]
    example = (data.train_x[:8],)
    cases = [(InsertMasks(sparsity=0.0), 0.0), (InsertMasks(sparsity=0.0), 0.25),
             (InsertMasks(sparsity=0.0, select="conv1"), 0.25)]  # every layer masked, or one
    for insert, amount in cases:
        masked = fxcompress.compile(model, [insert], example_inputs=example)
        pruned = fxcompress.compile(masked, [PruneChannels(amount=amount, reconstruct=True)],
                                    example_inputs=example, calibration_data=calibration)
        accuracy = evaluate(pruned, data.test_x, data.test_y)
        assert accuracy >= dense - 0.02, (insert, amount, accuracy, dense)
