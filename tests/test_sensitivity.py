"""Sensitivity sweeps: one layer pruned at a time, table renderings, plot, and restoration of weights."""
import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.passes import InsertMasks
from fxcompress.sensitivity import sensitivity
from fxcompress.zoo import LeNet5, LeNet300100


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


def test_a_grouped_convolution_loses_whole_input_channels_as_insert_masks_chooses_them():
    """A depthwise conv's weight is [8, 1, 3, 3]: dim 1 holds one group's single channel, so the sweep took the
    whole layer for one "channel" (0% then 100%); its channels are the 8 real input channels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.Conv2d(8, 4, 1)).eval()
    seen = []

    def evaluate(m):
        seen.append((m[0].weight == 0).flatten(1).all(1).tolist())
        return 0.0

    sensitivity(model, evaluate, sparsities=[0.25, 0.5], granularity="channel", layers="0")
    x = torch.randn(1, 8, 6, 6)
    for sparsity, pruned in zip((0.25, 0.5), seen[1:]):
        gm = fxcompress.compile(model, [InsertMasks(sparsity=sparsity, granularity="channel", select="0")], (x,))
        assert pruned == (gm.get_submodule("0").weight_mask == 0).flatten(1).all(1).tolist()
        assert sum(pruned) == round(8 * sparsity)


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
    ({"layers": "fc(("}, r"sensitivity.layers: 'fc\(\(' is not a valid regular expression \(missing \)"),
    ({"layers": 3}, "sensitivity.layers must be"),
])
def test_bad_arguments(kwargs, message):
    evaluated = []
    with pytest.raises(ConfigError, match=message):
        sensitivity(LeNet300100(), lambda m: evaluated.append(m) or 0.0, **kwargs)
    assert evaluated == []  # refused before the baseline's evaluation


def test_prunable_layers_names_what_a_sweep_would_prune():
    from fxcompress.sensitivity import prunable_layers
    assert prunable_layers(LeNet300100()) == ("fc1", "fc2", "fc3")
    assert prunable_layers(LeNet300100(), "fc[13]") == ("fc1", "fc3")
    with pytest.raises(ConfigError, match="is not a valid regular expression"):
        prunable_layers(LeNet300100(), "[")


def test_public_name():
    assert fxcompress.sensitivity is sensitivity


def test_max_sparsity_stops_at_the_first_drop():
    from fxcompress.sensitivity import SensitivityTable
    table = SensitivityTable(("a", "b"), (0.9, 0.5, 0.8), ((0.95, 0.9, 0.7), (0.2, 0.9, 0.9)), 0.95, "element")
    assert table.max_sparsity(tolerance=0.1) == {"a": 0.5, "b": 0.8}


def test_a_table_saved_as_json_loads_back_equal(tmp_path):
    from fxcompress.sensitivity import SensitivityTable
    table = sensitivity(LeNet300100(), weight_sparsity_metric("fc2"), sparsities=[0.5, 0.9], layers="fc[23]")
    path = table.save(tmp_path / "sens.json")
    assert SensitivityTable.load(path) == table and SensitivityTable.from_dict(table.to_dict()) == table


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not a sensitivity table"),
    ({"layers": []}, "'layers' must be a non-empty list of names"),
    ({"sparsities": [0.5, "x"]}, "'sparsities' must be a non-empty list of numbers"),
    ({"values": [[0.5, 0.5]]}, "'values' must be 2 rows"),
    ({"values": [[0.5], [0.5]]}, "of 2 numbers"),
    ({"values": [[0.5, float("nan")], [0.5, 0.5]]}, "'values' must be"),
    ({"baseline": "high"}, "'baseline' must be a number"),
    ({"granularity": "rows"}, "'granularity' one of"),
])
def test_a_bad_table_file_is_a_format_error_naming_the_field(tmp_path, change, message):
    import json
    from fxcompress.errors import FormatError
    from fxcompress.sensitivity import SensitivityTable
    good = {"format": "fxcompress-sensitivity-1", "granularity": "element", "baseline": 0.9,
            "sparsities": [0.5, 0.9], "layers": ["fc1", "fc2"], "values": [[0.9, 0.8], [0.9, 0.7]]}
    assert SensitivityTable.from_dict(good).values == ((0.9, 0.8), (0.9, 0.7))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**good, **change}))
    with pytest.raises(FormatError, match=message):
        SensitivityTable.load(path)
    path.write_text("{not json")
    with pytest.raises(FormatError, match="bad.json: not JSON"):
        SensitivityTable.load(path)


def test_a_loaded_file_is_swept_by_its_functional_layers_and_a_quantized_one_is_refused(tmp_path):
    from fxcompress.encoded.decode import decode
    from fxcompress.passes import InsertFakeQuant
    x = torch.rand(2, 1, 8, 8)
    gm = fxcompress.compile(LeNet300100(64).eval(), [InsertMasks(sparsity=0.5), InsertFakeQuant(bits=4)],
                            example_inputs=(x,))
    with pytest.raises(ConfigError, match=r"layer fc1 computes with its weight through KMeansWeight.*decode"):
        sensitivity(gm, lambda m: 0.0, [0.5])
    fxcompress.save(gm, tmp_path / "m.fxc")
    loaded = decode(fxcompress.load(tmp_path / "m.fxc"))  # plain modules own the weights of a loaded file
    assert not any(isinstance(m, torch.nn.Linear) for m in loaded.modules())
    zeros = lambda m: (m.get_submodule("fc2").weight == 0).float().mean().item()  # noqa: E731
    table = sensitivity(loaded, zeros, [0.5, 0.75])
    assert table.layers == ("fc1", "fc2", "fc3")
    assert table.values[1] == (pytest.approx(0.5, abs=0.01), pytest.approx(0.75, abs=0.01))  # fc2 pruned further
    assert table.values[0][1] == table.baseline == pytest.approx(0.5, abs=0.01)  # fc1 swept: fc2 untouched


def test_an_evaluation_in_training_mode_leaves_every_buffer_as_it_was_even_when_it_raises():
    """BatchNorm in training mode updates its running statistics on each evaluation: they were left as the
    last (pruned) evaluation made them, and each evaluation saw the statistics of the ones before."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(144, 3))  # left in training mode, as a user may
    x = torch.randn(8, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(m):
        seen.append(m[1].running_mean.clone())
        return m(x).sum().item()

    sensitivity(model, evaluate, sparsities=[0.5, 0.9])
    assert all(torch.equal(mean, before["1.running_mean"]) for mean in seen)  # each from the same statistics
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    calls = []

    def failing(m):
        calls.append(m(x).sum().item())
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return calls[-1]

    with pytest.raises(RuntimeError, match="evaluation failed"):
        sensitivity(model, failing, sparsities=[0.5, 0.9])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_lowered_model_is_refused_naming_its_lowered_layers():
    from fxcompress.passes import LowerDynamicInt8
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    gm = fxcompress.compile(model, [LowerDynamicInt8(repeats=1)], example_inputs=(torch.randn(2, 16),))
    with pytest.raises(ConfigError, match=r"0\.dynamic_int8, 2\.dynamic_int8 are lowered"):
        sensitivity(gm, lambda m: 1.0, sparsities=[0.5])
