"""LowerToInteger's native backend: uint8 codes between layers, each layer on the faster of
oneDNN's int8 kernel and a float kernel, chosen by measurement (`kernels.native`).

Every linear / conv2d layer becomes a `NativeLayer`. Where the model allows it (`kernels` holds both),
each layer's int8 kernel and its float kernel (the weight dequantized from its codes, codes in and
out: the cast and the rounding are part of its cost) are timed on the layer's real input
(`kernels.choose_kernel`: interleaved medians; float stays unless int8 is `margin` times faster):
oneDNN's int8 calls cost tens of microseconds each, which small layers at small batches never win
back. Both read and write the same codes, so the choice never changes what the model computes
beyond float rounding.

An activation grid whose every reader is a float-kernel layer, and whose writer is one too or the
model's float input, needs no uint8: its codes stay float32 ("float_codes": no cast on either side,
the float input's boundary one `float_codes` node), max pooling between stays the float op, a view
becomes a reshape (a float layer reading channels-last uint8 writes channels-last) and a ReLU is the
writer's clamp. A model whose layers all chose float runs with as
many nodes as the float model: each hidden layer rounds and clamps in place where the float model
has its ReLU, and the input's boundary stands for the first layer's.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.kernels.lowering import layer_inputs
from fxcompress.kernels.timing import KernelChoice, choose_kernel, run_reaching
from fxcompress.kernels import native
from fxcompress.kernels.native import (NativeAdd, NativeCat, NativeLayer, QuantizeToCodes, float_codes,
                                     max_pool2d_codes, relu_codes)
from fxcompress.quant.commuting import commutes_with_quantization, is_add
from fxcompress.quant.integer import dequantize_codes
from fxcompress.quant.quantizers import Grid

from .lower_integer_graph import (MAX_POOL_ARGS, Bounds, JoinPlan, LayerPlan, Quantized, cat_operands, clamp_bounds,
                                  clamp_codes, is_activation_quant, is_max_pool2d, is_relu, swap, swap_join)


def choose_kernels(gm: GraphModule, layers: list[Quantized], plans: dict[Node, LayerPlan], example_inputs: tuple,
                   options: dict[str, Any]) -> dict[Node, KernelChoice | str]:
    """Each layer's kernel: a KernelChoice where several were timed on the layer's real input, else the
    kernel's name (one kernel of `kernels` runs the layer, or `float_select` forces it onto float)."""
    kernels, forced = options["kernels"], options["float_select"]
    chosen: dict[Node, KernelChoice | str] = {}
    timed: dict[Node, dict[str, NativeLayer]] = {}
    for q in layers:
        if forced is not None and re.fullmatch(forced, q.layer.name):
            chosen[q.node] = "float"
            continue
        forms = layer_forms(gm, q, plans[q.node], kernels)
        if len(forms) == 1:
            chosen[q.node] = next(iter(forms))
        else:
            timed[q.node] = forms
    if forced is not None and "float" not in {kernel_name(c) for c in chosen.values()}:
        raise ConfigError(f"LowerToInteger.float_select={forced!r} selects none of the layers lowered: "
                          f"{', '.join(q.layer.name for q in layers)}")
    inputs = layer_inputs(gm, list(timed), example_inputs)
    for q in layers:
        if q.node not in timed:
            continue
        grid, forms = q.input_grid, timed[q.node]
        codes = QuantizeToCodes(float(grid.scale), int(grid.zero_point), grid.qmax)(inputs[q.node].float())
        chosen[q.node] = choose_kernel({k: m.forward for k, m in forms.items()}, (codes,),
                                       baseline="float" if "float" in forms else next(iter(forms)),
                                       repeats=options["repeats"], margin=options["margin"], clock=options["clock"])
    return chosen


def layer_forms(gm: GraphModule, q: Quantized, plan: LayerPlan, kernels: tuple[str, ...]) -> dict[str, NativeLayer]:
    """The layer as a NativeLayer on each of `kernels` that can run it here (uint8 codes in and out, as
    they are timed); a PreconditionError naming the layer where none can."""
    fused = fused_clamp(gm, q.node, plan.chain)
    bounds = None if fused is None else fused[1]
    forms, refused = {}, {}
    for kernel in kernels:
        if kernel == "c_int8" and plan.kind != "linear":
            refused[kernel] = "our C kernel runs linear layers only"
            continue
        if kernel == "int8" and not native.saturation_free(plan.codes, q.input_grid.qmax):
            refused[kernel] = f"two weight codes times input code {q.input_grid.qmax} could pass int16 (no VNNI)"
            continue
        module = native_layer(q, plan, bounds, kernel)
        if kernel == "c_int8" and (reason := module.c_refusal()) is not None:
            refused[kernel] = reason
        else:
            forms[kernel] = module
    if not forms:
        reasons = "; ".join(f"{kernel}: {reason}" for kernel, reason in refused.items())
        raise PreconditionError(f"LowerToInteger: no kernel of kernels={kernels} can run layer '{q.layer.name}' "
                                f"({reasons}); allow 'float', which runs every layer")
    return forms


def kernel_name(choice: KernelChoice | str) -> str:
    return choice if isinstance(choice, str) else choice.kernel


def float_code_edges(gm: GraphModule, layers: list[Quantized], chosen: dict[Node, KernelChoice | str],
                     targets: dict[Node, Node | None], joins: dict[Node, JoinPlan]) -> set[Node]:
    """The activation fake-quants whose codes stay float32: every reader a float-kernel layer, the writer
    one too or float code before the integer part (not an int8 layer, not a join)."""
    floats = {q.node for q in layers if kernel_name(chosen[q.node]) == "float"}
    writers = {target: node for node, target in targets.items() if target is not None}
    join_targets = {join.target for join in joins.values() if join.target is not None}
    edges = set()
    for node in gm.graph.nodes:
        if not is_activation_quant(gm, node) or node in join_targets:
            continue
        writer = writers.get(node)
        if (writer is None or writer in floats) and node.users and all(user in floats for user in node.users):
            edges.add(node)
    return edges


def boundary(gm: GraphModule, node: Node, grid: Grid, values: bool) -> Node:
    """The activation fake-quant `node` where float code meets the integer part: uint8 codes
    (QuantizeToCodes), or before float-kernel layers float32 codes (one function node: no module call).
    Returns the node of the codes."""
    if not values:
        gm.add_submodule(node.target, QuantizeToCodes(float(grid.scale), int(grid.zero_point), grid.qmax))
        return node
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(float_codes, (node.args[0], float(grid.scale), int(grid.zero_point), grid.qmax))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def fused_clamp(gm: GraphModule, node: Node, chain: tuple[Node, ...]) -> tuple[Node, Bounds] | None:
    """The ReLU or constant clamp (ReLU6, hardtanh) right after `node` that its kernel's clamp can take, with
    its bounds in real units, if there is one: on the way to the output grid, or (a ReLU, or a clamp with a
    lower bound) right after a layer that dequantizes."""
    users = list(node.users)
    if len(users) != 1 or (chain and chain[0] is not users[0]) or users[0].args[:1] != (node,):
        return None
    bounds = (0.0, None) if is_relu(gm, users[0]) else clamp_bounds(gm, users[0])
    if bounds is None or (not chain and bounds[0] is None):
        return None
    return users[0], bounds


def native_layer(q: Quantized, plan: LayerPlan, bounds: Bounds | None, kernel: str, values_in: bool = False,
                 values_out: bool = False) -> NativeLayer:
    """The layer as a NativeLayer on `kernel`: uint8 codes in (float32 codes with `values_in`), codes onto
    the plan's grid out (float32 codes with `values_out`), or real values where the plan dequantizes."""
    in_grid, out_grid = q.input_grid, plan.out_grid
    output = "float32" if out_grid is None else "float_codes" if values_out else "uint8"
    module = NativeLayer(plan.kind, list(plan.codes.shape), float(in_grid.scale), int(in_grid.zero_point), output,
                         output_scale=1.0 if out_grid is None else float(out_grid.scale),
                         output_zero_point=0 if out_grid is None else int(out_grid.zero_point),
                         clamp=_native_clamp(out_grid, bounds), kernel=kernel,
                         input="float_codes" if values_in else "uint8", input_qmax=int(in_grid.qmax), **plan.options)
    module.weight.copy_(plan.codes.to(torch.int8))
    module.weight_scale.copy_(plan.weight_scale.float())
    if plan.bias is not None:  # the reference's integer bias, at the accumulator's scale
        module.bias.copy_(plan.bias)
    return module


def replace_native(gm: GraphModule, q: Quantized, plan: LayerPlan, choice: KernelChoice | str,
                   edges: set[Node]) -> dict[str, Any]:
    """Swap the layer for a NativeLayer on its chosen kernel, the ReLU or clamp right after it fused; the ops
    up to its output grid respelled for uint8 codes (float32 codes: only a ReLU changes). Returns its stats."""
    fused = fused_clamp(gm, q.node, plan.chain)
    taken = None if fused is None else fused[0]  # the ReLU or clamp the kernel takes
    values_in, values_out = q.input_quant in edges, plan.target in edges
    module = native_layer(q, plan, None if fused is None else fused[1], kernel_name(choice), values_in, values_out)
    if isinstance(choice, KernelChoice):
        module.kernel_choice = choice = KernelChoice.from_stats(choice.as_stats())  # as stats and files hold it
    new = swap(gm, q, module, "native")
    module._where = f"NativeLayer {new.target}"  # its errors at run time name it by its place in the model
    respell_chain(gm, new, taken, plan.chain, plan.out_grid, in_float=values_out)
    times = {} if not isinstance(choice, KernelChoice) else choice.as_stats()["times_ms"]
    return {"module": new.target, "kernel": module.kernel, "times_ms": times,
            "speedup": (round(choice.speedup_over("float"), 4)
                        if isinstance(choice, KernelChoice) and "float" in choice.times_ms else None),
            "input": module.input, "output": module.output}


def lay_out_boundaries(gm: GraphModule) -> int:
    """Each float -> codes boundary read only by convolutions writes channels-last codes, the layout their
    kernels read (any other is reordered inside each call). Returns how many."""
    laid = 0
    for node in gm.graph.find_nodes(op="call_module"):
        boundary_module = gm.get_submodule(node.target)
        if not isinstance(boundary_module, QuantizeToCodes):
            continue
        readers = [gm.get_submodule(u.target) if u.op == "call_module" else None for u in node.users]
        if readers and all(isinstance(r, NativeLayer) and r.kind == "conv2d" for r in readers):
            boundary_module.channels_last = True
            laid += 1
    return laid


# what writes a fresh tensor of codes: a residual they hold may take a convolution's sum in place
_FRESH_MODULES = (NativeLayer, NativeAdd, NativeCat, QuantizeToCodes)
_FRESH_FUNCTIONS = (max_pool2d_codes, relu_codes)


def fuse_residual_adds(gm: GraphModule) -> list[str]:
    """Each residual add that ActivationConfig(fuse_adds=True) left to a convolution becomes part of it: the
    float add of an int8 convolution's real output and a residual's dequantized uint8 codes, through at most
    a ReLU, onto a grid's codes, is one NativeLayer call with oneDNN's sum post-op (`accumulate`), which rounds
    the sum once as the fake-quant model does. Returns the fused layers' module paths."""
    fused = []
    for add in list(gm.graph.nodes):
        match = _residual_add(gm, add)
        if match is None:
            continue
        host, values, relu, quantize = match
        codes = values.args[0]
        layer, grid = gm.get_submodule(host.target), gm.get_submodule(quantize.target)
        clamp = None if relu is None else (0.0, None)  # the grid is uint8's whole range (_residual_add)
        module = NativeLayer(**{**layer.config(), "output": "uint8", "output_scale": grid.scale,
                                "output_zero_point": grid.zero_point, "clamp": clamp,
                                "accumulate": [values.args[1], values.args[2]],
                                "accumulate_in_place": _writable_residual(gm, codes, host, add, values)})
        module.load_state_dict(layer.state_dict())
        module._where = layer._where
        gm.add_submodule(host.target, module)
        with gm.graph.inserting_before(quantize):
            new = gm.graph.call_module(host.target, (host.args[0], codes))
        new.meta = dict(quantize.meta)
        quantize.replace_all_uses_with(new)
        for node in (quantize, relu, add, values, host):
            if node is not None and not node.users:
                gm.graph.erase_node(node)
        fused.append(host.target)
    return fused


def _writable_residual(gm: GraphModule, codes: Node, host: Node, add: Node, values: Node) -> bool:
    """Whether the fused convolution may write its sum into the residual's own codes: a tensor a kernel wrote
    fresh (no view of another value), whose every other reader ran before the add and wrote a fresh tensor of
    its own (no view of the codes lives on), and which is not the convolution's own input (oneDNN would
    overwrite what it is reading: `conv(x) + x`)."""
    if not _writes_fresh(gm, codes) or len(values.users) != 1:
        return False
    order = {node: i for i, node in enumerate(gm.graph.nodes)}  # with the layers fused so far
    return all(reader is values or (reader is not host and order[reader] < order[add] and _writes_fresh(gm, reader))
               for reader in codes.users)


def _writes_fresh(gm: GraphModule, node: Node) -> bool:
    return ((node.op == "call_module" and isinstance(gm.get_submodule(node.target), _FRESH_MODULES))
            or (node.op == "call_function" and node.target in _FRESH_FUNCTIONS))


def time_fused_layers(gm: GraphModule, paths: list[str], example_inputs: tuple, repeats: int) -> dict[str, KernelChoice]:
    """Each fused layer of `paths` timed as it now runs (with its residual, on the inputs a run of the model
    gives it): what its kernel choice records, in place of the times of the unfused convolution."""
    gm.recompile()
    chosen: dict[str, KernelChoice] = {}

    def time_here(layer: NativeLayer, args: tuple, path: str) -> None:
        if path not in chosen:
            chosen[path] = layer.choose(args[0], ("int8",), repeats=repeats, residual=args[1])

    run_reaching(gm, {path: gm.get_submodule(path) for path in paths}, time_here, example_inputs)
    return chosen


def _residual_add(gm: GraphModule, add: Node) -> tuple[Node, Node, Node | None, Node] | None:
    """(the convolution, the residual's dequantize node, the ReLU or None, the boundary onto codes) of a float
    add that one oneDNN int8 convolution can take, or None."""
    if not is_add(add) or len(add.args) != 2 or add.kwargs or len(add.users) != 1:
        return None
    hosts = [x for x in add.args if isinstance(x, Node) and x.op == "call_module" and len(x.users) == 1
             and _can_accumulate(gm.get_submodule(x.target))]
    values = [x for x in add.args if isinstance(x, Node) and x.op == "call_function" and x.target is dequantize_codes]
    if not hosts or not values or hosts[0] is values[0]:
        return None
    (after,) = add.users
    relu = after if is_relu(gm, after) and after.args[:1] == (add,) else None
    if relu is not None:
        if len(relu.users) != 1:
            return None
        (after,) = relu.users
    grid = gm.get_submodule(after.target) if after.op == "call_module" else None
    # oneDNN's sum post-op takes a ReLU after it, no other clamp: the grid must span uint8 (8-bit activations)
    if not isinstance(grid, QuantizeToCodes) or grid.channels_last or grid.qmax != native.UINT8_MAX:
        return None
    return hosts[0], values[0], relu, after


def _can_accumulate(module: nn.Module) -> bool:
    return (isinstance(module, NativeLayer) and module.kind == "conv2d" and module.kernel == "int8"
            and module.input == "uint8" and module.output == "float32" and module.clamp is None)


def fuse_boundaries(gm: GraphModule) -> int:
    """Each float -> codes boundary read only by a c_int8 layer on its grid becomes part of that layer's call
    (NativeLayer input "float32": our C kernel quantizes the values itself, code for code as the boundary
    did), so a model's input, its first layer and each layer after it are one call each. Returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), QuantizeToCodes):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,):
            continue
        boundary, layer = gm.get_submodule(node.target), gm.get_submodule(users[0].target)
        grid = (boundary.scale, boundary.zero_point, boundary.qmax)
        if not isinstance(layer, NativeLayer) or layer.kernel != "c_int8" or layer.input != "uint8" \
                or grid != (layer.input_scale, layer.input_zero_point, layer.input_qmax):
            continue
        layer._drop_derived()  # its C arguments were made for uint8 input
        layer.input = "float32"
        users[0].replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        fused += 1
    return fused


def native_refusal(gm: GraphModule, q: Quantized, plan: LayerPlan, kernels: tuple[str, ...]) -> str | None:
    """Why the native kernels allowed (`kernels`) could not compute this layer as the reference does, if they
    cannot. oneDNN's int8 kernel may saturate on a CPU without VNNI; the float kernel and ours never do, so
    such a layer only refuses when int8 is the one kernel allowed (otherwise int8 is just not offered)."""
    kind, codes, in_grid = plan.kind, plan.codes, q.input_grid
    if kind not in native.KERNELS:
        return f"{kind} has no native kernel (only {', '.join(native.KERNELS)})"
    low, high = int(codes.min()), int(codes.max())
    if low < native.INT8_RANGE[0] or high > native.INT8_RANGE[1]:
        return (f"its centered weight codes span [{low}, {high}], beyond int8 with zero-point 0 (quantize with "
                "InsertFakeQuant(method='linear', symmetric=True) or 'fixed_point', at most 8 bits)")
    for grid, what in ((in_grid, "input"), (plan.out_grid, "output")):
        if grid is not None and (grid.qmin != 0 or grid.qmax > native.UINT8_MAX):
            return (f"its {what} activation grid [{grid.qmin}, {grid.qmax}] is not uint8 (use "
                    "ActivationConfig(symmetric=False) with at most 8 bits)")
    if not native.saturation_free(codes, in_grid.qmax) and set(kernels) <= {"int8"}:
        return (f"two weight codes times input code {in_grid.qmax} could pass int16 in this CPU's u8 x s8 "
                "kernels (no VNNI); use ActivationConfig(bits=7) or 7-bit weights, or allow the float / c_int8 "
                "kernels")
    for node in plan.chain:
        if not native_code_safe(gm, node):
            return f"{node.format_node()} has no kernel on uint8 codes"
    return None


def native_code_safe(gm: GraphModule, node: Node) -> bool:
    """Code-safe ops native can run on uint8: ReLU, 2-d max pooling without indices, reshapes, dropout."""
    if is_relu(gm, node) or clamp_bounds(gm, node) is not None:
        return True
    if is_max_pool2d(gm, node):
        return _native_pool_ok(gm, node)
    if node.target in (F.max_pool1d, F.max_pool3d) or (
            node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.MaxPool1d, nn.MaxPool3d))):
        return False
    return commutes_with_quantization(gm, node)


def _native_pool_ok(gm: GraphModule, node: Node) -> bool:
    if not is_max_pool2d(gm, node):
        return False
    if node.op == "call_module":
        return not gm.get_submodule(node.target).return_indices
    return not dict(zip(MAX_POOL_ARGS, node.args[1:]), **node.kwargs).get("return_indices", False)


def _native_clamp(out_grid: Grid | None, bounds: Bounds | None) -> tuple[float, float | None] | None:
    """The fused clamp in real units: the fused ReLU's / clamp's `bounds` and / or the output grid's range where
    uint8 does not give it (no upper bound: None, which keeps the layer's configuration plain data)."""
    if out_grid is None:
        return bounds  # fused_clamp gives a dequantizing layer lower-bounded clamps only
    scale, zero = float(out_grid.scale), int(out_grid.zero_point)
    low = (out_grid.qmin - zero) * scale
    high = None if out_grid.qmax == native.UINT8_MAX else (out_grid.qmax - zero) * scale
    if bounds is None:
        return None if high is None else (low, high)
    if bounds[1] is not None:
        high = bounds[1] if high is None else min(high, bounds[1])
    return (low if bounds[0] is None else max(low, bounds[0]), high)


def native_code_op(gm: GraphModule, node: Node, grid: Grid | None, in_float: bool = False) -> None:
    """Respell one code-safe op for codes on `grid` (ReLU clamps at the zero-point, ReLU6 / clamp at its bounds'
    codes; max pooling and view take channels-last tensors, which the kernels write; float32 codes pool with
    the float op)."""
    zero_point = 0 if grid is None else int(grid.zero_point)
    if in_float and is_max_pool2d(gm, node):
        return
    if is_relu(gm, node) and zero_point == 0:  # codes are >= 0 already: the identity
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return
    if is_relu(gm, node):
        target, args = relu_codes, (node.args[0], zero_point)
    elif (bounds := clamp_bounds(gm, node)) is not None and grid is not None:
        target, args = torch.clamp, (node.args[0], *clamp_codes(grid, bounds))
    elif is_max_pool2d(gm, node):
        if node.op == "call_module":
            pool = gm.get_submodule(node.target)
            values = {name: getattr(pool, name) for name in MAX_POOL_ARGS[:-1]}
        else:
            values = dict(zip(MAX_POOL_ARGS, node.args[1:]), **node.kwargs)
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
        kernel = pair(values["kernel_size"])
        stride = pair(values.get("stride") or kernel)
        target, args = max_pool2d_codes, (node.args[0], kernel, stride, pair(values.get("padding", 0)),
                                          pair(values.get("dilation", 1)), bool(values.get("ceil_mode", False)))
    elif node.op == "call_method" and node.target == "view":
        with gm.graph.inserting_before(node):
            new = gm.graph.call_method("reshape", node.args, node.kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return
    else:
        return
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def native_join_refusal(gm: GraphModule, add: JoinPlan) -> str | None:
    for grid in (*add.grids, add.out_grid):
        if grid is not None and (grid.qmin != 0 or grid.qmax > native.UINT8_MAX):
            return f"an activation grid [{grid.qmin}, {grid.qmax}] of the add is not uint8"
    for node in add.chain:
        if not native_code_safe(gm, node):
            return f"{node.format_node()} has no kernel on uint8 codes"
    return None


def replace_native_add(gm: GraphModule, node: Node, add: JoinPlan) -> None:
    """A NativeAdd on uint8 codes, the ReLU or clamp right after it fused as its clamp."""
    out, fused = add.out_grid, fused_clamp(gm, node, add.chain)
    if fused is not None and out is None and fused[1] != (0.0, None):
        fused = None  # dequantizing, NativeAdd fuses a ReLU only: the clamp stays the float op after it
    taken = None if fused is None else fused[0]  # the ReLU or clamp the add takes
    a, b = ((float(g.scale), int(g.zero_point)) for g in add.grids)
    if out is None:
        module = NativeAdd(a, b, None, relu=taken is not None)
    else:
        low, high = (out.qmin, out.qmax) if fused is None else clamp_codes(out, fused[1])
        module = NativeAdd(a, b, (float(out.scale), int(out.zero_point)), low=low, high=high)
    respell_chain(gm, swap_join(gm, node, module, "native"), taken, add.chain, out)


def respell_chain(gm: GraphModule, new: Node, taken: Node | None, chain: tuple[Node, ...], grid: Grid | None,
                  in_float: bool = False) -> None:
    """After a layer or add became the kernel node `new`: the ReLU / clamp it took (`taken`) goes, its users
    reading `new`, and the rest of `chain` up to the output grid is respelled for codes on `grid`."""
    if taken is not None:
        taken.replace_all_uses_with(new)
        gm.graph.erase_node(taken)
    for node in chain:
        if node is not taken:
            native_code_op(gm, node, grid, in_float=in_float)


def replace_native_cat(gm: GraphModule, node: Node, cat: JoinPlan) -> None:
    out = cat.out_grid
    grids = [(float(g.scale), int(g.zero_point)) for g in cat.grids]
    output = None if out is None else (float(out.scale), int(out.zero_point))
    module = NativeCat(grids, output, cat.dim, *(() if out is None else (out.qmin, out.qmax)))
    swap_join(gm, node, module, "native", cat_operands(node))
    for chained in cat.chain:
        native_code_op(gm, chained, out)

