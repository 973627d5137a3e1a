"""compile(): trace once, then for each pass run -> invalidate analyses -> verify -> annotate shapes -> record.

With `check_analyses` (or FXCOMPRESS_CHECK_ANALYSES=1, as the test suite sets) every analysis a pass
reported preserved is recomputed from scratch after it and compared with the cached result.
"""
from __future__ import annotations

import copy
import inspect
import os
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten

from .analyses.shapes import ShapeInfo, propagate_shapes, shapes_and_outputs
from .analysis import AnalysisKey, Preserved, check_preserved
from .config import check_bool
from .memory import release_freed_memory
from .errors import ConfigError, FxCompressError, TraceError, UnknownOpError, UnknownOpWarning, VerificationError
from .frontends import export_module, from_exported, is_exported_module, linears_written_as_matmul
from .frontends import specialize_shapes as fold_shapes
from .frontends.guards import insert_exact_input_checks
from .history import append_record, copy_history
from .pass_base import Pass, PassContext, PassRecord, PassResult
from .quant import sync_trainable
from .tracing import check_trace_options, origin, trace
from .verify import (OutputSignature, check_example_inputs, check_graph, check_outputs, failing_node, forward,
                     verify_forward, verify_graph)


def _node_signatures(gm: GraphModule) -> dict[str, str]:
    return {n.name: f"{n.op}|{n.target}|{n.args}|{n.kwargs}" for n in gm.graph.nodes}


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"compile.example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


FRONTENDS = ("fx", "export", "auto")


def _copy(model: nn.Module, share_tensors: bool) -> nn.Module:
    """A deep copy of `model`. With `share_tensors` (every pass only reads tensors), the copy's
    parameters and buffers are new tensor objects over the original's storage: the module tree is
    copied, the weights are not, and flags set on the copy (requires_grad) stay on the copy."""
    if not share_tensors:
        return copy.deepcopy(model)
    memo: dict[int, Any] = {}
    for _, param in model.named_parameters(remove_duplicate=False):  # tied parameters stay tied
        memo.setdefault(id(param), nn.Parameter(param.detach(), requires_grad=param.requires_grad))
    for _, buffer in model.named_buffers(remove_duplicate=False):
        memo.setdefault(id(buffer), buffer.detach())
    return copy.deepcopy(model, memo)


def _own_tensors(gm: nn.Module, source: nn.Module) -> None:
    """Give `gm` its own copy of each tensor it still shares with `source` after the passes (those
    they read but did not replace, such as biases and norms), so that training or editing the result
    never writes into the caller's model; tied parameters stay tied."""
    shared = {t.untyped_storage().data_ptr() for t in (*source.parameters(), *source.buffers()) if t.numel()}
    copies: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or not tensor.numel() or tensor.untyped_storage().data_ptr() not in shared:
                    continue
                if id(tensor) not in copies:
                    clone = tensor.detach().clone()
                    copies[id(tensor)] = nn.Parameter(clone, tensor.requires_grad) if table is module._parameters \
                        else clone
                table[name] = copies[id(tensor)]


def _to_graph(model: Any, inputs: tuple, frontend: str, inplace: bool, leaf_modules: Collection[Any],
              concrete_args: Mapping[str, Any] | None, share_tensors: bool = False) -> GraphModule:
    """The GraphModule the passes rewrite: a compiled one as it is, an exported one respelled at
    torch level, an nn.Module traced by torch.fx or exported by torch.export (per `frontend`)."""
    if isinstance(model, torch.export.ExportedProgram) or is_exported_module(model):
        # translated before any copy, which would drop an unlifted program's input ranges; shares its tensors
        gm = from_exported(model)
        return gm if inplace else copy.deepcopy(gm)
    if isinstance(model, GraphModule):
        gm = model if inplace else _copy(model, share_tensors)
        if gm is not model:
            copy_history(model, gm)  # one from torch.load holds it where a deep copy drops it
        return _linears_read(gm)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compile.model must be an nn.Module or a torch.export.ExportedProgram, "
                          f"got {type(model).__name__}")
    check_trace_options(model, leaf_modules, concrete_args)
    # torch.export traces through every module and fixes every input it is not given to its default:
    # it would drop both options without a word (a concrete flag=True traced as the default False)
    fx_only = [name for name, given in (("leaf_modules", leaf_modules),
                                        ("concrete_args", _not_defaults(model, inputs, concrete_args))) if given]
    if frontend == "export" and fx_only:
        raise ConfigError(f"compile: {' and '.join(fx_only)} are options of the fx front end, which "
                          f"frontend='export' does not use; drop them or use frontend='fx'")
    model = model if inplace else copy.deepcopy(model)
    if frontend == "export":
        return export_module(model, inputs)
    try:
        return _linears_read(trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args))
    except TraceError as fx_error:
        if frontend == "fx":
            raise
        if fx_only:
            fx_error.add_note(f"the torch.export fallback was not tried: it cannot honour {' and '.join(fx_only)}")
            raise
        try:
            return export_module(model, inputs)
        except (TraceError, ConfigError) as export_error:
            raise TraceError(f"{fx_error}\nand the torch.export fallback failed too: {export_error}") from export_error


def _not_defaults(model: nn.Module, inputs: tuple, concrete_args: Mapping[str, Any] | None) -> list[str]:
    """The concrete arguments torch.export would not honour: all but those fixed to the default of a
    parameter that `inputs` leave out (export runs the forward with that default too)."""
    if not concrete_args:
        return []
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return list(concrete_args)
    honoured = {p.name for p in parameters[len(inputs):]
                if p.name in concrete_args and p.default is not inspect.Parameter.empty
                and (concrete_args[p.name] is p.default
                     or (type(p.default) in (bool, int, float, str) and type(concrete_args[p.name]) is type(p.default)
                         and concrete_args[p.name] == p.default))}
    return [name for name in concrete_args if name not in honoured]


def _linears_read(gm: GraphModule) -> GraphModule:
    """The traced graph with `x @ weight.T` over a stored weight read as the linear layer it is (as the
    export front end reads it)."""
    if linears_written_as_matmul(gm.graph, gm):
        gm.recompile()
    return gm


def compile(model: nn.Module, passes: Sequence[Pass] = (), example_inputs: Any = None, *,
            calibration_data: Sequence | None = None, leaf_modules: Collection[Any] = (),
            concrete_args: Mapping[str, Any] | None = None, inplace: bool = False,
            verify: bool = True, progress: bool = False, check_analyses: bool | None = None,
            frontend: str = "auto", strict: bool = False, specialize_shapes: bool = False) -> GraphModule:
    """Trace `model` (or take a GraphModule) and apply `passes` in order, verifying after each.

    `model` is an nn.Module, a GraphModule from an earlier compile, a `torch.export.ExportedProgram`
    or its `.module()`. An nn.Module is traced by torch.fx (`frontend="fx"`), exported by
    torch.export (`"export"`), or traced with export as the fallback when tracing fails (`"auto"`).

    Returns the GraphModule itself; `fxcompress.history(gm)` lists what every pass changed.
    Without `inplace=True` the caller's model is never modified (one deep copy is made).
    `calibration_data` is an iterable of input tuples (or tensors) for passes that need data.
    Inputs the model cannot run raise ConfigError naming them and the module that failed.
    Threads may compile different models at once (traces take turns; see tracing.TRACE_LOCK).
    After every pass that changed the graph, each node's `node.meta["tensor_meta"]` holds its shape.
    `check_analyses=True` recomputes every analysis a pass reported preserved and raises
    VerificationError naming the pass and the analysis if it differs (default: the environment
    variable FXCOMPRESS_CHECK_ANALYSES, off unless set to something other than 0).
    A pass that reports changed=False must leave the outputs on `example_inputs` as they were (up to
    rounding): one that edits a weight, a buffer or a submodule without saying so raises VerificationError.
    `leaf_modules` and `concrete_args` are the fx front end's: a path no module has, an argument the
    forward does not take, or either with frontend="export" raises ConfigError naming it, and with
    frontend="auto" the export fallback, which would drop them, is not tried.

    A pass that changes nothing on a graph holding ops it does not know (`Pass.unknown_ops`) is
    named with those ops, their module paths and source lines: an UnknownOpWarning, or an
    UnknownOpError with `strict=True`.

    `specialize_shapes=True` folds every size the graph computes from the inputs' shapes
    (`x.size()[:-1] + (heads, head_dim)`, `x.shape[-1]`, `x.dim()`) into its value on
    `example_inputs` before any pass runs: `view(x, (2, 8, 4, 8))`. The returned GraphModule then
    accepts only inputs of exactly the example inputs' shapes (batch size included; a check after the
    inputs raises ConfigError naming the input and axis otherwise); sizes that depend on the data, not
    only on shapes, are kept and named in a warning.
    """
    check_analyses = _check_options(passes, example_inputs, frontend, check_analyses, inplace=inplace,
                                    verify=verify, progress=progress, strict=strict,
                                    specialize_shapes=specialize_shapes)
    inputs = _as_tuple(example_inputs)
    # passes that only read tensors (LowerToEncoded) are given a copy of the module tree around the
    # caller's tensors: inplace=False then costs no copy of the weights they replace anyway
    share = bool(passes) and all(getattr(p, "reads_tensors_only", False) for p in passes) and not specialize_shapes
    gm = _to_graph(model, inputs, frontend, inplace, leaf_modules, concrete_args, share)

    shapes, expected = _first_run(gm, inputs, verify, specialize_shapes)
    ctx = PassContext(example_inputs=inputs, calibration_data=calibration_data, gm=gm, progress=progress)
    ctx.analyses.put(shapes)
    last = expected  # the outputs of the latest run, which a pass that reports no change must reproduce
    for index, p in enumerate(passes):
        gm, seen = _run_pass(gm, p, index, ctx, expected if not p.changes_output_shapes else None, verify,
                             check_analyses, strict, last)
        if p.changes_output_shapes and verify:
            expected = seen  # the structure its verification run saw is the one later passes keep
        last = seen if verify else None
    if share and isinstance(model, GraphModule) and gm is not model:
        _own_tensors(gm, model)
    sync_trainable(gm)  # parameters no gradient reaches (behind k-means) must not look trainable
    return gm


def _first_run(gm: GraphModule, inputs: tuple, verify: bool,
               specialize: bool) -> tuple[ShapeInfo, OutputSignature | None]:
    """Check the example inputs (a failure now is theirs, before any pass is blamed), take the output
    structure every pass must keep, and write every node's shape (passes read node.meta, summary()
    and draw() after them, and a freshly traced graph has none): one run of the graph serves all
    three unless shape specialization rewrites the graph between the check and the shapes."""
    both = None if specialize else _one_run(gm, inputs)
    outputs = check_example_inputs(gm, inputs) if both is None else both[1]
    expected = OutputSignature.of(outputs) if verify else None
    del outputs  # only their structure is kept: a large model's outputs (logits) need not live through the passes
    if specialize:
        fold_shapes(gm, inputs)
        # a folded view(2, 8, 4, 4) runs any input of as many elements, mixing its rows: refuse other shapes
        insert_exact_input_checks(gm.graph, inputs)
        gm.recompile()
        verify_graph(gm, inputs if verify else None, expected, "specialize_shapes")
    shapes = propagate_shapes(gm, inputs) if both is None else both[0]
    del both
    release_freed_memory()  # glibc keeps the run's freed transients resident under the first pass's peak otherwise
    return shapes, expected


def _one_run(gm: GraphModule, inputs: tuple) -> tuple[ShapeInfo, Any] | None:
    """The shape step and its outputs, to serve as the forward check too, where running the graph
    node by node is calling `gm`: no forward hooks on it and `inputs` bind to its generated forward
    (the interpreter would silently drop an extra input that the call refuses). None where it is not,
    or where the run fails: the separate steps then run and name the failure as they always did."""
    hooks = (gm._forward_hooks, gm._forward_pre_hooks, nn.modules.module._global_forward_hooks,
             nn.modules.module._global_forward_pre_hooks)
    if any(hooks):
        return None
    try:
        inspect.signature(gm.forward).bind(*inputs)
        return shapes_and_outputs(gm, inputs)
    except Exception:  # noqa: BLE001 - the separate forward reruns it, and its error names the culprit
        return None


def _check_options(passes: Sequence[Pass], example_inputs: Any, frontend: str, check_analyses: bool | None,
                   **flags: bool) -> bool:
    """Refuse bad options by name before anything runs; returns check_analyses with its default applied."""
    if not isinstance(passes, (list, tuple)):
        hint = f" (a single Pass: wrap it in a list, [{passes!r}])" if isinstance(passes, Pass) else ""
        raise ConfigError(f"compile.passes must be a list or tuple of Pass instances, got "
                          f"{type(passes).__name__} {passes!r}{hint}")
    for index, p in enumerate(passes):
        if not isinstance(p, Pass):
            raise ConfigError(f"compile.passes[{index}] must be a Pass instance, got {p!r}")
    if check_analyses is None:
        check_analyses = os.environ.get("FXCOMPRESS_CHECK_ANALYSES", "") not in ("", "0")
    for flag, value in (*flags.items(), ("check_analyses", check_analyses)):
        check_bool("compile", flag, value)
    if example_inputs is None:
        raise ConfigError("compile.example_inputs is required: passes are verified by a forward pass on them")
    if frontend not in FRONTENDS:
        raise ConfigError(f"compile.frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    return check_analyses


def _run_pass(gm: GraphModule, p: Pass, index: int, ctx: PassContext, expected: OutputSignature | None,
              verify: bool, check_analyses: bool, strict: bool = False,
              last: OutputSignature | None = None) -> tuple[GraphModule, OutputSignature | None]:
    """Run one pass, verify and annotate the graph, record it; the graph and the signature of the
    outputs of its verification run (None without verification). A pass that reports changed=False
    must compute the outputs of `last` (the run before it) again."""
    label = f"pass #{index} {p!r}"
    before = _node_signatures(gm)
    start = time.perf_counter()
    ctx.gm = gm
    try:
        result = p(gm, ctx)
    except FxCompressError as exc:
        _note_unknown_ops(exc, gm, p, label)
        raise  # a pass's own typed error (ConfigError, PreconditionError, ...) already says what is wrong
    except Exception as exc:
        raise VerificationError(f"{label} raised {type(exc).__name__}{_handled_node(exc, gm)}: {exc}") from exc
    if not isinstance(result, PassResult):
        raise VerificationError(f"{label} returned {type(result).__name__}, not a PassResult")
    preserved = type(p).preserves if result.preserved is None else check_preserved(result.preserved, label)
    seconds = time.perf_counter() - start
    if result.gm is not None:
        result.gm.meta.update({k: v for k, v in gm.meta.items() if k not in result.gm.meta})
        gm = result.gm
    ctx.gm = gm
    seen = _check_and_annotate(gm, result.changed or result.gm is not None, preserved, ctx, label, expected,
                               verify, check_analyses)
    if verify or result.changed or result.gm is not None:
        # the checking run freed its activations into glibc's free lists, where they would stay resident
        # under the next pass's peak (or a next stage's) unless handed back
        release_freed_memory()
    after = _node_signatures(gm)
    record = PassRecord(
        name=type(p).__name__, config=p.config(), changed=result.changed,
        nodes_created=tuple(n for n in after if n not in before),
        nodes_erased=tuple(n for n in before if n not in after),
        nodes_changed=tuple(n for n in after if n in before and before[n] != after[n]),
        params_touched=tuple(result.params_touched), stats=dict(result.stats), seconds=seconds)
    if not result.changed and (record.nodes_created or record.nodes_erased or record.nodes_changed):
        rewritten = [n for n in gm.graph.nodes if n.name in record.nodes_created + record.nodes_changed]
        raise VerificationError(f"{label} reported changed=False but rewrote nodes "
                                f"{list(record.nodes_created + record.nodes_erased + record.nodes_changed)[:5]}"
                                + "".join(f"; {n.name}: {origin(n)}" for n in rewritten[:5]))
    if not result.changed and seen is not None and last is not None:
        _check_unchanged_outputs(gm, ctx, label, last, seen)
    if not result.changed and result.gm is None:
        _report_unknown_ops(gm, p, label, strict)
    append_record(gm, record)
    return gm, seen


def _check_and_annotate(gm: GraphModule, changed: bool, preserved: tuple[Preserved, ...], ctx: PassContext,
                        label: str, expected: OutputSignature | None, verify: bool,
                        check_analyses: bool) -> OutputSignature | None:
    """After a pass: verify the graph (lint, recompile, run on the example inputs, output structure)
    and, if the pass changed it, refresh the analyses and node.meta; one run of the graph serves both
    where it can. The outputs' signature (None without verification)."""
    if not changed:
        return verify_graph(gm, ctx.example_inputs, expected, label) if verify else None
    if verify:
        check_graph(gm, label)  # lints and recompiles
    else:
        gm.recompile()
    return _refresh_analyses(gm, preserved, ctx, label, check_analyses, verify, expected)


def _check_unchanged_outputs(gm: GraphModule, ctx: PassContext, label: str, before: OutputSignature,
                             after: OutputSignature) -> None:
    """VerificationError if a pass that reported changed=False changed the outputs on the example inputs:
    the node diff sees a rewritten graph, not a weight scaled in place, a buffer or a submodule replaced,
    and history would record that such a pass changed nothing."""
    changed = after.changed_values(before)
    if not changed:
        return
    # a graph that draws random numbers or updates state of its own in its forward does not reproduce its
    # own outputs: one more run tells such a graph from a pass that edited it, and of it nothing is concluded
    try:
        again = OutputSignature.of(forward(gm, ctx.example_inputs))
    except Exception as exc:  # it ran a moment ago: what fails now is state its own run left behind
        raise VerificationError(f"{label}: a second run on example_inputs failed"
                                f"{failing_node(gm, ctx.example_inputs)}: {type(exc).__name__}: {exc}") from exc
    if again.changed_values(after):
        return
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = tree_flatten(output.args[0])[0]
    named = [f"output {i}" + (f" {leaves[i].name} ({origin(leaves[i])})"
                              if len(leaves) == len(after.leaves) and isinstance(leaves[i], Node) else "")
             for i in changed[:5]]
    raise VerificationError(f"{label} reported changed=False, but the outputs on example_inputs changed: "
                            f"{'; '.join(named)}. A pass that edits weights, buffers or submodules must "
                            f"report changed=True")


def _handled_node(exc: BaseException, gm: GraphModule) -> str:
    """' while handling node %x (<origin>)': the node of `gm` that the innermost frame of the crash
    held in a local variable (`node` preferred), so that a crash inside a pass names the user's line."""
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        named = sorted(frame.f_locals.items(), key=lambda item: item[0] != "node")
        held = [value for _, value in named if isinstance(value, Node) and value.graph is gm.graph]
        if held:
            return f" while handling node {held[0].format_node()} ({origin(held[0])})"
    return ""


def _report_unknown_ops(gm: GraphModule, p: Pass, label: str, strict: bool) -> None:
    """A pass that changed nothing on a graph holding ops it does not know says so, naming them:
    it may have found nothing to do only because it could not read them."""
    unknown = p.unknown_ops(gm)
    if not unknown:
        return
    message = (f"{label} changed nothing, and the graph holds {_listed(gm, unknown)}. Teach its tables these "
               f"ops (docs/architecture.md), mark them as leaf modules, or respell them")
    if strict:
        raise UnknownOpError(message)
    warnings.warn(message + " (compile(..., strict=True) makes this an error)", UnknownOpWarning, stacklevel=4)


def _note_unknown_ops(exc: FxCompressError, gm: GraphModule, p: Pass, label: str) -> None:
    """A pass's own refusal ("selects no layer") may come from ops it could not read: name them in a note."""
    try:
        unknown = p.unknown_ops(gm)
    except Exception:  # noqa: BLE001 - the pass may have left the graph half rewritten; its refusal stands
        return
    if unknown:
        exc.add_note(f"{label}: the graph holds {_listed(gm, unknown)}")


def _listed(gm: GraphModule, unknown: list[Node], shown: int = 10) -> str:
    more = f"; and {len(unknown) - shown} more" if len(unknown) > shown else ""
    return (f"{len(unknown)} op(s) it does not know: "
            + "; ".join(f"{_op_name(gm, n)} at {origin(n)}" for n in unknown[:shown]) + more)


def _op_name(gm: GraphModule, node: Node) -> str:
    """An op as a user would write it: torch.cumsum, aten.foo.default, .cumsum(), LSTM 'rnn'."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    if isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(node.target)
    module = getattr(node.target, "__module__", None) or ""
    name = getattr(node.target, "__name__", repr(node.target))
    return f"{_PUBLIC_MODULES.get(module, module)}.{name}".lstrip(".")


# where C-implemented functions say they live, and where users import them from
_PUBLIC_MODULES = {"_operator": "operator", "torch._C._nn": "torch.nn.functional", "torch._C": "torch",
                   "torch._C._VariableFunctions": "torch", "torch.functional": "torch"}


def _refresh_analyses(gm: GraphModule, preserved: tuple[Preserved, ...], ctx: PassContext, label: str,
                      check: bool, verify: bool = False,
                      expected: OutputSignature | None = None) -> OutputSignature | None:
    """After a pass that changed the graph: drop what it did not preserve, run the graph on the
    example inputs (with `verify`, a forward check: it runs, and its outputs have the `expected`
    structure), write every node's shape (the nodes it added too), check what it preserved if asked,
    and cache the fresh shapes. The signature of the verified outputs (None without `verify`)."""
    ctx.analyses.invalidate(keep=preserved)
    seen = None
    both = _one_run(gm, ctx.example_inputs) if verify else None
    if both is not None:
        shapes = both[0]
        seen = check_outputs(gm, both[1], expected, label)
        del both
    else:
        if verify:  # no shared run: the forward check on gm's code, then the shape step
            seen = verify_forward(gm, ctx.example_inputs, expected, label)
        shapes = _propagated(gm, ctx, label)
    if check:
        scratch = PassContext(example_inputs=ctx.example_inputs, calibration_data=ctx.calibration_data, gm=gm)
        scratch.analyses.put(shapes)

        def recompute(key: AnalysisKey):
            return scratch.get(key[0], **dict(key[1]))
        ctx.analyses.check(recompute, label)
    ctx.analyses.put(shapes)
    return seen


def _propagated(gm: GraphModule, ctx: PassContext, label: str) -> ShapeInfo:
    try:
        return propagate_shapes(gm, ctx.example_inputs)
    except Exception as exc:
        raise VerificationError(f"{label}: shape propagation failed{failing_node(gm, ctx.example_inputs)}: "
                                f"{type(exc).__name__}: {exc}") from exc
