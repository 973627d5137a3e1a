"""Feature capture: calibration batches, input rows of linear / conv layers, sampled positions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.channels.capture import Capture, Sampling, _windows, calibration_batch


def test_calibration_items_are_concatenated_into_one_batch():
    batch = calibration_batch([torch.ones(2, 3), torch.zeros(1, 3)])
    assert len(batch) == 1 and batch[0].shape == (3, 3)
    pairs = calibration_batch([(torch.ones(2, 3), torch.ones(2)), (torch.ones(1, 3), torch.ones(1))])
    assert [t.shape[0] for t in pairs] == [3, 3]


def _all_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every output position's row (a full copy, fine for the small tests here)."""
    windows = _windows(m, x)
    return windows.flatten(windows.dim() + 1 - m.weight.dim()).flatten(0, -2)


def _input(m: nn.Module, size: int = 10) -> torch.Tensor:
    return torch.randn(8, m.in_channels, *[size] * len(m.kernel_size), dtype=torch.float64)


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
    capture = Capture(gm, {node.name: m}, Sampling(samples),
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


class HeadsView(nn.Module):
    """A linear layer's output viewed into heads by its own sizes: fixed numbers once shapes are specialized."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        b, n, c = x.shape
        heads = F.relu(self.fc(x)).view(b, n, 2, c // 2)
        return self.out(heads.reshape(b, n, c))


def test_a_graph_of_fixed_sizes_names_the_node_the_joined_calibration_batch_fails_at():
    import fxcompress
    from fxcompress.errors import PreconditionError
    from fxcompress.passes import PruneChannels

    torch.manual_seed(0)
    model, x = HeadsView().eval(), torch.randn(2, 5, 8)
    prune = PruneChannels(amount=0.5, method="greedy", reconstruct=True)
    # two batches of the example's shape are read as one batch of 4, which `view(2, 5, 2, 4)` cannot hold:
    # the graph's check of its input's exact shape refuses it first
    with pytest.raises(PreconditionError, match=r"one batch of 4, fails at node 'check_input_shape' .*"
                                                r"input 'x' has size 4 along axis 0.*as one such batch"):
        fxcompress.compile(model, [prune], (x,), calibration_data=[x, x], specialize_shapes=True)
    pruned = fxcompress.compile(model, [prune], (x,), calibration_data=[x], specialize_shapes=True)
    assert pruned.fc.out_features == 4
