"""Exports of a compressed GraphModule: dense module (`decode`), per-layer sparse COO / CSR arrays, JSON / YAML of
float and integer weights (the CNN_Compress storage forms). The ONNX files (`to_onnx`, `to_onnx_int8`) live in
`fxcompress.onnx` and are importable from here too."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from torch.fx import GraphModule

from .encoded.decode import decode
from .encoded.tensor import grid_codebook
from .errors import ConfigError, MissingDependencyError
from .layers import effective_weight, find_layers
from .onnx import Dequantize, QuantizeDequantize, to_onnx, to_onnx_int8

__all__ = ["Dequantize", "QuantizeDequantize", "decode", "sparse_arrays", "to_json", "to_onnx", "to_onnx_int8",
           "to_yaml", "weights_as_data"]


def _matrices(gm: GraphModule) -> dict[str, np.ndarray]:
    """Each layer's effective weight as a 2-D array (output channels x the rest)."""
    return {layer.name: effective_weight(gm, layer).cpu().numpy().reshape(effective_weight(gm, layer).shape[0], -1)
            for layer in find_layers(gm)}


def sparse_arrays(gm: GraphModule, form: str = "csr") -> dict[str, dict[str, Any]]:
    """Per layer: `coo` (rows, cols, values) or `csr` (indptr, indices, values) of the nonzeros, plus shape."""
    if form not in ("coo", "csr"):
        raise ConfigError(f"sparse_arrays.form must be 'coo' or 'csr', got {form!r}")
    out = {}
    for name, matrix in _matrices(gm).items():
        rows, cols = np.nonzero(matrix)
        entry = {"shape": matrix.shape, "values": matrix[rows, cols]}
        if form == "coo":
            entry |= {"rows": rows, "cols": cols}
        else:
            entry |= {"indptr": np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=matrix.shape[0]))]),
                      "indices": cols}
        out[name] = entry
    return out


def weights_as_data(gm: GraphModule, integer: bool = False) -> dict[str, Any]:
    """Plain data per layer: float weights, or (integer=True) integer codes with their codebook/scale."""
    data = {}
    for layer in find_layers(gm):
        weight = effective_weight(gm, layer).cpu().numpy().astype(np.float32)
        entry: dict[str, Any] = {"shape": list(weight.shape)}
        if not integer:
            entry["weight"] = weight.reshape(-1).tolist()
        else:
            grid = grid_codebook(weight.reshape(-1))
            if grid is not None:  # fixed-point / uniform: weight = scale * int
                entry |= {"scale": float(grid.data.view("<f4")[0]),
                          "int": (grid.symbols + grid.offset).astype(int).tolist()}
            else:  # weight sharing: weight = codebook[index]
                codebook, index = np.unique(weight.reshape(-1), return_inverse=True)
                entry |= {"codebook": codebook.tolist(), "index": index.astype(int).tolist()}
        data[layer.name] = entry
    return data


def to_json(gm: GraphModule, path: str | os.PathLike, integer: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(weights_as_data(gm, integer), f)


def to_yaml(gm: GraphModule, path: str | os.PathLike, integer: bool = False) -> None:
    try:
        import yaml
    except ImportError as exc:
        raise MissingDependencyError("to_yaml needs PyYAML: pip install 'fxcompress[yaml]'") from exc
    with open(path, "w") as f:
        # libyaml's emitter when PyYAML was built with it: the pure-Python one takes seconds per million numbers
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        yaml.dump(weights_as_data(gm, integer), f, Dumper=dumper, default_flow_style=True)
