"""Smoke test of examples/prune_lenet.py on digits: the staged global recipe reaches its sparsity."""
import runpy
from pathlib import Path

import pytest

from fxcompress.datasets import load_dataset
from fxcompress.training import torch_threads

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prune_lenet.py"


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # tiny models: one thread is fastest, and does not stall on shared cores
        yield


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_iterative_pruning_on_digits(name):
    example = runpy.run_path(str(EXAMPLE))
    recipe = example["Recipe"](stages=(0.5, 0.7), dense_epochs=6, stage_epochs=2, retrain_lr=1e-3)
    row = example["prune_iteratively"](name, load_dataset("digits"), recipe)
    assert row["sparsity"] == pytest.approx(70.0, abs=0.01)
    assert row["dense"] > 85.0
    assert row["pruned"] >= row["dense"] - 5.0
    table = example["format_rows"]([row])
    assert f"| {name} | digits |" in table and "70.00" in table
