"""Exports of a compressed GraphModule: dense module, per-layer sparse COO / CSR arrays, JSON / YAML of
float and integer weights (the CNN_Compress storage forms), ONNX of the decoded model with named inputs
and a dynamic batch, and the int8 QDQ ONNX of a fake-quant model that ONNX Runtime runs on its int8
kernels."""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_leaves

from .analyses.shapes import reads_values_as_sizes
from .encoded.decode import decode
from .encoded.tensor import grid_codebook
from .errors import ConfigError, MissingDependencyError, PreconditionError
from .layers import (KINDS, bias_arg, chain_module_node, constant_value, effective_weight, find_layers, input_arg,
                     layer_node)
from .quant import ActivationQuant, GridWeight, KMeansWeight
from .quant.channel_grid import per_channel_grid
from .quant.commuting import commutes_with_quantization
from .kernels.native import NativeAdd, NativeCat, NativeLayer, QuantizeToCodes
from .passes.lower_integer_graph import clamp_bounds, clamp_codes, is_relu
from .quant.quantizers import Grid, quantize
from .tracing import origin

__all__ = ["Dequantize", "QuantizeDequantize", "decode", "sparse_arrays", "to_json", "to_onnx", "to_onnx_int8",
           "to_yaml", "weights_as_data"]

NATIVE_MODULES = (NativeLayer, QuantizeToCodes, NativeAdd, NativeCat)  # oneDNN kernels: no ONNX operator

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


# ONNX: the TorchScript exporter's opsets from the first with per-channel QuantizeLinear (13) to its newest
OPSETS = (13, 20)
DEFAULT_OPSET = 17
BATCH = "batch"  # the symbolic first axis of every input and output under dynamic_batch
# the integer types ONNX quantizes to, each with its full range: QuantizeLinear saturates there
_ONNX_INTEGERS = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
_INT32_MAX = 2 ** 31 - 1


def to_onnx(gm: GraphModule, path: str | os.PathLike, example_inputs: tuple, *,
            input_names: list[str] | None = None, output_names: list[str] | None = None,
            dynamic_batch: bool = True, opset: int = DEFAULT_OPSET, quantized: bool = False) -> None:
    """Write `gm` as an ONNX model (needs the `onnx` extra).

    Inputs are named `input_names` (default: the GraphModule's placeholder names), outputs
    `output_names` (default: "output", or "output_0", "output_1", ...). With `dynamic_batch`, the
    first axis of every input and output is the symbol "batch", so any batch size runs. `quantized`
    writes the int8 QDQ form of a fake-quant model (see `to_onnx_int8`); otherwise the decoded
    dense float model.
    """
    _check_onnx()
    if not isinstance(gm, GraphModule):
        raise ConfigError(f"to_onnx needs a GraphModule from fxcompress.compile, got {type(gm).__name__}")
    if not isinstance(opset, int) or isinstance(opset, bool) or not OPSETS[0] <= opset <= OPSETS[1]:
        raise ConfigError(f"to_onnx.opset must be an int in [{OPSETS[0]}, {OPSETS[1]}], got {opset!r}")
    if not isinstance(dynamic_batch, bool) or not isinstance(quantized, bool):
        raise ConfigError(f"to_onnx.dynamic_batch and to_onnx.quantized must be True or False, "
                          f"got {dynamic_batch!r} and {quantized!r}")
    example_inputs = _check_inputs(gm, example_inputs)
    module = _quantize_dequantize(gm) if quantized else decode(gm)
    _refuse_native(module)
    _refuse_values_as_sizes(module)
    with torch.no_grad():
        outputs = [t for t in tree_leaves(module.eval()(*example_inputs)) if isinstance(t, torch.Tensor)]
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = _names("input_names", input_names, len(example_inputs), placeholders)
    outputs_named = _names("output_names", output_names, len(outputs),
                           ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    if set(inputs) & set(outputs_named):
        raise ConfigError(f"to_onnx: {sorted(set(inputs) & set(outputs_named))} name both an input and an output; "
                          "ONNX names each value once")
    axes, checks = None, [(example_inputs, outputs)]
    if dynamic_batch:
        checks.append(_another_batch(module, example_inputs, outputs))
        axes = {name: {0: BATCH} for name, t in zip(inputs, example_inputs) if t.ndim}
        axes |= {name: {0: BATCH} for name, t in zip(outputs_named, outputs) if t.ndim}
    _respell_for_onnx(module)
    # written beside the target and moved there once ONNX Runtime ran it: no half-written or failing file is left
    path = os.fspath(path)
    partial = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter has the QDQ symbolics
            try:
                torch.onnx.export(module, tuple(example_inputs), partial, dynamo=False, input_names=inputs,
                                  output_names=outputs_named, dynamic_axes=axes, opset_version=opset,
                                  # QDQ functions export by their symbolic; inlined, their traced bodies break it
                                  autograd_inlining=not quantized)
            except torch.onnx.errors.UnsupportedOperatorError as exc:
                raise ConfigError(f"to_onnx: {exc}; {_nodes_calling(module, exc)}") from exc
            except torch.onnx.errors.OnnxExporterError as exc:
                raise ConfigError(f"to_onnx: the ONNX exporter failed: {_first_line(exc)}") from exc
        _run_in_onnx_runtime(partial, inputs, outputs_named, checks, compare_values=not quantized)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


# how far ONNX Runtime's float outputs may be from the graph's, relative to the outputs' size (at least 1): float32
# rounding in another order of sums is far below it; an op the exporter wrote otherwise is far above it
RUNTIME_TOLERANCE = 1e-3


def _run_in_onnx_runtime(path: str, input_names: list[str], output_names: list[str],
                         checks: list[tuple[tuple, list[torch.Tensor]]], compare_values: bool) -> None:
    """Run the written file in ONNX Runtime on each (inputs, the graph's outputs) of `checks`: it must load, run,
    give outputs of the graph's shapes and, with `compare_values` (the float export; an int8 QDQ model runs other
    kernels than the fake-quant graph), the graph's values within RUNTIME_TOLERANCE. The exporter translates op
    by op and some translations are wrong for some graphs (ONNX Runtime then fails far from the cause, at every
    batch): such a file is refused here, not left for the user to find. Without onnxruntime, not run."""
    try:
        import onnxruntime
    except ImportError:
        return
    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
        raise ConfigError(f"to_onnx: ONNX Runtime cannot load the exported model: {_first_line(exc)}") from exc
    takes = {value.name for value in session.get_inputs()}
    for batch_inputs, expected in checks:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(input_names, batch_inputs) if name in takes}
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in zip(input_names, batch_inputs))
        try:
            got = session.run(output_names, feed)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own exception types
            raise ConfigError(f"to_onnx: the exported model fails in ONNX Runtime on {shapes} where the graph runs "
                              f"(the exporter wrote an op otherwise than torch computes it): "
                              f"{_first_line(exc)}") from exc
        for name, value, reference in zip(output_names, got, expected):
            reference = reference.detach().cpu()
            if tuple(value.shape) != tuple(reference.shape):
                raise ConfigError(f"to_onnx: output {name!r} of the exported model on {shapes} is {value.shape}, "
                                  f"the graph's {tuple(reference.shape)}")
            if not compare_values or reference.numel() == 0:
                continue
            if not reference.is_floating_point():
                same = np.array_equal(value, reference.numpy())
            else:
                difference = float(np.abs(value.astype(np.float64) - reference.double().numpy()).max())
                same = difference <= RUNTIME_TOLERANCE * max(1.0, float(reference.abs().max()))
            if not same:
                raise ConfigError(f"to_onnx: output {name!r} of the exported model on {shapes} differs from the "
                                  "graph's in ONNX Runtime (the exporter wrote an op otherwise than torch computes it)")


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def _another_batch(module: GraphModule, example_inputs: tuple, outputs: list[torch.Tensor]
                   ) -> tuple[tuple, list[torch.Tensor]]:
    """The example with each input's first row appended once more, and the graph's outputs on it, which must be
    one row longer. A file with a symbolic batch must compute one: the exporter traces the graph as it is, and a
    graph with the example's batch written into its sizes (a program the user exported with static shapes)
    gives a file that ONNX Runtime refuses at another batch, with a reshape error far from the cause."""
    sizes = {t.shape[0] for t in example_inputs if t.ndim}
    longer = tuple(torch.cat([t, t[:1]]) if t.ndim else t for t in example_inputs)
    got: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            got = [t for t in tree_leaves(module(*longer)) if isinstance(t, torch.Tensor)]
        failure = None if [t.shape[:1] for t in got] == [(t.shape[0] + 1,) if t.ndim else () for t in outputs] \
            else "its outputs do not grow with it"
    except Exception as exc:  # noqa: BLE001 - reported below, with what the graph raised
        failure = _first_line(exc)
    if failure is not None and sizes:
        raise ConfigError(f"to_onnx: dynamic_batch=True, but the graph does not run a batch other than the "
                          f"example's {sorted(sizes)} as one ({failure}); a symbolic batch needs sizes that follow "
                          "the inputs' first dimension (a program exported with static shapes holds the example's) "
                          "and outputs with the batch first: compile the model itself or export it with a dynamic "
                          "batch (torch.export.Dim), or pass dynamic_batch=False")
    return longer, got


def _diff_as_slices(input: torch.Tensor, n: int = 1, dim: int = -1, prepend: torch.Tensor | None = None,
                    append: torch.Tensor | None = None) -> torch.Tensor:
    """torch.diff written with ops the exporter has: `n` times each element minus the one before it along `dim`,
    after joining `prepend` and `append`."""
    parts = [t for t in (prepend, input, append) if t is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else input
    for _ in range(n):
        x = x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)
    return x


def _cumsum_counting(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.cumsum with a bool input counted as int64, torch's own result type (ONNX's CumSum takes no bool)."""
    if dtype is None and input.dtype == torch.bool:
        dtype = torch.int64
    return torch.cumsum(input, dim, dtype=dtype)


def _repeat_interleave_as_expand(input: torch.Tensor, repeats: int | torch.Tensor, dim: int | None = None, *,
                                 output_size: int | None = None) -> torch.Tensor:
    """torch.repeat_interleave of a whole number of repeats along `dim` as a broadcast and a flatten: the exporter's
    own translation lost the rank of what followed (transformers 5's Cohere rotary embedding: the file failed in
    ONNX Runtime at every batch size). Repeats per element, or no dim, stay torch's op."""
    if not isinstance(repeats, int) or dim is None or input.dim() == 0:
        return torch.repeat_interleave(input, repeats, dim, output_size=output_size)
    dim %= input.dim()
    broadcast = [-1] * (input.dim() + 1)
    broadcast[dim + 1] = repeats
    return input.unsqueeze(dim + 1).expand(*broadcast).flatten(dim, dim + 1)


# Calls the TorchScript exporter cannot write as torch makes them, each with an equal spelling it can: Hugging
# Face's attention masks (transformers 5) take the diff of position ids and the cumsum of a bool tensor.
ONNX_RESPELLINGS = {torch.diff: _diff_as_slices, torch.cumsum: _cumsum_counting,
                    torch.repeat_interleave: _repeat_interleave_as_expand}
ONNX_METHOD_RESPELLINGS = {"diff": _diff_as_slices, "cumsum": _cumsum_counting,
                           "repeat_interleave": _repeat_interleave_as_expand}


def _respell_for_onnx(module: GraphModule) -> None:
    """Rewrite, in `module` (the exported copy), the calls of ONNX_RESPELLINGS into their exportable twins."""
    changed = False
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in ONNX_RESPELLINGS:
            node.target = ONNX_RESPELLINGS[node.target]
        elif node.op == "call_method" and node.target in ONNX_METHOD_RESPELLINGS:
            node.op, node.target = "call_function", ONNX_METHOD_RESPELLINGS[node.target]
        else:
            continue
        changed = True
    if changed:
        module.recompile()


def _nodes_calling(module: GraphModule, exc: Exception) -> str:
    """The graph's nodes that call the operator an exporter error names ('aten::diff'), with their origin."""
    found = re.search(r"'(?:aten|prim)::(\w+)'", str(exc))
    name = found.group(1) if found else None
    nodes = [node for node in module.graph.nodes if name and node.op in ("call_function", "call_method")
             and (node.target == name or getattr(node.target, "__name__", None) == name
                  or str(node.target).split(".")[-2:-1] == [name])]
    if not nodes:
        return "no node of the graph calls it by that name (a module or function it calls does)"
    return "called by " + "; ".join(f"node {node.name!r} ({origin(node)})" for node in nodes[:5]) + \
        (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")


def _refuse_values_as_sizes(gm: GraphModule) -> None:
    """ONNX's exporter traces the model once: a size read from tensor values (a mixture of experts' rows per
    expert, `.item()`, `nonzero`) becomes a constant of the example, and the file computes something else for
    any input routed otherwise (a Mixtral's logits left the model's by 0.016 on another batch of tokens)."""
    found = next((node for node in gm.graph.nodes if reads_values_as_sizes(node)), None)
    if found is not None:
        raise ConfigError(f"to_onnx: node {found.name!r} ({found.format_node()[:120]}) reads tensor values as "
                          "sizes, which the ONNX exporter would fix at the example's values, so the file would "
                          "compute something else for other inputs; save with fxcompress.save, or export a model "
                          "without data-dependent sizes")


def to_onnx_int8(gm: GraphModule, path: str | os.PathLike, example_inputs: tuple, **options: Any) -> None:
    """The int8 QDQ ONNX model of a fake-quant GraphModule: `to_onnx(..., quantized=True)`.

    Every calibrated ActivationQuant becomes QuantizeLinear -> DequantizeLinear with its scale and
    zero point (uint8 for asymmetric grids, int8 for symmetric ones); every linear / fixed-point
    weight grid of at most 8 bits becomes int8 (uint8 when asymmetric) codes -> DequantizeLinear
    with our per-channel scales on axis 0; a bias next to an input grid becomes int32 codes at the
    accumulator's scale (input scale times weight scale), as LowerToInteger rounds it. ONNX Runtime
    fuses these pairs into its int8 kernels (QLinearConv, QLinearMatMul / QGemm, QLinearAdd). A layer
    whose output reaches a grid through ReLU, ReLU6 / hardtanh / clamp with constant bounds, max pooling
    or flatten quantizes where it writes (the clamps become the range of its codes, exactly: rounding is
    monotone), and a grid narrower than its integer type clips its codes after QuantizeLinear, so each
    such layer runs on ORT's int8 kernel.
    """
    to_onnx(gm, path, example_inputs, quantized=True, **options)


def _check_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("to_onnx needs onnx: pip install 'fxcompress[onnx]'") from exc


def _check_inputs(gm: GraphModule, example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(f"to_onnx.example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"to_onnx.example_inputs[{i}] must be a tensor, got {type(t).__name__}")
    count = sum(n.op == "placeholder" for n in gm.graph.nodes)
    if len(example_inputs) != count:
        raise ConfigError(f"to_onnx.example_inputs holds {len(example_inputs)} tensors but the model takes {count}")
    return tuple(example_inputs)


def _names(field: str, names: Any, count: int, default: list[str]) -> list[str]:
    """`names` checked (a list of `count` distinct non-empty strings), or `default`."""
    if names is None:
        return default
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ConfigError(f"to_onnx.{field} must be a list of strings, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ConfigError(f"to_onnx.{field}: {bad!r} are not names (non-empty strings)")
    if len(names) != count:
        raise ConfigError(f"to_onnx.{field} gives {len(names)} names {list(names)} but the model has {count}")
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"to_onnx.{field} repeats {repeated}; each value needs its own name")
    return list(names)


def _refuse_native(module: nn.Module) -> None:
    for name, m in module.named_modules():
        if isinstance(m, NATIVE_MODULES):
            raise PreconditionError(f"to_onnx: module '{name}' ({type(m).__name__}) runs oneDNN kernels that ONNX "
                                    "has no operator for; export the fake-quant model it was lowered from with "
                                    "to_onnx(..., quantized=True)")


class _QuantizeDequantizeFn(torch.autograd.Function):
    """Fake-quant of an activation onto codes [qmin, qmax]; exports as QuantizeLinear [-> Clip of the codes]
    -> DequantizeLinear (int8: QuantizeLinear [-> DequantizeLinear -> Clip -> QuantizeLinear] -> DequantizeLinear)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool):
        q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)  # fake_quantize's arithmetic
        return (q - zero_point) * scale

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool):
        dtype = torch.int8 if signed else torch.uint8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        codes = g.op("QuantizeLinear", x, s, z)
        # QuantizeLinear saturates at the type's ends, not the grid's: a Clip after it, since one before it
        # would keep ORT from fusing the layer that writes x with QuantizeLinear. ORT runs uint8 codes
        # through a Clip of the codes; int8 ones only in Q -> DQ pairs (it turns them into uint8 for its
        # kernels), so their clamp runs on their values, at the grid points of qmin and qmax
        if (qmin, qmax) != _ONNX_INTEGERS[dtype] and not signed:
            codes = g.op("Clip", codes, *[g.op("Constant", value_t=torch.tensor(q, dtype=dtype)) for q in (qmin, qmax)])
        elif (qmin, qmax) != _ONNX_INTEGERS[dtype]:
            bounds = [g.op("Constant", value_t=torch.tensor((q - zero_point) * scale, dtype=torch.float32))
                      for q in (qmin, qmax)]
            codes = g.op("QuantizeLinear", g.op("Clip", g.op("DequantizeLinear", codes, s, z), *bounds), s, z)
        return g.op("DequantizeLinear", codes, s, z)


class _DequantizeFn(torch.autograd.Function):
    """Stored integer codes to float; exports as DequantizeLinear (per channel on `axis`, or per tensor)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int | None):
        shape = [-1 if d == axis else 1 for d in range(codes.ndim)] if axis is not None else []
        return ((codes.to(torch.float32) - zero_point.to(torch.float32).reshape(shape))
                * scale.reshape(shape))

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int | None):
        if axis is None:
            return g.op("DequantizeLinear", codes, scale, zero_point)
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class QuantizeDequantize(nn.Module):
    """An activation grid as ONNX sees it: QuantizeLinear -> DequantizeLinear (uint8, or int8 if signed)."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool) -> None:
        super().__init__()
        self.scale, self.zero_point, self.qmin, self.qmax, self.signed = scale, zero_point, qmin, qmax, signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeDequantizeFn.apply(x, self.scale, self.zero_point, self.qmin, self.qmax, self.signed)


class Dequantize(nn.Module):
    """Stored integer codes (a weight or a bias) -> DequantizeLinear; per channel on `axis`, or per tensor."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 axis: int | None) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", zero_point.to(codes.dtype))

    def forward(self) -> torch.Tensor:
        return _DequantizeFn.apply(self.codes, self.scale, self.zero_point, self.axis)


def _qdq_type(module: QuantizeDequantize) -> torch.dtype:
    return torch.int8 if module.signed else torch.uint8


def _integer_type(qmin: int, qmax: int) -> torch.dtype | None:
    """The ONNX integer type holding every code of [qmin, qmax]: int8 first, then uint8; None if neither."""
    return next((t for t in (torch.int8, torch.uint8) if _ONNX_INTEGERS[t][0] <= qmin and qmax <= _ONNX_INTEGERS[t][1]),
                None)


def _activation_grids(gm: GraphModule) -> dict[Node, Grid]:
    """Each ActivationQuant node's grid, its module swapped for QuantizeDequantize."""
    grids = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, ActivationQuant):
            continue
        grid = module.grid() if module.enabled else None
        if grid is None:
            raise PreconditionError(f"to_onnx(quantized=True): the activation fake-quant '{node.target}' is "
                                    "disabled or has observed nothing; compile with calibration_data first")
        signed = grid.qmin < 0
        low, high = _ONNX_INTEGERS[torch.int8 if signed else torch.uint8]
        if not low <= grid.qmin <= grid.qmax <= high:
            raise PreconditionError(f"to_onnx(quantized=True): the activation grid '{node.target}' spans codes "
                                    f"[{grid.qmin}, {grid.qmax}] ({module.bits} bits); QDQ ONNX holds at most 8")
        gm.add_submodule(node.target, QuantizeDequantize(float(grid.scale), int(grid.zero_point), grid.qmin,
                                                         grid.qmax, signed))
        grids[node] = grid
    return grids


def _quantize_dequantize(gm: GraphModule) -> GraphModule:
    """A copy of fake-quant `gm` whose grids are QDQ modules and whose weights are stored integer codes."""
    gm = copy.deepcopy(gm)
    grids = _activation_grids(gm)
    weights = 0
    for layer in find_layers(gm):
        node = layer_node(gm, layer)
        chain = chain_module_node(gm, node, (GridWeight, KMeansWeight))
        if chain is None:
            continue  # a float layer (mixed precision) stays float
        _quantize_layer(gm, layer, node, chain, grids.get(input_arg(node)))
        _quantize_output_early(gm, node, grids)
        weights += 1
    if not grids and not weights:
        raise PreconditionError("to_onnx(quantized=True): the model has no activation or weight fake-quant; run "
                                "InsertFakeQuant(method='linear', bits=8, activations=ActivationConfig(bits=8)) "
                                "with calibration_data first")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unread_tensors(gm)
    gm.recompile()
    return gm


def _drop_unread_tensors(gm: GraphModule) -> None:
    """Delete the float weights (and masks) the integer codes replaced: the exporter would keep them."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = tuple(f"{n.target}." for n in gm.graph.nodes if n.op == "call_module")
    tensors = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    tensors += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    for name in tensors:
        if name not in read and not name.startswith(called):
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)


def _quantize_output_early(gm: GraphModule, node: Node, grids: dict[Node, Grid]) -> None:
    """Quantize the layer's output where the layer writes it when it reaches a grid through code-safe ops
    only (clamps with constant bounds, ReLU among them; max pooling, flatten and others that move values):
    a layer -> QuantizeLinear pair that ORT fuses into QLinearConv / QGemm.

    The same values: rounding q onto a grid is monotone, so q(clamp(x, lo, hi)) = clamp(q(x), q(lo), q(hi))
    and the ops that move values commute with it and with clamps. The clamps leave the graph and their
    codes become the range of the layer's own QDQ (a Clip of the codes after QuantizeLinear, none where
    they are the grid's ends: the grid saturates there itself); the grid after the ops stays."""
    found = _grid_reached(gm, node, grids)
    if found is None:
        return
    steps, target = found
    grid, module = grids[target], gm.get_submodule(target.target)
    low, high = _code_range(gm, steps, grid, _ONNX_INTEGERS[_qdq_type(module)])
    clamps = [step for step in steps if _clamp(gm, step) is not None]
    for step in clamps:
        step.replace_all_uses_with(step.args[0])
        gm.graph.erase_node(step)
    if not steps:
        return  # the layer writes straight into its grid: layer -> QuantizeLinear already
    name = f"{node.name}_output_quant"
    gm.add_submodule(name, QuantizeDequantize(module.scale, module.zero_point, low, high, module.signed))
    if len(steps) == len(clamps):  # only clamps: the grid itself takes their range (its own module: a
        target.target = name       # grid module called elsewhere keeps its range there)
        return
    with gm.graph.inserting_after(node):
        early = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(early, delete_user_cb=lambda u: u is not early)


def _grid_reached(gm: GraphModule, node: Node, grids: dict[Node, Grid]) -> tuple[list[Node], Node] | None:
    """The code-safe ops from `node` (each the only user of the one before, reading it first) to the
    activation grid they reach, and that grid's node; None if another op or a fork comes first."""
    current, steps = node, []
    while len(current.users) == 1:
        (user,) = current.users
        if user in grids:
            return steps, user
        if not user.args or user.args[0] is not current \
                or not (commutes_with_quantization(gm, user) or _clamp(gm, user) is not None):
            return None
        current = user
        steps.append(user)
    return None


def _clamp(gm: GraphModule, node: Node) -> tuple[float | None, float | None] | None:
    """A clamp's constant (low, high) (LowerToInteger's table; ReLU is (0, None)); None for any other node."""
    return (0.0, None) if is_relu(gm, node) else clamp_bounds(gm, node)


def _code_range(gm: GraphModule, steps: list[Node], grid: Grid, codes: tuple[int, int]) -> tuple[int, int]:
    """The codes [low, high] that the clamps among `steps`, in order, then `grid` leave of the integer type's
    `codes`: clamps compose into one clamp, whose bounds are where the lowest and highest codes go."""
    whole = Grid(grid.scale, grid.zero_point, *codes)  # the layer's rounding saturates at the type's ends
    low, high = codes
    for step in steps:
        if (bounds := _clamp(gm, step)) is not None:
            a, b = clamp_codes(whole, bounds)
            low, high = min(max(low, a), b), min(max(high, a), b)  # torch.clamp: max first, then min
    return min(max(low, grid.qmin), grid.qmax), min(max(high, grid.qmin), grid.qmax)


def _quantize_layer(gm: GraphModule, layer: Any, node: Node, chain: Node, input_grid: Grid | None) -> None:
    """Replace the layer's weight chain by integer codes -> DequantizeLinear, and its bias by int32 codes."""
    quantizer = gm.get_submodule(chain.target)
    if not isinstance(quantizer, GridWeight) or not quantizer.enabled:
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has a {type(quantizer).__name__} "
                                "weight (k-means codebooks are no integer grid) or a disabled one; QDQ needs an "
                                "enabled linear / fixed-point grid")
    weight = constant_value(gm, chain.args[0])
    grid = per_channel_grid(quantizer, weight)
    if isinstance(grid, str):
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' ({chain.target}): {grid}; QDQ ONNX "
                                "holds one weight scale per output channel or tensor")
    dtype = _integer_type(grid.qmin, grid.qmax)
    if dtype is None:
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has {quantizer.bits}-bit weight codes "
                                f"[{grid.qmin}, {grid.qmax}]; QDQ ONNX holds at most 8 bits")
    axis = quantizer.axis
    # DequantizeLinear's axis 0 is the output channel of conv and Gemm weights; an embedding's table has no
    # accumulator, and its rows are gathered from the dequantized table on any axis
    if axis not in (None, 0) and KINDS[layer.kind].family != "embedding":
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has per-channel weight scales on "
                                f"axis {axis}; only axis 0 or per-tensor grids are exported")
    codes = quantize(weight, grid, axis).to(dtype)
    _replace(gm, chain, f"{layer.name}.weight_dequantize",
             Dequantize(codes, grid.scale, grid.zero_point.round(), axis))
    bias = bias_arg(node)
    if bias is None or input_grid is None:
        return  # without an input grid the layer's accumulator has no scale: the bias stays float
    scale = (input_grid.scale.float() * grid.scale.float()).expand(weight.shape[0])
    bias_codes = torch.round(constant_value(gm, bias).float() / scale)
    if bias_codes.abs().max() > _INT32_MAX:
        raise PreconditionError(f"to_onnx(quantized=True): layer '{layer.name}' has a bias beyond int32 at the "
                                f"accumulator's scale (largest |code| {bias_codes.abs().max():.3g})")
    _replace(gm, bias, f"{layer.name}.bias_dequantize",
             Dequantize(bias_codes.to(torch.int32), scale, torch.zeros_like(scale), 0), users=[node])


def _replace(gm: GraphModule, node: Node, target: str, module: nn.Module, users: list[Node] | None = None) -> None:
    """A call_module of `module` (no inputs) in place of `node` for `users` (default: all of them)."""
    gm.add_submodule(target, module)
    with gm.graph.inserting_before(node if node.op != "get_attr" else next(iter(users or node.users))):
        new = gm.graph.call_module(target, ())
    for user in list(users or node.users):
        user.replace_input_with(node, new)
