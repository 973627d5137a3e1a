"""Least-squares reconstruction of the layers whose input channels were removed (He et al. ICCV 2017).

Before pruning, the outputs of every consumer whose inputs will shrink are captured on the
calibration data (`capture`). After pruning, reconstruction goes layer by layer, in graph order:
each consumer sees the inputs of the already pruned and refitted model and is refitted (weights and
bias, ridge least squares in float64) to reproduce the unpruned model's outputs at the same
positions. A masked consumer is refitted within its mask, so pruned weights stay zero. A consumer whose rows
follow the data (a mixture of experts' routed tokens: `analyses.shapes.data_sized`) is left as it is, and so is
a weight several layer calls compute with (a module called twice, a tied head): one fit per call would overwrite
the others; so is a weight or bias any other node reads (`analyses.ownership.ParamOwnership`: a regularizer, a
matmul of the weight), whose result the fit would change, and a layer whose rows cannot be gathered (a transposed
conv) or whose weight is transformed (fake-quantized). `Targets.skipped` names each with its reason.

The calibration batches run one by one, in step (`capture.Capture.run_batches`): their rows are joined, not their
inputs, so batches of different sequence lengths and dicts bound to the graph's inputs by name are refitted on.
Padded positions (zeros of an `attention_mask` input) are left out of the rows of every consumer whose rows line
up with them, as the calibration walk leaves them out; the others keep them, with a PaddingIncludedWarning.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..analyses.ownership import ParamOwnership
from ..analyses.shapes import data_sized
from ..layers import bias_arg, weight_arg
from .capture import (Capture, Sampling, calibration_batch, consumer_module, owner_path, run_capture, tied_reason,
                      weight_support, why_not_consumer)
from .graph import ChannelGraph

RIDGE = 1e-6  # relative to the mean diagonal of X^T X: keeps the normal equations well posed


@dataclass
class Targets:
    """What the unpruned model's consumers produced at the sampled positions (kept outputs only), and the
    consumers whose inputs shrink but which are not refitted, each with the reason."""

    outputs: dict[str, torch.Tensor]
    picks: dict[str, np.ndarray]
    batch: list
    sampling: Sampling
    skipped: dict[str, str] = field(default_factory=dict)
    # consumers whose rows keep padded positions (not lined up with the attention mask's), as warned
    padding_included: tuple[str, ...] = ()


ROUTED = ("its rows follow the data (a mixture of experts' routed tokens): pruning changes the router's inputs, "
          "so its rows before and after pruning are not the same positions")


def capture_targets(gm: GraphModule, cg: ChannelGraph, removed: np.ndarray, data, sampling: Sampling,
                    progress: bool = False, ownership: ParamOwnership | None = None) -> Targets:
    """Before pruning: the outputs of every consumer whose inputs will shrink (`progress`: a tqdm bar), and in
    `skipped` those left out of the refit, by layer name, with the reason. `ownership` is the graph's
    ParamOwnership (computed here when not given)."""
    watched, kept, outputs, skipped = {}, {}, {}, {}
    nodes = {n.name: n for n in gm.graph.nodes}
    readers = (ownership or ParamOwnership.compute(gm, None)).readers
    # a layer whose rows follow the data (an expert's routed tokens) reads other tokens once pruning changes the
    # router's inputs: its rows before and after would not be the same positions, so it is not refitted
    routed = data_sized(gm)
    for layer in cg.layers:
        if layer.in_ids is None or not removed[cg.labels[layer.in_ids]].any():
            continue  # its inputs keep every channel: nothing to make up for
        node = nodes[layer.node]
        # a module called twice (or a weight two layers read) is one weight for several calls: each call's refit
        # would overwrite the last, fitted to that call's inputs alone, and the earlier call's output (which later
        # layers are refitted on) would come from a weight the model no longer holds. Not refitted, as a tied head.
        # A weight or bias any other node reads (a regularizer, a matmul of the weight) would change under it.
        why = (tied_reason(gm, node) or why_not_consumer(gm, node) or (ROUTED if layer.node in routed else None)
               or _other_readers(gm, node, readers, nodes))
        if why:
            # one module called at several places is one entry: each distinct reason once
            if why not in skipped.get(layer.name, "").split("; "):
                skipped[layer.name] = f"{skipped[layer.name]}; {why}" if layer.name in skipped else why
            continue
        m = consumer_module(gm, node)
        watched[layer.node] = m
        out = np.ones(m.weight.shape[0], dtype=bool) if layer.out_ids is None else ~removed[cg.labels[layer.out_ids]]
        kept[layer.node] = torch.as_tensor(np.flatnonzero(out))

    def after(n, m, y):
        outputs[n.name] = y[:, kept[n.name]]

    batch = calibration_batch(data)
    capture = Capture(gm, watched, sampling, after=after, progress="capture features" if progress else None)
    picks = run_capture(capture, batch, purpose="reconstruction")
    return Targets(outputs, picks, batch, sampling, skipped, tuple(capture.padding_included))


def _other_readers(gm: GraphModule, node: Node, readers: Mapping[str, tuple[str, ...]],
                   nodes: Mapping[str, Node]) -> str | None:
    """Why a consumer's weight or bias may not be refitted: another node reads it (ParamOwnership's readers,
    under any name of the tensor), besides the layer itself and its own weight chain (get_attr, mask
    products). None when only the layer reads them."""
    path = owner_path(node)
    chains = {"weight": [], "bias": []}
    if node.op == "call_function":
        current = weight_arg(node)
        while isinstance(current, Node):  # the chain get_attr -> mul(mask) ... -> the layer's weight argument
            chains["weight"].append(current)
            current = current.args[0] if current.op != "get_attr" and current.args else None
        if isinstance(bias_arg(node), Node):
            chains["bias"].append(bias_arg(node))
    found = []
    for what, chain in chains.items():
        own, others = {node, *chain}, {}
        for reader in readers.get(f"{path}.{what}", ()):
            r = nodes[reader]
            if r not in own:
                # a get_attr is only a reference: the nodes computing with it are the readers to name
                for user in (r.users if r.op == "get_attr" else (r,)):
                    others[user.name] = None
        for chained in chain:  # one get_attr node can feed the layer and something else alike
            for user in chained.users:
                if user not in own:
                    others[user.name] = None
        if others:
            found.append(f"its {what} is also read by {', '.join(map(repr, others))}")
    if not found:
        return None
    return f"{' and '.join(found)}, not as this layer's parameter: a refit would change what they compute"


def refit(gm: GraphModule, targets: Targets, progress: bool = False) -> list[str]:
    """After pruning: refit each consumer, in graph order, on the pruned model's own inputs. A masked
    consumer keeps its zeros: each output is fitted on the inputs its mask leaves. `progress` shows
    a tqdm bar over the layers (off where the output is not a terminal)."""
    nodes = [n for n in gm.graph.nodes if n.name in targets.outputs]
    watched = {n.name: consumer_module(gm, n) for n in nodes}
    supports = {n.name: weight_support(gm, n) for n in nodes}
    done = []

    def before(n, m, rows):
        _solve_into(m, rows, targets.outputs[n.name], supports[n.name])
        done.append(owner_path(n))

    # the same layers and positions as the targets' capture, which already warned of any padding kept
    run_capture(Capture(gm, watched, targets.sampling, before=before, picks=targets.picks,
                        progress="reconstruct" if progress else None), targets.batch)
    return done


def _solve_into(m: nn.Module, x: torch.Tensor, y: torch.Tensor, support: torch.Tensor | None = None) -> None:
    """Least squares (ridge) fit of the layer's weight and bias so that x -> y, group by group.

    A grouped conv's group g reads the g-th block of input columns (rows are ordered channel first,
    see `capture._windows`) and writes the g-th block of outputs, so each group is an independent problem.
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
