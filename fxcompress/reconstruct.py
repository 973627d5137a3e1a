"""Data-driven channel pruning: ThiNet's greedy and He et al.'s lasso selection, and the least-squares
reconstruction of consumer layers (He et al. ICCV 2017; Luo et al. ThiNet 2017).

Features are captured with torch.fx's Interpreter on the calibration batch and solved in float64
on the CPU. Only a bounded number of output positions is sampled, and they are drawn before any
feature is gathered: a conv's input patches stay a strided view of its (padded) input, so a large
feature map is never materialized as one row per position.

A *consumer* is a linear, conv1d, conv2d or conv3d layer (any padding and padding mode; grouped
convs are refitted group by group) whose input channels shrink: a module, or a masked layer (its
stored weight times masks), refitted within its mask so pruned weights stay zero.
Reconstruction is layer by layer, in graph order: each consumer sees the inputs of the already
pruned and refitted model and is refitted (weights and bias) to reproduce the unpruned model's
outputs at the same positions.
"""
from __future__ import annotations

import math
import warnings

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg

from .analyses.channels import ChannelGraph, ChannelGroup
from .channel_selection import lowest, norm_scores
from .execution import evaluating
from .layers import FUNCTIONS, bias_arg, layer_kind, weight_arg, weight_source
from .pruning.masks import masks_only

RIDGE = 1e-6  # relative to the mean diagonal of X^T X: keeps the normal equations well posed


# ---- features -----------------------------------------------------------------------------------
def calibration_batch(data: Iterable) -> tuple[torch.Tensor, ...]:
    """All calibration inputs as one batch (each item a tensor or a tuple of tensors)."""
    items = [item if isinstance(item, (tuple, list)) else (item,) for item in data]
    return tuple(torch.cat([item[i] for item in items]) for i in range(len(items[0])))


_KINDS = ("linear", "conv1d", "conv2d", "conv3d")


def _owner(node: Node) -> str | None:
    """The module path holding the layer's parameters: the called module, or for a masked
    (functional) layer the module its stored weight belongs to."""
    if node.op == "call_module":
        return node.target
    if node.op == "call_function" and node.target in FUNCTIONS:
        source = weight_source(node)
        if source is not None and source.op == "get_attr" and source.target.endswith(".weight"):
            return source.target.rpartition(".")[0]
    return None


def _consumer(gm: GraphModule, node: Node, grouped: bool = True) -> nn.Module | None:
    """The module whose parameters a node computes with, if it can be sampled and refitted (grouped
    convs only if asked), else None. A masked layer qualifies through its owner module, which keeps
    its parameters and conv options: its weight must be the stored one times masks and nothing else,
    its bias the owner's."""
    path = _owner(node)
    m = gm.get_submodule(path) if path is not None else None
    kind = layer_kind(m) if m is not None else None
    if kind not in _KINDS:
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


def _support(gm: GraphModule, node: Node) -> torch.Tensor | None:
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


class _Capture(Interpreter):
    """Runs the graph; at each watched node calls `before(node, module, input rows)` and
    `after(node, module, output rows)`, both sampled at the same positions (kept in `picks`)."""

    def __init__(self, gm: GraphModule, watched: dict[str, nn.Module], sampling: Sampling, *,
                 before=None, after=None, picks: dict | None = None) -> None:
        super().__init__(gm)
        self.watched, self.samples, self.before, self.after = watched, sampling.samples, before, after
        self.rng = np.random.default_rng(sampling.seed)
        self.picks: dict[str, np.ndarray] = dict(picks or {})

    def run_node(self, n: Node) -> Any:
        m = self.watched.get(n.name)
        if m is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        windows = _windows(m, args[0])
        # the trailing dims are one row's features, as many as the weight has besides its outputs
        at = self._positions(n.name, windows.shape[:windows.dim() + 1 - m.weight.dim()])
        if self.before is not None:
            self.before(n, m, windows[at].flatten(1).double())
            self._rerun_weight_chain(n)
        result = super().run_node(n)
        if self.after is not None:
            self.after(n, m, _outputs(m, result)[at].double())
        return result

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


def _run(capture: _Capture, batch: tuple) -> dict:
    """Run the captured graph on the batch in eval mode; returns the sampled positions."""
    with evaluating(capture.module):
        capture.run(*batch)
    return capture.picks


# ---- reconstruction -----------------------------------------------------------------------------
@dataclass
class Targets:
    """What the unpruned model's consumers produced at the sampled positions (kept outputs only)."""

    outputs: dict[str, torch.Tensor]
    picks: dict[str, np.ndarray]
    batch: tuple
    sampling: Sampling


def capture_targets(gm: GraphModule, cg: ChannelGraph, removed: np.ndarray, data, sampling: Sampling) -> Targets:
    """Before pruning: the outputs of every consumer whose inputs will shrink."""
    watched, kept, outputs = {}, {}, {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for layer in cg.layers:
        m = _consumer(gm, nodes[layer.node])
        if m is None or layer.in_ids is None or not removed[cg.labels[layer.in_ids]].any():
            continue
        watched[layer.node] = m
        out = np.ones(m.weight.shape[0], dtype=bool) if layer.out_ids is None else ~removed[cg.labels[layer.out_ids]]
        kept[layer.node] = torch.as_tensor(np.flatnonzero(out))

    def after(n, m, y):
        outputs[n.name] = y[:, kept[n.name]]

    batch = calibration_batch(data)
    picks = _run(_Capture(gm, watched, sampling, after=after), batch)
    return Targets(outputs, picks, batch, sampling)


def refit(gm: GraphModule, targets: Targets) -> list[str]:
    """After pruning: refit each consumer, in graph order, on the pruned model's own inputs. A masked
    consumer keeps its zeros: each output is fitted on the inputs its mask leaves."""
    nodes = [n for n in gm.graph.nodes if n.name in targets.outputs]
    watched = {n.name: _consumer(gm, n) for n in nodes}
    supports = {n.name: _support(gm, n) for n in nodes}
    done = []

    def before(n, m, rows):
        _solve_into(m, rows, targets.outputs[n.name], supports[n.name])
        done.append(_owner(n))

    _run(_Capture(gm, watched, targets.sampling, before=before, picks=targets.picks), targets.batch)
    return done


def _solve_into(m: nn.Module, x: torch.Tensor, y: torch.Tensor, support: torch.Tensor | None = None) -> None:
    """Least squares (ridge) fit of the layer's weight and bias so that x -> y, group by group.

    A grouped conv's group g reads the g-th block of input columns (rows are ordered channel first,
    see `_windows`) and writes the g-th block of outputs, so each group is an independent problem.
    With a `support` (bool, the weight's shape), each output uses only its allowed inputs.
    """
    groups, with_bias = getattr(m, "groups", 1), m.bias is not None
    ins, outs = x.shape[1] // groups, y.shape[1] // groups
    for g in range(groups):
        xg, yg = x[:, g * ins:(g + 1) * ins], y[:, g * outs:(g + 1) * outs]
        if with_bias:
            xg = torch.cat([xg, torch.ones(xg.shape[0], 1, dtype=xg.dtype)], 1)
        gram = xg.T @ xg
        gram += RIDGE * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
        if support is None:
            solution = torch.linalg.solve(gram, xg.T @ yg)  # (in [+1], out)
        else:
            allowed = support[g * outs:(g + 1) * outs].reshape(outs, -1)
            if with_bias:
                allowed = torch.cat([allowed, torch.ones(outs, 1, dtype=torch.bool)], 1)
            solution = _solve_on_support(gram, xg.T @ yg, allowed)
        weight = solution[:-1] if with_bias else solution
        with torch.no_grad():
            block = m.weight[g * outs:(g + 1) * outs]
            block.copy_(weight.T.reshape(block.shape).to(m.weight.dtype))
            if with_bias:
                m.bias[g * outs:(g + 1) * outs].copy_(solution[-1].to(m.bias.dtype))


def _solve_on_support(gram: torch.Tensor, rhs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Solve gram @ w = rhs per output column, over that output's allowed inputs only (zeros
    elsewhere). Outputs with the same pattern share one solve: filter / channel masks give a few
    patterns; element masks give one per output, each the size of its kept inputs."""
    solution = torch.zeros_like(rhs)
    patterns, which = torch.unique(allowed, dim=0, return_inverse=True)
    for k, pattern in enumerate(patterns):
        cols, outs = pattern.nonzero().squeeze(1), (which == k).nonzero().squeeze(1)
        if len(cols):
            solution[cols[:, None], outs] = torch.linalg.solve(gram[cols][:, cols], rhs[cols][:, outs])
    return solution


# ---- data-driven selection ----------------------------------------------------------------------
def data_driven_removal(gm: GraphModule, cg: ChannelGraph, counts: list[tuple[ChannelGroup, int]], data,
                        method: str, sampling: Sampling) -> tuple[list, list[str]]:
    """[(group, classes to remove)] by ThiNet greedy or lasso, and the groups that fell back to l1
    (no consumer whose output could be measured)."""
    contributions = _contributions(gm, cg, calibration_batch(data), sampling)
    fallback_scores, chosen, fallbacks = None, [], []
    for group, count in counts:
        z = _class_columns(cg, group, contributions)
        if z is None:
            fallback_scores = norm_scores(gm, cg, 1) if fallback_scores is None else fallback_scores
            scores, _ = fallback_scores, fallbacks.append(group.label)
        else:
            scores = np.full(cg.labels.max() + 1, np.inf)
            scores[group.prunable] = (_greedy_order if method == "greedy" else _lasso_scores)(z, group, count, sampling.seed)
        chosen.append((group, lowest(group, scores, count, cg, 1)))
    return chosen, fallbacks


def _contributions(gm, cg, batch, sampling: Sampling) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """Per consumer: (in_ids, Z) where Z[s, c] is input channel c's contribution to one randomly
    chosen output channel at sampled position s (ThiNet's sampling)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = {l.node: l for l in cg.layers
              if l.in_ids is not None and _consumer(gm, nodes[l.node], grouped=False) is not None}
    watched = {name: _consumer(gm, nodes[name], grouped=False) for name in layers}
    supports = {name: _support(gm, nodes[name]) for name in layers}
    found, rng = {}, np.random.default_rng(sampling.seed + 1)

    def before(n, m, rows):
        w = m.weight.detach() if supports[n.name] is None else m.weight.detach() * supports[n.name]
        w = w.double().reshape(m.weight.shape[0], layers[n.name].in_ids.size, -1)
        outs = torch.as_tensor(rng.integers(0, w.shape[0], rows.shape[0]))
        x = rows.reshape(rows.shape[0], w.shape[1], -1)
        found[n.name] = (layers[n.name].in_ids, torch.einsum("sck,sck->sc", x, w[outs]))

    _run(_Capture(gm, watched, sampling, before=before), batch)
    return found


def _class_columns(cg: ChannelGraph, group: ChannelGroup, contributions: dict) -> np.ndarray | None:
    """Stack, over the group's consumers, the contributions summed per class: (rows, prunable)."""
    column = {int(c): i for i, c in enumerate(group.prunable)}
    blocks = []
    for in_ids, z in contributions.values():
        classes = cg.labels[in_ids]
        inside = np.array([c in column for c in classes.tolist()])
        if not inside.any():
            continue
        gather = np.zeros((len(classes), len(column)))
        gather[np.flatnonzero(inside), [column[c] for c in classes[inside].tolist()]] = 1.0
        blocks.append(z.numpy() @ gather)
    return np.concatenate(blocks) if blocks else None


def _greedy_order(z: np.ndarray, group: ChannelGroup, count: int, seed: int) -> np.ndarray:
    """ThiNet: repeatedly remove the channel whose removal adds least to ||sum of removed contributions||^2."""
    gram = z.T @ z
    n = gram.shape[0]
    order = np.full(n, np.inf)
    acc, free = np.zeros(n), np.ones(n, dtype=bool)
    for step in range(n):
        cost = np.where(free, gram.diagonal() + 2 * acc, np.inf)
        best = int(np.argmin(cost))
        order[best], free[best] = step, False
        acc += gram[best]
    return order


def _lasso_scores(z: np.ndarray, group: ChannelGroup, count: int, seed: int) -> np.ndarray:
    """He et al.: y = sum of all contributions ~ z @ beta with an L1 penalty; alpha is bisected until
    `keep` channels have nonzero beta. Channels with the smallest |beta| (the zeros) are removed."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    keep = z.shape[1] - count
    scale = np.linalg.norm(z, axis=0).clip(1e-12)
    zn, y = z / scale, z.sum(1)
    lo, hi = 0.0, float(np.abs(zn.T @ y).max() / len(y))  # at hi every beta is zero
    best = np.ones(z.shape[1])
    for _ in range(30):
        alpha = (lo + hi) / 2
        with warnings.catch_warnings():  # only the zero pattern matters here, not the last digits of beta
            warnings.simplefilter("ignore", ConvergenceWarning)
            beta = Lasso(alpha=alpha, fit_intercept=False, max_iter=500, random_state=seed).fit(zn, y).coef_
        nonzero = int((beta != 0).sum())
        if nonzero >= keep:
            best, lo = beta, alpha
            if nonzero == keep:
                break
        else:
            hi = alpha
    return np.abs(best) + 1e-9 * scale / scale.max()  # ties among zeros: the weaker channel goes first
