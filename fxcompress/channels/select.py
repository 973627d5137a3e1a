"""Which channels to remove: importance scores per channel class, counts per group, the removal set.

Scores are per class (a set of coupled channels): `l1` / `l2` add the norms of every producer filter
in the class (a residual group sums the filters of all the convs feeding the add), `random` draws
them, a callable computes them, and `greedy` (ThiNet, Luo et al. 2017) and `lasso` (He et al. 2017)
measure each channel's contribution to the consumers' outputs on calibration data. Every method
then removes the lowest-scored classes of each group, never emptying a tensor.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.fx import GraphModule

from ..errors import ConfigError
from .capture import Capture, Sampling, calibration_batch, consumer_module, run_capture, weight_support
from .graph import ChannelGraph, ChannelGroup

METHODS = ("l1", "l2", "random", "greedy", "lasso")
DATA_METHODS = ("greedy", "lasso")  # they measure the consumers' outputs on calibration data


@dataclass(frozen=True)
class Selection:
    """How the channels to remove are chosen (PruneChannels' fields of the same names)."""

    method: str | Callable = "l1"
    global_: bool = False
    min_channels: int = 1
    round_to: int = 1
    sampling: Sampling = field(default_factory=Sampling)

    @property
    def data_driven(self) -> bool:
        return self.method in DATA_METHODS


@dataclass(frozen=True)
class Removal:
    """What choose_removal decided: the classes to remove (bool per class), the groups a data-driven
    method scored by l1 because no consumer's output could be measured, and {group label: why} for
    the groups that were to lose channels but lose none because no multiple of round_to fits."""

    removed: np.ndarray
    scored_by_l1: list[str]
    held: dict[str, str]


def choose_removal(gm: GraphModule, cg: ChannelGraph, groups: list[tuple[ChannelGroup, float]],
                   selection: Selection, data=None) -> Removal:
    """The classes to remove when each group of `groups` loses its amount (see Removal)."""
    removed = np.zeros(cg.labels.max() + 1 if len(cg.labels) else 0, dtype=bool)
    if not groups:
        return Removal(removed, [], {})
    counts, held = _counts(gm, cg, groups, selection)
    if selection.data_driven:
        per_group, fallbacks = data_driven_scores(gm, cg, counts, data, selection.method, selection.sampling)
    else:
        per_group, fallbacks = [_scores(gm, cg, groups, selection)] * len(counts), []
    for (group, count), scores in zip(counts, per_group):
        removed[lowest(group, scores, count, cg, selection.min_channels)] = True
    return Removal(removed, fallbacks, held)


def _counts(gm, cg: ChannelGraph, groups, selection: Selection) -> tuple[list[tuple[ChannelGroup, int]], dict]:
    """How many classes each group loses: its own amount, or with `global_` its share of one ranking
    of every group's scores (each normalized by its group's mean, as filter norms of different
    layers are not on one scale); and {label: why} of the groups round_to leaves whole.

    The global ranking takes exactly its budget. Equal scores are shared out between the groups in
    proportion to their sizes: ranked by the class's place in its group (lowest class first, as
    `lowest` takes them), then by group, in the graph's order. (A threshold on the score took every
    class tied with the last one: groups of equal filter norms all went down to one channel.)"""
    bounds = (selection.min_channels, selection.round_to)
    amounts = list(groups)
    if selection.global_:
        scores = norm_scores(gm, cg, 1) if selection.data_driven else _scores(gm, cg, groups, selection)
        normalized = np.concatenate([scores[g.prunable] / max(scores[g.prunable].mean(), 1e-12) for g, _ in groups])
        owner = np.concatenate([np.full(len(g.prunable), i) for i, (g, _) in enumerate(groups)])
        place = np.concatenate([np.arange(len(g.prunable)) / len(g.prunable) for g, _ in groups])
        total = sum(len(g.classes) for g, _ in groups)
        budget = int(np.floor(np.mean([a for _, a in groups]) * total))
        taken = np.bincount(owner[np.lexsort((owner, place, normalized))[:budget]], minlength=len(groups))
        amounts = [(g, float(taken[i]) / len(g.classes)) for i, (g, _) in enumerate(groups)]
    counts, held = [], {}
    for g, amount in amounts:
        counts.append((g, removal_count(g, amount, *bounds)))
        why = rounding_holds(g, amount, *bounds)
        if why is not None:
            held[g.label] = why
    return counts, held


def _scores(gm, cg: ChannelGraph, groups, selection: Selection) -> np.ndarray:
    """Scores per class of the methods that need no data (higher = keep)."""
    if selection.method in ("l1", "l2"):
        return norm_scores(gm, cg, 1 if selection.method == "l1" else 2)
    size = cg.labels.max() + 1
    if selection.method == "random":
        return np.random.default_rng(selection.sampling.seed).random(size)
    scores = np.zeros(size)
    for g, _ in groups:
        values = np.asarray(selection.method(gm, cg, g), dtype=float)
        if values.shape != g.prunable.shape:
            raise ConfigError(f"PruneChannels.method returned {values.shape[0] if values.ndim else 0} scores "
                              f"for group {g.label}; expected one per prunable channel ({len(g.prunable)})")
        scores[g.prunable] = values
    return scores


def prunable_units(cg: ChannelGraph, prune_normalized: bool = False, prune_outputs: bool = False
                   ) -> list[ChannelGroup]:
    """Each group's per-layer units (see layer_units) holding channels that may be removed; with
    `prune_normalized`, those frozen only for exactness (layer-norm channels) count as prunable, with
    `prune_outputs` those frozen only for reaching the model output."""
    units = []
    for g in cg.groups:
        released = g.released(prune_normalized, prune_outputs)
        if len(released):
            g = dataclasses.replace(g, prunable=np.union1d(g.prunable, released))
        if len(g.prunable):
            units.extend(unit for unit in layer_units(cg, g) if len(unit.prunable))
    return units


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
            inexact=np.intersect1d(group.inexact, classes), at_output=np.intersect1d(group.at_output, classes),
            frozen=group.frozen if len(prunable) < len(classes) else None))
    return units


def removal_count(group: ChannelGroup, amount: float, min_channels: int, round_to: int) -> int:
    """How many classes of `group` to remove: `amount` of them, keeping a multiple of `round_to`
    and at least `min_channels` (and never all). The frozen classes stay too, so the kept number is
    rounded up only after they are counted (a partly frozen group removes fewer); where no multiple
    fits below the whole group, it loses none (`rounding_holds` says why)."""
    total = len(group.classes)
    keep = math.ceil(_least_kept(group, amount, min_channels) / round_to) * round_to
    return max(0, total - keep)


def _least_kept(group: ChannelGroup, amount: float, min_channels: int) -> int:
    """The classes `group` keeps at `amount` before rounding: at least `min_channels`, one, and its frozen ones."""
    total = len(group.classes)
    keep = total - math.floor(amount * total + 1e-9)
    return max(keep, min_channels, 1, total - len(group.prunable))


def rounding_holds(group: ChannelGroup, amount: float, min_channels: int, round_to: int) -> str | None:
    """Why `group` loses none of the channels `amount` asks for: the least it may keep (its frozen
    channels, min_channels) leaves no multiple of round_to below its width. None if it loses some,
    or if it was to lose none anyway."""
    total = len(group.classes)
    least = _least_kept(group, amount, min_channels)
    if least >= total or removal_count(group, amount, min_channels, round_to) > 0:
        return None
    frozen = total - len(group.prunable)
    held = f" ({frozen} of them frozen)" if frozen else ""
    return (f"round_to={round_to}: keeping at least {least} of its {total} channels{held} leaves no multiple "
            f"of {round_to} below {total}, so none are removed")


def lowest(group: ChannelGroup, scores: np.ndarray, count: int, cg: ChannelGraph,
           min_channels: int) -> np.ndarray:
    """The `count` prunable classes of lowest score, skipping any whose removal would empty a
    tensor: every producer keeps `min_channels` outputs, every other slot and split piece one.

    Equal scores (channels whose filters are equal or all zero) go lowest class first, in every
    group and every method alike, so the choice is deterministic. Classes are numbered in the order
    of their first element, and the walk numbers a tensor's channels in position order when it
    first meets the tensor: the lowest class is the lowest channel index of the group's first
    producer (in graph order)."""
    order = group.prunable[np.lexsort((group.prunable, scores[group.prunable]))]
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


# ---- data-driven scores -------------------------------------------------------------------------
def data_driven_scores(gm: GraphModule, cg: ChannelGraph, counts: list[tuple[ChannelGroup, int]], data,
                       method: str, sampling: Sampling) -> tuple[list[np.ndarray], list[str]]:
    """Per group, scores by ThiNet greedy or lasso (lowest removed first), and the groups that fell
    back to l1 (no consumer whose output could be measured)."""
    contributions = _contributions(gm, cg, calibration_batch(data), sampling, purpose=f"{method} selection")
    fallback_scores, per_group, fallbacks = None, [], []
    for group, count in counts:
        z = _class_columns(cg, group, contributions)
        if z is None:
            fallback_scores = norm_scores(gm, cg, 1) if fallback_scores is None else fallback_scores
            per_group.append(fallback_scores)
            fallbacks.append(group.label)
            continue
        scores = np.full(cg.labels.max() + 1, np.inf)
        scores[group.prunable] = _DATA_SCORES[method](z, group, count, sampling.seed)
        per_group.append(scores)
    return per_group, fallbacks


def _contributions(gm, cg, batch, sampling: Sampling, purpose: str | None = None
                   ) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
    """Per consumer: (in_ids, Z) where Z[s, c] is input channel c's contribution to one randomly
    chosen output channel at sampled position s (ThiNet's sampling), positions drawn among the unpadded ones
    where the consumer's rows line up with the attention mask (`purpose` words the warning where they do not)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = {l.node: l for l in cg.layers
              if l.in_ids is not None and consumer_module(gm, nodes[l.node], grouped=False) is not None}
    watched = {name: consumer_module(gm, nodes[name], grouped=False) for name in layers}
    supports = {name: weight_support(gm, nodes[name]) for name in layers}
    found, rng = {}, np.random.default_rng(sampling.seed + 1)

    def before(n, m, rows):
        w = m.weight.detach() if supports[n.name] is None else m.weight.detach() * supports[n.name]
        w = w.double().reshape(m.weight.shape[0], layers[n.name].in_ids.size, -1)
        outs = torch.as_tensor(rng.integers(0, w.shape[0], rows.shape[0]))
        x = rows.reshape(rows.shape[0], w.shape[1], -1)
        found[n.name] = (layers[n.name].in_ids, torch.einsum("sck,sck->sc", x, w[outs]))

    run_capture(Capture(gm, watched, sampling, before=before), batch, purpose)
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
    # scikit-learn takes about a second to import: only the lasso method pays for it
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


_DATA_SCORES: dict[str, Callable] = {"greedy": _greedy_order, "lasso": _lasso_scores}
