"""Each shipped recipe (fxcompress/recipes/*.yaml, found by name) runs with `fxcompress run --quick`, and its file holds what the
recipe asked for: the sparsity, the codebook sizes, the removed channels, the integer layers; its report is
given the final model and, where one fits, the reference that holds the weights before quantization."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.cli.recipe import load_recipe, shipped_recipes
from fxcompress.cli.run import data_shape, load_data
from fxcompress.layers import effective_weight, find_layers
from fxcompress.cli import run as run_module
from fxcompress.quant.integer import IntegerLayer
from fxcompress.report import layer_weights, write_report
from fxcompress.training import evaluate

RECIPES = Path(fxcompress.__file__).resolve().parent / "recipes"


def _sparsity(gm):
    weights = torch.cat([effective_weight(gm, layer).flatten() for layer in find_layers(gm)])
    return (weights == 0).float().mean().item()


def _distinct_nonzeros(gm):
    return {layer.name: torch.unique(effective_weight(gm, layer)[effective_weight(gm, layer) != 0]).numel()
            for layer in find_layers(gm)}


def _deep_compression_lenet300(gm, state, dense_params, report):
    assert _sparsity(gm) == pytest.approx(0.9, abs=1e-3)
    assert max(_distinct_nonzeros(gm).values()) <= 32  # 5-bit k-means
    assert state["accuracies"][-1] >= state["dense"] - 0.05 and state["dense"] > 0.8
    # the histograms' data: each layer's weights before k-means (from the fake-quant step) and its centroids
    assert all(w.before is not None and 1 < w.centroids.numel() <= 32 for w in report)


def _deep_compression_lenet5(gm, state, dense_params, report):
    assert _sparsity(gm) == pytest.approx(0.9, abs=1e-3)  # AGP ended at its target
    counts = _distinct_nonzeros(gm)
    assert counts["conv1"] <= 256 and counts["conv2"] <= 256 and counts["fc1"] <= 32 and counts["fc2"] <= 32
    assert [w.name for w in report] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(w.before is not None and w.centroids.numel() == counts[w.name] for w in report)


def _channel_pruning_resnet(gm, state, dense_params, report):
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())  # folded
    assert sum(p.numel() for p in gm.parameters()) < 0.6 * dense_params  # half the channels of each conv
    # no reference fits the pruned shapes, and nothing is quantized: every layer's plain weights, and no
    # centroids marked (distinct float weights share no value, however few they are)
    assert [w.name for w in report] == [layer.name for layer in find_layers(gm)] and len(report) == 11
    assert all(w.before is None and w.centroids is None for w in report)


def _integer_lenet5(gm, state, dense_params, report):
    integer_layers = {name.split(".")[0] for name, m in gm.named_modules() if isinstance(m, IntegerLayer)}
    assert integer_layers == {"conv1", "conv2", "fc1", "fc2"}
    fake_quant, integer = state["accuracies"]
    assert abs(integer - fake_quant) <= 0.02
    # the integer layers' grids and weights before quantization, read from the fake-quant step
    assert {w.name for w in report} == integer_layers
    assert all(w.before is not None and w.grid is not None and not w.codes_only for w in report)


CHECKS = {f.__name__.lstrip("_"): f for f in (_deep_compression_lenet300, _deep_compression_lenet5,
                                               _channel_pruning_resnet, _integer_lenet5)}


# recipes run and checked by a test file of their own
OWN_TESTS = {"hf_vit_digits": "test_hf_recipe.py"}


def test_every_shipped_recipe_is_checked():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(CHECKS) | set(OWN_TESTS) == set(shipped_recipes())


@pytest.fixture
def reports(monkeypatch):
    """(model, options, files) of each report a run writes, written without its pictures: what a run gives
    write_report is checked here, and the pictures are drawn where a test reads them (a run's report in
    tests/cli/test_run.py, every kind of layer in tests/report/). They cost a run 0.7-2 s of CPU."""
    calls = []

    def write(gm, path, **options):
        calls.append((gm, options, write_report(gm, path, pictures=False, **options)))
        return calls[-1][2]
    monkeypatch.setattr(run_module, "write_report", write)
    return calls


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_shipped_recipe_runs_quick(cli, tmp_path, name, reports):
    path = RECIPES / f"{name}.yaml"
    status, out, err = cli("run", name, "--quick", "--out", tmp_path)  # found by name
    assert status == 0, err
    state = json.loads((tmp_path / "state.json").read_text())
    recipe = load_recipe(path, quick=True)
    data = load_data(recipe, data_shape(recipe))
    gm = fxcompress.load(tmp_path / "model.fxc")
    accuracies = [s["accuracy"] for s in state["steps"]]
    assert evaluate(gm, data.test_x, data.test_y) == accuracies[-1]  # the file is the model the run measured
    dense = float(out.split("dense: accuracy ")[1].split()[0])
    dense_params = sum(p.numel() for p in torch.load(tmp_path / "dense.pt", weights_only=True).values())
    [(reported, options, files)] = reports
    assert evaluate(reported, data.test_x, data.test_y) == accuracies[-1]  # the report is of the final model
    assert files.html == tmp_path / "report.html" and files.markdown == tmp_path / "report.md"
    page = files.html.read_text()
    assert f"{path.name}: {recipe.model}" in page and "<svg" in page and f"{accuracies[-1]:.4f}" in page
    CHECKS[name](gm, {"dense": dense, "accuracies": accuracies}, dense_params,
                 layer_weights(reported, options["reference"]))
    assert "| dense |" in (tmp_path / "summary.md").read_text()
