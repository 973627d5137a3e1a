"""Op rules of tensor operations (element-wise, shape, indexing, attention); `ops` maps each op to
its rule. Each maps input tracks to the output track.

A rule is `rule(walk, node, **options) -> track`; a track is `{dim: element ids}` for a tensor, a
tuple of tracks for a tuple of tensors, None for a non-tensor. Rules couple (`walk.couple`,
`walk.union`) what must shrink together and freeze (`walk.freeze`) what must not shrink, with a
reason; they never drop a channel dimension silently.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from .walk import Edit, Walk, Width, Widths, _arg, _dim, size_items


def _first(node: Node) -> Node:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


def same(w: Walk, node: Node) -> dict:
    return dict(w.tensor_track(_first(node)))


def shape(w: Walk, node: Node) -> Width | Widths | None:
    """A size read (x.size(1), x.size(), x.shape, x.numel()): a number, but one that reads widths.
    A whole shape is a Widths even without channels: its length places the items of `+` joins."""
    x = node.args[0]
    if w.shape(x) is None:
        return None
    track = w.tensor_track(x)
    sizes = Widths(tuple(Width((track[d],)) if d in track else None for d in range(len(w.shape(x)))))
    if node.target == "size" and len(node.args) + len(node.kwargs) > 1:
        return sizes.item(_arg(node, 1, "dim"))
    if node.target == "size" or (node.target is getattr and node.args[1] == "shape"):
        return sizes
    if node.target == "numel" and track:
        return Width(tuple(track.values()))
    return None  # x.dim(), other attributes


def attribute(w: Walk, node: Node) -> Any:
    """getattr: `x.shape` reads sizes (see `shape`); `.values` / `.indices` of topk's or sort's result
    is that result; `.T` / `.mT` move dims as permute does, `.data` is x. Any other attribute that
    is a tensor is an op these rules do not know: its channels freeze (read as no channels, the
    readers' widths would not follow x's)."""
    x, name = node.args[0], node.args[1]
    if name == "shape":
        return shape(w, node)
    inner = w.track(x)
    if isinstance(inner, tuple) and name in _RESULT_FIELDS:
        return inner[_RESULT_FIELDS[name]]
    if w.shape(x) is not None and w.shape(node) is not None:
        nd, track = len(w.shape(x)), w.tensor_track(x)
        if name == "data":
            return dict(track)
        if name in ("T", "mT"):
            order = list(range(nd))[::-1] if name == "T" else [*range(nd - 2), nd - 1, nd - 2]
            return {new: track[old] for new, old in enumerate(order) if old in track}
    if w.empty_output(node) is not None:
        return w.unknown(node, f"unsupported attribute .{name} at {node.name}")
    return None  # x.dtype, x.device, x.ndim


# the fields of the (values, indices) results of topk and sort, and their positions
_RESULT_FIELDS = {"values": 0, "indices": 1}


def spatial(w: Walk, node: Node, count: int | None) -> dict:
    x = _first(node)
    track, nd = dict(w.tensor_track(x)), len(w.shape(x) or ())
    first = 2 if count is None else nd - count
    for d in [d for d in track if d >= first]:
        w.freeze(track.pop(d), f"{node.name} pools or resizes a channel dimension")
    return track


def pad(w: Walk, node: Node) -> dict:
    x, amounts = node.args[0], _arg(node, 1, "pad")
    track, nd = dict(w.tensor_track(x)), len(w.shape(x) or ())
    for i in range(len(amounts) // 2):
        d = nd - 1 - i
        if d in track and (amounts[2 * i] != 0 or amounts[2 * i + 1] != 0):
            w.freeze(track.pop(d), f"{node.name} pads a channel dimension")
    return track


def binary(w: Walk, node: Node) -> dict | None:
    out = w.shape(node)
    if out is None:
        return None
    inputs = [a for a in (*node.args, *node.kwargs.values()) if w.shape(a) is not None]
    return _broadcast(w, node, inputs, len(out), trailing=0)


def _broadcast(w: Walk, node: Node, tensors: list, count: int, trailing: int) -> dict:
    """Couple the first `count` broadcast dims of `tensors`, leaving out each one's last `trailing`."""
    track = {}
    for k in range(count):
        entries = []
        for t in tensors:
            s = w.shape(t)
            d = k - (count - (len(s) - trailing))
            if d >= 0:
                entries.append((w.tensor_track(t).get(d), s[d]))
        ids = w.couple(entries, f"{node.name} combines channels with a tensor whose channels cannot be sliced")
        if ids is not None:
            track[k] = ids
    return track


def _align(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """Group the non-singleton dims of two shapes of equal numel into blocks of equal product."""
    ia = [d for d, s in enumerate(a) if s != 1]
    ib = [d for d, s in enumerate(b) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) and j < len(ib):
        ga, gb, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ga.append(ia[i]); pa *= a[ia[i]]; i += 1
            else:
                gb.append(ib[j]); pb *= b[ib[j]]; j += 1
        groups.append((ga, gb))
    return groups


def _regroup(w: Walk, node: Node, track: dict, ins: list[int], outs: list[int], shapes) -> tuple[dict, dict]:
    """Channels of input dims `ins` laid out again over output dims `outs` (same numel): the output
    track, and {out dim: size} of the other dims a channel dim is split into (their sizes never change)."""
    a, b = shapes
    tracked = [d for d in ins if d in track]
    if not tracked:
        return {}, {}
    if len(tracked) > 1:
        w.freeze({d: track[d] for d in tracked}, f"{node.name} merges two channel dimensions")
        return {}, {}
    t = tracked[0]
    sizes = [a[d] for d in ins]
    spread = np.broadcast_to(track[t].reshape([-1 if d == t else 1 for d in ins]), sizes)
    grid = spread.reshape([b[d] for d in outs])
    varying = [k for k in range(grid.ndim) if grid.shape[k] > 1 and
               np.any(np.diff(grid, axis=k) != 0)]
    # the dim that keeps the channels: the innermost one along which they differ (all equal: one class).
    # A split into ([qkv,] heads, head_dim) keeps them on head_dim, so the same positions of every head
    # go; with attention="heads" on heads, so each head's whole block goes.
    if len(varying) > 1 and w.attention == "heads":
        keep = varying[-2]
    else:
        keep = varying[-1] if varying else max(k for k in range(grid.ndim) if grid.shape[k] > 1)
    columns = np.moveaxis(grid, keep, -1).reshape(-1, grid.shape[keep])
    if len(varying) > 1:  # couple each channel of the kept dim with its positions along the others
        w.union(columns, np.broadcast_to(columns[0], columns.shape))
    return {outs[keep]: columns[0].copy()}, {outs[k]: b[outs[k]] for k in varying if k != keep}


@dataclass
class _Block:
    """A block of a reshape's dims holding a channel dim: the output dims whose sizes the pass writes."""

    channels: np.ndarray  # the input's ids of the channel dim
    kept: dict            # {out dim: ids}, as _regroup gives them
    fixed: dict           # {out dim: size}


def _reshape_track(w: Walk, node: Node, x: Node) -> tuple[dict, dict, list[_Block]]:
    """The output track of a reshape, its fixed sizes (see _regroup) and its blocks holding channels."""
    a, b = w.shape(x), w.shape(node)
    track, out, fixed, blocks = w.tensor_track(x), {}, {}, []
    if not track:
        return out, fixed, blocks
    for ins, outs in _align(a, b):
        kept, sizes = _regroup(w, node, track, ins, outs, (a, b))
        out.update(kept)
        fixed.update(sizes)
        if kept:
            blocks.append(_Block(next(track[d] for d in ins if d in track), kept, sizes))
    covered = {d for ins, _ in _align(a, b) for d in ins}
    for d in set(track) - covered:
        w.freeze(track[d], f"{node.name} reshapes a channel dimension")
    return out, fixed, blocks


def _sizes_edit(w: Walk, node: Node, ids: dict, fixed: dict | None = None, runtime: tuple = ()) -> Edit:
    """The edit of a view / reshape / expand's sizes; one computed tuple for a shape of several
    dims (`x.size()[:-1] + (heads, d)`) is spread into its items by the pass."""
    items, rank = size_items(node), len(w.shape(node))
    spread = rank if len(items) == 1 and isinstance(items[0], Node) and rank > 1 else 0
    return Edit("sizes", dict(ids), fixed=fixed or {}, spread=spread, runtime=tuple(runtime))


def reshape(w: Walk, node: Node) -> dict:
    out, fixed, blocks = _reshape_track(w, node, _first(node))
    sized = node.op == "call_method" and node.target in ("view", "reshape") or node.target is torch.reshape
    if out and sized:
        runtime = [d for block in blocks for d in _computed_sizes(w, node, block, out, fixed)]
        if out:
            w.edits[node.name] = _sizes_edit(w, node, out, fixed, runtime)
    return out


def _computed_sizes(w: Walk, node: Node, block: _Block, out: dict, fixed: dict) -> list[int]:
    """The out dims of a block whose computed size is left to run time; freezes the block (dropping
    it from `out` and `fixed`) where no size can be written.

    The pass writes the pruned sizes as constants, which is right for a -1 (it stays), a constant
    (the model fixed the sizes itself) and a size computed from channel widths only (`c // heads`,
    or a residual stream's `d` for heads * head_dim: it reads no run-time size, so the dims merged
    with the channels have constant sizes). A size that also reads a dim sized at run time is no
    constant: `y.reshape(b * c, -1)` written as `reshape(8, -1)` fixes the example's batch (an
    example batch of 1 hides the merge from the shapes). Where it reads the width of these channels,
    it computes the pruned size itself at run time and is left alone; else (`b * 8`) it can be
    neither written nor kept, and the channels stay."""
    runtime = []
    for d in (*block.kept, *block.fixed):
        size = _size_argument(w, node, d)
        if isinstance(size, int):
            continue
        read = w.tracks.get(size) if isinstance(size, Node) else size
        if isinstance(read, Width) and not _reads_other_sizes(w, size):
            continue
        if d in block.kept and _reads_merged(read, block.channels):
            runtime.append(d)
            continue
        for k in block.kept:
            w.freeze(out.pop(k), f"{node.name} sizes channels with a size known only at run time")
        for k in block.fixed:
            fixed.pop(k)
        return []
    return runtime


def _reads_merged(read: Width | None, channels: np.ndarray) -> bool:
    """Whether a computed size reads channel widths only of dims holding these channels: the dim
    itself (`b * c`), or the dim they were split from (their other heads coupled with them), so
    that at run time it reads their pruned width."""
    return (isinstance(read, Width) and bool(read.parts)
            and all(np.isin(channels, part).all() for part in read.parts))


def _reads_other_sizes(w: Walk, size: Any) -> bool:
    """Whether a computed size reads a size of a dim that holds no channel (a batch, a length), or
    anything else the graph knows only at run time, so that no constant may stand for it."""
    stack, seen = [size], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        read = w.tracks.get(n)
        if n.op in ("placeholder", "get_attr") or w.shape(n) is not None:
            return True  # an input or a tensor's value
        if n.op == "call_method" and n.target == "numel":
            if len(w.tensor_track(n.args[0])) < len(w.shape(n.args[0])):
                return True
        elif isinstance(read, Widths) or _reads_a_size(w, n):
            items = read.items if isinstance(read, Widths) else (read,)
            if any(not isinstance(item, Width) for item in items):
                return True
        elif n.op != "call_method" or n.target != "dim":  # arithmetic on sizes: what it reads
            stack.extend(n.all_input_nodes)
    return False


def _reads_a_size(w: Walk, n: Node) -> bool:
    """`x.size(d)`, `x.size()`, `x.shape`, or an item of one."""
    if n.op == "call_method" and n.target == "size":
        return True
    if n.op == "call_function" and n.target is getattr:
        return n.args[1] == "shape"
    return n.target is operator.getitem and isinstance(w.tracks.get(n.args[0]), Widths)


def _size_argument(w: Walk, node: Node, d: int) -> Any:
    """The size a view / reshape is given at out dim d: an int or a node as written, or, for an
    item of a computed tuple of sizes that no `+` join spells, the Width it reads (None: no channel)."""
    items = size_items(node)
    one_tuple = len(items) == 1 and isinstance(items[0], Node) and len(w.shape(node)) > 1
    return _tuple_item(w, items[0], d) if one_tuple else items[d]


def _tuple_item(w: Walk, sizes: Node, d: int) -> Any:
    """Item d of a tuple of sizes: the literal int or node where a `+` join spells it, else the
    Width (or None) the analysis has for it."""
    if sizes.op == "call_function" and sizes.target is operator.add:
        for part in sizes.args:
            joined = w.as_sizes(part)
            n = len(joined.items) if joined is not None else 0
            if d < n:
                return part[d] if isinstance(part, (tuple, list)) else _tuple_item(w, part, d)
            d -= n
    track = w.tracks.get(sizes)
    return track.items[d] if isinstance(track, Widths) and d < len(track.items) else None


def reshape_as(w: Walk, node: Node) -> dict:
    """`x.view_as(z)` / `x.reshape_as(z)`: x's channels laid out as a reshape lays them out, but the
    sizes are z's, read at run time, not written in the graph (there is nothing for the pass to
    rewrite). So each output dim must shrink exactly as z's dim does: its channels couple with z's
    channels of that dim. Where z's dim cannot shrink (no channels: an input, a constant, another
    layer's frozen output) x's channels there freeze, and where x's channels cannot follow (a dim
    the view keeps whole, a head count) z's freeze; otherwise the pruned shapes still agree."""
    out = _reshape_track(w, node, node.args[0])[0]
    return _sized_as(w, node, out, _arg(node, 1, "other"))


def _sized_as(w: Walk, node: Node, track: dict, other: Node) -> dict:
    """The output track of an op whose output takes `other`'s shape at run time: per dim, the
    channels `track` places there coupled with `other`'s channels of that dim."""
    sizes, theirs = w.shape(node), w.tensor_track(other)
    reason = f"{node.name} takes the shape of a tensor whose channels cannot be sliced alike"
    out = {}
    for d, size in enumerate(sizes):
        ids = w.couple([(track.get(d), size), (theirs.get(d), size)], reason)
        if ids is not None:
            out[d] = ids
    return out


def unflatten(w: Walk, node: Node) -> dict:
    """torch.unflatten(x, dim, sizes), x.unflatten(dim, sizes), nn.Unflatten: a view splitting one
    dim. Its channels are laid out as a reshape lays them out (a head split included); the sizes
    written for them are rewritten by the pass (an "unflatten" edit: {offset in sizes: ids}, fixed
    {offset: size}). A size the graph computes there freezes the channels (no constant to write)."""
    x = node.args[0]
    nd = len(w.shape(x))
    if node.op == "call_module":
        module = w.gm.get_submodule(node.target)
        dim, sizes = module.dim, module.unflattened_size
    else:
        dim, sizes = _arg(node, 1, "dim"), _arg(node, 2, "sizes")
    dim = _dim(dim, nd)
    out, fixed, _ = _reshape_track(w, node, x)
    span = range(dim, dim + len(sizes))
    written = {d - dim: ids for d, ids in out.items() if d in span}
    pinned = {d - dim: size for d, size in fixed.items() if d in span}
    if any(not isinstance(sizes[k], int) for k in (*written, *pinned)):
        for k in written:
            w.freeze(out.pop(k + dim), f"{node.name} sizes channels with a size computed in the graph")
        return out
    if written:
        w.edits[node.name] = Edit("unflatten", written, dim=dim, fixed=pinned)
    return out


def squeeze(w: Walk, node: Node) -> dict:
    return _reshape_track(w, node, _first(node))[0]


unsqueeze = squeeze


def expand(w: Walk, node: Node) -> dict:
    x, out = node.args[0], w.shape(node)
    shift = len(out) - len(w.shape(x))
    track = {}
    for d, ids in w.tensor_track(x).items():
        if len(ids) == 1 and out[d + shift] > 1:  # one channel repeated: it holds no channel of the output
            w.freeze(ids, f"{node.name} expands one channel over {out[d + shift]}")
        else:
            track[d + shift] = ids
    if track and node.target == "expand":
        w.edits[node.name] = _sizes_edit(w, node, track)
    return track


def expand_as(w: Walk, node: Node) -> dict:
    """`x.expand_as(z)`: the sizes are z's, read at run time. A dim x repeats (size 1, or one it
    lacks) follows z's width: its positions are z's channels, each a copy of x's value, so they go
    with z's. A dim x has at full size must shrink as z's does: their channels couple (one side
    unable to shrink freezes the other)."""
    x, other = node.args[0], _arg(node, 1, "other")
    sx, out = w.shape(x), w.shape(node)
    shift = len(out) - len(sx)
    mine, theirs = w.tensor_track(x), w.tensor_track(other)
    reason = f"{node.name} expands to the shape of a tensor whose channels cannot be sliced alike"
    track = {}
    for d, size in enumerate(out):
        k = d - shift
        if k < 0 or (sx[k] == 1 and size > 1):
            if k in mine:  # one channel repeated: removing it would empty the expansion
                w.freeze(mine[k], f"{node.name} expands one channel over {size}")
            if d in theirs:
                track[d] = theirs[d]
            continue
        ids = w.couple([(mine.get(k), sx[k]), (theirs.get(d), size)], reason)
        if ids is not None:
            track[d] = ids
    return track


def repeat(w: Walk, node: Node) -> dict:
    """x.repeat(*factors) / torch.tile: each dim tiled, new leading dims prepended. A channel dim
    tiled r times holds its ids r times over: pruned, it tiles the kept channels, which are what
    the kept positions hold. The factors count copies, not channels, and stay as written."""
    x = node.args[0]
    sx, out = w.shape(x), w.shape(node)
    shift = len(out) - len(sx)
    return {d + shift: np.tile(ids, out[d + shift] // sx[d]) for d, ids in w.tensor_track(x).items()}


def repeat_interleave(w: Walk, node: Node) -> dict:
    """repeat_interleave(x, repeats, dim): each position repeated in place. A channel dim repeated
    r times (an int) holds each id r times in a row (as GQA's repeat_kv does): exact. Counts read
    from a tensor, an output_size spelling the width, no dim (the flattened tensor) or torch's
    one-argument form (indices of counts) freeze the channels."""
    x, repeats, dim = node.args[0], _arg(node, 1, "repeats"), _arg(node, 2, "dim")
    nd = len(w.shape(x))
    track = dict(w.tensor_track(x))
    if repeats is None or (dim is None and nd > 1):
        return w.unknown(node, f"{node.name} repeats the flattened channels")
    dim = _dim(0 if dim is None else dim, nd)
    if dim in track:
        if not isinstance(repeats, int) or node.kwargs.get("output_size") is not None:
            w.freeze(track.pop(dim), f"{node.name} repeats channels by counts or to a size given in the graph")
        else:
            track[dim] = np.repeat(track[dim], repeats)
    return track


def _dims_arg(node: Node, start: int) -> list[int]:
    rest = node.args[start:] or (node.kwargs.get("dims"),)
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def permute(w: Walk, node: Node) -> dict:
    x = node.args[0]
    nd = len(w.shape(x))
    order = [_dim(d, nd) for d in _dims_arg(node, 1)]
    track = w.tensor_track(x)
    return {new: track[old] for new, old in enumerate(order) if old in track}


def transpose(w: Walk, node: Node) -> dict:
    x = node.args[0]
    nd = len(w.shape(x))
    d0, d1 = _dim(_arg(node, 1, "dim0"), nd), _dim(_arg(node, 2, "dim1"), nd)
    swap = {d0: d1, d1: d0}
    return {swap.get(d, d): ids for d, ids in w.tensor_track(x).items()}


def movedim(w: Walk, node: Node) -> dict:
    """movedim / moveaxis(x, source, destination): the source dims go to the destinations, the
    others keep their order in the dims left (numpy's moveaxis); channels follow their dims."""
    x = node.args[0]
    nd = len(w.shape(x))
    source, destination = _arg(node, 1, "source"), _arg(node, 2, "destination")
    source = [_dim(d, nd) for d in (source if isinstance(source, (list, tuple)) else [source])]
    destination = [_dim(d, nd) for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    order = [d for d in range(nd) if d not in source]
    for new, old in sorted(zip(destination, source)):
        order.insert(new, old)
    track = w.tensor_track(x)
    return {new: track[old] for new, old in enumerate(order) if old in track}


def reduce(w: Walk, node: Node, at: int = 1) -> dict:
    """A reduction over the dims given at argument `at` (None: all), keepdim next: `x.sum(1)`,
    `torch.logsumexp(x, -1)`; at 2 `torch.norm(x, p, dim, keepdim)`. Channels of a dim it keeps are
    reduced each on its own; a channel dim it reduces freezes (each result mixes all its channels)."""
    return _reduce_over(w, node, _arg(node, at, "dim"), _arg(node, at + 1, "keepdim", False))


def variance(w: Walk, node: Node) -> dict:
    """var / std in torch's three spellings: (x, dim, unbiased, keepdim), (x, dim, *, correction,
    keepdim) and (x, unbiased): a bool where the dims go is `unbiased`, the statistic then of all dims."""
    dims = _arg(node, 1, "dim")
    keep = node.kwargs.get("keepdim", node.args[3] if len(node.args) > 3 else False)
    return _reduce_over(w, node, None if isinstance(dims, bool) else dims, keep)


def _reduce_over(w: Walk, node: Node, dims: Any, keep: bool) -> dict:
    x = node.args[0]
    nd = len(w.shape(x))
    listed = dims if isinstance(dims, (list, tuple)) else [dims]
    dims = set(range(nd)) if dims is None else {_dim(d, nd) for d in listed}
    track, out = w.tensor_track(x), {}
    statistic = _is_mean(node) and _is_square(x)
    for d, ids in track.items():
        if d in dims and statistic:  # an RMS norm written out (x * rsqrt(x.pow(2).mean(-1) + eps))
            w.freeze(ids, f"{node.name} normalizes over these channels (RMS norm statistics would change)",
                     inexact_only=True)
        elif d in dims:
            w.freeze(ids, f"{node.name} reduces over a channel dimension")
        else:
            out[d if keep else d - sum(1 for r in dims if r < d)] = ids
    return out


def _is_mean(node: Node) -> bool:
    return node.target in (torch.mean, "mean")


_CASTS = ("to", "float", "double", "half", "bfloat16", "type_as", "type")


def _is_square(x) -> bool:
    """`x.pow(2)`, `torch.pow(x, 2)`, `x.square()`, `x * x`, seen through dtype casts: the mean of it
    is a second moment, the statistic of an RMS norm; removing channels leaves a valid one."""
    while isinstance(x, Node) and x.op == "call_method" and x.target in _CASTS:
        x = x.args[0]
    if not isinstance(x, Node) or x.op not in ("call_function", "call_method"):
        return False
    if x.target in (torch.pow, operator.pow, "pow"):
        return len(x.args) > 1 and not isinstance(x.args[1], Node) and x.args[1] == 2
    if x.target in (torch.square, "square"):
        return True
    return x.target in (operator.mul, torch.mul, "mul") and len(x.args) > 1 and x.args[0] is x.args[1]


def softmax(w: Walk, node: Node) -> dict:
    x = node.args[0]
    nd = len(w.shape(x))
    dim = w.gm.get_submodule(node.target).dim if node.op == "call_module" else _arg(node, 1, "dim")
    if dim is None:  # nn.Softmax() / F.softmax(x): the dim torch picks (torch.nn.functional._get_softmax_dim)
        dim = 0 if nd in (0, 1, 3) else 1
    track = dict(w.tensor_track(x))
    if _dim(dim, nd) in track:
        w.freeze(track.pop(_dim(dim, nd)), f"{node.name} normalizes over a channel dimension")
    return track


def _along(w: Walk, node: Node, dims: Any, verb: str) -> dict:
    """The input's track, less the channel dims among `dims` (None: every dim), frozen: the op
    mixes the positions along them, so a channel's output there depends on its neighbours."""
    x = node.args[0]
    nd = len(w.shape(x))
    listed = range(nd) if dims is None else dims if isinstance(dims, (list, tuple)) else [dims]
    track = dict(w.tensor_track(x))
    for d in {_dim(d, nd) for d in listed} & set(track):
        w.freeze(track.pop(d), f"{node.name} {verb} a channel dimension")
    return track


def cumulative(w: Walk, node: Node) -> dict:
    """cumsum / cumprod along dim: each position accumulates the ones before it."""
    return _along(w, node, _arg(node, 1, "dim"), "accumulates along")


def roll(w: Walk, node: Node) -> dict:
    """roll(x, shifts, dims): position i takes i - shift modulo the width, which pruning changes;
    without dims the flattened tensor rolls, every dim mixed."""
    dims = _arg(node, 2, "dims")
    return _along(w, node, None if dims in (None, (), []) else dims, "rolls")


def flip(w: Walk, node: Node) -> dict:
    """flip(x, dims): a channel dim reversed is a fixed reordering, its ids reversed: the kept
    channels of the flipped tensor are the flipped kept ones."""
    x = node.args[0]
    nd = len(w.shape(x))
    flipped = {_dim(d, nd) for d in _dims_arg(node, 1)}
    return {d: ids[::-1].copy() if d in flipped else ids for d, ids in w.tensor_track(x).items()}


def normalize(w: Walk, node: Node) -> dict:
    """F.normalize(x, p, dim=1): divides by the norm along dim, which reads every channel there."""
    return _along(w, node, _arg(node, 2, "dim", 1), "normalizes over")


def sort(w: Walk, node: Node) -> tuple:
    """sort(x, dim=-1) -> (values, indices): along a channel dim positions hold ranks, not channels."""
    track = _along(w, node, _arg(node, 1, "dim", -1), "sorts along")
    return track, dict(track)


def topk(w: Walk, node: Node) -> tuple:
    """topk(x, k, dim=-1) -> (values, indices): along a channel dim, k ranks, not channels."""
    track = _along(w, node, _arg(node, 2, "dim", -1), "selects the top k along")
    return track, dict(track)


def _joined(w: Walk, node: Node) -> list | None:
    """The tensors cat / stack join, when the graph spells them as a list; None when one node computes
    the whole sequence (`torch.cat(x.chunk(2, -1)[::-1])`, `torch.stack(x.unbind(1))`): its items
    have no nodes of their own to read tracks and shapes from."""
    tensors = _arg(node, 0, "tensors")
    return list(tensors) if isinstance(tensors, (list, tuple)) else None


def cat(w: Walk, node: Node) -> dict:
    tensors, out = _joined(w, node), w.shape(node)
    if tensors is None:
        return w.unknown(node, f"{node.name} concatenates a sequence computed in the graph")
    dim = _dim(_arg(node, 1, "dim", 0), len(out))
    track = _couple_dims(w, node, tensors, len(out), skip=dim)
    pieces = [w.tensor_track(t).get(dim) for t in tensors]
    if any(p is not None for p in pieces):
        for i, t in enumerate(tensors):
            if pieces[i] is None:
                pieces[i] = w.fresh(w.shape(t)[dim])
                w.freeze(pieces[i], f"{node.name} concatenates channels that cannot be sliced")
        track[dim] = np.concatenate(pieces)
    return track


def _couple_dims(w: Walk, node: Node, tensors: list, ndim: int, skip: int | None = None) -> dict:
    track = {}
    for d in range(ndim):
        if d != skip:
            entries = [(w.tensor_track(t).get(d), w.shape(t)[d]) for t in tensors]
            ids = w.couple(entries, f"{node.name} joins channels with a tensor whose channels cannot be sliced")
            if ids is not None:
                track[d] = ids
    return track


def stack(w: Walk, node: Node) -> dict:
    tensors, out = _joined(w, node), w.shape(node)
    if tensors is None:
        return w.unknown(node, f"{node.name} stacks a sequence computed in the graph")
    dim = _dim(_arg(node, 1, "dim", 0), len(out))
    inner = _couple_dims(w, node, tensors, len(w.shape(tensors[0])))
    return {d + (d >= dim): ids for d, ids in inner.items()}


def _pieces(w: Walk, node: Node, dim_index: int) -> tuple:
    x = node.args[0]
    nd = len(w.shape(x))
    dim = _dim(_arg(node, dim_index, "dim", 0), nd)
    track = w.tensor_track(x)
    sizes = [m.shape[dim] for m in w.meta[node.name]]
    if dim not in track:
        return tuple(dict(track) for _ in sizes)
    bounds = np.cumsum([0, *sizes])
    pieces = [track[dim][bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    w.edits[node.name] = Edit("split", dim=dim, pieces=pieces)
    return tuple({**track, dim: p} for p in pieces)


def split(w: Walk, node: Node) -> tuple:
    return _pieces(w, node, 2)


def chunk(w: Walk, node: Node) -> tuple:
    return _pieces(w, node, 2)


def unbind(w: Walk, node: Node) -> tuple:
    x = node.args[0]
    nd = len(w.shape(x))
    dim = _dim(_arg(node, 1, "dim", 0), nd)
    track = dict(w.tensor_track(x))
    if dim in track:
        w.freeze(track.pop(dim), f"{node.name} unbinds a channel dimension")
    out = {d - (d > dim): ids for d, ids in track.items()}
    return tuple(dict(out) for _ in w.meta[node.name])


def getitem(w: Walk, node: Node) -> object:
    container, index = node.args
    inner = w.track(container)
    if isinstance(inner, tuple):
        return inner[index] if isinstance(index, int) else w.unknown(node, f"{node.name} slices a tuple")
    if w.shape(container) is None:
        return None
    return _index_tensor(w, node, container, index if isinstance(index, tuple) else (index,))


def _index_tensor(w: Walk, node: Node, x: Node, index: tuple) -> dict:
    track, nd = w.tensor_track(x), len(w.shape(x))
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return w.unknown(node, f"{node.name} indexes channels with a tensor")
    out, slices, d_in, d_out = {}, {}, 0, 0
    for position, item in enumerate(index):
        if item is None:
            d_out += 1
        elif item is Ellipsis:
            for _ in range(nd - sum(1 for i in index if i is not None and i is not Ellipsis)):
                if d_in in track:
                    out[d_out] = track[d_in]
                d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(item, int):
            if d_in in track:
                w.freeze(track[d_in], f"{node.name} picks a single channel")
            d_in += 1
        else:
            if d_in in track:
                item = _resolved(w, track[d_in], item, w.shape(x)[d_in], w.shape(node)[d_out])
                if item is None:
                    w.freeze(track[d_in], f"{node.name} slices channels with a step or computed bounds")
                else:
                    out[d_out] = track[d_in][item]
                    if item != slice(None):
                        slices[position] = (track[d_in], item)
            d_in, d_out = d_in + 1, d_out + 1
    for d in range(d_in, nd):
        if d in track:
            out[d_out + d - d_in] = track[d]
    if slices:
        w.edits[node.name] = Edit("slice", {p: ids for p, (ids, _) in slices.items()},
                                  fixed={p: item for p, (_, item) in slices.items()})
    return out


def _resolved(w: Walk, ids: np.ndarray, item: slice, size: int, length: int) -> slice | None:
    """A slice of a channel dim with constant bounds, or None if it cannot be pruned. A bound computed
    from this very dim's width (rotary embeddings' `x[..., : x.shape[-1] // 2]`) is a constant of the
    model: its value follows from the shapes (the other bound given, the output length known), and the
    pass writes the pruned one in its place. A bound read from anything else (a sequence length)
    would change at run time, so it freezes the channels."""
    if item.step not in (None, 1):
        return None
    start, stop = item.start, item.stop
    computed = [b for b in (start, stop) if isinstance(b, Node)]
    if not computed:
        return item
    if len(computed) > 1 or not all(_reads_only(w.track(b), ids) for b in computed):
        return None
    if isinstance(stop, Node):
        first = slice(start, None).indices(size)[0]
        resolved = slice(start, first + length)
    else:
        end = slice(None, stop).indices(size)[1]
        resolved = slice(end - length, stop)
    return resolved if len(range(*resolved.indices(size))) == length else None


def _reads_only(read, ids: np.ndarray) -> bool:
    """Whether a computed size reads the width of `ids`'s dim and nothing else."""
    return isinstance(read, Width) and bool(read.parts) and all(p is ids or np.array_equal(p, ids) for p in read.parts)


def narrow(w: Walk, node: Node) -> dict:
    """narrow(x, dim, start, length) is x[..., start:start + length] on dim: along a channel dim a
    slice with constant bounds, which the pass rewrites as it rewrites slicing's (a "narrow" edit:
    the slice in `fixed`), so the kept channels inside it are what it keeps. Bounds the graph
    computes (a tensor, a size read) freeze the channels."""
    x = node.args[0]
    sx = w.shape(x)
    dim = _dim(_arg(node, 1, "dim"), len(sx))
    start, length = _arg(node, 2, "start"), _arg(node, 3, "length")
    track = dict(w.tensor_track(x))
    if dim not in track:
        return track
    if not (isinstance(start, int) and isinstance(length, int)):
        w.freeze(track.pop(dim), f"{node.name} narrows channels with computed bounds")
        return track
    first = start + sx[dim] if start < 0 else start
    bounds = slice(first, first + length)
    w.edits[node.name] = Edit("narrow", {dim: track[dim]}, dim=dim, fixed={dim: bounds})
    track[dim] = track[dim][bounds]
    return track


def matmul(w: Walk, node: Node) -> dict:
    a, b = node.args[0], node.args[1]
    sa, sb, out = w.shape(a), w.shape(b), w.shape(node)
    ta, tb = w.tensor_track(a), w.tensor_track(b)
    if len(sa) < 2 or len(sb) < 2:
        return w.unknown(node, f"{node.name} multiplies a vector")
    reason = f"{node.name} contracts channels with a tensor whose channels cannot be sliced"
    w.couple([(ta.get(len(sa) - 1), sa[-1]), (tb.get(len(sb) - 2), sb[-2])], reason)
    track = _broadcast(w, node, [a, b], len(out) - 2, trailing=2)
    for d, ids in ((len(out) - 2, ta.get(len(sa) - 2)), (len(out) - 1, tb.get(len(sb) - 1))):
        if ids is not None:
            track[d] = ids
    return track


def sdpa(w: Walk, node: Node) -> dict:
    q, k, v = node.args[:3]
    sq, sk, sv, out = w.shape(q), w.shape(k), w.shape(v), w.shape(node)
    tq, tk, tv = w.tensor_track(q), w.tensor_track(k), w.tensor_track(v)
    reason = f"{node.name} attends with a tensor whose channels cannot be sliced"
    w.couple([(tq.get(len(sq) - 1), sq[-1]), (tk.get(len(sk) - 1), sk[-1])], reason)
    w.couple([(tk.get(len(sk) - 2), sk[-2]), (tv.get(len(sv) - 2), sv[-2])], reason)
    mask = _arg(node, 3, "attn_mask")
    mask = [mask] if w.shape(mask) is not None else []
    for m in mask:  # its (query, key) dims hold positions; no channel may be cut there
        tm = w.tensor_track(m)
        w.freeze({d: tm[d] for d in tm if d >= len(w.shape(m)) - 2}, f"{node.name}: an attention mask over channels")
    track = _broadcast(w, node, [q, k, v], len(out) - 2, trailing=2)
    if node.kwargs.get("enable_gqa") and len(sq) > 2 and sq[-3] != sk[-3]:
        _gqa_heads(w, node, (q, k, v), reason)
    if mask:  # a mask with a head dim (T5's position bias, (1, heads, q, k)) loses the heads q, k, v lose
        _broadcast(w, node, [q, k, v, *mask], len(out) - 2, trailing=2)
    for d, ids in ((len(out) - 2, tq.get(len(sq) - 2)), (len(out) - 1, tv.get(len(sv) - 1))):
        if ids is not None:
            track[d] = ids
    if len(sq) - 1 in tq and node.kwargs.get("scale") is None:
        w.edits[node.name] = Edit("sdpa_scale", value=_sdpa_scale(sq[-1]))  # keep the unpruned scale
    return track



def _gqa_heads(w: Walk, node: Node, qkv: tuple, reason: str) -> None:
    """sdpa(enable_gqa=True): query head h reads key / value head h // (query heads / kv heads), so a
    KV head goes with the query heads that read it (broadcasting alone would couple nothing there)."""
    q, k, v = qkv
    heads, kv_heads = w.shape(q)[-3], w.shape(k)[-3]
    entries = [(w.tensor_track(q).get(len(w.shape(q)) - 3), heads)]
    for t in (k, v):
        ids = w.tensor_track(t).get(len(w.shape(t)) - 3)
        entries.append((None if ids is None else np.repeat(ids, heads // kv_heads), heads))
    w.couple(entries, reason)


def _sdpa_scale(head_dim: int) -> float:
    """F.scaled_dot_product_attention's default scale for a head_dim."""
    return 1.0 / math.sqrt(head_dim)


def _pixel_factor(w: Walk, node: Node, attr: str) -> int:
    if node.op == "call_module":
        return getattr(w.gm.get_submodule(node.target), attr)
    return _arg(node, 1, attr)


def _spatial_channels(w: Walk, node: Node, track: dict, nd: int) -> dict:
    for d in [d for d in track if d >= nd - 2]:
        w.freeze(track.pop(d), f"{node.name} interleaves a channel dimension with space")
    return track


def pixel_shuffle(w: Walk, node: Node) -> dict:
    """(*, C r², H, W) -> (*, C, H r, W r): output channel c spreads input channels c r² ..
    c r² + r² - 1 over space. Each block of r² goes with its output channel (coupled, as whole
    heads are); pruned by whole blocks, the shuffle of the kept ones is the kept output channels,
    and r stays."""
    x = node.args[0]
    nd, r = len(w.shape(x)), _pixel_factor(w, node, "upscale_factor")
    track = _spatial_channels(w, node, dict(w.tensor_track(x)), nd)
    if nd - 3 in track:
        blocks = track[nd - 3].reshape(-1, r * r)
        w.union(blocks, np.broadcast_to(blocks[:, :1], blocks.shape))
        track[nd - 3] = blocks[:, 0].copy()
    return track


def pixel_unshuffle(w: Walk, node: Node) -> dict:
    """(*, C, H r, W r) -> (*, C r², H, W): input channel c becomes the r² output channels c r² ..
    c r² + r² - 1, its id repeated in place (as repeat_interleave's); r stays."""
    x = node.args[0]
    nd, r = len(w.shape(x)), _pixel_factor(w, node, "downscale_factor")
    track = _spatial_channels(w, node, dict(w.tensor_track(x)), nd)
    if nd - 3 in track:
        track[nd - 3] = np.repeat(track[nd - 3], r * r)
    return track
