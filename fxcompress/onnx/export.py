"""`to_onnx`: a compressed GraphModule as an ONNX file with named inputs and a symbolic batch, the decoded float
model or the int8 QDQ model of a fake-quant one; ops the exporter cannot write are respelled first
(`respellings`), and the file is run in ONNX Runtime before it is kept (`runtime_check`)."""
from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from ..analyses.shapes import reads_values_as_sizes
from ..encoded.decode import decode
from ..errors import ConfigError, MissingDependencyError, PreconditionError
from ..frontends.guards import describe, input_checks
from ..kernels.native import NativeAdd, NativeCat, NativeLayer, QuantizeToCodes
from ..tracing import origin
from .qdq import quantize_dequantize
from .respellings import respell
from .row_groups import keep_row_counts_as_tensors
from .runtime_check import first_line, run_in_onnx_runtime

NATIVE_MODULES = (NativeLayer, QuantizeToCodes, NativeAdd, NativeCat)  # oneDNN kernels: no ONNX operator
# ONNX: the TorchScript exporter's opsets from the first with per-channel QuantizeLinear (13) to its newest
OPSETS = (13, 20)
DEFAULT_OPSET = 17
BATCH = "batch"  # the symbolic first axis of every input and output under dynamic_batch


def to_onnx(gm: GraphModule, path: str | os.PathLike, example_inputs: tuple, *,
            input_names: list[str] | None = None, output_names: list[str] | None = None,
            dynamic_batch: bool = True, dynamic_axes: dict[str, dict[int, str]] | None = None,
            opset: int = DEFAULT_OPSET, quantized: bool = False) -> None:
    """Write `gm` as an ONNX model (needs the `onnx` extra).

    Inputs are named `input_names` (default: the GraphModule's placeholder names), outputs
    `output_names` (default: "output", or "output_0", "output_1", ...). With `dynamic_batch`, the
    first axis of every input and output is the symbol "batch", so any batch size runs. `dynamic_axes` names
    more symbolic axes of inputs, as torch.onnx.export takes them ({"input_ids": {1: "length"}}): each must
    be one the graph computes with (it runs the example grown by one along each), and the outputs' axes that
    follow them become symbolic under the same name. `quantized`
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
    module = _exportable(gm, quantized)
    with torch.no_grad():
        outputs = [t for t in tree_leaves(module.eval()(*example_inputs)) if isinstance(t, torch.Tensor)]
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = _names("input_names", input_names, len(example_inputs), placeholders)
    outputs_named = _names("output_names", output_names, len(outputs),
                           ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))])
    if set(inputs) & set(outputs_named):
        raise ConfigError(f"to_onnx: {sorted(set(inputs) & set(outputs_named))} name both an input and an output; "
                          "ONNX names each value once")
    axes, checks = _symbolic_axes(module, (inputs, example_inputs), (outputs_named, outputs), dynamic_batch,
                                  dynamic_axes)
    _refuse_bounded_axes(module, example_inputs, inputs, axes)
    respell(module)
    # written beside the target and moved there once ONNX Runtime ran it: no half-written or failing file is left
    path = os.fspath(path)
    partial = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter has the QDQ symbolics
            try:
                torch.onnx.export(module, tuple(example_inputs), partial, dynamo=False, input_names=inputs,
                                  output_names=outputs_named, dynamic_axes=axes or None, opset_version=opset,
                                  # QDQ functions export by their symbolic; inlined, their traced bodies break it
                                  autograd_inlining=not quantized)
            except torch.onnx.errors.UnsupportedOperatorError as exc:
                raise ConfigError(f"to_onnx: {exc}; {_nodes_calling(module, exc)}") from exc
            except torch.onnx.errors.OnnxExporterError as exc:
                raise ConfigError(f"to_onnx: the ONNX exporter failed: {first_line(exc)}") from exc
        run_in_onnx_runtime(partial, inputs, outputs_named, checks, compare_values=not quantized,
                            qdq=module if quantized else None)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _exportable(gm: GraphModule, quantized: bool) -> GraphModule:
    """The copy of `gm` to export: the QDQ or decoded float model, whose rows per expert (a mixture of experts')
    follow the data in the file; refused where it holds native kernels or reads other sizes from values."""
    module = quantize_dequantize(gm) if quantized else decode(gm)
    _refuse_native(module)
    keep_row_counts_as_tensors(module)
    _refuse_values_as_sizes(module)
    return module


def _symbolic_axes(module: GraphModule, inputs: tuple[list[str], tuple], outputs: tuple[list[str], list],
                   dynamic_batch: bool, dynamic_axes: Any) -> tuple[dict, list[tuple[tuple, list[torch.Tensor]]]]:
    """The exporter's `dynamic_axes` ({name: {axis: symbol}}) for a symbolic batch and the user's axes, and the
    (inputs, the graph's outputs) the file must then reproduce in ONNX Runtime: the example, the example with one
    more batch row, the example grown along the user's axes."""
    (input_names, example_inputs), (output_names, example_outputs) = inputs, outputs
    axes, checks = {}, [(example_inputs, example_outputs)]
    if dynamic_batch:
        checks.append(_another_batch(module, example_inputs, example_outputs))
        axes = {name: {0: BATCH} for name, t in zip(input_names, example_inputs) if t.ndim}
        axes |= {name: {0: BATCH} for name, t in zip(output_names, example_outputs) if t.ndim}
    if dynamic_axes:
        wanted = _check_axes(dynamic_axes, input_names, example_inputs)
        grown, grown_outputs = _grown(module, example_inputs, input_names, wanted)
        checks.append((grown, grown_outputs))
        for name, named in wanted.items():
            axes[name] = axes.get(name, {}) | named
        for name, named in _following(wanted, output_names, example_outputs, grown_outputs).items():
            axes[name] = named | axes.get(name, {})  # an output's batch axis keeps its name
    return axes, checks


def _refuse_bounded_axes(module: GraphModule, example_inputs: tuple, input_names: list[str], axes: dict) -> None:
    """The graph's input checks (`frontends.guards`) leave the copy being exported, where ONNX Runtime takes any
    size along a symbolic axis. A symbolic axis a check bounds is refused where the graph, unchecked, runs a size
    just outside the bound: it would compute the traced branch there, silently (a model that branches on that
    size). Where it fails there (a position table's length) the file fails there too, and is written."""
    names = {node: name for node, name in zip(module.graph.find_nodes(op="placeholder"), input_names)}
    bounded = []
    for check in input_checks(module.graph):
        name = names.get(check.args[0])
        for axis, symbol in axes.get(name, {}).items():
            lowest, highest = check.args[2][axis]
            outside = [size for size in (lowest - 1 if lowest > 1 else None,
                                         highest + 1 if highest is not None else None) if size is not None]
            bounded += [(name, axis, symbol, (lowest, highest), size) for size in outside]
        module.graph.erase_node(check)
    module.recompile()
    for name, axis, symbol, (lowest, highest), size in bounded:
        index = input_names.index(name)
        x = example_inputs[index]
        resized = x.repeat_interleave(-(-size // x.shape[axis]), axis).narrow(axis, 0, size)
        try:
            with torch.no_grad():
                # the generated forward itself: a GraphModule's call prints the failing line, which is expected here
                module.forward(*example_inputs[:index], resized, *example_inputs[index + 1:])
        except Exception:  # noqa: BLE001 - a size the graph cannot run: the file cannot either
            continue
        raise ConfigError(f"to_onnx: input {name!r} is symbolic along axis {axis} ({symbol!r}), but the graph was "
                          f"traced by torch.export for {describe(lowest, highest)} there and runs a size of {size} "
                          "as the model may not (it branches on that size); an ONNX file cannot hold that bound: "
                          f"export without that axis{' (dynamic_batch=False)' if axis == 0 else ''}")


def _check_axes(dynamic_axes: Any, inputs: list[str], example_inputs: tuple) -> dict[str, dict[int, str]]:
    """`dynamic_axes` checked: input names to {axis: symbol}, each axis inside its input's dims."""
    if not isinstance(dynamic_axes, dict):
        raise ConfigError(f"to_onnx.dynamic_axes must be a dict of input names to {{axis: name}}, got {dynamic_axes!r}")
    ranks = {name: t.ndim for name, t in zip(inputs, example_inputs)}
    checked = {}
    for name, named in dynamic_axes.items():
        if name not in ranks:
            raise ConfigError(f"to_onnx.dynamic_axes names {name!r}, which is no input of the model ({inputs})")
        if not isinstance(named, dict) or not named or not all(
                isinstance(d, int) and not isinstance(d, bool) and -ranks[name] <= d < ranks[name]
                and isinstance(symbol, str) and symbol.strip() for d, symbol in named.items()):
            raise ConfigError(f"to_onnx.dynamic_axes[{name!r}] must map axes of its {ranks[name]} dims to names, "
                              f"got {named!r}")
        checked[name] = {d % ranks[name]: symbol for d, symbol in named.items()}
    return checked


def _grown(module: GraphModule, example_inputs: tuple, inputs: list[str], wanted: dict[str, dict[int, str]]
           ) -> tuple[tuple, list[torch.Tensor]]:
    """The example grown by one along each axis of `wanted` and the graph's outputs on it: a symbolic axis the
    graph does not compute with (a size the export fixed) is refused here, where ONNX Runtime would fail far
    from the cause."""
    try:
        return _run_grown(module, example_inputs, [wanted.get(name, {}) for name in inputs])
    except Exception as exc:  # noqa: BLE001 - reported with what the graph raised
        raise ConfigError(f"to_onnx.dynamic_axes {wanted}: the graph does not run the example grown along them "
                          f"({first_line(exc)}); its sizes hold the example's there") from exc


def _run_grown(module: GraphModule, example_inputs: tuple, axes: list) -> tuple[tuple, list[torch.Tensor]]:
    """The example with its first slice appended once more along each of its inputs' `axes`, and the graph's
    output tensors on it (what the graph raises propagates)."""
    grown = []
    for t, dims in zip(example_inputs, axes):
        for d in dims:
            t = torch.cat([t, t.narrow(d, 0, 1)], d)
        grown.append(t)
    with torch.no_grad():
        return tuple(grown), [t for t in tree_leaves(module(*grown)) if isinstance(t, torch.Tensor)]


def _following(wanted: dict[str, dict[int, str]], names: list[str], outputs: list[torch.Tensor],
               grown_outputs: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    """The output axes that grew with the inputs' axes of `wanted`: symbolic too, named as those where they share
    one name (a length), else after the output and axis."""
    symbols = {symbol for named in wanted.values() for symbol in named.values()}
    following = {}
    for name, before, after in zip(names, outputs, grown_outputs):
        grew = [d for d in range(before.ndim) if before.shape[d] != after.shape[d]]
        if grew:
            following[name] = {d: next(iter(symbols)) if len(symbols) == 1 else f"{name}_{d}" for d in grew}
    return following


def _another_batch(module: GraphModule, example_inputs: tuple, outputs: list[torch.Tensor]
                   ) -> tuple[tuple, list[torch.Tensor]]:
    """The example with each input's first row appended once more, and the graph's outputs on it, which must be
    one row longer. A file with a symbolic batch must compute one: the exporter traces the graph as it is, and a
    graph with the example's batch written into its sizes (a program the user exported with static shapes)
    gives a file that ONNX Runtime refuses at another batch, with a reshape error far from the cause."""
    sizes = {t.shape[0] for t in example_inputs if t.ndim}
    if not sizes:
        return example_inputs, outputs  # no input has a batch to grow
    try:
        longer, got = _run_grown(module, example_inputs, [(0,) if t.ndim else () for t in example_inputs])
        failure = None if [t.shape[:1] for t in got] == [(t.shape[0] + 1,) if t.ndim else () for t in outputs] \
            else "its outputs do not grow with it"
    except Exception as exc:  # noqa: BLE001 - reported below, with what the graph raised
        failure = first_line(exc)
    if failure is not None:
        raise ConfigError(f"to_onnx: dynamic_batch=True, but the graph does not run a batch other than the "
                          f"example's {sorted(sizes)} as one ({failure}); a symbolic batch needs sizes that follow "
                          "the inputs' first dimension (a program exported with static shapes holds the example's) "
                          "and outputs with the batch first: compile the model itself or export it with a dynamic "
                          "batch (torch.export.Dim), or pass dynamic_batch=False")
    return longer, got


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
    """ONNX's exporter traces the model once: a size read from tensor values (`.item()`, `nonzero`) becomes a
    constant of the example, and the file computes something else for any input routed otherwise (a Mixtral's
    logits left the model's by 0.016 on another batch of tokens). Rows sliced or split at such numbers, as
    mixtures of experts take them, were rewritten before (`row_groups`); any other such read is refused."""
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

    The file is kept only where ONNX Runtime's outputs on the example inputs are those of the QDQ module it was
    exported from within one step of the module's last activation grids carried to the outputs, plus a float
    tolerance (`int8_check`); a file that computes otherwise is a ConfigError and is not left. On x86 CPUs
    without VNNI, whose uint8 x int8 kernels saturate with 8-bit weights and 8-bit activations, the error says
    to quantize activations to 7 bits.
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
