"""Sensitivity sweeps: one layer pruned at a time, table renderings, plot, and restoration of weights."""
import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.passes import InsertMasks
from fxcompress.sensitivity import sensitivity
from zoo import LeNet5, LeNet300100


def weight_sparsity_metric(layer):
    """A metric that reads the model back: the sparsity of one layer's weight (deterministic)."""
    return lambda model: (model.get_submodule(layer).weight == 0).float().mean().item()


def test_each_layer_is_pruned_alone_and_restored():
    model = LeNet300100()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(m):
        seen.append(tuple(round((m.get_submodule(n).weight == 0).float().mean().item(), 3)
                          for n in ("fc1", "fc2", "fc3")))
        return 1.0

    table = sensitivity(model, evaluate, sparsities=[0.25, 0.5])
    assert table.layers == ("fc1", "fc2", "fc3")
    assert seen == [(0, 0, 0), (0.25, 0, 0), (0.5, 0, 0), (0, 0.25, 0), (0, 0.5, 0), (0, 0, 0.25), (0, 0, 0.5)]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_values_baseline_rows_and_tolerance():
    model = LeNet300100()
    table = sensitivity(model, weight_sparsity_metric("fc2"), sparsities=[0.5, 0.9], layers="fc[23]")
    assert table.baseline == 0.0
    assert table.values == ((0.5, pytest.approx(0.9, abs=1e-6)), (0.0, 0.0))
    assert table.rows()[2] == {"layer": "fc3", "sparsity": 0.5, "metric": 0.0, "delta": 0.0}
    assert table.max_sparsity(tolerance=0.0) == {"fc2": 0.9, "fc3": 0.9}
    negative = sensitivity(model, lambda m: -weight_sparsity_metric("fc2")(m), sparsities=[0.5, 0.9], layers="fc2")
    assert negative.max_sparsity(tolerance=0.6) == {"fc2": 0.5}


def test_structured_granularity_and_existing_masks():
    x = torch.randn(1, 1, 28, 28)
    gm = fxcompress.compile(LeNet5(), [InsertMasks(sparsity=0.5, select="conv2")], example_inputs=(x,))
    zeros = lambda m: (m.conv2.weight * m.conv2.weight_mask == 0).float().mean().item()  # noqa: E731
    table = sensitivity(gm, zeros, sparsities=[0.2], layers="conv2")
    assert table.values[0][0] == pytest.approx(0.5)  # already beyond 0.2: nothing more is pruned
    filters = sensitivity(LeNet5(), weight_sparsity_metric("conv1"), sparsities=[0.4], granularity="filter",
                          layers="conv1")
    assert filters.values[0][0] == pytest.approx(0.4)


def test_text_markdown_and_png(tmp_path):
    table = sensitivity(LeNet300100(), weight_sparsity_metric("fc1"), sparsities=[0.5], progress=True)
    text, markdown = table.to_text(), table.to_markdown()
    assert "baseline 0.0000" in text and "fc1" in text and str(table) == text
    assert markdown.splitlines()[2] == "| layer | 0.5 |" and "| fc1 | 0.5000 |" in markdown
    path = table.save_plot(tmp_path / "sens.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsities": [1.2]}, "sensitivity.sparsities must be in"),
    ({"granularity": "rows"}, "sensitivity.granularity must be one of"),
    ({"layers": "conv.*"}, "no linear / conv layer matches"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sensitivity(LeNet300100(), lambda m: 0.0, **kwargs)


def test_public_name():
    assert fxcompress.sensitivity is sensitivity


def test_max_sparsity_stops_at_the_first_drop():
    from fxcompress.sensitivity import SensitivityTable
    table = SensitivityTable(("a", "b"), (0.9, 0.5, 0.8), ((0.95, 0.9, 0.7), (0.2, 0.9, 0.9)), 0.95, "element")
    assert table.max_sparsity(tolerance=0.1) == {"a": 0.5, "b": 0.8}
