"""Which channels to remove: importance scores per channel class, counts per group, the removal set.

Scores are per class (a set of coupled channels): `l1` / `l2` add the norms of every producer filter
in the class (a residual group sums the filters of all the convs feeding the add), `random` draws
them, a callable computes them. `greedy` and `lasso` (data-driven, in `fxcompress.reconstruct`)
return the classes to remove directly.
"""
from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import torch
from torch.fx import GraphModule

from .analyses.channels import ChannelGraph, ChannelGroup


def norm_scores(gm: GraphModule, cg: ChannelGraph, p: int) -> np.ndarray:
    """Sum over producer filters of |w|_1 (p=1) or the root of the summed squares (p=2), per class."""
    total = np.zeros(cg.labels.max() + 1 if len(cg.labels) else 0)
    for layer in cg.layers:
        ids = cg.slots.get((layer.weight, layer.out_dim))
        if ids is None:
            continue
        with torch.no_grad():
            w = operator.attrgetter(layer.weight)(gm).detach().transpose(0, layer.out_dim).flatten(1)
            norms = torch.linalg.vector_norm(w, ord=p, dim=1).double().cpu().numpy()
        total += np.bincount(cg.labels[ids], weights=norms ** p, minlength=len(total))
    return total if p == 1 else np.sqrt(total)


def layer_units(cg: ChannelGraph, group: ChannelGroup) -> list[ChannelGroup]:
    """The group split into the sets of classes written by the same producers, so an amount applies
    to each layer's outputs. A residual stream's classes are all written by every conv feeding its
    adds (one unit); a DenseNet block's group holds each layer's new channels, and each layer loses
    its share instead of the group losing its lowest-scored channels wherever they are (filter norms
    of different layers are not on one scale: the stem would be cut to one channel)."""
    if len(group.producers) <= 1:
        return [group]
    producers = set(group.producers)
    writers: dict[int, tuple[str, ...]] = {}
    readers: dict[int, set[str]] = {}
    for layer in cg.layers:
        for ids, into in ((layer.out_ids, writers), (layer.in_ids, readers)):
            if ids is None or (into is writers and layer.name not in producers):
                continue
            for c in np.unique(cg.labels[ids]).tolist():
                if into is writers:
                    writers[c] = writers.get(c, ()) + (layer.name,)
                else:
                    readers.setdefault(c, set()).add(layer.name)
    by_writers: dict[tuple[str, ...], list[int]] = {}
    for c in group.classes.tolist():
        by_writers.setdefault(writers.get(c, ()), []).append(c)
    if len(by_writers) == 1:
        return [group]
    units = []
    for names, classes in by_writers.items():
        classes = np.asarray(classes, dtype=np.int64)
        prunable = np.intersect1d(group.prunable, classes)
        read = set().union(*(readers.get(c, set()) for c in classes.tolist()))
        units.append(dataclasses.replace(
            group, classes=classes, prunable=prunable, producers=names,
            consumers=tuple(n for n in group.consumers if n in read), inexact=np.intersect1d(group.inexact, classes),
            frozen=group.frozen if len(prunable) < len(classes) else None))
    return units


def removal_count(group: ChannelGroup, amount: float, min_channels: int, round_to: int) -> int:
    """How many classes of `group` to remove: `amount` of them, keeping a multiple of `round_to`
    and at least `min_channels` (and never all)."""
    total = len(group.classes)
    keep = total - math.floor(amount * total + 1e-9)
    keep = min(total, math.ceil(keep / round_to) * round_to)
    keep = max(keep, min(min_channels, total), 1)
    return max(0, min(total - keep, len(group.prunable)))


def lowest(group: ChannelGroup, scores: np.ndarray, count: int, cg: ChannelGraph,
           min_channels: int) -> np.ndarray:
    """The `count` prunable classes of lowest score, skipping any whose removal would empty a
    tensor: every producer keeps `min_channels` outputs, every other slot and split piece one."""
    order = group.prunable[np.argsort(scores[group.prunable], kind="stable")]
    containers = _containers(group, cg, min_channels)
    chosen = []
    for c in order.tolist():
        if len(chosen) == count:
            break
        if all(c not in classes or len(classes) > floor for classes, floor in containers):
            chosen.append(c)
            for classes, _ in containers:
                classes.discard(c)
    return np.asarray(chosen, dtype=np.int64)


def _containers(group: ChannelGroup, cg: ChannelGraph, min_channels: int) -> list[tuple[set, int]]:
    """(classes, how many must stay) for each slot and split piece holding classes of `group`."""
    outputs = {(l.weight, l.out_dim) for l in cg.layers if l.name in group.producers}
    floors: dict[frozenset, int] = {}
    pieces = [p for e in cg.edits.values() if e.kind == "split" for p in e.pieces]
    mine = set(group.classes.tolist())
    for key, ids in [*((k, cg.slots[k]) for k in group.slots), *((None, p) for p in pieces)]:
        classes = frozenset(cg.labels[ids].tolist())
        if key is not None or not classes.isdisjoint(mine):
            floor = max(min_channels, 1) if key in outputs else 1
            floors[classes] = max(floor, floors.get(classes, 0))
    return [(set(classes), floor) for classes, floor in floors.items()]
