"""Wanda masks (|W| x input-channel norm, compared per output row), computed block by block on
calibration data, and OWL's outlier-weighted per-layer sparsities."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.passes import InsertMasks
from fxcompress.pruning import AGP
from fxcompress.pruning.owl import OWL, outlier_ratio, owl_sparsities


def _outlier_batches(count=4, rows=64, width=32, outliers=(3, 17), scale=20.0):
    """Inputs where a few channels are much larger than the rest, as in language models' activations."""
    gain = torch.ones(width)
    gain[list(outliers)] = scale
    return [torch.randn(rows, width) * gain for _ in range(count)]


def _mask(gm, name):
    return gm.get_buffer(f"{name}.weight_mask")


def test_the_wanda_mask_keeps_the_highest_weight_times_input_norm_of_each_row():
    model = nn.Sequential(nn.Linear(32, 8)).eval()
    weight = model[0].weight.detach().clone()
    batches = _outlier_batches()
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5, importance="wanda")], example_inputs=(batches[0],),
                            calibration_data=batches)
    scores = weight.abs() * torch.cat(batches).norm(dim=0)
    expected = torch.zeros_like(weight, dtype=torch.bool).scatter_(1, scores.topk(16, dim=1).indices, True)
    assert torch.equal(_mask(gm, "0"), expected)
    assert (_mask(gm, "0").sum(1) == 16).all()  # every output row to exactly its sparsity


def test_wanda_loses_less_output_than_magnitude_where_inputs_have_outlier_channels():
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    batches = _outlier_batches()
    x = torch.cat(batches)
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for importance in ("abs", "wanda"):
        gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5, importance=importance)],
                                example_inputs=(batches[0],), calibration_data=batches)
        with torch.no_grad():
            errors[importance] = float((gm(x) - reference).norm() / reference.norm())
    assert errors["wanda"] < 0.6 * errors["abs"], errors


def test_the_second_layer_is_scored_on_what_the_pruned_first_layer_gives():
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    batches = _outlier_batches()
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5, importance="wanda")], example_inputs=(batches[0],),
                            calibration_data=batches)
    pruned_first = model[0].weight.detach() * _mask(gm, "0")
    hidden = torch.relu(torch.cat(batches) @ pruned_first.T + model[0].bias.detach())
    scores = model[2].weight.detach().abs() * hidden.norm(dim=0)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(12, dim=1).indices, True)
    assert torch.equal(_mask(gm, "2"), expected)


@pytest.mark.parametrize("config, field", [
    ({"scope": "global"}, "InsertMasks.scope"),
    ({"granularity": "filter"}, "InsertMasks.granularity"),
    ({"schedule": AGP(end=10)}, "InsertMasks.schedule"),
])
def test_wanda_refuses_what_it_would_not_read(config, field):
    with pytest.raises(ConfigError, match=field):
        InsertMasks(importance="wanda", **config)


def test_wanda_needs_calibration_data_and_linear_layers():
    x = torch.randn(4, 32)
    with pytest.raises(PreconditionError, match="InsertMasks needs calibration data"):
        fxcompress.compile(nn.Sequential(nn.Linear(32, 8)), [InsertMasks(importance="wanda")], example_inputs=(x,))
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 8))
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(ConfigError, match=r"0 \(embedding\)"):
        fxcompress.compile(model, [InsertMasks(importance="wanda")], example_inputs=(ids,), calibration_data=[ids])
    gm = fxcompress.compile(model, [InsertMasks(importance="wanda", types=("linear",))], example_inputs=(ids,),
                            calibration_data=[ids])
    assert float(_mask(gm, "1").float().mean()) == 0.5


def test_owl_sparsities_fall_with_the_outlier_ratio_and_keep_the_weighted_mean():
    ratios = {"a": 0.02, "b": 0.08, "c": 0.05}
    sizes = {"a": 1000, "b": 4000, "c": 2000}
    sparsity = owl_sparsities(ratios, sizes, target=0.6, spread=0.08)
    assert sparsity["b"] < sparsity["c"] < sparsity["a"]
    assert sum(sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.6, abs=1e-12)
    assert max(sparsity.values()) - min(sparsity.values()) == pytest.approx(0.16)
    assert owl_sparsities({"a": 0.1, "b": 0.1}, {"a": 1, "b": 3}, 0.5, 0.08) == {"a": 0.5, "b": 0.5}


def test_the_outlier_ratio_counts_scores_above_threshold_times_the_mean_of_unpruned_weights():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 13.0, float("-inf")])
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 8)  # mean 2.5: only 13 is above 12.5


def test_owl_prunes_the_layer_with_outlier_inputs_less_and_keeps_total_sparsity():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)).eval()
    batches = _outlier_batches()  # the first layer's inputs have two outlier channels, the others' do not
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5, importance="wanda", profile=OWL(spread=0.1))],
                            example_inputs=(batches[0],), calibration_data=batches)
    stats = fxcompress.history(gm)[-1].stats
    layers = stats["layers"]
    assert max(stats["outlier_ratio"], key=stats["outlier_ratio"].get) == "0"
    assert layers["0"] == min(layers.values()) and layers["0"] < 0.45
    assert stats["sparsity"] == pytest.approx(0.5, abs=2 / 1024)  # per-row rounding of three layers
