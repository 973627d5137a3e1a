"""Feature capture: calibration batches, input rows of linear / conv layers, sampled positions."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.batches import PaddingIncludedWarning
from fxcompress.channels.capture import Capture, Sampling, _windows, calibration_batch, run_capture
from fxcompress.errors import PreconditionError


def test_calibration_batches_are_kept_apart_as_given():
    """Each batch stays a batch (a tensor a tuple of one, a dict as it is, bound by name when run): they are
    no longer joined, so batches whose sizes differ past the batch dim can be read."""
    a, b, c = torch.ones(2, 3), torch.zeros(1, 5), {"x": torch.ones(1, 3)}
    batches = calibration_batch([a, (b, torch.ones(1)), c])
    assert len(batches) == 3 and batches[0] == (a,) and batches[1][0] is b and batches[2] is c
    assert calibration_batch(iter([a]))[0] == (a,)  # a generator is listed once
    with pytest.raises(PreconditionError, match="calibration_data is one dict"):
        calibration_batch({"x": a})
    with pytest.raises(PreconditionError, match="yielded no batch"):
        calibration_batch([])


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


def test_a_graph_of_fixed_sizes_runs_batches_of_the_example_size_and_names_the_batch_that_fails():
    import fxcompress
    from fxcompress.passes import PruneChannels

    torch.manual_seed(0)
    model, x = HeadsView().eval(), torch.randn(2, 5, 8)
    prune = PruneChannels(amount=0.5, method="greedy", reconstruct=True)
    # each batch runs as given: two batches of the example's shape fit `view(2, 5, 2, 4)` (joined, they were one
    # batch of 4, which it cannot hold)
    pruned = fxcompress.compile(model, [prune], (x,), calibration_data=[x, x], specialize_shapes=True)
    assert pruned.fc.out_features == 4 and fxcompress.history(pruned)[-1].stats["reconstructed"] == ["out"]
    # a batch of another size is refused by the graph's check of its input's exact shape, naming that batch
    with pytest.raises(PreconditionError, match=r"calibration batch 1 \(leading size 4\) fails at node "
                                                r"'check_input_shape' .*input 'x' has size 4 along axis 0.*"
                                                r"runs only batches of the example's sizes"):
        fxcompress.compile(model, [prune], (x,), calibration_data=[x, torch.cat([x, x])], specialize_shapes=True)


class _Sequence(nn.Module):
    """A linear layer over (batch, sequence, features) and a conv1d over (batch, channels, length), with a gate
    input that a dict batch names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.conv = nn.Linear(6, 4), nn.Conv1d(4, 3, 3, padding=1)

    def forward(self, x, gate):
        return self.conv((self.fc(x) * gate).transpose(1, 2))


def _rows_of(batches, samples: int = 10 ** 6) -> tuple[dict, dict, dict]:
    """{layer: input rows}, {layer: output rows}, picks, as the capture gathers them from `batches`."""
    torch.manual_seed(0)
    model = _Sequence().double().eval()
    gm = torch.fx.symbolic_trace(model)
    watched = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    rows, outputs = {}, {}
    capture = Capture(gm, watched, Sampling(samples), before=lambda n, _, r: rows.update({n.name: r}),
                      after=lambda n, _, y: outputs.update({n.name: y}))
    picks = run_capture(capture, calibration_batch(batches))
    return rows, outputs, picks


def test_batches_of_different_lengths_give_each_batch_s_rows():
    """Sequences of 3 and 7 positions: joining the inputs failed in torch.cat; the rows are per position, so
    each batch is captured as it is and its rows joined."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 6, generator=gen, dtype=torch.float64), torch.randn(1, 7, 6, generator=gen,
                                                                                   dtype=torch.float64)]
    gates = [torch.rand(2, 3, 1, generator=gen, dtype=torch.float64), torch.rand(1, 7, 1, generator=gen,
                                                                                dtype=torch.float64)]
    rows, outputs, picks = _rows_of(list(zip(xs, gates)))
    torch.manual_seed(0)
    model = _Sequence().double().eval()
    assert rows["fc"].shape == (2 * 3 + 7, 6) and rows["conv"].shape == (2 * 3 + 7, 4 * 3)
    torch.testing.assert_close(rows["fc"], torch.cat([x.reshape(-1, 6) for x in xs]))
    with torch.no_grad():
        hidden = [(model.fc(x) * g).transpose(1, 2) for x, g in zip(xs, gates)]
        convs = [model.conv(h) for h in hidden]
    # every output position of both batches, in batch order, and each row reproduces the conv there
    torch.testing.assert_close(outputs["conv"], torch.cat([y.movedim(1, -1).reshape(-1, 3) for y in convs]))
    torch.testing.assert_close(rows["conv"] @ model.conv.weight.detach().reshape(3, -1).T + model.conv.bias.detach(),
                               outputs["conv"])
    assert picks["conv"].tolist() == list(range(13))


def test_rows_of_batches_of_one_shape_are_those_of_the_joined_batch():
    """The positions are drawn over the batches one after another, as over their concatenation: the same
    draw, so features do not change for calibration data that joining could already read."""
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 5, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    gates = [torch.rand(4, 5, 1, generator=gen, dtype=torch.float64) for _ in range(3)]
    apart = _rows_of(list(zip(xs, gates)), samples=17)
    joined = _rows_of([(torch.cat(xs), torch.cat(gates))], samples=17)
    for a, b in zip(apart, joined):
        assert a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    assert len(apart[2]["fc"]) == 17


def test_dict_batches_are_bound_to_the_graph_inputs_by_name():
    """A tokenizer-style dict is bound by the calibration walk's rule (`batches.bind_inputs`): any key order, and
    a key no input has is refused naming the batch (it was unsupported: a dict's keys were read as tensors)."""
    gen = torch.Generator().manual_seed(3)
    x, gate = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64), torch.rand(2, 4, 1, generator=gen,
                                                                                  dtype=torch.float64)
    named = _rows_of([{"gate": gate, "x": x}])
    positional = _rows_of([(x, gate)])
    for a, b in zip(named, positional):
        assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    with pytest.raises(PreconditionError, match=r"calibration batch 1: the graph has no input named 'gates'"):
        _rows_of([(x, gate), {"x": x, "gates": gate}])


# ---- padded positions (zeros of an attention_mask input) ----------------------------------------------------------
class _Masked(nn.Module):
    """A linear layer over (batch, sequence, features), one over (batch * sequence, features) rows, and a conv1d
    over the sequence, with the attention mask as the graph's second input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.flat, self.conv = nn.Linear(6, 4), nn.Linear(4, 4), nn.Conv1d(4, 3, 3, padding=1)

    def forward(self, x, attention_mask):
        h = self.fc(x) * attention_mask[..., None]
        h = self.flat(h.flatten(0, 1)).reshape(h.shape)
        return self.conv(h.transpose(1, 2))


def _masked_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of 2 x 5 positions; the first right-padded (3 and 4 real tokens): 17 kept positions of 20."""
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 5, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:], mask[1, 4:] = 0, 0
    return [(xs[0], mask), (xs[1], torch.ones_like(mask))]


def _masked_capture(batches, samples: int = 10 ** 6):
    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(_Masked().double().eval())
    watched = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    rows, outputs = {}, {}
    capture = Capture(gm, watched, Sampling(samples), before=lambda n, _, r: rows.update({n.name: r}),
                      after=lambda n, _, y: outputs.update({n.name: y}))
    picks = run_capture(capture, calibration_batch(batches), purpose="a test")
    return gm, rows, outputs, picks


def test_padded_positions_are_left_out_of_the_rows_that_line_up_with_them():
    """A linear layer's rows, (batch, sequence, features) or (batch * sequence, features), are taken at the
    unpadded positions only, inputs and outputs alike; a conv's windows span several positions, so it keeps them
    all, and the warning names it and only it."""
    batches = _masked_batches()
    with pytest.warns(PaddingIncludedWarning, match=r"a test.*input rows of 'conv' do not line up") as caught:
        gm, rows, outputs, picks = _masked_capture(batches)
    assert len(caught) == 1 and "'fc'" not in str(caught[0].message) and "'flat'" not in str(caught[0].message)
    keep = torch.cat([mask for _, mask in batches]).bool()
    xs = torch.cat([x for x, _ in batches])
    assert rows["fc"].shape == (17, 6) and torch.equal(rows["fc"], xs[keep])
    with torch.no_grad():
        hidden = gm.fc(xs) * keep[..., None]
        flat = gm.flat(hidden.flatten(0, 1))
    torch.testing.assert_close(outputs["fc"], gm.fc(xs)[keep].detach())
    assert rows["flat"].shape == (17, 4) and torch.equal(rows["flat"], hidden[keep])
    torch.testing.assert_close(outputs["flat"], flat[keep.flatten()])
    assert rows["conv"].shape == (20, 4 * 3)  # every position, padding included (warned)
    assert picks["fc"].tolist() == list(range(17)) and picks["conv"].tolist() == list(range(20))


def test_sampled_positions_are_drawn_among_the_unpadded_ones_only():
    """With fewer samples than kept positions, every sampled row is an unpadded position's, and the draw is over
    the 17 kept positions (it was over all 20, so a padded position could be drawn)."""
    batches = _masked_batches()
    with pytest.warns(PaddingIncludedWarning):
        _, rows, _, picks = _masked_capture(batches, samples=12)
    kept = torch.cat([x for x, _ in batches])[torch.cat([mask for _, mask in batches]).bool()]
    assert rows["fc"].shape == (12, 6) and torch.equal(rows["fc"], kept[torch.as_tensor(picks["fc"])])
    assert len(np.unique(picks["fc"])) == 12 and picks["fc"].max() < 17


def test_batches_without_padding_read_every_position_and_warn_nothing():
    """An all-ones mask is no padding: every row is read, and nothing is said."""
    batches = [(x, torch.ones_like(mask)) for x, mask in _masked_batches()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaddingIncludedWarning)
        _, rows, _, _ = _masked_capture(batches)
    assert rows["fc"].shape == (20, 6) and rows["conv"].shape == (20, 12)
