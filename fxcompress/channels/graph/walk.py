"""The walk behind ChannelGraph: one pass over the graph in topological order applying op rules.

Every channel of every prunable tensor dimension is an *element* (an int). Parameters own them:
the first time a parameter dimension is seen it gets fresh elements (a *slot*). A tensor value
carries a *track*, `{dim: ids}`, saying which element each position of a channel dimension holds;
rules compute the output track from the input tracks (cat concatenates ids, slicing slices them,
flatten repeats them in blocks, a head split couples them across heads, or within each head when
whole heads are pruned) and record which elements must go together (`union`) or can never go
(`freeze`, with the reason). Element classes are the connected components of the unions; they are
computed afterwards, in C, by scipy.

Cost: each node does numpy work proportional to the channels it carries, so the walk is linear in
the size of the graph's tensors' channel lists; a DenseNet concatenation chain costs the length of
its concatenated id arrays, nothing quadratic in Python.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.shape_prop import TensorMetadata

from ...layers import weight_source

NOT_CHANNEL = "not a channel dimension"
Track = dict  # {dim: np.ndarray of element ids}
Rule = Callable[["Walk", Node], Any]  # input tracks of a node -> its output track (see tensor_rules)
RuleLookup = Callable[[GraphModule, Node], "tuple[Rule | None, str]"]  # a call's rule, and the op in words


@dataclass
class LayerChannels:
    """A weight-bearing layer as the analysis sees it: which elements its output and input positions hold."""

    node: str
    name: str                  # module path (or the weight's owner for functional layers)
    kind: str                  # "conv", "conv_transpose", "linear", "embedding", "mha"
    weight: str | None         # qualified name of the stored weight
    out_ids: np.ndarray | None  # element of each position of the weight's output dim
    in_ids: np.ndarray | None   # element of each input channel (None: not prunable from here)
    groups: int = 1
    out_dim: int = 0            # the weight dim holding output channels (1 for transposed conv, embedding)


@dataclass
class Edit:
    """A node whose arguments spell a channel count; the pass rewrites them after pruning.

    kind "sizes": {out_dim: ids} of view/reshape/expand, and `fixed` {out_dim: size}: the other dims
    a channel dim is split into (heads or head_dim, whichever keeps its size), written as constants,
    so a size computed there from a width (`C // num_heads`) stays right, and `spread`: the length
    of the sizes when they come as one computed tuple (`x.size()[:-1] + (heads, d)`; 0 if not),
    which the pass indexes item by item so that single items can change; "split": pieces of
    split/chunk along `dim`; "slice": getitem slices {index position: ids}, with `fixed` {index
    position: the slice with constant bounds} (bounds computed from the width resolved), and `runtime`:
    the dims of "sizes" whose computed size reads the pruned width at run time (`b * c` where channels
    merge with the batch), left as written; "narrow": narrow along a channel `dim`, {dim: ids} and
    `fixed` {dim: the slice it takes}; "unflatten": {offset in its sizes: ids} and `fixed` {offset:
    size}, as "sizes" has them; "groups"/"num_groups":
    group counts of functional conv / group_norm from `ids` and `per_group`; "sdpa_scale": pin
    attention's scale to `value`.
    """

    kind: str
    ids: dict = field(default_factory=dict)
    dim: int = 0
    pieces: list = field(default_factory=list)
    fixed: dict = field(default_factory=dict)
    per_group: int = 1
    value: float = 0.0
    spread: int = 0
    runtime: tuple = ()


@dataclass(frozen=True)
class Width:
    """A number computed from channel widths (`x.size(1) // 4`): the channels whose count it reads."""

    parts: tuple


@dataclass(frozen=True)
class Widths:
    """A tuple of sizes (`x.size()`, `x.shape`, a slice of one, tuples joined by `+`): for each
    position, the Width it reads, None where it reads no channel."""

    items: tuple

    def item(self, index: Any) -> Width | Widths | None:
        """`sizes[index]`: one size, or a slice of them; an index computed at run time reads them all."""
        bounds = (index.start, index.stop, index.step) if isinstance(index, slice) else (index,)
        if not all(b is None or isinstance(b, int) for b in bounds):
            return Width(_parts(self))
        return Widths(self.items[index]) if isinstance(index, slice) else self.items[index]


class ComputedDim(Exception):
    """A dim argument the graph computes (`x.sum(dim=x.dim() - 1)`): no rule can tell which dim it is."""


def _dim(d: int, nd: int) -> int:
    if not isinstance(d, int):
        raise ComputedDim(d)  # visit() freezes the op's channels, with the node named
    return d + nd if d < 0 else d


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class Walk:
    """State of one walk over a GraphModule; `run()` visits every node once."""

    def __init__(self, gm: GraphModule, meta, attention: str = "head_dims") -> None:
        self.gm, self.meta = gm, meta
        self.attention = attention  # "head_dims" | "heads": what a head split keeps (see tensor_rules._regroup)
        self.count = 0
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.inexact: list[tuple[np.ndarray, str]] = []
        self.at_output: list[tuple[np.ndarray, str]] = []  # removable only if the output shape may change
        self.slots: dict[tuple[str, int], np.ndarray] = {}
        self.tensor_names: dict[int, str] = {}  # id of a stored tensor -> the first name it was read under
        self.layers: list[LayerChannels] = []
        self.edits: dict[str, Edit] = {}
        self.tracks: dict[Node, Any] = {}

    # ---- elements -------------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        ids = np.arange(self.count, self.count + n, dtype=np.int64)
        self.count += n
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        self.pairs.append((a.ravel(), b.ravel()))

    def freeze(self, track: Any, reason: str, *, inexact_only: bool = False, at_output: bool = False) -> None:
        """Keep these elements. `inexact_only`: removing them would be valid but not exact (a layer
        norm's statistics would change); PruneChannels(prune_normalized=True) may still remove them.
        `at_output`: they reach the model's output; PruneChannels(prune_outputs=True) may remove them."""
        into = self.inexact if inexact_only else self.at_output if at_output else self.frozen
        if isinstance(track, dict):
            for ids in track.values():
                into.append((ids.ravel(), reason))
        elif isinstance(track, np.ndarray):
            into.append((track.ravel(), reason))
        elif isinstance(track, (tuple, list)):
            for t in track:
                self.freeze(t, reason, inexact_only=inexact_only, at_output=at_output)

    def couple(self, entries: list[tuple[np.ndarray | None, int]], reason: str) -> np.ndarray | None:
        """Positions of same-size dims hold the same channel: union their ids.

        `entries` are (ids or None, size). An untracked size-1 dim broadcasts and couples nothing; a
        tracked one (a one-channel slice, `y[:, 7:8]`) that broadcasts over a wider dim freezes, since
        removing its channel would leave it empty and so empty the whole result. A dim of the full
        size that carries no ids (a constant, an input, a layer's one-wide weight) cannot shrink, so
        the others freeze.
        """
        size = max((s for _, s in entries), default=1)
        if size > 1:
            self.freeze([ids for ids, s in entries if s == 1 and ids is not None],
                        f"{reason} (one channel broadcast over {size})")
        full = [(ids, s) for ids, s in entries if s == size]
        tracked = [ids for ids, _ in full if ids is not None]
        if not tracked:
            return None
        if len(tracked) < len(full):
            self.freeze(tracked, reason)
        for other in tracked[1:]:
            self.union(tracked[0], other)
        return tracked[0]

    def param_track(self, name: str, dims: tuple[int, ...] | None = None) -> Track:
        """The elements of a stored tensor's dims (created once per tensor dim). A tensor tied under
        several names (`b.weight = a.weight`) has the same elements under each: it is cut once, so
        its channels go together or stay together, whichever name a use reads."""
        tensor = operator.attrgetter(name)(self.gm)
        if not isinstance(tensor, torch.Tensor):
            return {}
        first = self.tensor_names.setdefault(id(tensor), name)
        track = {}
        for d in range(tensor.dim()) if dims is None else dims:
            if tensor.shape[d] > 1:
                if (first, d) not in self.slots:
                    self.slots[(first, d)] = self.fresh(tensor.shape[d])
                track[d] = self.slots.setdefault((name, d), self.slots[(first, d)])
        return track

    def module_param(self, node: Node, attr: str, dims: tuple[int, ...]) -> Track | None:
        module = self.gm.get_submodule(node.target)
        if getattr(module, attr, None) is None:
            return None
        return self.param_track(f"{node.target}.{attr}", dims)

    # ---- values ---------------------------------------------------------------------------
    def shape(self, value: Any) -> tuple[int, ...] | None:
        if not isinstance(value, Node):
            return None
        m = self.meta.get(value.name)
        return tuple(m.shape) if isinstance(m, TensorMetadata) else None

    def track(self, value: Any) -> Any:
        return self.tracks.get(value) if isinstance(value, Node) else None

    def tensor_track(self, value: Any) -> Track:
        t = self.track(value)
        return t if isinstance(t, dict) else {}

    def empty_output(self, node: Node) -> Any:
        m = self.meta.get(node.name)
        if isinstance(m, TensorMetadata):
            return {}
        if isinstance(m, (tuple, list)):
            return tuple({} if isinstance(x, TensorMetadata) else None for x in m)
        return None

    # ---- the walk -------------------------------------------------------------------------
    def run(self, rule_of: RuleLookup) -> None:
        """Visit every node in topological order; `rule_of(gm, node)` names the rule of a call
        (see `ops.rule_of`), so the walk itself knows no op."""
        for node in self.gm.graph.nodes:
            self.tracks[node] = self.visit(node, rule_of)

    def visit(self, node: Node, rule_of: RuleLookup) -> Any:
        if node.op == "placeholder":
            return self.empty_output(node)
        if node.op == "get_attr":
            return self.param_track(node.target) if self.shape(node) is not None else None
        if node.op == "output":
            self.freeze(self.all_input_tracks(node), f"reaches the model output ({node.name})", at_output=True)
            return None
        rule, what = rule_of(self.gm, node)
        if rule is None:
            return self.unknown(node, f"unsupported {what} at {node.name}")
        try:
            out = rule(self, node)
        except ComputedDim as computed:
            return self.unknown(node, f"{node.name} reads a dim computed in the graph ({computed.args[0]})")
        return self.check_widths(node, out)

    def check_widths(self, node: Node, out: Any) -> Any:
        """Sizes read from channel dims may flow into size arithmetic and into the size arguments the
        pass rewrites; any other use (a scale, a constant's shape) would compute with the new width,
        so those channels are frozen as inexact."""
        reads = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: reads.append(n)
                              if isinstance(self.tracks.get(n), (Width, Widths)) else None)
        if not reads:
            return out
        if node.name not in self.meta:  # arithmetic on sizes: the result reads the same channels
            return self.computed_size(node, reads)
        allowed = self.rewritten(node)
        for n in reads:
            if n not in allowed:
                self.freeze(list(_parts(self.tracks[n])), f"{node.name} computes with the width of these channels",
                            inexact_only=True)
        return out

    def computed_size(self, node: Node, reads: list) -> Width | Widths:
        """A size computed from sizes: an item or a slice of a tuple of sizes is that part of it,
        tuples joined by `+` keep their positions, any other arithmetic reads every width it is given."""
        if node.target is operator.getitem and isinstance(self.tracks.get(node.args[0]), Widths):
            return self.tracks[node.args[0]].item(node.args[1])
        if node.target is operator.add:
            joined = [self.as_sizes(a) for a in node.args]
            if all(j is not None for j in joined):
                return Widths(sum((j.items for j in joined), ()))
        return Width(tuple(p for n in reads for p in _parts(self.tracks[n])))

    def as_sizes(self, value: Any) -> Widths | None:
        """A tuple of sizes: a node computing one, or a literal tuple of ints and computed sizes."""
        if isinstance(value, Node):
            track = self.tracks.get(value)
            return track if isinstance(track, Widths) else None
        if not isinstance(value, (tuple, list)):
            return None
        tracks = [self.tracks.get(v) if isinstance(v, Node) else None for v in value]
        if any(isinstance(t, Widths) for t in tracks):
            return None  # a tuple of tuples is no size
        return Widths(tuple(t if isinstance(t, Width) else None for t in tracks))

    def rewritten(self, node: Node) -> set:
        """The argument nodes the pass replaces by constants (sizes of pruned dims)."""
        edit = self.edits.get(node.name)
        if edit is None or edit.kind not in ("sizes", "split", "slice"):
            return set()
        if edit.kind == "slice":  # the computed bounds of the slices the pass rewrites
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            return {b for p in edit.ids for b in (index[p].start, index[p].stop) if isinstance(b, Node)}
        if edit.kind == "split":
            found = set()
            torch.fx.node.map_arg(node.args[1:], found.add)
            return found
        sizes, edited = size_items(node), {*edit.ids, *edit.fixed}
        if edit.spread:  # one computed tuple: rewritten if every width it reads lands on an edited dim
            track = self.tracks.get(sizes[0])
            if not isinstance(track, Widths):  # widths read by arithmetic the pass cannot place
                return set()
            return {sizes[0]} if all(t is None or d in edited for d, t in enumerate(track.items)) else set()
        return {sizes[d] for d in edited if isinstance(sizes[d], Node)}

    def all_input_tracks(self, node: Node) -> list:
        found = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(self.tracks.get(n)))
        return found

    def unknown(self, node: Node, reason: str) -> Any:
        self.freeze(self.all_input_tracks(node), reason)
        return self.empty_output(node)

    def add_layer(self, node: Node, kind: str, out_ids, in_ids, groups: int = 1, out_dim: int = 0) -> None:
        if kind == "mha":
            name, weight = node.target, f"{node.target}.in_proj_weight"
        elif node.op == "call_module":
            name, weight = node.target, f"{node.target}.weight"
        else:
            source = weight_source(node) if kind != "embedding" else _embedding_source(node)
            weight = source.target if source is not None and source.op == "get_attr" else None
            name = weight.rpartition(".")[0] or weight if weight else node.name
        self.layers.append(LayerChannels(node.name, name, kind, weight, out_ids, in_ids, groups, out_dim))


def _parts(read: Width | Widths) -> tuple:
    if isinstance(read, Width):
        return read.parts
    return tuple(p for item in read.items if item is not None for p in item.parts)


def size_items(node: Node) -> list:
    """The size arguments of a view / reshape / expand as a list: `x.view(a, b)`, `x.view((a, b))`,
    `torch.reshape(x, shape=(a, b))`, or one computed tuple `x.view(sizes)` (a list of one node)."""
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    sizes = node.args[1] if packed else node.args[1:]
    if not sizes:
        shape = node.kwargs.get("shape", node.kwargs.get("size", ()))
        sizes = shape if isinstance(shape, (list, tuple)) else (shape,)
    return list(sizes)


def _embedding_source(node: Node) -> Node | None:
    w = _arg(node, 1, "weight")
    while isinstance(w, Node) and w.op != "get_attr":
        w = w.args[0] if w.args and isinstance(w.args[0], Node) else None
    return w

