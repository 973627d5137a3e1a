"""The torchvision zoo through the export front end: PruneChannels gives the model symbolic tracing gives.

A representative set (a fire-module CNN with concatenations; a MobileNetV3 with inverted residuals,
in-place hardswish, squeeze-excitation and in-place dropout); `benchmarks/torchvision_export.py` runs
every classification model (export takes seconds a model).
Random init (weights=None): nothing downloads. Needs the vision extra.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fxcompress
from fxcompress.passes import PruneChannels

models = pytest.importorskip("torchvision.models", reason="torchvision (the vision extra) is not installed")

REPRESENTATIVE = ["squeezenet1_0", "mobilenet_v3_small"]


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_export_prunes_to_the_same_model_as_symbolic_tracing(name):
    torch.manual_seed(0)
    model, x = models.get_model(name, weights=None).eval(), torch.randn(2, 3, 64, 64)
    traced = fxcompress.compile(model, [PruneChannels(amount=0.5)], (x,), frontend="fx")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an aten op left unspelled warns: none may
        exported = fxcompress.compile(model, [PruneChannels(amount=0.5)], (x,), frontend="export")
    assert exported.meta["frontend"] == "export"
    assert _params(exported) == _params(traced) < 0.6 * _params(model)
    with torch.no_grad():  # the same channels go: the two pruned models compute the same function
        torch.testing.assert_close(exported(x), traced(x), rtol=1e-5, atol=1e-5)
