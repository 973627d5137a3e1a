"""SparseGPT as reconstruction: on a linear layer with correlated inputs, the second-order update
of the kept weights loses clearly less output than the mask alone, whichever mask (magnitude,
Wanda, its own OBS choice, 2:4, one already in the graph); pruned weights stay exactly zero."""
import pytest
import torch
from torch import nn

import fxcompress
from calibration.tiny_lm import correlated_batches, relative_error
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.passes import InsertMasks, SparseGPT


def _compile(model, passes, batches):
    return fxcompress.compile(model, passes, example_inputs=(batches[0],), calibration_data=batches)


def _effective_weight(gm):
    return gm.get_submodule("0").weight.detach() * gm.get_buffer("0.weight_mask")


@pytest.mark.parametrize("importance, margin", [("abs", 0.8), ("wanda", 0.8), ("sparsegpt", 0.5)])
def test_the_update_loses_clearly_less_output_than_magnitude_pruning(layer, importance, margin):
    model, batches = layer
    x = torch.cat(batches)
    magnitude = _compile(model, [InsertMasks(sparsity=0.5)], batches)
    gm = _compile(model, [SparseGPT(sparsity=0.5, importance=importance)], batches)
    assert relative_error(gm, model, x) < margin * relative_error(magnitude, model, x)
    mask = gm.get_buffer("0.weight_mask")
    assert float(mask.float().mean()) == 0.5
    assert torch.equal(gm.get_submodule("0").weight.detach()[~mask], torch.zeros(int((~mask).sum())))
    report = fxcompress.history(gm)[-1].stats["layers"]["0"]
    assert report["error_updated"] < report["error_masked"] and report["damp"] == 0.01


def test_with_the_magnitude_mask_only_the_kept_weights_change(layer):
    model, batches = layer
    magnitude = _compile(model, [InsertMasks(sparsity=0.5)], batches)
    gm = _compile(model, [SparseGPT(sparsity=0.5, importance="abs")], batches)
    assert torch.equal(gm.get_buffer("0.weight_mask"), magnitude.get_buffer("0.weight_mask"))
    assert not torch.equal(_effective_weight(gm), _effective_weight(magnitude))


def test_an_existing_mask_is_kept_and_what_is_pruned_now_is_compensated(layer):
    model, batches = layer
    x = torch.cat(batches)
    masked = _compile(model, [InsertMasks(sparsity=0.3, importance="wanda")], batches)
    earlier = masked.get_buffer("0.weight_mask").clone()
    gm = _compile(masked, [SparseGPT(sparsity=0.6, importance="abs")], batches)
    mask = gm.get_buffer("0.weight_mask")
    assert not (mask & ~earlier).any() and float(mask.float().mean()) == pytest.approx(0.4, abs=1 / 256)
    both = _compile(masked, [InsertMasks(sparsity=0.6)], batches)
    assert torch.equal(mask, both.get_buffer("0.weight_mask"))  # the same selection, then the update
    assert relative_error(gm, model, x) < 0.8 * relative_error(both, model, x)
    assert fxcompress.history(gm)[-1].stats["masks_created"] == 0


def test_a_callable_importance_gives_the_mask_the_update_works_from(layer):
    model, batches = layer
    gm = _compile(model, [SparseGPT(sparsity=0.25, importance=lambda w: -w.abs())], batches)  # prune the largest
    weight, mask = model[0].weight.detach(), gm.get_buffer("0.weight_mask")
    assert float(weight.abs()[~mask].min()) >= float(weight.abs()[mask].max())


def test_two_four_sparsity_with_the_update(layer):
    model, batches = layer
    x = torch.cat(batches)
    gm = _compile(model, [SparseGPT(granularity="2:4")], batches)
    groups = _effective_weight(gm).reshape(64, 64, 4)
    assert (groups.ne(0).sum(-1) <= 2).all() and (gm.get_buffer("0.weight_mask").reshape(64, 64, 4).sum(-1) == 2).all()
    magnitude = _compile(model, [InsertMasks(granularity="2:4")], batches)
    assert relative_error(gm, model, x) < 0.5 * relative_error(magnitude, model, x)


def test_layers_are_reconstructed_on_the_outputs_of_the_pruned_layers_before_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    batches = correlated_batches(count=4)
    gm = _compile(model, [SparseGPT(sparsity=0.5)], batches)
    stats = fxcompress.history(gm)[-1].stats
    assert stats["blocks"] == [[["0"]], [["2"]]] and stats["sparsity"] == 0.5
    assert stats["calibration_batches"] == 4 and stats["calibration_peak_bytes"] > 0
    x = torch.cat(batches)
    magnitude = _compile(model, [InsertMasks(sparsity=0.5)], batches)
    assert relative_error(gm, model, x) < 0.6 * relative_error(magnitude, model, x)


def test_refusals_name_the_field_or_the_layer(layer):
    model, batches = layer
    with pytest.raises(PreconditionError, match="SparseGPT needs calibration data"):
        fxcompress.compile(model, [SparseGPT()], example_inputs=(batches[0],))
    with pytest.raises(ConfigError, match="SparseGPT.sparsity"):
        SparseGPT(granularity="2:4", sparsity=0.7)
    with pytest.raises(ConfigError, match="SparseGPT.blocksize"):
        SparseGPT(granularity="4:8", blocksize=100)
    with pytest.raises(ConfigError, match="SparseGPT.granularity"):
        SparseGPT(granularity="filter")


@pytest.mark.parametrize("importance", ["sparsegpt", "abs"])
def test_an_n_m_pattern_on_a_layer_whose_width_m_does_not_divide_names_the_layer(importance):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).eval()
    batches = [torch.randn(16, 8) for _ in range(2)]
    with pytest.raises(PreconditionError, match="layer '2': 2:4 sparsity needs input channels in multiples of 4; "
                                                "it has 6"):
        _compile(model, [SparseGPT(granularity="2:4", importance=importance)], batches)
