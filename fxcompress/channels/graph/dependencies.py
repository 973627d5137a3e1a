"""ChannelGraph: which channels of which tensors must shrink together, computed once per graph.

Channels are elements; the op rules (mapped to ops in `ops`) couple the elements that must be
removed together (a residual add, a concatenation's offsets, a head split) and freeze the ones that
must stay (an unknown op, the model output), each with its reason. A *class* is a set of coupled
elements: removing a channel removes a class. A *group* is a connected component of the networkx
graph whose nodes are parameter slots `(parameter, dim)` and whose edges join slots sharing a class:
the layers whose widths change together. Print a ChannelGraph to see the groups before pruning.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
from torch.fx import GraphModule

from ...analyses.shapes import ShapeInfo
from ...analysis import Analysis
from ...config import check_choice
from .ops import rule_of
from .walk import NOT_CHANNEL, Edit, LayerChannels, Walk

if TYPE_CHECKING:  # the graph's type in annotations; networkx itself is imported where a graph is built
    import networkx as nx

Slot = tuple[str, int]  # (qualified parameter or buffer name, dim)


@dataclass(frozen=True)
class ChannelGroup:
    """Slots whose widths change together, the classes (channels) they hold, and what is frozen."""

    index: int
    slots: tuple[Slot, ...]
    classes: np.ndarray        # every class of the group
    prunable: np.ndarray       # the classes that may be removed, outputs unchanged where they are zero
    frozen: str | None         # why some (or all) classes must stay; None if none must
    producers: tuple[str, ...]  # layers whose output channels are in the group
    consumers: tuple[str, ...]  # layers whose input channels are in the group
    inexact: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # removable, not exactly
    at_output: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # reach the output

    def released(self, normalized: bool, outputs: bool) -> np.ndarray:
        """The frozen classes that may go all the same: inexact ones with `normalized`, those reaching
        the model output with `outputs` (a class that is both needs both)."""
        soft = np.union1d(self.inexact, self.at_output)
        keep = ((np.isin(soft, self.inexact) & (not normalized)) | (np.isin(soft, self.at_output) & (not outputs)))
        return soft[~keep]

    @property
    def label(self) -> str:
        if self.producers:
            return self.producers[0] + (f" (+{len(self.producers) - 1})" if len(self.producers) > 1 else "")
        return f"{self.slots[0][0]}[{self.slots[0][1]}]"

    def __str__(self) -> str:
        state = f"{len(self.prunable)}/{len(self.classes)} prunable"
        if self.frozen:
            state += f"; frozen: {self.frozen}"
        return (f"group {self.index} [{self.label}]: {state}\n"
                f"  producers: {', '.join(self.producers) or '-'}\n"
                f"  consumers: {', '.join(self.consumers) or '-'}\n"
                f"  slots: {', '.join(f'{p}[{d}]' for p, d in self.slots)}")


@dataclass(frozen=True)
class ChannelGraph(Analysis):
    """The channel dependency graph of a GraphModule (see the module docstring).

    `attention` says how hand-written attention (a channel dim viewed as (heads, head_dim)) is pruned:
    "head_dims" removes the same positions of every head, "heads" removes whole heads. It is the
    analysis's parameter: `ctx.get(ChannelGraph, attention="heads")`, each mode cached on its own.
    """

    labels: np.ndarray                    # element -> class
    slots: Mapping[Slot, np.ndarray]      # parameter dims -> element of each position
    layers: tuple[LayerChannels, ...]
    edits: Mapping[str, Edit]             # nodes whose arguments spell channel counts
    frozen_classes: Mapping[int, str]     # class -> why it must stay (inexact ones included)
    groups: tuple[ChannelGroup, ...]
    graph: nx.Graph                       # slots, joined when they share a class
    attention: str = "head_dims"

    @classmethod
    def compute(cls, gm: GraphModule, ctx, attention: str = "head_dims") -> ChannelGraph:
        check_choice("ChannelGraph", "attention", attention, ATTENTION_MODES)
        walk = Walk(gm, ctx.get(ShapeInfo).meta, attention)
        walk.run(rule_of)
        labels = _classes(walk.count, walk.pairs)
        hard = _frozen(labels, walk.frozen)
        inexact, at_output = _frozen(labels, walk.inexact), _frozen(labels, walk.at_output)
        frozen = {**at_output, **inexact, **hard}
        graph, groups = _groups(labels, walk.slots, frozen, walk.layers, set(inexact) - set(hard),
                                set(at_output) - set(hard))
        return cls(labels, MappingProxyType(walk.slots), tuple(walk.layers), MappingProxyType(walk.edits),
                   MappingProxyType(frozen), groups, graph, attention)

    def same_as(self, fresh: ChannelGraph) -> bool:
        """The same classes of the same slots, frozen for the same reasons (arrays compared by value)."""
        return (np.array_equal(self.labels, fresh.labels) and self.slots.keys() == fresh.slots.keys()
                and all(np.array_equal(ids, fresh.slots[k]) for k, ids in self.slots.items())
                and dict(self.frozen_classes) == dict(fresh.frozen_classes))

    def classes_of(self, ids: np.ndarray) -> np.ndarray:
        return self.labels[ids]

    @cached_property
    def containers(self) -> tuple[tuple[Slot | None, frozenset], ...]:
        """(slot or None, its classes) for every slot and every split / chunk piece: what channel
        selection must never empty. Computed once, on first use."""
        pieces = [p for e in self.edits.values() if e.kind == "split" for p in e.pieces]
        return (*((k, frozenset(self.labels[ids].tolist())) for k, ids in self.slots.items()),
                *((None, frozenset(self.labels[p].tolist())) for p in pieces))

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if len(g.prunable)]

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.groups) or "(no channel groups)"


ATTENTION_MODES = ("head_dims", "heads")


def _classes(count: int, pairs: list) -> np.ndarray:
    if not pairs:
        return np.arange(count)
    from scipy.sparse import coo_matrix  # here, not at the top: loading a file never needs scipy
    from scipy.sparse.csgraph import connected_components
    rows = np.concatenate([a for a, _ in pairs])
    cols = np.concatenate([b for _, b in pairs])
    matrix = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(count, count))
    return connected_components(matrix, directed=False)[1]


def _frozen(labels: np.ndarray, frozen: list) -> dict[int, str]:
    if not frozen:
        return {}
    ids = np.concatenate([ids for ids, _ in frozen])
    reason = np.concatenate([np.full(len(ids), i) for i, (ids, _) in enumerate(frozen)])
    classes, first = np.unique(labels[ids], return_index=True)
    return {int(c): frozen[reason[i]][1] for c, i in zip(classes, first)}


def _groups(labels, slots, frozen, layers, inexact: set, at_output: set) -> tuple[nx.Graph, tuple[ChannelGroup, ...]]:
    keys = [k for k, ids in slots.items() if frozen.get(int(labels[ids[0]])) != NOT_CHANNEL]
    import networkx as nx  # here, not at the top: a process that builds no channel graph skips its import
    per_slot = [np.unique(labels[slots[k]]) for k in keys]
    graph = nx.Graph()
    graph.add_nodes_from(keys)
    if keys:
        slot_of = np.concatenate([np.full(len(c), i) for i, c in enumerate(per_slot)])
        cls = np.concatenate(per_slot)
        order = np.argsort(cls, kind="stable")
        cls, slot_of = cls[order], slot_of[order]
        same = cls[1:] == cls[:-1]
        edges = np.unique(slot_of[:-1][same] * len(keys) + slot_of[1:][same])  # one int per slot pair
        graph.add_edges_from((keys[e // len(keys)], keys[e % len(keys)]) for e in edges.tolist())
    index = {k: i for i, k in enumerate(keys)}
    frozen_mask = np.zeros(labels.max() + 1 if len(labels) else 0, dtype=bool)
    frozen_mask[list(frozen)] = True
    components = sorted(nx.connected_components(graph), key=lambda c: min(index[k] for k in c))
    members = [sorted(c, key=index.__getitem__) for c in components]
    classes = [np.unique(np.concatenate([per_slot[index[k]] for k in m])) for m in members]
    producers, consumers = _layers_by_group(classes, labels, layers)
    groups = []
    for g, (slots_g, classes_g) in enumerate(zip(members, classes)):
        prunable = classes_g[~frozen_mask[classes_g]]
        reason = next((frozen[int(c)] for c in classes_g if frozen_mask[c]), None)
        soft = np.asarray([c for c in classes_g.tolist() if c in inexact], dtype=np.int64)
        output = np.asarray([c for c in classes_g.tolist() if c in at_output], dtype=np.int64)
        groups.append(ChannelGroup(g, tuple(slots_g), classes_g, prunable, reason,
                                   tuple(producers[g]), tuple(consumers[g]), soft, output))
    return graph, tuple(groups)


def _layers_by_group(classes: list[np.ndarray], labels: np.ndarray, layers) -> tuple[list, list]:
    """For each group, the layers writing (producers) and reading (consumers) its channels."""
    group_of = np.full(labels.max() + 1 if len(labels) else 0, -1)
    for g, c in enumerate(classes):
        group_of[c] = g
    producers, consumers = [[] for _ in classes], [[] for _ in classes]
    for layer in layers:
        for ids, found in ((layer.out_ids, producers), (layer.in_ids, consumers)):
            if ids is not None:
                for g in np.unique(group_of[labels[ids]]):
                    if g >= 0:
                        found[g].append(layer.name)
    return producers, consumers

