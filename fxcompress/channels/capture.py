"""Feature capture for data-driven channel pruning: the inputs and outputs of linear / conv layers
on calibration data, sampled at a bounded number of output positions.

Features are captured with torch.fx's Interpreter on the calibration batch, in float64. The output
positions are drawn before any feature is gathered: a conv's input patches stay a strided view of
its (padded) input, so a large feature map is never materialized as one row per position.

A *consumer* is a linear, conv1d, conv2d or conv3d layer (any padding and padding mode; grouped
convs group by group): a module, or a masked layer (its stored weight times masks) through the
module that owns its weight.

Each calibration batch runs as it is given (a dict bound to the graph's inputs by name, as the calibration
walk binds it), all of them in step, node by node: a layer's rows are drawn from the positions of every batch
and concatenated, so batches whose sizes differ beyond the batch dim (sequences of different lengths) give
rows alike, and a graph whose sizes are fixed at the example's runs batches of the example's sizes.

Padding: where the graph has an `attention_mask` input of shape (batch, sequence) with zeros, a linear layer whose
input rows line up with those positions ((batch, sequence, features), or (batch * sequence, features)) is
captured at the unpadded positions only, and its positions are drawn among those, as the calibration walk leaves
padding out of every statistic (`batches.token_rows`). A layer whose rows do not line up (a conv, a reshaped
value) keeps every row, and `run_capture` warns with a PaddingIncludedWarning naming it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg
from tqdm.auto import tqdm

from ..batches import (TOKEN_MASK, PaddingIncludedWarning, batch_keep, bind_inputs, calibration_batches,
                       token_rows)
from ..errors import PreconditionError
from ..execution import evaluating
from ..layers import FUNCTIONS, KINDS, bias_arg, layer_kind, stored_attr, tied_readers, weight_arg, weight_source
from ..pruning.masks import masks_only
from ..tracing import origin


def calibration_batch(data: Iterable) -> list[tuple | Mapping]:
    """The calibration batches as `run_capture` runs them: each a tuple of positional inputs (a tensor is a
    tuple of one) or a dict, which is bound to the graph's inputs by name when the graph is known
    (`batches.bind_inputs`). They are not concatenated: a layer's rows are per position, so batches whose
    sequences differ in length are captured one by one and their rows joined (see `Capture.run_batches`)."""
    return [item if isinstance(item, Mapping) else tuple(item) if isinstance(item, (tuple, list)) else (item,)
            for item in calibration_batches(data, "PruneChannels")]


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
    convs only if asked), else None (`why_not_consumer` says why). A masked layer qualifies through its owner
    module, which keeps its parameters and conv options: its weight must be the stored one times masks and
    nothing else, its bias the owner's. A functional layer over stored parameters that no layer module owns (the
    export front end's `F.linear(x, get_attr)`) qualifies through a module made around those very parameters."""
    return _consumer(gm, node, grouped)[0]


def why_not_consumer(gm: GraphModule, node: Node, grouped: bool = True) -> str | None:
    """Why `consumer_module` has no module for a node (None: it has one), in words for a pass's report."""
    return _consumer(gm, node, grouped)[1]


# why a layer's rows cannot be gathered or its weight refitted, as the reports word it
TRANSPOSED = ("a transposed conv: each output sums several input positions' contributions, no one input window, "
              "which is what the refit's rows gather")
COMPUTED_OPTIONS = "a conv whose options (stride, padding, ...) are computed in the graph"


def tied_reason(gm: GraphModule, node: Node) -> str | None:
    """Why a layer whose weight other layer calls compute with too is not refitted (None: no other does, or the
    node is no linear / conv layer, such as an nn.MultiheadAttention, which has no `weight`)."""
    if not (node.op == "call_module" and layer_kind(gm.get_submodule(node.target)) is not None
            or node.op == "call_function" and node.target in FUNCTIONS):
        return None
    others = tied_readers(gm, node)
    if not others:
        return None
    if node.op == "call_module" and all(o.op == "call_module" and o.target == node.target for o in others):
        return (f"called at {len(others) + 1} places: one weight for several calls, each call's fit would overwrite "
                "the others'")
    names = ", ".join(repr(o.target if o.op == "call_module" else o.name) for o in others)
    return (f"its weight is shared with {names} (a tied head, or a weight several layers compute with): a fit for "
            "one call would change the others")


def _consumer(gm: GraphModule, node: Node, grouped: bool) -> tuple[nn.Module | None, str | None]:
    """`consumer_module`'s module, or None and the reason."""
    path = owner_path(node)
    if path is None:
        if node.op == "call_function" and node.target in FUNCTIONS:
            return None, ("its weight is no stored parameter of a module (computed from the inputs, or produced "
                          "by an encoded weight's module): there is no tensor to refit into")
        return None, "not a linear or conv layer"
    m = gm.get_submodule(path)
    kind = layer_kind(m)
    if kind is None and node.op == "call_function":
        m, why = _functional_view(gm, node)
        if m is None:
            return None, why
        kind = layer_kind(m)
    elif kind is not None and node.op == "call_function" and FUNCTIONS.get(node.target) == kind != "linear" \
            and not KINDS[kind].is_transposed:
        # a masked conv computes with its own call's options, not its owner module's: a padding mode other
        # than zeros is an F.pad before the call, which then pads nothing; gathering windows with the owner's
        # padding would pad twice and misplace every sampled position
        m = _conv_view(node, kind, m.weight, m.bias)
        if m is None:
            return None, COMPUTED_OPTIONS
        kind = layer_kind(m)
    if kind is None:
        return None, f"a {type(m).__name__}, not a linear or conv layer whose input rows can be gathered"
    # a transposed conv's output is no product of one input window, which is what rows gather
    if KINDS[kind].is_transposed:
        return None, TRANSPOSED
    if node.op == "call_function":
        bias = bias_arg(node)
        same_bias = (bias is None and m.bias is None) or (bias is not None and bias.op == "get_attr"
                                                          and bias.target == f"{path}.bias")
        if FUNCTIONS[node.target] != kind:
            return None, f"a {FUNCTIONS[node.target]} call computing with the weight of a {kind} layer"
        if masks_only(gm, node) is None:
            # a fake-quantized (or otherwise transformed) weight: the layer computes with a function of the
            # stored tensor, so a least-squares fit of the stored tensor is not what the layer would compute with
            return None, ("its weight is transformed in the graph (fake-quantized, or more than the stored tensor "
                          "times masks): the fit would not be the weight it computes with")
        if not same_bias:
            return None, f"its bias is not its module's stored bias ({path}.bias)"
    if type(m) is not nn.Linear and not grouped and m.groups != 1:
        return None, "a grouped conv"
    return m, None


# the functional conv options after (input, weight, bias), in order, as their nn module takes them
_CONV_OPTIONS = ("stride", "padding", "dilation", "groups")


def _functional_view(gm: GraphModule, node: Node) -> tuple[nn.Module | None, str | None]:
    """An nn.Linear / nn.Conv module holding the very parameters of a functional linear / conv call (so what is
    refitted into it is refitted into the graph's tensors), or None and why: another kind, a transposed conv, a
    weight or bias that is no stored parameter, or a weight another layer reads too (a tied head: refitting one
    layer would change the other)."""
    kind = FUNCTIONS.get(node.target)
    source, bias_node = weight_source(node), bias_arg(node)
    if kind is None or KINDS[kind].module is None or KINDS[kind].family == "embedding":
        return None, "not a linear or conv layer whose input rows can be gathered"
    if KINDS[kind].is_transposed:
        return None, TRANSPOSED
    if source is None or source.op != "get_attr":
        return None, "its weight is no stored tensor: there is no tensor to refit into"
    tied = tied_reason(gm, node)
    if tied:
        return None, tied
    if bias_node is not None and bias_node.op != "get_attr":
        return None, "its bias is computed in the graph, no stored tensor"
    weight = stored_attr(gm, source.target)
    bias = stored_attr(gm, bias_node.target) if bias_node is not None else None
    if not isinstance(weight, nn.Parameter) or (bias_node is not None and not isinstance(bias, nn.Parameter)):
        return None, "its weight or bias is a buffer, not a parameter"
    if kind == "linear":
        view = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        view.weight = weight
        if bias is not None:
            view.bias = bias
        return view, None
    view = _conv_view(node, kind, weight, bias)
    return (view, None) if view is not None else (None, COMPUTED_OPTIONS)


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
    `after(node, module, output rows)`, both sampled at the same positions (kept in `picks`).

    Several batches run in step (`run_batches`): every node is run for each batch before the next node, so
    a watched layer's rows come from all of them at once, and `before` (a refit) changes the weight for
    every batch's later nodes alike."""

    def __init__(self, gm: GraphModule, watched: dict[str, nn.Module], sampling: Sampling, *,
                 before=None, after=None, picks: dict | None = None, progress: str | None = None) -> None:
        super().__init__(gm)
        self.watched, self.samples, self.before, self.after = watched, sampling.samples, before, after
        self.rng = np.random.default_rng(sampling.seed)
        self.picks: dict[str, np.ndarray] = dict(picks or {})
        # `progress` names the work for a tqdm bar over the watched layers (off where not a terminal)
        self.bar = tqdm(total=len(watched), desc=progress, unit="layer", disable=None if progress else True,
                        leave=False)
        # the batch whose environment is `self.env`, and each batch's size: named when a node fails on it
        self.batch, self.sizes = 0, []
        # each batch's kept positions (None: no padding), and the watched layers whose rows kept the padding
        # anyway because they do not line up with the (batch, sequence) positions
        self.keeps: list[torch.Tensor | None] = []
        self.padding_included: list[str] = []

    def run(self, *args, **kwargs) -> Any:
        """One batch of positional inputs (Interpreter's signature)."""
        if kwargs:
            raise TypeError(f"Capture.run takes the graph's inputs positionally, not {sorted(kwargs)}")
        return self.run_batches([args])[0]

    def run_batches(self, batches: list[tuple | Mapping]) -> list[Any]:
        """Run every batch (positional inputs, or a dict bound to the graph's inputs by name), in step; returns
        the graph's output for each."""
        nodes = list(self.graph.nodes)
        envs: list[dict[Node, Any]] = []
        iters, self.sizes, self.keeps = [], [], []
        for i, batch in enumerate(batches):
            # a dict is bound by the rule of the calibration walk: the two readers accept the same batches
            inputs = bind_inputs(nodes, batch, i) if isinstance(batch, Mapping) else self.graph.process_inputs(*batch)
            envs.append({})
            iters.append(iter(inputs))
            self.sizes.append(next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None))
            # read now: the environments drop the input once no later node reads it
            self.keeps.append(batch_keep(nodes, inputs))
        outputs: list[Any] = [None] * len(batches)
        for n in nodes:
            m = self.watched.get(n.name)
            if m is None:
                for i, env in enumerate(envs):
                    self._enter(i, env, iters[i])
                    env[n] = self._run_graph_node(n)
            else:
                self._run_watched(n, m, envs)
            for env in envs:  # values no later node reads go, as Interpreter.run lets them go
                for gone in self.user_to_last_uses.get(n, []):
                    env.pop(gone, None)
            if n.op == "output":
                outputs = [self.graph.process_outputs(env[n]) for env in envs]
        return outputs

    def _enter(self, i: int, env: dict[Node, Any], args=None) -> None:
        """Make batch `i`'s environment the one Interpreter's methods read."""
        self.batch, self.env = i, env
        if args is not None:
            self.args_iter = args

    def _run_watched(self, n: Node, m: nn.Module, envs: list[dict[Node, Any]]) -> None:
        self.bar.set_postfix_str(n.name)  # drawn at once: a watched layer's solve is the slow part
        windows, keeps = [], []
        for i, env in enumerate(envs):
            self._enter(i, env)
            args, _ = self.fetch_args_kwargs_from_env(n)
            # only the kept positions' rows where they line up: the draw below is then among them alone
            rows, keep = self._token_rows(n, m, args[0], self.keeps[i])
            windows.append(_windows(m, args[0]) if rows is None else rows)
            keeps.append(keep)
        # the trailing dims are one row's features, as many as the weight has besides its outputs; the leading
        # ones are a batch's positions, which may differ from batch to batch (sequences of other lengths)
        at = self._positions(n.name, [w.shape[:w.dim() + 1 - m.weight.dim()] for w in windows])
        if self.before is not None:
            self.before(n, m, torch.cat([w[a].flatten(1).double() for w, a in zip(windows, at)]))
            self._rerun_weight_chain(n, envs)
        del windows
        results = []
        for i, env in enumerate(envs):
            self._enter(i, env)
            env[n] = self._run_graph_node(n)
            results.append(env[n])
        if self.after is not None:
            # a linear layer's outputs share its inputs' leading dims: the same positions are kept
            self.after(n, m, torch.cat([(_outputs(m, y) if k is None else token_rows(y, k))[a].double()
                                        for y, a, k in zip(results, at, keeps)]))
        self.bar.update(1)

    def _token_rows(self, n: Node, m: nn.Module, x: Any, keep: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's input rows at the batch's kept positions, and those positions; (None, None) where every row
        is read: no padding, or rows that do not line up with the positions (noted in `padding_included`)."""
        if keep is None:
            return None, None
        if isinstance(m, nn.Linear) and isinstance(x, torch.Tensor):
            # a linear layer's rows are its input's leading positions; a conv's rows are windows over several
            # positions (its channels before its length), so no conv row is one token
            keep = keep.to(x.device)
            rows = token_rows(x, keep)
            if rows is not None:
                return rows, keep
        if n.name not in self.padding_included:
            self.padding_included.append(n.name)
        return None, None

    def _run_graph_node(self, n: Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:  # a batch the model cannot run: name it and the node (the solves' errors stay theirs)
            raise PreconditionError(
                f"calibration batch {self.batch} (leading size {self.sizes[self.batch]}) fails at node {n.name!r} "
                f"({origin(n)}): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. A graph "
                "whose sizes are fixed at the example's (compile's specialize_shapes, or a model torch.export could "
                "not give a free batch) runs only batches of the example's sizes")from exc

    def _rerun_weight_chain(self, n: Node, envs: list[dict[Node, Any]]) -> None:
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
        if chain:  # the same stored tensors for every batch: one product, read by each
            for env in envs:
                env[chain[0]] = values[chain[0]]

    def _positions(self, name: str, shapes: list[torch.Size]) -> list[tuple[torch.Tensor, ...]]:
        """Per batch, indices (one tensor per dim of its `shapes` entry) of the sampled output positions of a
        layer.

        Drawn (as flat indices over the batches' positions one after another, as if the batches were joined)
        the first time a layer is seen and reused after, so the features before and after pruning are taken at
        the same positions.
        """
        sizes = [math.prod(shape) for shape in shapes]
        total = sum(sizes)
        if name not in self.picks:
            self.picks[name] = np.sort(self.rng.choice(total, min(self.samples, total), replace=False))
        picks, found, start = self.picks[name], [], 0
        for shape, size in zip(shapes, sizes):
            mine = picks[(picks >= start) & (picks < start + size)] - start
            found.append(tuple(torch.as_tensor(i) for i in np.unravel_index(mine, shape)))
            start += size
        return found


def run_capture(capture: Capture, batches: list[tuple | Mapping], purpose: str | None = None) -> dict:
    """Run the captured graph on the batches (`calibration_batch`) in eval mode; returns the sampled
    positions. With a `purpose` (what the rows are for, in the warning's words), a PaddingIncludedWarning names
    the layers whose rows keep padded positions; a capture that re-reads the same layers (the refit after the
    targets' capture) passes none, so a user is told once."""
    with evaluating(capture.module), capture.bar:
        capture.run_batches(batches)
    if purpose is not None and capture.padding_included:
        warnings.warn(f"PruneChannels ({purpose}): the calibration batches' {TOKEN_MASK} marks padding, but the "
                      f"input rows of {', '.join(map(repr, capture.padding_included))} do not line up with its "
                      f"(batch, sequence) positions: their rows include the padded positions",
                      PaddingIncludedWarning, stacklevel=3)
    return capture.picks


