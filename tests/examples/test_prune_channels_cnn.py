"""Smoke test of examples/prune_channels_cnn.py on digits: half the conv channels go, reconstruction helps."""
import runpy
from pathlib import Path

from fxcompress.datasets import load_dataset
from fxcompress.training import torch_threads

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "prune_channels_cnn.py"


def test_channel_pruning_with_reconstruction_on_digits():
    example = runpy.run_path(str(EXAMPLE))
    data = load_dataset("digits")
    with torch_threads(1):
        model = example["trained_cnn"](data, 5)
        plain = example["prune"](model, data, "l1", False)
        rebuilt = example["prune"](model, data, "l1", True)
    assert plain["params"] == rebuilt["params"] < 0.5 * sum(p.numel() for p in model.parameters())
    assert rebuilt["accuracy"] > plain["accuracy"]
