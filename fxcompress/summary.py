"""summary(gm): one row per weight-bearing layer — size, sparsity, bits, bytes, MACs — and totals.

Bytes are exact for layers whose weight chain holds an encoded weight (`storage_bytes()`), and
estimated otherwise: the weights at the chain's bits each, stored dense or, when that is smaller,
as nonzeros plus relative indices (Deep Compression's 5 bits for fc, 8 for conv); plus what the
quantizer needs to decode them (`_decoding_bytes`: a k-means codebook as held, a linear grid's
scales and zero-points, one per grid, or 2^bits fp32 entries for any other quantizer), plus the
bias as stored. A bias shared by two calls of one layer is counted once, as a tied weight is.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import TensorMetadata

from .analyses.shapes import propagate_shapes
from .history import format_history
from .kernels.dynamic import DynamicInt8Linear
from .kernels.sparse import SparseLayer
from .kernels.weight_only import TiedEmbedding, WeightOnlyLinear
from .quant.integer import IntegerLayer
from .quant.modules import GridWeight, KMeansWeight
from .quant.quantizers import SCALE_DTYPES
from .kernels.native import NativeLayer
from .layers import (Layer, WeightTransform, bias_arg, chain_transforms, constant_value, effective_weight,
                     find_layers, layer_node, weight_arg)

COLUMNS = ("layer", "op", "weight_shape", "params", "nonzeros", "sparsity", "bits", "sqnr_db",
           "dense_bytes", "compressed_bytes", "exact", "macs", "macs_effective", "kernel", "latency_ms")
_INDEX_BITS = {"linear": 5}  # relative-index width Deep Compression uses; 8 for every conv


@dataclass(frozen=True)
class Summary:
    """The table of `summary()`: `rows` (list of dicts, one per layer), `totals`, and the pass history."""

    rows: tuple[dict[str, Any], ...]
    totals: dict[str, Any]
    history: str

    def __str__(self) -> str:
        return self.to_text()

    def _cells(self) -> list[list[str]]:
        return [[_fmt(row.get(c)) for c in COLUMNS] for row in (*self.rows, self.totals)]

    def to_text(self, with_history: bool = True) -> str:
        cells = [list(COLUMNS), *self._cells()]
        widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in cells]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        lines.append(f"compression ratio {self.totals['ratio']:.2f}x "
                     f"({'exact' if self.totals['exact'] == 'yes' else 'estimated'} bytes)")
        if with_history:
            lines += ["", "passes:", self.history]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        head = "| " + " | ".join(COLUMNS) + " |"
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
        body = ["| " + " | ".join(r) + " |" for r in self._cells()]
        return "\n".join([head, rule, *body, "", f"Compression ratio: **{self.totals['ratio']:.2f}x**"])


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def _output_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _input_shape(layer: Layer, node) -> tuple[int, ...] | None:
    position = layer.spec.input_pos if node.op == "call_function" else 0
    first = node.args[position] if len(node.args) > position else None
    return _output_shape(first) if first is not None and hasattr(first, "meta") else None


def _macs(layer: Layer, weight: torch.Tensor, node) -> int | None:
    """Multiply-accumulates of the layer for one forward on the example inputs (shape-propagated)."""
    if layer.spec.family == "embedding":
        return 0  # a table lookup multiplies nothing
    if layer.spec.is_transposed:
        shape = _input_shape(layer, node)  # every input element is multiplied by Cout/groups * kernel weights
        return None if shape is None else math.prod(shape) * (weight.numel() // weight.shape[0])
    return _output_macs(_output_shape(node), weight)


def _output_macs(shape: tuple[int, ...] | None, weight: torch.Tensor) -> int | None:
    """Every output element needs weight.numel() / out_features multiply-accumulates."""
    return None if shape is None else math.prod(shape) * (weight.numel() // weight.shape[0])


def _sqnr(gm: GraphModule, node, weight: torch.Tensor) -> float | None:
    """SQNR (dB) of the effective weight against the input of the chain's first quantizing transform."""
    current, reference = weight_arg(node), None
    while current is not None and current.op != "get_attr":
        if current.op == "call_module" and getattr(gm.get_submodule(current.target), "bits", None):
            reference = current.args[0] if current.args else None
        first = current.args[0] if current.args else None
        current = first if hasattr(first, "op") else None
    if reference is None:
        return None
    ref = constant_value(gm, reference).double()
    noise = (ref - weight.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else None


def _bias_key(node) -> str | None:
    """What names the layer's stored bias: two calls of one layer (a module called twice) read the same."""
    if node.op == "call_module":
        return f"{node.target}.bias"
    arg = bias_arg(node)
    return None if arg is None else f"{arg.op}:{arg.target}"


def _bias(gm: GraphModule, node) -> tuple[int, int]:
    """(values, stored bytes) of the layer's bias: exact for an encoded bias, else its dtype's size."""
    if node.op == "call_module":
        bias = getattr(gm.get_submodule(node.target), "bias", None)
        return (0, 0) if bias is None else (bias.numel(), bias.numel() * bias.element_size())
    arg = bias_arg(node)
    if arg is None:
        return 0, 0
    value = constant_value(gm, arg)
    module = gm.get_submodule(arg.target) if arg.op == "call_module" else None
    parts = module.storage_bytes() if isinstance(module, WeightTransform) else None
    return value.numel(), sum(parts.values()) if parts is not None else value.numel() * value.element_size()


def _decoding_bytes(quantizer: WeightTransform | None, bits: int, shape: Sequence[int]) -> int:
    """Bytes besides the codes that turn them back into weights. A k-means codebook as the module holds it
    (one table per channel when per-channel); a linear grid's scales (in its scale dtype) and, when
    asymmetric, its zero-points (one integer of the code width each), one of each per grid: per tensor,
    per output channel or per group; a fixed-point grid its exponents (one byte per grid, none when
    `int_bits` fixes the format). Any other quantizer: a codebook of 2^bits fp32 entries. `quantizer` is
    the transform of the weight chain that sets the bits."""
    if isinstance(quantizer, KMeansWeight):
        return quantizer.codebook.numel() * quantizer.codebook.element_size()
    if isinstance(quantizer, GridWeight) and quantizer.enabled:
        grids = quantizer.grid_count(shape)
        if quantizer.method == "fixed_point":
            return 0 if quantizer.int_bits is not None else grids
        zero_points = 0 if quantizer.symmetric else grids * math.ceil(bits / 8)
        return grids * SCALE_DTYPES[quantizer.scale_dtype].itemsize + zero_points
    return 4 * 2 ** bits if bits < 32 else 0


def _row(gm: GraphModule, layer: Layer, counted_biases: set[str]) -> dict[str, Any]:
    node = layer_node(gm, layer)
    weight = effective_weight(gm, layer)
    transforms = chain_transforms(gm, node) if node.op == "call_function" else []
    quantizer = next((t for t in reversed(transforms) if t.bits), None)  # the last transform with bits
    bits = quantizer.bits if quantizer is not None else 32
    bias_count, bias_bytes = _bias(gm, node)
    key = _bias_key(node)
    if key is not None and key in counted_biases:  # a second call of the layer: its bias is counted once
        bias_count, bias_bytes = 0, 0
    counted_biases.add(key)
    params, nonzeros = weight.numel() + bias_count, int(torch.count_nonzero(weight))
    exact_parts = next((t.storage_bytes() for t in reversed(transforms) if t.storage_bytes() is not None), None)
    if exact_parts is not None:
        exact_parts = {**exact_parts, "bias": bias_bytes}
        compressed, exact = sum(exact_parts.values()), True
    else:
        # a storage format keeps the weights sparse only where that is smaller: a linear grid that rounds a
        # few weights to zero is not worth an index per remaining weight
        dense = math.ceil(weight.numel() * bits / 8)
        sparse = math.ceil(nonzeros * (bits + _INDEX_BITS.get(layer.kind, 8)) / 8)
        decoding = _decoding_bytes(quantizer, bits, weight.shape) if layer.tied_to is None else 0
        compressed, exact = min(dense, sparse) + decoding + bias_bytes, False
    macs = _macs(layer, weight, node)
    if layer.tied_to is not None:  # the weight is counted, and stored, once: in the row of `tied_to`
        params, compressed, exact = bias_count, bias_bytes, exact_parts is not None
        nonzeros, exact_parts = None, None
    return {
        "layer": layer.name if layer.tied_to is None else f"{layer.name} (tied to {layer.tied_to})",
        "op": layer.kind, "weight_shape": tuple(weight.shape) if nonzeros is not None else None, "params": params,
        "nonzeros": nonzeros, "sparsity": None if nonzeros is None else 1 - nonzeros / weight.numel(), "bits": bits,
        "sqnr_db": _sqnr(gm, node, weight) if transforms else None,
        "dense_bytes": 4 * params, "compressed_bytes": compressed, "exact": "yes" if exact else "no",
        "macs": macs, "macs_effective": _effective(macs, int(torch.count_nonzero(weight)), weight.numel()),
        **({"bytes_" + k: v for k, v in exact_parts.items()} if exact_parts else {}),
    }


def _effective(macs: int | None, nonzeros: int, size: int) -> int | None:
    return None if macs is None else round(macs * nonzeros / size)


def summary(gm: GraphModule, example_inputs: Any = None) -> Summary:
    """The per-layer compression table of `gm` (MACs need shapes: from the last compile, or pass inputs)."""
    if example_inputs is not None:
        propagate_shapes(gm, example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
    layers = find_layers(gm)
    lowered = [(node, gm.get_submodule(node.target)) for node in gm.graph.find_nodes(op="call_module")
               if isinstance(gm.get_submodule(node.target), LOWERED)]
    other = _other_parameters(gm, layers, {node.target for node, _ in lowered})
    counted_biases: set[str] = set()
    rows = (tuple(_row(gm, layer, counted_biases) for layer in layers)
            + tuple(_ROWS.get(type(m), _lowered_row)(node, m) for node, m in lowered)
            + _tied_embedding_rows(gm) + ((other,) if other else ()))
    return Summary(rows, _totals(rows), format_history(gm))


LOWERED = (IntegerLayer, NativeLayer, SparseLayer, WeightOnlyLinear,
           DynamicInt8Linear)  # lowered layers: modules holding their weight in a run-time form


def _kernel_columns(module) -> dict[str, Any]:
    """The kernel a lowered layer runs and its measured milliseconds per call (when it was measured)."""
    choice = getattr(module, "kernel_choice", None)
    return {"kernel": choice.kernel if choice is not None else getattr(module, "kernel", None),
            "latency_ms": None if choice is None else choice.ms}


def _sparse_row(node, module: SparseLayer) -> dict[str, Any]:
    """A layer lowered by LowerToSparse: the bytes it holds in its chosen form (sparse or dense)."""
    size = math.prod(module.weight_shape)
    params, nonzeros = size + (module.out_features if module.has_bias else 0), module.nonzeros()
    shape = _output_shape(node)
    macs = None if shape is None else math.prod(shape) * module.in_features
    return {"layer": node.target.removesuffix(".sparse"), "op": f"{module.kind} (SparseLayer)",
            "weight_shape": tuple(module.weight_shape), "params": params, "nonzeros": nonzeros,
            "sparsity": 1 - nonzeros / size, "bits": _sparse_bits(module), "sqnr_db": None,
            "dense_bytes": 4 * params, "compressed_bytes": module.held_bytes(), "exact": "yes", "macs": macs,
            "macs_effective": _effective(macs, nonzeros, size), **_kernel_columns(module)}


def _sparse_bits(module: SparseLayer) -> int:
    """The bits each kept weight is stored in: uint8 codes into a codebook (`shared`), else its values' dtype."""
    return 8 if module.shared else 8 * getattr(torch, module.dtype).itemsize


def _quantized_linear_row(node, module: WeightOnlyLinear | DynamicInt8Linear) -> dict[str, Any]:
    """A weight-only or dynamic int8 linear layer: the bytes of its codes, scales and bias; its nonzeros
    are those of the weight it computes with (a pruned weight stays pruned through the codes)."""
    size = module.in_features * module.out_features
    params = size + (module.out_features if module.has_bias else 0)
    nonzeros = _dequantized_nonzeros(module)
    shape = _output_shape(node)
    macs = None if shape is None else math.prod(shape) * module.in_features
    return {"layer": node.target, "op": f"linear ({type(module).__name__})",
            "weight_shape": (module.out_features, module.in_features), "params": params, "nonzeros": nonzeros,
            "sparsity": 1 - nonzeros / size, "bits": getattr(module, "bits", 8), "sqnr_db": None,
            "dense_bytes": 4 * params, "compressed_bytes": module.held_bytes(), "exact": "yes", "macs": macs,
            "macs_effective": _effective(macs, nonzeros, size), **_kernel_columns(module)}


_ROWS_AT_ONCE = 1024  # rows dequantized at a time: a language model's head is not made float whole


def _dequantized_nonzeros(module: WeightOnlyLinear | DynamicInt8Linear) -> int:
    return sum(int(torch.count_nonzero(module.dequantize_rows(start, min(start + _ROWS_AT_ONCE, module.out_features))))
               for start in range(0, module.out_features, _ROWS_AT_ONCE))


def _lowered_row(node, module: IntegerLayer | NativeLayer) -> dict[str, Any]:
    """An integer-lowered layer: its weight codes as the module holds them, and every other tensor it
    needs to run (the bias in its dtype, the requantization's multipliers and shifts or output scales,
    the native backend's weight scales and zero-points); bits are those the codes span (sign included).
    The native backend may keep its codes only inside its kernel, so they are read through `weight`."""
    weight, bias = module.weight, module.bias
    params, nonzeros = weight.numel() + bias.numel(), int(torch.count_nonzero(weight))
    largest = int(weight.abs().max()) if weight.numel() else 0
    held = weight.numel() * weight.element_size() + sum(
        t.numel() * t.element_size() for name, t in module.named_buffers(recurse=False) if name != "weight")
    macs = _output_macs(_output_shape(node), weight)
    return {"layer": node.target, "op": f"{module.kind} ({type(module).__name__})",
            "weight_shape": tuple(weight.shape), "params": params, "nonzeros": nonzeros,
            "sparsity": 1 - nonzeros / weight.numel(), "bits": largest.bit_length() + 1, "sqnr_db": None,
            "dense_bytes": 4 * params, "compressed_bytes": held, "exact": "yes", "macs": macs,
            "macs_effective": _effective(macs, nonzeros, weight.numel()), **_kernel_columns(module)}


def _tied_embedding_rows(gm: GraphModule) -> tuple[dict[str, Any], ...]:
    """A token embedding reading a lowered LM head's tensors: its weight is counted, and stored, once, in
    the head's row (as a tied layer's is in the row of the layer it is tied to)."""
    paths = {id(m): path for path, m in gm.named_modules()}
    return tuple({"layer": f"{node.target} (rows of {paths.get(id(m.head), 'its tied head')})",
                  "op": f"embedding ({type(m).__name__})", "weight_shape": None, "params": 0, "nonzeros": None,
                  "sparsity": None, "bits": getattr(m, "bits", 8), "sqnr_db": None, "dense_bytes": 0,
                  "compressed_bytes": 0, "exact": "yes", "macs": 0, "macs_effective": 0, "kernel": None,
                  "latency_ms": None}
                 for node in gm.graph.find_nodes(op="call_module")
                 if isinstance(m := gm.get_submodule(node.target), TiedEmbedding))


_ROWS = {SparseLayer: _sparse_row, WeightOnlyLinear: _quantized_linear_row, DynamicInt8Linear: _quantized_linear_row}


def _other_parameters(gm: GraphModule, layers: list[Layer], lowered: set[str] = frozenset()) -> dict[str, Any] | None:
    """One row for the parameters outside linear / conv layers (norms, attention, embeddings), kept fp32."""
    owners = {layer.name for layer in layers} | set(lowered)
    owners |= {name for name, m in gm.named_modules() if isinstance(m, WeightTransform)}
    tensors = [p for name, p in gm.named_parameters() if name.rpartition(".")[0] not in owners]
    if not tensors:
        return None
    count = sum(p.numel() for p in tensors)
    return {"layer": "(other parameters)", "op": "", "weight_shape": None, "params": count,
            "nonzeros": None, "sparsity": None, "bits": 32, "sqnr_db": None, "dense_bytes": 4 * count,
            "compressed_bytes": 4 * count, "exact": "yes", "macs": None, "macs_effective": None}


def _totals(rows: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    def total(key):
        values = [r[key] for r in rows if r[key] is not None]
        return sum(values) if values else None

    # the weights whose nonzeros are counted: a row without a count (a tied layer's) adds none of either
    weights = sum(math.prod(r["weight_shape"]) for r in rows if r["weight_shape"] and r["nonzeros"] is not None)
    nonzeros = total("nonzeros") or 0
    return {
        "layer": "total", "op": "", "weight_shape": None, "params": total("params") or 0, "nonzeros": nonzeros,
        "sparsity": 1 - nonzeros / weights if weights else 0.0,
        "bits": None, "sqnr_db": None, "dense_bytes": total("dense_bytes"),
        "compressed_bytes": total("compressed_bytes"),
        "exact": "yes" if rows and all(r["exact"] == "yes" for r in rows) else "no",
        "macs": total("macs"), "macs_effective": total("macs_effective"),
        "ratio": (total("dense_bytes") or 0) / max(total("compressed_bytes") or 1, 1),
    }
