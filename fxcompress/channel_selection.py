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
    wanted = set(group.producers)
    writers = [(l.name, cg.labels[l.out_ids]) for l in cg.layers if l.name in wanted and l.out_ids is not None]
    # which writers write each class of the group: classes with the same row form one unit
    writes = np.zeros((len(group.classes), len(writers)), dtype=bool)
    for j, (_, classes) in enumerate(writers):
        inside = np.isin(classes, group.classes)
        writes[np.searchsorted(group.classes, classes[inside]), j] = True
    patterns, unit_of_class = np.unique(writes, axis=0, return_inverse=True)
    unit_of_class = unit_of_class.reshape(-1)  # 1-D on every numpy version
    count = len(patterns)
    if count == 1:
        return [group]
    producers = [tuple(name for (name, _), w in zip(writers, row) if w) for row in patterns]
    unit = np.full(cg.labels.max() + 1, -1)
    unit[group.classes] = unit_of_class
    consumers = [set() for _ in range(count)]
    readers = set(group.consumers)
    for l in cg.layers:
        if l.name in readers and l.in_ids is not None:
            for u in np.unique(unit[cg.labels[l.in_ids]]).tolist():
                if u >= 0:
                    consumers[u].add(l.name)
    units = []
    for u in range(count):
        classes = group.classes[unit_of_class == u]
        prunable = np.intersect1d(group.prunable, classes)
        units.append(dataclasses.replace(
            group, classes=classes, prunable=prunable, producers=producers[u],
            consumers=tuple(n for n in group.consumers if n in consumers[u]),
            inexact=np.intersect1d(group.inexact, classes),
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
    """(classes of `group`, how many of them must stay) for each slot and split piece holding some.

    A slot's floor is `min_channels` for a producer's outputs, else one; classes of the slot outside
    the group count towards it (another unit of a DenseNet block keeps at least one of its own), so
    only the part that could still be emptied from here is checked.
    """
    outputs = {(l.weight, l.out_dim) for l in cg.layers if l.name in group.producers}
    slots = set(group.slots)
    mine = frozenset(group.classes.tolist())
    floors: dict[frozenset, int] = {}
    for key, classes in cg.containers:
        if key is not None and key not in slots:
            continue
        inside = classes & mine
        floor = (max(min_channels, 1) if key in outputs else 1) - (len(classes) - len(inside))
        if inside and floor > 0:
            floors[inside] = max(floor, floors.get(inside, 0))
    return [(set(classes), floor) for classes, floor in floors.items()]
