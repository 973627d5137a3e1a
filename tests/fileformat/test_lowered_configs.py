"""Crafted configurations of the modules a lowering writes: a file whose native-integer modules declare values of
the wrong type or grids the kernels cannot run on is refused at load, naming the module and the value; it never
loads to fail (or run wrongly) at its first call. Found by mutating saved native models: a zero-point given as a
string reached oneDNN's argument parser, an output scale of 0 overflowed the C kernel's fixed-point multiplier."""
import functools
import math
import struct
import zlib
import typing
from collections.abc import Mapping, Sequence

import pytest
import torch

import fxcompress
from fxcompress.errors import FormatError
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.fileformat.graphdata import conforms
from fxcompress.passes import ActivationConfig, InsertFakeQuant, LowerToInteger

from layer_cases import NativeBlock

from .hostile import read_manifest, tensor_data, with_manifest


@functools.cache
def _saved():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    grids = ActivationConfig(bits=8, joins=True)
    gm = fxcompress.compile(NativeBlock().eval(), [
        InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True, activations=grids),
        LowerToInteger(backend="native", kernels=("int8",), repeats=1)], example_inputs=(x,), calibration_data=[x])
    return to_bytes(gm, example_inputs=(x,)), x, gm(x)


def _with_config(type_suffix, key, value):
    """The saved file with `key` of the first module whose type ends in `type_suffix` set to `value`; its path."""
    data, _, _ = _saved()
    manifest = read_manifest(data)
    entry = next(m for m in manifest["modules"] if m["type"].endswith(type_suffix) and key in m["config"])
    entry["config"][key] = value
    return with_manifest(data, manifest), entry["path"]


def test_the_model_has_every_native_module_kind():
    types = {m["type"].rpartition(".")[2] for m in read_manifest(_saved()[0])["modules"]}
    assert {"QuantizeToCodes", "NativeLayer", "NativeAdd", "NativeCat"} <= types


@pytest.mark.parametrize("type_suffix, key, value, match", [
    ("NativeLayer", "output_zero_point", "x", "config 'output_zero_point' is 'x', not a int"),
    ("NativeLayer", "input_scale", True, "config 'input_scale' is True, not a float"),
    ("NativeLayer", "stride", [1, "2"], "config 'stride' is \\[1, '2'\\], not a list\\[int\\] \\| None"),
    ("NativeAdd", "a", [0.1], "config 'a' is \\[0.1\\], not a tuple\\[float, int\\]"),
    ("NativeCat", "dim", 1.0, "config 'dim' is 1.0, not a int"),
])
def test_a_value_of_the_wrong_type_names_the_module_and_key(type_suffix, key, value, match):
    data, path = _with_config(type_suffix, key, value)
    with pytest.raises(FormatError, match=f"manifest: module '{path}': {match}"):
        from_bytes(data)


@pytest.mark.parametrize("type_suffix, key, value, match", [
    ("NativeLayer", "output_scale", 0.0, "the output grid needs a finite scale > 0"),
    ("NativeLayer", "input_zero_point", 256, "the input grid needs .* got scale=.*, zero_point=256"),
    ("NativeLayer", "accumulate", [0.1, -1], "accumulate"),
    ("QuantizeToCodes", "qmax", 1000, "the input grid needs .* qmax in 1..255"),
    ("QuantizeToCodes", "scale", -0.5, "the input grid needs a finite scale > 0"),
    ("NativeAdd", "b", [0.1, 300], "operand b needs"),
    ("NativeAdd", "high", 256, "the output codes \\[low, high\\] must lie in 0..255"),
    ("NativeCat", "grids", [[0.1, 0], [0.0, 0]], "operand 1 needs a finite scale > 0"),
])
def test_a_grid_the_kernels_cannot_run_on_is_refused_at_load(type_suffix, key, value, match):
    data, path = _with_config(type_suffix, key, value)
    with pytest.raises(FormatError, match=f"manifest: module '{path}': .*cannot be built .*{match}"):
        from_bytes(data)


def test_a_non_finite_scale_is_refused():
    data, path = _with_config("QuantizeToCodes", "scale", math.inf)
    with pytest.raises(FormatError, match=f"module '{path}': config 'scale' is inf, not a float"):
        from_bytes(data)


def test_a_layer_with_real_outputs_has_no_output_grid_to_break():
    """The head dequantizes: whatever output grid a file gives it is not used (oneDNN refused any but 1 / 0)."""
    data, x, expected = _saved()
    manifest = read_manifest(data)
    head = next(m for m in manifest["modules"] if m["type"].endswith("NativeLayer") and m["config"]["output"] == "float32")
    head["config"]["output_scale"], head["config"]["output_zero_point"] = 2.0 ** 31, 7
    with torch.no_grad():
        assert torch.equal(from_bytes(with_manifest(data, manifest))(x), expected)


@pytest.mark.parametrize("value, annotation, fits", [
    (3, int, True), (True, int, False), (3, float, True), (float("nan"), float, False), ([1, 2], list[int], True),
    ([1, 2.5], list[int], False), ([0.5, 3], tuple[float, int], True), ([0.5], tuple[float, int], False),
    ([[0.5, 3], [1, 0]], list[tuple[float, int]], True), (None, int | None, True), ("a", int | None, False),
    ({"x": 1.0}, Mapping[str, float], True), ({"x": "1"}, dict[str, float], False), ([1, 2], Sequence[int], True),
    ([1, "a"], tuple[int, ...], False), ({"anything": [1]}, dict[str, typing.Any], True), (object(), typing.Any, True),
])
def test_conforms(value, annotation, fits):
    assert conforms(value, annotation) is fits


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_a_weight_scale_that_is_not_finite_and_positive_is_refused(value):
    """Random bytes in a weight_scale tensor (checksum recomputed) made our C kernel's multiplier fail at the first
    call; the scales are checked with the tensors at load."""
    data, _, _ = _saved()
    manifest = read_manifest(data)
    entry = next(t for t in manifest["tensors"] if t["name"].endswith("weight_scale"))
    tensors = bytearray(tensor_data(data))
    tensors[entry["offset"]:entry["offset"] + 4] = struct.pack("<f", value)
    entry["crc32"] = zlib.crc32(bytes(tensors[entry["offset"]:entry["offset"] + entry["length"]]))
    layer = entry["name"].rpartition(".")[0]
    with pytest.raises(FormatError, match=f"module '{layer}': tensor 'weight_scale' holds a scale that is not "
                                          "finite and > 0"):
        from_bytes(with_manifest(data, manifest, bytes(tensors)))
