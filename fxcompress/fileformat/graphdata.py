"""A GraphModule's graph and module tree as plain JSON data, and back, through the allow-lists.

Loading treats every string as hostile: torch.fx turns node names, placeholder targets, kwargs keys
and attribute paths into the source of `forward`, and copies attributes along `get_attr` /
`call_module` paths. So each name must be a plain ASCII identifier (no keyword, no dunder), each
path must walk only the module tree (`_modules`, then a parameter or buffer slot), and each
argument is rebuilt from a closed set of tagged values. Any violation is a FormatError naming
the node or module.
"""
from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import types
import typing
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxcompress.errors import FormatError

from .allowlist import (CREATED_ELEMENTS, CREATED_PIECES, CREATED_SLACK, DEVICE_FIELDS, DTYPES, FUNCTION_NAMES,
                        FUNCTIONS, MAX_PIECES, METHODS, MODULE_CREATED_ELEMENTS, MODULE_NAMES, MODULES, NAMED_RESULTS,
                        NUMERIC_LIMITS, RESULT_FIELDS, STANDARD_MODULES, TENSOR_PROPERTIES, ensure_torchvision,
                        fxcompress_modules, is_safe_name, is_safe_path_part)

ALIAS = "alias"  # a module table entry naming a module listed earlier under another path
MAX_ARG_DEPTH = 32  # nesting of one argument (tuples, lists, dicts, slices)
_NODE_KEYS = {"name", "op", "target", "args", "kwargs"}
_MODULE_KEYS = {"path", "type", "config", "training"}


def fail(where: str, message: str) -> FormatError:
    return FormatError(f"manifest: {where}: {message}")


# ---- saving -------------------------------------------------------------------------------------

def _encode_arg(value: Any, where: str) -> Any:
    if isinstance(value, Node):
        return {"n": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"f": repr(value)}
    if isinstance(value, (tuple, list)):
        items = [_encode_arg(v, where) for v in value]
        return {"t": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {"d": [[_encode_arg(k, where), _encode_arg(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"s": [_encode_arg(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"e": 1}
    if isinstance(value, torch.dtype) and str(value).removeprefix("torch.") in DTYPES:
        return {"dt": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"dev": str(value)}
    if isinstance(value, torch.memory_format):
        return {"mf": str(value).removeprefix("torch.")}
    raise FormatError(f"cannot save {where}: argument {value!r} of type {type(value).__name__} is not storable")


def _function_name(node: Node, where: str) -> str:
    if node.target not in FUNCTION_NAMES:
        ensure_torchvision()
    if node.target not in FUNCTION_NAMES:
        raise FormatError(f"cannot save {where}: {node.target!r} is not in the allow-list of functions "
                          "(fxcompress.register_function adds a trusted one)")
    if node.target is getattr and not _is_property_read(node.args, node.kwargs):
        raise FormatError(f"cannot save {where}: getattr is stored only for tensor properties "
                          f"{sorted(TENSOR_PROPERTIES)}, torch.finfo / iinfo fields {sorted(NUMERIC_LIMITS)} and "
                          f"the fields {sorted(RESULT_FIELDS)} of topk / sort / max / min results")
    return FUNCTION_NAMES[node.target]


def _check_names_storable(node: Node, where: str) -> None:
    names = [node.name, *node.kwargs]
    if node.op == "placeholder":
        names.append(node.target)
    paths = [node.target] if node.op in ("get_attr", "call_module") else []
    if not all(map(is_safe_name, names)) or not all(is_safe_path_part(p) for t in paths for p in t.split(".")):
        raise FormatError(f"cannot save {where}: a name or target is not a plain identifier (or uses a dunder)")


def graph_to_data(gm: GraphModule) -> list[dict]:
    """The graph's nodes as data, placeholders first (in their own order, which is the inputs' order): torch.fx
    lets a pass insert a node between two placeholders, and `graph_from_data` accepts them only at the front."""
    nodes = []
    ordered = sorted(gm.graph.nodes, key=lambda node: node.op != "placeholder")  # stable: the rest keep their order
    for node in ordered:
        where = f"node {node.format_node()}"
        _check_names_storable(node, where)
        target = node.target
        if node.op == "call_function":
            target = _function_name(node, where)
        elif node.op == "call_method" and target not in METHODS:
            raise FormatError(f"cannot save {where}: method {target!r} is not in the allow-list")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode_arg(node.args, where), "kwargs": _encode_arg(node.kwargs, where)})
    return nodes


def modules_to_data(gm: GraphModule) -> list[dict]:
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    ours = {cls: name for name, cls in fxcompress_modules().items()}
    described, rebuilt = [], []  # rebuilt: paths whose children are recreated with them (our modules, aliases)
    first_path: dict[int, str] = {}  # a module held under several paths is described once, under its first
    for path, module in gm.named_modules(remove_duplicate=False):
        if not path:
            described.append({"path": "", "type": "root", "config": {}, "training": module.training})
            continue
        if any(path.startswith(prefix + ".") for prefix in rebuilt):
            continue
        if not all(map(is_safe_path_part, path.split("."))):
            raise FormatError(f"cannot save module {path!r}: a path step is not a plain identifier")
        cls = type(module)
        if id(module) in first_path:
            described.append({"path": path, "type": ALIAS, "config": {"same_as": first_path[id(module)]}})
            rebuilt.append(path)
        elif cls in MODULE_NAMES:
            fields = MODULES[MODULE_NAMES[cls]][1]
            described.append({"path": path, "type": MODULE_NAMES[cls],
                              "config": {f: _encode_arg(getattr(module, f), path) for f in fields}})
        elif cls in ours:
            described.append({"path": path, "type": ours[cls], "config": module.config()})
            rebuilt.append(path)
        elif path in called:
            raise FormatError(f"cannot save module {path!r}: type {cls.__name__} is not in the allow-list "
                              "(fxcompress.register_module adds a trusted one)")
        else:
            described.append({"path": path, "type": "container", "config": {}})
        first_path.setdefault(id(module), path)
        described[-1]["training"] = module.training
    return described


# ---- loading: values ----------------------------------------------------------------------------

def _hashable(value: Any, where: str) -> Any:
    try:
        hash(value)
    except TypeError:
        raise fail(where, f"dict key {value!r} is not hashable") from None
    return value


def _device(inner: Any, where: str) -> torch.device:
    try:
        return torch.device(_typed(inner, str, where, "device"))
    except RuntimeError as exc:
        raise fail(where, f"device {inner!r} is invalid ({exc})") from None


def _number(inner: Any, where: str) -> float:
    try:
        return float(_typed(inner, str, where, "non-finite float"))
    except ValueError:
        raise fail(where, f"non-finite float {inner!r} is not a number") from None


def _dtype(inner: Any, where: str) -> torch.dtype:
    if not isinstance(inner, str) or inner not in DTYPES:
        raise fail(where, f"dtype {inner!r} is not supported")
    return DTYPES[inner]


MEMORY_FORMATS = {name: getattr(torch, name) for name in
                  ("contiguous_format", "preserve_format", "channels_last", "channels_last_3d")}


def _memory_format(inner: Any, where: str) -> torch.memory_format:
    if not isinstance(inner, str) or inner not in MEMORY_FORMATS:
        raise fail(where, f"memory format {inner!r} is not supported")
    return MEMORY_FORMATS[inner]


def _typed(value: Any, kind: type | tuple, where: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise fail(where, f"{what} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
    return value


def _pairs(inner: Any, where: str) -> list:
    items = _typed(inner, list, where, "a dict's items")
    if not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise fail(where, "a dict's items must be [key, value] pairs")
    return items


def _slice_parts(inner: Any, where: str) -> list:
    if not isinstance(inner, list) or len(inner) != 3:
        raise fail(where, "a slice must be [start, stop, step]")
    return inner


# tag -> decoder(inner, decode-one-value, where); a closed set, so an argument is only ever data
_TAGS: dict[str, Callable] = {
    "t": lambda inner, dec, w: tuple(map(dec, _typed(inner, list, w, "a tuple"))),
    "d": lambda inner, dec, w: {_hashable(dec(k), w): dec(v) for k, v in _pairs(inner, w)},
    "s": lambda inner, dec, w: slice(*map(dec, _slice_parts(inner, w))),
    "e": lambda inner, dec, w: Ellipsis,
    "f": lambda inner, dec, w: _number(inner, w),
    "dt": lambda inner, dec, w: _dtype(inner, w),
    "dev": lambda inner, dec, w: _device(inner, w),
    "mf": lambda inner, dec, w: _memory_format(inner, w),
}


def decode_arg(value: Any, nodes: dict[str, Node] | None, where: str, depth: int = 0) -> Any:
    """A stored argument back as a value; `nodes` are the earlier nodes (None: no node may be named)."""
    if depth > MAX_ARG_DEPTH:
        raise fail(where, f"an argument is nested deeper than {MAX_ARG_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    dec = lambda v: decode_arg(v, nodes, where, depth + 1)  # noqa: E731
    if isinstance(value, list):
        return [dec(v) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise fail(where, f"argument {_short(value)} is not a stored value")
    (tag, inner), = value.items()
    if tag == "n":
        if nodes is None or not isinstance(inner, str) or inner not in nodes:
            raise fail(where, f"argument names {_short(inner)}, which is not an earlier node")
        return nodes[inner]
    if tag not in _TAGS:
        raise fail(where, f"argument tag {_short(tag)} is unknown")
    return _TAGS[tag](inner, dec, where)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- loading: paths in the module tree ----------------------------------------------------------

def submodule(root: nn.Module, path: str, where: str) -> nn.Module:
    """The submodule at dotted `path`, walking only `_modules` (never attributes or classes)."""
    module = root
    for part in path.split(".") if path else []:
        if not is_safe_path_part(part):
            raise fail(where, f"path {_short(path)} has an unsafe step {_short(part)}")
        if part not in module._modules or module._modules[part] is None:
            raise fail(where, f"path {_short(path)} does not name a submodule")
        module = module._modules[part]
    return module


def split_slot(root: nn.Module, path: Any, where: str) -> tuple[nn.Module, str]:
    """(owning module, slot name) of a parameter / buffer path such as `fc1.weight`."""
    parent, _, name = _typed(path, str, where, "a tensor path").rpartition(".")
    if not is_safe_path_part(name):
        raise fail(where, f"path {_short(path)} has an unsafe step {_short(name)}")
    return submodule(root, parent, where), name


def _attribute_target(root: nn.Module, target: Any, where: str) -> str:
    module, name = split_slot(root, target, where)
    slots = (module._modules, module._parameters, module._buffers)
    if not any(store.get(name) is not None for store in slots):
        raise fail(where, f"target {_short(target)} is not a submodule, parameter or buffer")
    return target


def _module_target(root: nn.Module, target: Any, where: str) -> str:
    if not _typed(target, str, where, "a module target"):
        raise fail(where, "call_module needs a submodule path")
    module = submodule(root, target, where)
    # a container has no forward: calling it raises NotImplementedError, which the dry run reads as a missing
    # meta kernel (not a refusal), so the file would load and fail at its first call
    if type(module).forward is nn.Module.forward:
        raise fail(where, f"call_module target {_short(target)} is a container, which has no forward to call")
    return target


def _function_target(name: Any, where: str) -> Callable:
    if isinstance(name, str) and name not in FUNCTIONS and name.startswith("torchvision."):
        ensure_torchvision()
    if not isinstance(name, str) or name not in FUNCTIONS:
        raise fail(where, f"function {_short(name)} is not in the allow-list; if you trust it, register it "
                          "with fxcompress.register_function before loading")
    return FUNCTIONS[name]


def _method_target(name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in METHODS:
        raise fail(where, f"method {_short(name)} is not in the allow-list")
    return name


def _placeholder_target(name: Any, where: str) -> str:
    if not is_safe_name(name):
        raise fail(where, f"placeholder target {_short(name)} is not a plain identifier")
    return name


def _output_target(name: Any, where: str) -> str:
    if name != "output":
        raise fail(where, f"output target {_short(name)} must be 'output'")
    return name


# op -> how its target is resolved (root, stored target, where) -> fx target
_TARGETS: dict[str, Callable] = {
    "placeholder": lambda root, t, w: _placeholder_target(t, w),
    "get_attr": _attribute_target,
    "call_module": lambda root, t, w: _module_target(root, t, w),
    "call_function": lambda root, t, w: _function_target(t, w),
    "call_method": lambda root, t, w: _method_target(t, w),
    "output": lambda root, t, w: _output_target(t, w),
}


# ---- loading: the graph -------------------------------------------------------------------------

def _is_property_read(args: tuple, kwargs: dict) -> bool:
    """A tensor property (`x.dtype`), or a field of a torch.finfo / iinfo node (`finfo(x.dtype).min`)."""
    if not (len(args) == 2 and isinstance(args[0], Node) and isinstance(args[1], str) and not kwargs):
        return False
    if args[0].op == "call_function" and args[0].target in (torch.finfo, torch.iinfo):
        return args[1] in NUMERIC_LIMITS
    if args[0].op == "call_function" and args[0].target is getattr and args[0].args[1:] == ("device",):
        return args[1] in DEVICE_FIELDS
    if args[0].op in ("call_function", "call_method") and args[0].target in NAMED_RESULTS:
        return args[1] in RESULT_FIELDS
    return args[1] in TENSOR_PROPERTIES


def _check_call(op: str, target: Any, args: tuple, kwargs: dict, where: str) -> None:
    """The argument shapes torch.fx's code generator assumes for each op."""
    rules = {
        "placeholder": len(args) <= 1 and not kwargs and not _mentions_node(args),
        "get_attr": not args and not kwargs,
        "output": len(args) == 1 and not kwargs,
        "call_method": bool(args) and isinstance(args[0], Node),
        "call_module": True,
        "call_function": target is not getattr or _is_property_read(args, kwargs),
    }
    if not rules[op]:
        raise fail(where, f"the arguments of this {op} node have the wrong form")
    if op == "call_function" and not _binds(target, args, kwargs):
        raise fail(where, f"the arguments do not match the signature of {getattr(target, '__name__', target)}")


def _check_sizes(root: nn.Module, op: str, target: Any, args: tuple, kwargs: dict, budget: int, where: str) -> None:
    """A call that allocates by sizes written in the file (its arguments, or its module's configuration)
    stays within `budget` elements."""
    if op == "call_module":
        module = submodule(root, target, where)
        count = MODULE_CREATED_ELEMENTS.get(type(module))
        created, what = (count(module), type(module).__name__) if count is not None else (0, "")
    else:
        count = CREATED_ELEMENTS.get(target) if op in ("call_function", "call_method") else None
        created, what = (count(args, kwargs), getattr(target, "__name__", target)) if count is not None else (0, "")
    if created > budget:
        raise fail(where, f"{what} would create {created} elements from sizes the file states, more than the "
                          f"model's tensors hold plus {CREATED_SLACK} ({budget})")
    pieces = CREATED_PIECES.get(target) if op in ("call_function", "call_method") else None
    if pieces is not None and pieces(args, kwargs) > MAX_PIECES:
        raise fail(where, f"{getattr(target, '__name__', target)} would make {pieces(args, kwargs)} tensors from a "
                          f"count the file states, more than {MAX_PIECES}")


_SCALARS = (bool, int, float)


def _check_module_call(root: nn.Module, target: str, args: tuple, kwargs: dict, where: str) -> None:
    """The constants a call gives one of torch's modules fit its forward's annotated bool / int / float parameters.
    The dry run runs such a module on meta tensors, where its forward may take another path than on the CPU:
    nn.MultiheadAttention's fast path hands need_weights to a C++ op that takes a bool only, its meta path only
    asks whether it is true, so `need_weights=[]` loaded and failed at the first call."""
    module = submodule(root, target, where)
    if MODULE_NAMES.get(type(module)) not in STANDARD_MODULES:
        return
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except TypeError:
        raise fail(where, f"the arguments do not match the signature of {type(module).__name__}.forward") from None
    hints = _forward_hints(type(module))
    for name, value in bound.items():
        if hints.get(name) in _SCALARS and not _mentions_node(value) and not conforms(value, hints[name]):
            raise fail(where, f"argument {name!r} of {type(module).__name__} is {_short(value)}, not a "
                              f"{hints[name].__name__}")


@functools.cache
def _forward_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.forward)
    except Exception:  # noqa: BLE001 - annotations that do not resolve: nothing to check against
        return {}


def _mentions_node(value: Any) -> bool:
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


def _binds(fn: Callable, args: tuple, kwargs: dict) -> bool:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # a builtin without a signature: torch checks its arguments when called
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _kwargs(value: Any, nodes: dict[str, Node], where: str) -> dict:
    kwargs = decode_arg(value, nodes, where)
    if not isinstance(kwargs, dict) or not all(map(is_safe_name, kwargs)):
        raise fail(where, "kwargs must be a dict whose keys are plain identifiers")
    return kwargs


def _node_entry(item: Any, index: int) -> tuple[str, str]:
    if not isinstance(item, dict) or set(item) != _NODE_KEYS:
        raise fail(f"graph node #{index}", f"must be an object with exactly the keys {sorted(_NODE_KEYS)}")
    name, op = item["name"], item["op"]
    if not is_safe_name(name):
        raise fail(f"graph node #{index}", f"name {_short(name)} is not a plain identifier")
    if op not in _TARGETS:
        raise fail(f"graph node {name!r}", f"unknown op {_short(op)}")
    return name, op


def graph_from_data(items: Any, root: nn.Module) -> Graph:
    """The graph, checked against the rebuilt module tree `root` before torch.fx generates any code."""
    graph, nodes = Graph(), {}
    budget = sum(t.numel() for t in (*root.parameters(), *root.buffers())) + CREATED_SLACK
    ops = [_node_entry(item, i)[1] for i, item in enumerate(_typed(items, list, "graph", "the graph"))]
    if ops.count("output") != 1 or ops[-1] != "output":
        raise fail("graph", "must end with its one output node")
    if "placeholder" in ops[ops.count("placeholder"):]:
        raise fail("graph", "placeholder nodes must come first")
    for item in items:
        name, op = item["name"], item["op"]
        where = f"graph node {name!r}"
        target = _TARGETS[op](root, item["target"], where)
        args = decode_arg(item["args"], nodes, where)
        if not isinstance(args, tuple):
            raise fail(where, "args must be a tuple")
        kwargs = _kwargs(item["kwargs"], nodes, where)
        _check_call(op, target, args, kwargs, where)
        if op == "call_module":
            _check_module_call(root, target, args, kwargs, where)
        _check_sizes(root, op, target, args, kwargs, budget, where)
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise fail(where, f"name is already used or reserved (torch.fx renamed it {node.name!r})")
        nodes[name] = node
    return graph


# ---- loading: the module tree -------------------------------------------------------------------

def _standard_module(kind: str, config: dict, where: str) -> nn.Module:
    cls, fields = MODULES[kind]
    if set(config) != set(fields):
        raise fail(where, f"config keys {sorted(config)} are not exactly {kind}'s fields {sorted(fields)}")
    kwargs = {k: _tuples(decode_arg(v, None, where)) for k, v in config.items()}
    return _construct(cls, kwargs, where)


def _fxcompress_module(cls: type, config: dict, where: str) -> nn.Module:
    # every parameter without a default must be given, none unknown: a parameter added later with a
    # default (GridWeight's group_size) is left out by modules that do not use it, and by older files
    parameters = inspect.signature(cls).parameters
    required = {name for name, p in parameters.items() if p.default is inspect.Parameter.empty}
    if not required <= set(config) <= set(parameters):
        raise fail(where, f"config keys {sorted(config)} are not {cls.__name__}'s: it needs {sorted(required)} "
                          f"and accepts {sorted(parameters)}")
    hints = _constructor_hints(cls)
    for key, value in config.items():  # before the constructor: its checks may assume the declared types
        if key in hints and not conforms(value, hints[key]):
            raise fail(where, f"config {key!r} is {_short(value)}, not a {_annotation_name(hints[key])}")
    return _construct(cls, config, where)


@functools.cache
def _constructor_hints(cls: type) -> dict[str, Any]:
    """The constructor's resolved annotations; none where they cannot be resolved (a registered class's own
    forward references), which leaves its checks to the constructor."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - any failure to resolve means: no declared types to check against
        return {}


# what torch takes as an integer scalar: a larger JSON integer given as an int or float field (a scale of 2 ** 100)
# raised OverflowError at the first call, where it met a tensor
_INT64 = range(-2 ** 63, 2 ** 63)


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a constructor's annotation: ints are not bools and fit int64, floats are finite
    numbers (an int among them fits int64), lists stand for sequences and tuples (fixed-length ones item by
    item), objects for mappings with string keys. An annotation these rules do not cover accepts anything (the
    constructor checks it)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, option) for option in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool) and value in _INT64
    if annotation is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (isinstance(value, float) or value in _INT64))
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (not args or all(isinstance(k, str) and conforms(v, args[1])
                                                            for k, v in value.items()))
    if annotation is list or origin in (list, collections.abc.Sequence):
        return isinstance(value, list) and (not args or all(conforms(v, args[0]) for v in value))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
        return isinstance(value, list) and len(value) == len(args) and all(map(conforms, value, args))
    return True


def _annotation_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("collections.abc.", "").replace("<class '", "").replace(
        "'>", "")


def _construct(cls: type, kwargs: dict, where: str) -> nn.Module:
    try:
        return cls(**kwargs)
    except FormatError:
        raise
    except Exception as exc:  # an allow-listed constructor refusing its configuration
        raise fail(where, f"{cls.__name__}({_short(kwargs)}) cannot be built ({type(exc).__name__}: {exc})") from None


def _build(kind: Any, config: Any, where: str) -> nn.Module:
    config = _typed(config, dict, where, "config")
    if kind == "container":
        if config:
            raise fail(where, "a container has no config")
        return nn.Module()
    if isinstance(kind, str) and kind in MODULES:
        return _standard_module(kind, config, where)
    ours = fxcompress_modules()
    if isinstance(kind, str) and kind in ours:
        return _fxcompress_module(ours[kind], config, where)
    raise fail(where, f"type {_short(kind)} is not in the allow-list; if you trust it, register it with "
                      "fxcompress.register_module before loading")


def _module_entry(root: nn.Module, item: Any, index: int) -> tuple[nn.Module, str, str]:
    """(parent, name, where) for module table entry `index`; the parent must exist, the name be a safe
    step that is new or a child the parent's constructor made (MultiheadAttention's out_proj)."""
    if not isinstance(item, dict) or set(item) != _MODULE_KEYS:
        raise fail(f"module #{index}", f"must be an object with exactly the keys {sorted(_MODULE_KEYS)}")
    path = _typed(item["path"], str, f"module #{index}", "path")
    where = f"module {path!r}"
    _typed(item["training"], bool, where, "training")
    if (index == 0) != (item["type"] == "root") or (index == 0) != (path == ""):
        raise fail(where, "the first entry, and only it, must be the root (path '', type 'root')")
    parent_path, _, name = path.rpartition(".")
    parent = submodule(root, parent_path, where)
    if index and (not is_safe_path_part(name) or (name not in parent._modules and hasattr(parent, name))):
        raise fail(where, f"path step {_short(name)} is unsafe or names an attribute")
    return parent, name, where


def _aliased(root: nn.Module, item: dict, listed: set, where: str) -> nn.Module:
    """The module an alias entry names: listed before it, and not one that contains the alias (a cycle)."""
    config = _typed(item["config"], dict, where, "config")
    if set(config) != {"same_as"} or config["same_as"] not in listed - {"", item["path"]}:
        raise fail(where, "an alias's config is exactly {'same_as': <the path of a module listed before it>}")
    module = submodule(root, config["same_as"], where)
    steps = item["path"].split(".")[:-1]
    containers = [submodule(root, ".".join(steps[:i]), where) for i in range(len(steps) + 1)]
    if any(container is module for container in containers):
        raise fail(where, f"an alias of {_short(config['same_as'])} inside it would make the module tree a cycle")
    return module


def modules_from_data(described: Any) -> nn.Module:
    """The module tree, built on the meta device: no constructor allocates by the sizes a file declares.

    The tensor table then provides every real tensor.
    """
    root, paths, aliases = nn.Module(), set(), []
    for index, item in enumerate(_typed(described, list, "modules", "the module table")):
        parent, name, where = _module_entry(root, item, index)
        if item["path"] in paths:
            raise fail(where, "is listed twice")
        if any(item["path"].startswith(alias + ".") for alias in aliases):
            raise fail(where, "lies below an alias (its module's entries are under the path it was first listed at)")
        paths.add(item["path"])
        if index == 0:
            _typed(item["config"], dict, where, "config")
            root.training = item["training"]
            continue
        if item["type"] == ALIAS:  # a second path of a module listed earlier: the very module
            module = _aliased(root, item, paths, where)
            aliases.append(item["path"])
        elif name in parent._modules:  # made by its parent's constructor; its tensors follow
            if item["type"] != "container" or parent._modules[name] is None:
                raise fail(where, "a submodule its parent builds can only be listed as a container")
            module = parent._modules[name]
            _build("container", item["config"], where)
        else:
            with torch.device("meta"):
                module = _build(item["type"], item["config"], where)
        module.training = item["training"]
        parent.add_module(name, module)
    if not described:
        raise fail("modules", "the module table is empty (it must start with the root)")
    return root


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
