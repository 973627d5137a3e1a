"""A GraphModule's graph and module tree as plain JSON data, and back, through the allow-lists."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from fxcompress.errors import FormatError

from .allowlist import DTYPES, FUNCTION_NAMES, FUNCTIONS, METHODS, MODULE_NAMES, MODULES, fxcompress_modules


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
    raise FormatError(f"cannot save {where}: argument {value!r} of type {type(value).__name__} is not storable")


def _decode_arg(value: Any, nodes: dict[str, Node]) -> Any:
    if isinstance(value, list):
        return [_decode_arg(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (key, inner), = value.items()
    decoders = {
        "n": lambda: nodes[inner], "f": lambda: float(inner), "e": lambda: Ellipsis,
        "t": lambda: tuple(_decode_arg(v, nodes) for v in inner),
        "d": lambda: {_decode_arg(k, nodes): _decode_arg(v, nodes) for k, v in inner},
        "s": lambda: slice(*(_decode_arg(v, nodes) for v in inner)),
        "dt": lambda: DTYPES[inner], "dev": lambda: torch.device(inner),
    }
    return decoders[key]()


def graph_to_data(gm: GraphModule) -> list[dict]:
    nodes = []
    for node in gm.graph.nodes:
        where = f"node {node.format_node()}"
        target = node.target
        if node.op == "call_function":
            if target not in FUNCTION_NAMES:
                raise FormatError(f"cannot save {where}: {target!r} is not in the allow-list of functions")
            target = FUNCTION_NAMES[target]
        elif node.op == "call_method" and target not in METHODS:
            raise FormatError(f"cannot save {where}: method {target!r} is not in the allow-list")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode_arg(node.args, where), "kwargs": _encode_arg(node.kwargs, where)})
    return nodes


def graph_from_data(nodes: list[dict]) -> Graph:
    graph, env = Graph(), {}
    for item in nodes:
        op, target = item["op"], item["target"]
        if op == "call_function":
            if target not in FUNCTIONS:
                raise FormatError(f"graph: function {target!r} is not in the allow-list")
            target = FUNCTIONS[target]
        elif op == "call_method" and target not in METHODS:
            raise FormatError(f"graph: method {target!r} is not in the allow-list")
        elif op not in ("placeholder", "get_attr", "call_module", "output", "call_method"):
            raise FormatError(f"graph: unknown node op {op!r}")
        args, kwargs = _decode_arg(item["args"], env), _decode_arg(item["kwargs"], env)
        env[item["name"]] = graph.create_node(op, target, tuple(args), dict(kwargs), name=item["name"])
    return graph


def modules_to_data(gm: GraphModule) -> list[dict]:
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    ours = {cls: name for name, cls in fxcompress_modules().items()}
    described, rebuilt = [], []  # rebuilt: paths of our modules, whose children their config recreates
    for path, module in gm.named_modules():
        if not path:
            described.append({"path": "", "type": "root", "config": {}, "training": module.training})
            continue
        if any(path.startswith(prefix + ".") for prefix in rebuilt):
            continue
        cls = type(module)
        if cls in MODULE_NAMES:
            fields = MODULES[MODULE_NAMES[cls]][1]
            described.append({"path": path, "type": MODULE_NAMES[cls],
                              "config": {f: _encode_arg(getattr(module, f), path) for f in fields}})
        elif cls in ours:
            described.append({"path": path, "type": ours[cls], "config": module.config()})
            rebuilt.append(path)
        elif path in called:
            raise FormatError(f"cannot save module {path!r}: type {cls.__name__} is not in the allow-list")
        else:
            described.append({"path": path, "type": "container", "config": {}})
        described[-1]["training"] = module.training
    return described


def modules_from_data(described: list[dict]) -> nn.Module:
    root, ours = nn.Module(), None
    for item in described:
        path, kind, config = item["path"], item["type"], item["config"]
        if kind == "root":
            root.training = bool(item["training"])
            continue
        if kind == "container":
            module = nn.Module()
        elif kind in MODULES:
            cls = MODULES[kind][0]
            module = cls(**{k: _tuples(_decode_arg(v, {})) for k, v in config.items()})
        else:
            ours = ours or fxcompress_modules()
            if kind not in ours:
                raise FormatError(f"module {path!r}: type {kind!r} is not in the allow-list")
            module = ours[kind](**config)
        module.training = bool(item["training"])
        parent, _, name = path.rpartition(".")
        root.get_submodule(parent).add_module(name, module)
    return root


def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
