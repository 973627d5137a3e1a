"""Tracing an nn.Module into a GraphModule, with failures explained (module path, op, hint), and
where each node came from: its module path and the user's source line, for every later message."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import linecache
import os
import re
import sys
import sysconfig
import threading
import traceback
from collections.abc import Callable, Collection, Mapping
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.fx import CodeGen, GraphModule, Node, Tracer
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .errors import ConfigError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
# torch, fxcompress and the standard library (functools' wrappers) are never the user's line
_NOT_USER = (_TORCH_DIR, os.path.dirname(os.path.abspath(__file__)), sysconfig.get_paths()["stdlib"])
# the zoo's models are models a user compiles: their lines are the user's lines
_ZOO_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo.py")
_TRACE_CODE = Tracer.trace.__code__  # frames above it are the caller of compile(), not the traced forward
# one frame of a node's `stack_trace`, in the format torch.fx and torch.export both write
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>[^\n]+)(?:\n(?!\s*File ")(?P<code>[^\n]*))?')

# torch.fx's Tracer patches nn.Module.__call__ / __getattr__ (and functions' globals) for the whole
# process while it traces, and restores them after. Two traces at once would restore each other's
# patches, so our traces take turns; forwards that other threads run meanwhile pass through the
# patches untouched (see _LocatingTracer._elsewhere).
TRACE_LOCK = threading.Lock()


class _LocatingTracer(Tracer):
    """torch.fx's Tracer that treats chosen modules as leaves, remembers where tracing failed, and
    writes each node's user line to `node.stack_trace` (torch.fx's own `record_stack_traces`
    formats the whole Python stack for every node; the one user frame is all messages need)."""

    def __init__(self, leaf_modules: Collection[Any] = ()) -> None:  # a default: GraphModule unpickling re-creates it
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.thread: int | None = None
        self.depth = 0  # create_arg's recursion (it converts a container's items by calling itself)
        self.converted: Any = None  # the value the last outermost create_arg call converted
        self.output_shape: OutputShape | None = None

    def trace(self, root, concrete_args=None):
        with TRACE_LOCK:
            self.thread = threading.get_ident()
            graph = super().trace(root, concrete_args)
        if self.output_shape is not None and type(graph._codegen) is CodeGen:
            # a ModelOutput in the forward's return value is a plain dict in the output node: the codegen returns
            # its class, as the export front end's does (a pytree codegen, from structured concrete_args, is left
            # alone). Set by the tracer, not by this module's trace(): unpickling a GraphModule (torch.save)
            # re-traces its generated forward with the graph's tracer class, this one, and would return the dicts.
            graph.set_codegen(RecordOutputs(self.output_shape))
        return graph

    def _elsewhere(self) -> bool:
        """Whether the caller is another thread, running some model's forward while this trace patches."""
        return threading.get_ident() != self.thread

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._elsewhere():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_arg(self, a: Any) -> Any:
        self.depth += 1
        try:
            return super().create_arg(a)
        finally:
            self.depth -= 1
            if not self.depth and not self._elsewhere():
                self.converted = a

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> Node:
        if kind == "output":
            # Tracer.trace converts the forward's return value with one create_arg call right before this: its
            # dict subclasses (ModelOutput) are plain dicts in `args` now, so their classes are read from it
            self.output_shape = output_shape(self.converted)
            self.converted = None
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not node.stack_trace:
            frame = _traced_user_frame()
            if frame is not None:
                line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
                node.stack_trace = f'File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}\n    {line}'
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if self._elsewhere():
            return forward(*args, **kwargs)  # a plain call, as if nothing were patched
        path = self.path_of_module(m)
        self.stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path  # the innermost module: the first to see the exception
            raise
        finally:
            self.stack.pop()


@functools.lru_cache(maxsize=4096)
def _is_library(filename: str) -> bool:
    return filename.startswith(_NOT_USER) and filename != _ZOO_FILE


def _traced_user_frame() -> FrameType | None:
    """The innermost frame of the traced forward outside torch, fxcompress and the standard library
    (None for nodes the tracer makes itself: placeholders, the output)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _TRACE_CODE:
        if not _is_library(frame.f_code.co_filename):
            return frame
        frame = frame.f_back
    return None


def _user_frame(exc: BaseException, module: nn.Module) -> str:
    """The last traceback line outside torch, fxcompress and the standard library: the user's line that tracing choked on.
    When torch failed before running any user code (reading the forward's signature), the user's
    forward itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not _is_library(f.filename)]
    if frames:
        f = frames[-1]
        return f"{os.path.basename(f.filename)}:{f.lineno}: {f.line}"
    try:
        lines, lineno = inspect.getsourcelines(type(module).forward)
    except (OSError, TypeError):  # defined in a notebook or in C: no source to point at
        return ""
    return f"{os.path.basename(inspect.getsourcefile(type(module).forward))}:{lineno}: {lines[0].strip()}"


def trace(model: nn.Module, *, leaf_modules: Collection[Any] = (),
          concrete_args: Mapping[str, Any] | None = None) -> GraphModule:
    """Symbolically trace `model` (sharing its parameters); raise TraceError naming where it failed.

    `leaf_modules` holds module types and/or qualified module paths to keep as single call_module
    nodes; `concrete_args` fixes inputs (e.g. flags) that the forward branches on.
    """
    check_trace_options(model, leaf_modules, concrete_args)
    tracer = _LocatingTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:
        where = tracer.failed_in or ""  # "" is the root module itself
        failed = model.get_submodule(where)
        kind = type(failed).__name__
        line = _user_frame(exc, failed)
        # the root itself cannot be a leaf: what is left to suggest there is fixing what it branches on
        leaf = f"mark '{where}' as a leaf (compile(..., leaf_modules=['{where}'])) or " if where else ""
        raise TraceError(
            f"torch.fx could not trace module '{where or '<root>'}' ({kind})"
            f"{' at ' + line if line else ''}: {type(exc).__name__}: {exc}\n"
            f"hint: {leaf}pass concrete_args for inputs that the forward branches on"
        ) from exc
    gm = GraphModule(tracer.root, graph, type(model).__name__)
    keep_non_persistent_buffers(tracer.root, gm)
    return gm


def check_trace_options(model: nn.Module, leaf_modules: Collection[Any],
                        concrete_args: Mapping[str, Any] | None) -> None:
    """ConfigError naming a leaf module or concrete argument that cannot mean anything for `model`:
    torch.fx ignores a leaf path no module has (the module it meant is then traced through, and its
    weights compressed) and a concrete argument the forward does not take, without a word."""
    if isinstance(leaf_modules, (str, nn.Module)) or not isinstance(leaf_modules, Collection):
        # a bare string would be read letter by letter, each letter a path no module has
        raise ConfigError(f"compile.leaf_modules must be a list of module types or module paths, got "
                          f"{type(leaf_modules).__name__} {leaf_modules!r}"
                          + (f" (wrap it in a list: [{leaf_modules!r}])" if isinstance(leaf_modules, str) else ""))
    paths = {name for name, _ in model.named_modules(remove_duplicate=False)}
    for entry in leaf_modules:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            continue
        if not isinstance(entry, str):
            raise ConfigError(f"compile.leaf_modules: {entry!r} is neither an nn.Module subclass nor a module path")
        if not entry:
            raise ConfigError("compile.leaf_modules: '' is the root module itself, which cannot be a leaf")
        if entry not in paths:
            near = sorted(p for p in paths if p and (p.startswith(entry) or entry.startswith(p)))[:5]
            raise ConfigError(f"compile.leaf_modules: {type(model).__name__} has no module at path {entry!r}"
                              + (f" (paths near it: {near})" if near else ""))
    if concrete_args is None:
        return
    if not isinstance(concrete_args, Mapping):
        raise ConfigError(f"compile.concrete_args must be a dict of the forward's argument names to values, "
                          f"got {type(concrete_args).__name__}")
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward written in C: torch.fx reads no names from it either
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # forward(**kwargs) takes any name
    for name in concrete_args:
        if name not in parameters:
            raise ConfigError(f"compile.concrete_args: {type(model).__name__}.forward takes no argument {name!r} "
                              f"(it takes {list(parameters)})")


def keep_non_persistent_buffers(source: nn.Module, gm: GraphModule) -> None:
    """The buffers `source` keeps out of its state_dict stay out of `gm`'s (torch.fx registers a buffer
    the graph reads by `get_attr` again on the modules it makes, as a persistent one)."""
    for name, _ in gm.named_buffers(remove_duplicate=False):
        owner, _, slot = name.rpartition(".")
        try:
            original = source.get_submodule(owner)
        except AttributeError:  # a path only the GraphModule has
            continue
        if slot in original._non_persistent_buffers_set:
            gm.get_submodule(owner)._non_persistent_buffers_set.add(slot)


# ---- the model's own output classes ----------------------------------------------------------------------

def record_type(cls: type) -> bool:
    """Whether an output class is a dict that a dataclass's fields fill (Hugging Face's ModelOutput): torch.fx
    stores any dict as a plain one in the output node, so the generated forward would return a dict."""
    return isinstance(cls, type) and issubclass(cls, dict) and dataclasses.is_dataclass(cls)


class OutputShape(NamedTuple):
    """A container of the model's output structure that holds a record somewhere: its type (the record's class,
    dict, list or tuple), its keys (a record's or dict's) and its items' shapes (None: kept as the graph has it).
    Kept instead of export's TreeSpec, which torch warns about (a deprecated LeafSpec check) when deep-copied, and
    compile deep-copies the graph with its codegen."""

    type: type
    keys: tuple
    items: tuple


def _matched(value: Any, shape: OutputShape | None) -> list | None:
    """The items of the graph's output `value` where `shape` has a container that `value` still has the form of;
    None anywhere else (a leaf, a namedtuple, which torch.fx keeps itself, or a container a pass reshaped)."""
    if shape is None:
        return None
    if issubclass(shape.type, dict) and isinstance(value, dict) and tuple(value) == shape.keys:
        return list(value.values())
    if shape.type in (list, tuple) and type(value) in (list, tuple, immutable_list) and len(value) == len(shape.items):
        return list(value)
    return None


class RecordOutputs(CodeGen):
    """Plain codegen whose forward returns the model's own output classes where its output structure has them
    (`CausalLMOutputWithPast(logits=...)`), so `out.logits`, `out[0]` and `to_tuple()` work on the compiled model
    as on the model. The graph's output node keeps plain dicts in their place, as an fx trace of the same forward
    has them: the passes and the file format read only that (a loaded file returns the dicts)."""

    def __init__(self, shape: OutputShape) -> None:
        super().__init__()
        self.shape = shape
        # global names for the classes the return statement calls, fixed here: torch.fx gives a name its namespace
        # already holds (a node's, another global's, another class's of the same name) a suffix, which the return
        # would not follow; so each is numbered, prefixed and long
        self.names: dict[type, str] = {}
        pending = [shape]
        while pending:
            node = pending.pop()
            pending += [item for item in node.items if item is not None]
            if record_type(node.type):
                self.names.setdefault(node.type, f"fxcompress_output{len(self.names)}_{node.type.__name__}")

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [(name, cls) for cls, name in self.names.items()]

    def generate_output(self, output_args: Any, *, descs: Any = None,
                        repr_fn: Callable[[object], str] | None = None) -> str:
        shown = repr_fn or repr

        def source(value: Any, shape: OutputShape | None) -> str:
            items = _matched(value, shape)
            if items is None:
                return shown(value)
            parts = [source(v, item) for v, item in zip(items, shape.items)]
            if record_type(shape.type):
                return f"{self.names[shape.type]}(" + ", ".join(f"{k}={p}" for k, p in zip(shape.keys, parts)) + ")"
            if shape.type is dict:
                return "{" + ", ".join(f"{k!r}: {p}" for k, p in zip(shape.keys, parts)) + "}"
            return f"[{', '.join(parts)}]" if shape.type is list else f"({''.join(p + ', ' for p in parts)})"

        return f"return {source(output_args, self.shape)}"

    def process_outputs(self, outputs: Any) -> Any:
        """The graph's outputs (an Interpreter's run of it) as the generated forward returns them: the records
        rebuilt, and within them torch.fx's immutable dicts and lists as the plain ones `return` builds."""
        def plain(value: Any) -> Any:
            if isinstance(value, immutable_dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, immutable_list):
                return [plain(v) for v in value]
            return tuple(map(plain, value)) if type(value) is tuple else value

        def rebuilt(value: Any, shape: OutputShape | None) -> Any:
            items = _matched(value, shape)
            if items is None:
                return plain(value)
            parts = [rebuilt(v, item) for v, item in zip(items, shape.items)]
            if record_type(shape.type):
                return shape.type(**dict(zip(shape.keys, parts)))
            return dict(zip(shape.keys, parts)) if shape.type is dict else shape.type(parts)

        return rebuilt(outputs, self.shape)


def output_shape(value: Any) -> OutputShape | None:
    """The containers of a traced forward's return value down to its records; None where it holds none."""
    if not record_type(type(value)) and type(value) not in (dict, list, tuple):
        return None  # a leaf, a proxy, or a container of another type (a namedtuple, which torch.fx keeps itself)
    items = tuple(map(output_shape, value.values() if isinstance(value, dict) else value))
    if not record_type(type(value)) and all(i is None for i in items):
        return None
    return OutputShape(type(value), tuple(value) if isinstance(value, dict) else (), items)


def source_line(node: Node) -> str | None:
    """The user's source line a node came from ("model.py:12: q = self.q(x)"): the innermost frame of
    its `stack_trace` outside torch, fxcompress and the standard library (fx traces and torch.export
    both write one), None when the node has none (a node a pass added)."""
    frames = [m for m in _FRAME.finditer(node.stack_trace or "") if not _is_library(m["file"])]
    if not frames:
        return None
    last = frames[-1]
    code = (last["code"] or "").strip()
    return f"{os.path.basename(last['file'])}:{last['line']}" + (f": {code}" if code else "")


def _own_origin(node: Node) -> tuple[str | None, bool]:
    """A node's module path, module type and source line from what tracing recorded on it (None
    when it has no record), and whether the source line is known."""
    if node.op in ("placeholder", "output"):
        return (f"input '{node.target}'" if node.op == "placeholder" else "the graph's output"), False
    stack = node.meta.get("nn_module_stack") or {}
    path, kind = list(stack.values())[-1] if stack else (node.target if node.op == "call_module" else "", None)
    line = source_line(node)
    if line is None and not stack and node.op != "call_module":
        return (f"attribute '{node.target}'" if node.op == "get_attr" else None), False
    kind_name = kind.__name__ if isinstance(kind, type) else str(kind or "").rpartition(".")[2]
    text = f"module '{path or '<root>'}'" + (f" ({kind_name})" if kind_name else "") + (f" at {line}" if line else "")
    return text, line is not None


def origin(node: Node, reach: int = 6) -> str:
    """Where `node` came from, for messages: "module 'attn.q' (Linear) at model.py:12: q = self.q(x)".

    A node a pass added has no source line of its own; it is placed by the nearest node that has
    one (its users and inputs, breadth first, up to `reach` steps away)."""
    own, located = _own_origin(node)
    if located:
        return own
    seen, level = {node}, [node]
    for _ in range(reach):
        level = [m for n in level for m in (*n.users, *n.all_input_nodes) if m not in seen]
        seen.update(level)
        near = next((text for text, found in map(_own_origin, level) if found), None)
        if near is not None:
            return f"{own or 'a node added by a pass'}, next to {near}"
    return own or "a node added by a pass"
