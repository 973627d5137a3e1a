"""Tracing an nn.Module into a GraphModule, with failures explained (module path, op, hint)."""
from __future__ import annotations

import inspect
import os
import sysconfig
import threading
import traceback
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Tracer

from .errors import TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
# torch, fxcompress and the standard library (functools' wrappers) are never the user's line
_NOT_USER = (_TORCH_DIR, os.path.dirname(os.path.abspath(__file__)), sysconfig.get_paths()["stdlib"])

# torch.fx's Tracer patches nn.Module.__call__ / __getattr__ (and functions' globals) for the whole
# process while it traces, and restores them after. Two traces at once would restore each other's
# patches, so our traces take turns; forwards that other threads run meanwhile pass through the
# patches untouched (see _LocatingTracer._elsewhere).
TRACE_LOCK = threading.Lock()


class _LocatingTracer(Tracer):
    """torch.fx's Tracer that treats chosen modules as leaves and remembers where tracing failed."""

    def __init__(self, leaf_modules: Collection[Any] = ()) -> None:  # a default: GraphModule unpickling re-creates it
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_paths = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.thread: int | None = None

    def trace(self, root, concrete_args=None):
        with TRACE_LOCK:
            self.thread = threading.get_ident()
            return super().trace(root, concrete_args)

    def _elsewhere(self) -> bool:
        """Whether the caller is another thread, running some model's forward while this trace patches."""
        return threading.get_ident() != self.thread

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._elsewhere():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

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


def _user_frame(exc: BaseException, module: nn.Module) -> str:
    """The last traceback line outside torch, fxcompress and the standard library: the user's line that tracing choked on.
    When torch failed before running any user code (reading the forward's signature), the user's
    forward itself."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_NOT_USER)]
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
    tracer = _LocatingTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as exc:
        where = tracer.failed_in or ""  # "" is the root module itself
        failed = model.get_submodule(where)
        kind = type(failed).__name__
        line = _user_frame(exc, failed)
        raise TraceError(
            f"torch.fx could not trace module '{where or '<root>'}' ({kind})"
            f"{' at ' + line if line else ''}: {type(exc).__name__}: {exc}\n"
            f"hint: mark '{where}' as a leaf (compile(..., leaf_modules=['{where}'])) or pass "
            "concrete_args for inputs that the forward branches on"
        ) from exc
    name = type(model).__name__
    return GraphModule(tracer.root, graph, name)
