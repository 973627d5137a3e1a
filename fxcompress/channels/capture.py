"""Feature capture for data-driven channel pruning: the inputs and outputs of linear / conv layers
on calibration data, sampled at a bounded number of output positions.

Features are captured with torch.fx's Interpreter on the calibration batch, in float64. The output
positions are drawn before any feature is gathered: a conv's input patches stay a strided view of
its (padded) input, so a large feature map is never materialized as one row per position.

A *consumer* is a linear, conv1d, conv2d or conv3d layer (any padding and padding mode; grouped
convs group by group): a module, or a masked layer (its stored weight times masks) through the
module that owns its weight.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg
from tqdm.auto import tqdm

from ..errors import PreconditionError
from ..execution import evaluating
from ..layers import FUNCTIONS, KINDS, bias_arg, layer_kind, stored_attr, tied_readers, weight_arg, weight_source
from ..pruning.masks import masks_only
from ..tracing import origin


def calibration_batch(data: Iterable) -> tuple[torch.Tensor, ...]:
    """All calibration inputs as one batch (each item a tensor or a tuple of tensors)."""
    items = [item if isinstance(item, (tuple, list)) else (item,) for item in data]
    return tuple(torch.cat([item[i] for item in items]) for i in range(len(items[0])))


def owner_path(node: Node) -> str | None:
    """The module path holding the layer's parameters: the called module, or for a masked
    (functional) layer the module its stored weight belongs to."""
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and node.target in FUNCTIONS:
        source = weight_source(node)
        if source is not None and source.op == "get_attr" and source.target.endswith(".weight"):
            return source.target.rpartition(".")[0]
    return None


def consumer_module(gm: GraphModule, node: Node, grouped: bool = True) -> nn.Module | None:
    """The module whose parameters a node computes with, if it can be sampled and refitted (grouped
    convs only if asked), else None. A masked layer qualifies through its owner module, which keeps
    its parameters and conv options: its weight must be the stored one times masks and nothing else,
    its bias the owner's. A functional layer over stored parameters that no layer module owns (the export
    front end's `F.linear(x, get_attr)`) qualifies through a module made around those very parameters."""
    path = owner_path(node)
    m = gm.get_submodule(path) if path is not None else None
    kind = layer_kind(m) if m is not None else None
    if kind is None and m is not None and node.op == "call_function":
        m = _functional_view(gm, node)
        kind = layer_kind(m) if m is not None else None
    elif kind is not None and node.op == "call_function" and FUNCTIONS.get(node.target) == kind != "linear" \
            and not KINDS[kind].is_transposed:
        # a masked conv computes with its own call's options, not its owner module's: a padding mode other
        # than zeros is an F.pad before the call, which then pads nothing; gathering windows with the owner's
        # padding would pad twice and misplace every sampled position
        m = _conv_view(node, kind, m.weight, m.bias)
        kind = layer_kind(m) if m is not None else None
    # a transposed conv's output is no product of one input window, which is what rows gather
    if kind is None or KINDS[kind].is_transposed:
        return None
    if node.op == "call_function":
        bias = bias_arg(node)
        same_bias = (bias is None and m.bias is None) or (bias is not None and bias.op == "get_attr"
                                                          and bias.target == f"{path}.bias")
        if FUNCTIONS[node.target] != kind or masks_only(gm, node) is None or not same_bias:
            return None
    if type(m) is not nn.Linear and not grouped and m.groups != 1:
        return None
    return m


# the functional conv options after (input, weight, bias), in order, as their nn module takes them
_CONV_OPTIONS = ("stride", "padding", "dilation", "groups")


def _functional_view(gm: GraphModule, node: Node) -> nn.Module | None:
    """An nn.Linear / nn.Conv module holding the very parameters of a functional linear / conv call (so what is
    refitted into it is refitted into the graph's tensors), or None: another kind, a transposed conv, a weight or
    bias that is no stored parameter, or a weight another layer reads too (a tied head: refitting one layer
    would change the other)."""
    kind = FUNCTIONS.get(node.target)
    source, bias_node = weight_source(node), bias_arg(node)
    if kind is None or KINDS[kind].module is None or KINDS[kind].is_transposed or KINDS[kind].family == "embedding" \
            or source is None or source.op != "get_attr" or tied_readers(gm, node) \
            or (bias_node is not None and bias_node.op != "get_attr"):
        return None
    weight = stored_attr(gm, source.target)
    bias = stored_attr(gm, bias_node.target) if bias_node is not None else None
    if not isinstance(weight, nn.Parameter) or (bias_node is not None and not isinstance(bias, nn.Parameter)):
        return None
    if kind == "linear":
        view = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        view.weight = weight
        if bias is not None:
            view.bias = bias
        return view
    return _conv_view(node, kind, weight, bias)


def _conv_view(node: Node, kind: str, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module | None:
    """An nn.Conv module over `weight` and `bias` with the options of the functional conv call `node` (None where
    an option is computed in the graph)."""
    given = dict(zip(_CONV_OPTIONS, node.args[3:]), **{k: v for k, v in node.kwargs.items() if k in _CONV_OPTIONS})
    if any(isinstance(v, Node) for v in given.values()):
        return None
    groups = given.get("groups", 1)
    view = KINDS[kind].module(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                              bias=bias is not None, device="meta", **given)
    view.weight = weight
    if bias is not None:
        view.bias = bias
    return view


def weight_support(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """Where a masked layer's weight may be nonzero (None: everywhere)."""
    return masks_only(gm, node) if node.op == "call_function" else None


def _windows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input with the output positions first and what one position reads last:
    (positions, in_features) for a linear layer, (N, *L, C, *kernel) for a conv.

    For a conv this is a strided view of the padded input (one copy of the input, no more), so the
    caller can gather the sampled positions without materializing a row for every position.
    """
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    # padded as the conv pads it (any padding mode; nn.Conv keeps its F.pad amounts, "same" and
    # "valid" resolved), so what is left is a convolution without padding
    x = F.pad(x, m._reversed_padding_repeated_twice, "constant" if m.padding_mode == "zeros" else m.padding_mode)
    for i, (k, stride, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        # a window spans the dilated kernel and moves by the stride; every d-th element is a tap
        x = x.unfold(2 + i, (k - 1) * d + 1, stride)[..., ::d]
    # channels just before the taps: a flattened row is ordered like weight.reshape(out, -1)
    return x.movedim(1, len(m.kernel_size) + 1)


def _outputs(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output with the same positions first as `_windows`: (*positions, out), a view."""
    return y.reshape(-1, y.shape[-1]) if isinstance(m, nn.Linear) else y.movedim(1, -1)


@dataclass(frozen=True)
class Sampling:
    """How many positions per layer the features are sampled at, and the seed that picks them."""

    samples: int = 4096
    seed: int = 0


class Capture(Interpreter):
    """Runs the graph; at each watched node calls `before(node, module, input rows)` and
    `after(node, module, output rows)`, both sampled at the same positions (kept in `picks`)."""

    def __init__(self, gm: GraphModule, watched: dict[str, nn.Module], sampling: Sampling, *,
                 before=None, after=None, picks: dict | None = None, progress: str | None = None) -> None:
        super().__init__(gm)
        self.watched, self.samples, self.before, self.after = watched, sampling.samples, before, after
        self.rng = np.random.default_rng(sampling.seed)
        self.picks: dict[str, np.ndarray] = dict(picks or {})
        # `progress` names the work for a tqdm bar over the watched layers (off where not a terminal)
        self.bar = tqdm(total=len(watched), desc=progress, unit="layer", disable=None if progress else True,
                        leave=False)

    def run(self, *args, **kwargs) -> Any:
        self.rows = next((x.shape[0] for x in args if isinstance(x, torch.Tensor) and x.dim()), None)
        return super().run(*args, **kwargs)

    def run_node(self, n: Node) -> Any:
        m = self.watched.get(n.name)
        if m is None:
            return self._run_graph_node(n)
        self.bar.set_postfix_str(n.name)  # drawn at once: a watched layer's solve is the slow part
        args, _ = self.fetch_args_kwargs_from_env(n)
        windows = _windows(m, args[0])
        # the trailing dims are one row's features, as many as the weight has besides its outputs
        at = self._positions(n.name, windows.shape[:windows.dim() + 1 - m.weight.dim()])
        if self.before is not None:
            self.before(n, m, windows[at].flatten(1).double())
            self._rerun_weight_chain(n)
        result = self._run_graph_node(n)
        if self.after is not None:
            self.after(n, m, _outputs(m, result)[at].double())
        self.bar.update(1)
        return result

    def _run_graph_node(self, n: Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:  # the model cannot run the batch: name the node (the solves' errors stay theirs)
            raise PreconditionError(
                f"the calibration data, read as one batch of {self.rows}, fails at node {n.name!r} ({origin(n)}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. A graph whose sizes are "
                "fixed at the example's (compile's specialize_shapes, or a model torch.export could not give a "
                "free batch) runs only the example's batch: give the calibration data as one such batch") from exc

    def _rerun_weight_chain(self, n: Node) -> None:
        """Recompute a functional layer's weight chain (stored weight -> mul(mask) ... -> layer).

        `before` has just refitted the stored weight, but the chain's product was computed earlier
        in the graph from the old values. Without this, the layer's output, which every later layer
        is refitted on, would come from the old weight while the model computes with the new one.
        """
        chain, current = [], weight_arg(n) if n.op == "call_function" else None
        while isinstance(current, Node) and current.op != "get_attr":
            chain.append(current)
            current = current.args[0]
        # the chain reads only stored tensors (masks_only checked it), whose env values may be freed
        values = {}
        for node in reversed(chain):
            args, kwargs = map_arg((node.args, node.kwargs), lambda a: values[a] if a in values
                                   else self.fetch_attr(a.target))
            values[node] = node.target(*args, **kwargs)
        if chain:
            self.env[chain[0]] = values[chain[0]]

    def _positions(self, name: str, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        """Indices, one tensor per dim of `shape`, of the sampled output positions of a layer.

        Drawn (as flat indices) the first time a layer is seen and reused after, so the features
        before and after pruning are taken at the same positions.
        """
        if name not in self.picks:
            total = math.prod(shape)
            self.picks[name] = np.sort(self.rng.choice(total, min(self.samples, total), replace=False))
        return tuple(torch.as_tensor(i) for i in np.unravel_index(self.picks[name], shape))


def run_capture(capture: Capture, batch: tuple) -> dict:
    """Run the captured graph on the batch in eval mode; returns the sampled positions."""
    with evaluating(capture.module), capture.bar:
        capture.run(*batch)
    return capture.picks


