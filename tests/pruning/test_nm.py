"""N:M sparsity as a mask constraint: exactly N kept in every M consecutive input weights, the N of
highest importance, for linear and conv layers, with magnitude or Wanda; refusals by field and layer."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.passes import InsertMasks


def _groups(tensor, m):
    """(…, M) groups of consecutive input channels; the input channels are dim 1 of the weight."""
    moved = tensor.movedim(1, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_every_group_of_m_inputs_keeps_its_n_largest_weights(n, m):
    model = nn.Sequential(nn.Linear(64, 16))
    weight = model[0].weight.detach().clone()
    gm = fxcompress.compile(model, [InsertMasks(granularity=f"{n}:{m}")], example_inputs=(torch.randn(2, 64),))
    mask = _groups(gm.get_buffer("0.weight_mask"), m)
    expected = torch.zeros_like(mask).scatter_(-1, _groups(weight.abs(), m).topk(n, dim=-1).indices, True)
    assert torch.equal(mask, expected) and (mask.sum(-1) == n).all()
    assert fxcompress.history(gm)[-1].stats["sparsity"] == pytest.approx(1 - n / m)
    assert (_groups(gm.get_submodule("0").weight.detach(), m).ne(0).sum(-1) <= n).all()  # the zeros are stored


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    model = nn.Sequential(nn.Conv2d(8, 4, 3))
    weight = model[0].weight.detach().clone()
    gm = fxcompress.compile(model, [InsertMasks(granularity="2:4")], example_inputs=(torch.randn(1, 8, 5, 5),))
    mask = _groups(gm.get_buffer("0.weight_mask"), 4)  # (out, kh, kw, in/4, 4)
    expected = torch.zeros_like(mask).scatter_(-1, _groups(weight.abs(), 4).topk(2, dim=-1).indices, True)
    assert torch.equal(mask, expected)


def test_wanda_scores_choose_within_each_group():
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    gain = torch.linspace(0.1, 10.0, 16)
    batches = [torch.randn(32, 16) * gain for _ in range(3)]
    gm = fxcompress.compile(model, [InsertMasks(granularity="2:4", importance="wanda")],
                            example_inputs=(batches[0],), calibration_data=batches)
    scores = model[0].weight.detach().abs() * torch.cat(batches).norm(dim=0)
    mask = _groups(gm.get_buffer("0.weight_mask"), 4)
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(-1, _groups(scores, 4).topk(2, dim=-1).indices, True))


def test_an_earlier_mask_is_kept_even_where_it_pruned_more_than_the_pattern():
    model = nn.Sequential(nn.Linear(16, 4))
    x = torch.randn(2, 16)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.9)], example_inputs=(x,))
    before = gm.get_buffer("0.weight_mask").clone()
    gm = fxcompress.compile(gm, [InsertMasks(granularity="2:4")], example_inputs=(x,))
    after = gm.get_buffer("0.weight_mask")
    assert not (after & ~before).any()  # nothing revived
    assert (_groups(after, 4).sum(-1) <= 2).all()


def test_input_channels_that_do_not_split_into_groups_are_an_error_naming_the_layer():
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(PreconditionError, match=r"layer '4'.*multiples of 4; it has 3"):
        fxcompress.compile(model, [InsertMasks(granularity="2:4")], example_inputs=(torch.randn(2, 16),))


def test_an_embedding_has_no_input_channels_to_group_and_the_error_names_it_and_the_way_out():
    """An embedding table has no input channels: the refusal names the layer and the types= that leave it
    out, and those types do leave it out (the linear layer after it is masked 2:4)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 8))
    x = torch.randint(0, 64, (2, 5))
    with pytest.raises(PreconditionError, match=r"layer '0': 2:4 sparsity groups input channels, which its "
                                                r"embedding weight does not have; leave the layer out with "
                                                r"types=\(('[a-z_0-9]+', )+'addmm'\)"):
        fxcompress.compile(model, [InsertMasks(granularity="2:4")], example_inputs=(x,))
    types = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
             "addmm")
    gm = fxcompress.compile(model, [InsertMasks(granularity="2:4", types=types)], example_inputs=(x,))
    assert (_groups(gm.get_buffer("1.weight_mask"), 4).sum(-1) == 2).all()
    assert not hasattr(gm.get_submodule("0"), "weight_mask")


@pytest.mark.parametrize("config, field", [
    ({"granularity": "4:4"}, "InsertMasks.granularity"),
    ({"granularity": "0:4"}, "InsertMasks.granularity"),
    ({"granularity": "2:4", "sparsity": 0.7}, "InsertMasks.sparsity"),
    ({"granularity": "2:4", "scope": "global"}, "InsertMasks.scope"),
])
def test_bad_patterns_and_fields_the_pattern_does_not_read_are_refused(config, field):
    with pytest.raises(ConfigError, match=field):
        InsertMasks(**config)
    InsertMasks(granularity="2:4", sparsity=0.5)  # the sparsity the pattern implies is no contradiction


def test_ties_are_pruned_earliest_first_in_n_m_groups_and_in_wanda_rows():
    """Equal scores: torch.topk breaks such ties in no specified order (on CPU the later ones went), so N:M and
    per-row selections pruned other weights than InsertMasks's element selection; earliest first, as it does."""
    from fxcompress.pruning.nm import nm_keep, row_keep
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 2.0, 1.0]])
    assert nm_keep(scores, 2, 4, "linear", "fc").tolist() == [[False, False, True, True, True, False, True, False]]
    assert row_keep(scores, 0.5, "linear").tolist() == [[False, False, False, False, True, True, True, True]]
