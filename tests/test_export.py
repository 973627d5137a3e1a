"""Exports: sparse arrays rebuild the weights; JSON / YAML float and integer forms are exact."""
import json

import numpy as np
import pytest
import torch

import fxcompress
from fxcompress import export
from fxcompress.errors import ConfigError
from fxcompress.layers import effective_weight, find_layers, insert_on_weight
from fxcompress.passes import LowerToEncoded
from small_lenet import SmallLeNet


@pytest.fixture(scope="module")
def lowered():
    x = torch.randn(2, 1, 8, 8)
    # 1.5 K weights: the exports are exact whatever the size, and YAML's emitter and parser take seconds per
    # 100 K numbers
    gm = fxcompress.compile(SmallLeNet(conv1=(4, 3), conv2=(8, 3), hidden=24).eval(), [], example_inputs=(x,))
    for layer in find_layers(gm):
        def build(graph, weight):  # prune small weights and round to multiples of 1/64
            kept = graph.call_function(torch.mul, (weight, graph.call_function(torch.gt, (
                graph.call_function(torch.abs, (weight,)), 0.01))))
            return graph.call_function(torch.mul, (graph.call_function(torch.round, (
                graph.call_function(torch.mul, (kept, 64.0)),)), 1 / 64))
        insert_on_weight(gm, layer, build)
    gm.recompile()
    return fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,)), x


def _weights(gm):
    return {layer.name: effective_weight(gm, layer).numpy() for layer in find_layers(gm)}


@pytest.mark.parametrize("form", ["coo", "csr"])
def test_sparse_arrays_rebuild_the_weights(lowered, form):
    gm, _ = lowered
    for name, entry in export.sparse_arrays(gm, form).items():
        weight = _weights(gm)[name]
        matrix = np.zeros(entry["shape"], np.float32)
        if form == "coo":
            matrix[entry["rows"], entry["cols"]] = entry["values"]
        else:
            rows = np.repeat(np.arange(entry["shape"][0]), np.diff(entry["indptr"]))
            matrix[rows, entry["indices"]] = entry["values"]
        assert np.array_equal(matrix.reshape(weight.shape), weight)
        assert len(entry["values"]) == np.count_nonzero(weight)


def test_json_float_and_integer_forms(lowered, tmp_path):
    gm, _ = lowered
    export.to_json(gm, tmp_path / "f.json")
    export.to_json(gm, tmp_path / "i.json", integer=True)
    floats, ints = json.loads((tmp_path / "f.json").read_text()), json.loads((tmp_path / "i.json").read_text())
    for name, weight in _weights(gm).items():
        assert np.array_equal(np.float32(floats[name]["weight"]).reshape(weight.shape), weight)
        entry = ints[name]
        rebuilt = np.float32(entry["int"]).astype(np.float32) * np.float32(entry["scale"])
        assert np.array_equal(rebuilt.reshape(weight.shape), weight)


def test_yaml_integer_form(lowered, tmp_path):
    yaml = pytest.importorskip("yaml")
    gm, _ = lowered
    export.to_yaml(gm, tmp_path / "i.yaml", integer=True)
    data = yaml.load((tmp_path / "i.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert set(data) == {"conv1", "conv2", "fc1", "fc2"}


def test_onnx_of_the_decoded_model(lowered, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    gm, x = lowered
    export.to_onnx(gm, tmp_path / "m.onnx", (x,))
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


def test_bad_form():
    with pytest.raises(ConfigError, match="form"):
        export.sparse_arrays(None, "dia")
