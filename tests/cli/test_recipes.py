"""Each shipped recipe (fxcompress/recipes/*.yaml, found by name) runs with `fxcompress run --quick`, and its file holds what the
recipe asked for: the sparsity, the codebook sizes, the removed channels, the integer layers."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.cli.recipe import load_recipe, shipped_recipes
from fxcompress.cli.run import data_shape, load_data
from fxcompress.layers import effective_weight, find_layers
from fxcompress.quant.integer import IntegerLayer
from fxcompress.training import evaluate

RECIPES = Path(fxcompress.__file__).resolve().parent / "recipes"


def _sparsity(gm):
    weights = torch.cat([effective_weight(gm, layer).flatten() for layer in find_layers(gm)])
    return (weights == 0).float().mean().item()


def _distinct_nonzeros(gm):
    return {layer.name: torch.unique(effective_weight(gm, layer)[effective_weight(gm, layer) != 0]).numel()
            for layer in find_layers(gm)}


def _deep_compression_lenet300(gm, state, dense_params):
    assert _sparsity(gm) == pytest.approx(0.9, abs=1e-3)
    assert max(_distinct_nonzeros(gm).values()) <= 32  # 5-bit k-means
    assert state["accuracies"][-1] >= state["dense"] - 0.05 and state["dense"] > 0.8


def _deep_compression_lenet5(gm, state, dense_params):
    assert _sparsity(gm) == pytest.approx(0.9, abs=1e-3)  # AGP ended at its target
    counts = _distinct_nonzeros(gm)
    assert counts["conv1"] <= 256 and counts["conv2"] <= 256 and counts["fc1"] <= 32 and counts["fc2"] <= 32


def _channel_pruning_resnet(gm, state, dense_params):
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())  # folded
    assert sum(p.numel() for p in gm.parameters()) < 0.6 * dense_params  # half the channels of each conv


def _integer_lenet5(gm, state, dense_params):
    integer_layers = {name.split(".")[0] for name, m in gm.named_modules() if isinstance(m, IntegerLayer)}
    assert integer_layers == {"conv1", "conv2", "fc1", "fc2"}
    fake_quant, integer = state["accuracies"]
    assert abs(integer - fake_quant) <= 0.02


CHECKS = {f.__name__.lstrip("_"): f for f in (_deep_compression_lenet300, _deep_compression_lenet5,
                                               _channel_pruning_resnet, _integer_lenet5)}


# recipes run and checked by a test file of their own
OWN_TESTS = {"hf_vit_digits": "test_hf_recipe.py"}


def test_every_shipped_recipe_is_checked():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == set(CHECKS) | set(OWN_TESTS) == set(shipped_recipes())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_shipped_recipe_runs_quick(cli, tmp_path, name):
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
    CHECKS[name](gm, {"dense": dense, "accuracies": accuracies}, dense_params)
    assert "| dense |" in (tmp_path / "summary.md").read_text()
