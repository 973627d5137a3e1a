"""Physically removing channel classes chosen on a ChannelGraph: smaller parameters, fixed modules,
rewritten size arguments. The modules stay in place with smaller tensors, so parameter counts,
MACs and latency really drop, and state_dict keys are unchanged."""
from __future__ import annotations

import operator
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..errors import PreconditionError
from .graph import ChannelGraph
from .graph.layer_rules import (batch_norm, conv, conv_transpose, embedding, group_norm, instance_norm, linear, mha,
                                prelu)
from .graph.ops import MODULE_RULES
from .graph.walk import size_items


def apply_removal(gm: GraphModule, cg: ChannelGraph, removed: np.ndarray) -> list[str]:
    """Remove every class flagged in `removed` (bool per class); returns the tensors resized."""
    def kept(ids: np.ndarray) -> np.ndarray:
        return np.flatnonzero(~removed[cg.labels[ids]])

    resized: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (name, dim), ids in cg.slots.items():
        keep = kept(ids)
        if len(keep) < len(ids):
            resized.setdefault(name, []).append((dim, keep))
    before = {m: _state(m) for m in gm.modules() if type(m) in _FIXERS}
    sliced: dict = {}  # a tensor tied under two names is cut once and stays one
    for name, cuts in resized.items():
        _slice_tensor(gm, name, cuts, sliced)
    _rebind_aliases(gm, sliced)
    for module, state in before.items():  # recomputed from the weights: a no-op where nothing changed
        _FIXERS[type(module)](module, state)
    nodes = {n.name: n for n in gm.graph.nodes}
    for node_name, edit in cg.edits.items():
        _EDITORS[edit.kind](gm, nodes[node_name], edit, lambda ids: len(kept(ids)), kept)
    return sorted(resized)


def _state(module: nn.Module) -> dict:
    return {k: v for k, v in vars(module).items() if isinstance(v, (int, tuple))}


def _slice_tensor(gm: GraphModule, name: str, cuts: list[tuple[int, np.ndarray]], sliced: dict) -> None:
    """Cut `name` to the kept indices of each dim; `sliced` maps id(original) -> (original, cuts, result),
    so a tensor tied under several names (an LM head's weight) is cut once and stays one tensor."""
    owner_path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_path)
    tensor = operator.attrgetter(name)(gm)
    cuts = sorted(cuts, key=lambda cut: cut[0])
    if id(tensor) in sliced:
        _, done, new = sliced[id(tensor)]
        if [(d, k.tolist()) for d, k in done] != [(d, k.tolist()) for d, k in cuts]:
            raise PreconditionError(f"PruneChannels: the tied tensor {name!r} would be cut differently under "
                                    "each of its names")
    else:
        with torch.no_grad():
            new = tensor.detach()
            for dim, keep in cuts:
                new = new.index_select(dim, torch.as_tensor(keep, device=new.device))
            new = new.clone()
        if isinstance(tensor, nn.Parameter):
            new = nn.Parameter(new, requires_grad=tensor.requires_grad)
        sliced[id(tensor)] = (tensor, cuts, new)  # the original kept alive: its id stays unique
    if attr in owner._buffers:
        owner._buffers[attr] = new
    else:
        setattr(owner, attr, new)


def _rebind_aliases(gm: GraphModule, sliced: dict) -> None:
    """A tied tensor the graph reads under one name only (torch.export reads an LM head tied to its
    embedding as one get_attr) is still held under its other names: they get the cut tensor too, so
    it stays one tensor and no stale full-width copy is left behind."""
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for attr, value in table.items():
                if value is not None and id(value) in sliced and sliced[id(value)][0] is value:
                    table[attr] = sliced[id(value)][2]


# ---- module attributes that spell widths, recomputed from the sliced parameters --------------
def _fix_linear(m: nn.Linear, before: dict) -> None:
    m.out_features, m.in_features = m.weight.shape


def _fix_conv(m: nn.modules.conv._ConvNd, before: dict) -> None:
    groups, c_in, c_out = before["groups"], before["in_channels"], before["out_channels"]
    transposed = m.transposed
    w_in = m.weight.shape[0] if transposed else m.weight.shape[1] * groups
    if groups > 1 and c_in // groups == 1:  # depthwise-like: whole groups went
        m.groups = m.weight.shape[0] if transposed else m.weight.shape[0] // (c_out // groups)
        w_in = m.groups
    m.in_channels = w_in
    m.out_channels = m.weight.shape[1] * m.groups if transposed else m.weight.shape[0]


def _fix_norm(m: nn.Module, before: dict) -> None:
    for name in ("weight", "running_mean"):
        tensor = getattr(m, name, None)
        if tensor is not None:
            m.num_features = tensor.shape[0]
            return


def _fix_group_norm(m: nn.GroupNorm, before: dict) -> None:
    if m.weight is not None:
        per_group = before["num_channels"] // before["num_groups"]
        m.num_channels = m.weight.shape[0]
        m.num_groups = m.num_channels // per_group if before["num_groups"] > 1 else 1


def _fix_prelu(m: nn.PReLU, before: dict) -> None:
    m.num_parameters = m.weight.shape[0]


def _fix_embedding(m: nn.Embedding, before: dict) -> None:
    m.embedding_dim = m.weight.shape[1]


def _fix_mha(m: nn.MultiheadAttention, before: dict) -> None:
    head_dim = before["head_dim"]
    m.embed_dim = m.kdim = m.vdim = m.in_proj_weight.shape[1]
    m.num_heads = m.embed_dim // head_dim
    m.out_proj.out_features, m.out_proj.in_features = m.out_proj.weight.shape


# The fixer of each module rule; the module types are those of the op tables, whose layers are the
# kinds of `fxcompress.layers.KINDS`.
_FIXER_OF_RULE: dict[Callable, Callable] = {
    linear: _fix_linear, conv: _fix_conv, conv_transpose: _fix_conv, batch_norm: _fix_norm, instance_norm: _fix_norm,
    group_norm: _fix_group_norm, prelu: _fix_prelu, embedding: _fix_embedding, mha: _fix_mha,
}
_FIXERS: dict[type, Callable] = {cls: _FIXER_OF_RULE[rule] for cls, rule in MODULE_RULES.items()
                                 if rule in _FIXER_OF_RULE}


# ---- graph arguments that spell widths ----------------------------------------------------------
def _edit_sizes(gm, node: Node, edit, count, kept) -> None:
    """view / reshape / expand: the size at a channel dim becomes the new width, the other dims of a
    head split their constant size (-1 stays -1). Sizes computed as one tuple (`x.size()[:-1] +
    (heads, d)`) are indexed item by item, so the other items keep their run-time values."""
    sizes = size_items(node)
    written = {d: ids for d, ids in edit.ids.items() if d not in edit.runtime}  # the others compute it
    new = {**edit.fixed, **{d: count(ids) for d, ids in written.items()}}
    if edit.spread:
        with gm.graph.inserting_before(node):
            sizes = [new[d] if d in new else gm.graph.call_function(operator.getitem, (sizes[0], d))
                     for d in range(edit.spread)]
    else:
        for dim, size in new.items():
            if not (isinstance(sizes[dim], int) and sizes[dim] == -1):
                sizes[dim] = size
    if node.op == "call_method" and node.target == "view" and len(node.args) > 1:
        # reshape: the same view wherever a view works; a copy where a width pruned to 1 left strides
        # a view cannot merge (torch.export drops a `.contiguous()` that was a no-op when traced)
        node.target = "reshape"
    if len(node.args) == 1:  # given by keyword
        key = "shape" if "shape" in node.kwargs else "size"
        node.kwargs = {**node.kwargs, key: tuple(sizes)}
    elif len(node.args) == 2 and (edit.spread or isinstance(node.args[1], (list, tuple))):
        node.args = (node.args[0], tuple(sizes))
    else:  # one argument per dim, as written
        node.args = (node.args[0], *sizes)


def _edit_split(gm, node: Node, edit, count, kept) -> None:
    """split / chunk: explicit piece sizes (a chunk becomes a split, its pieces may now differ)."""
    sizes = [count(p) for p in edit.pieces]
    if node.op == "call_method":
        node.target = "split"
    else:
        node.target = torch.split
    node.args, node.kwargs = (node.args[0], sizes), {"dim": edit.dim}


def _edit_slice(gm, node: Node, edit, count, kept) -> None:
    container, index = node.args
    items = list(index) if isinstance(index, tuple) else [index]
    for position, ids in edit.ids.items():
        start, stop, _ = edit.fixed[position].indices(len(ids))  # computed bounds resolved by the analysis
        survivors = kept(ids)
        items[position] = slice(int(np.searchsorted(survivors, start)), int(np.searchsorted(survivors, stop)))
    node.args = (container, tuple(items) if isinstance(index, tuple) else items[0])


def _edit_narrow(gm, node: Node, edit, count, kept) -> None:
    """narrow along a channel dim: start and length over the kept channels (as a slice's bounds)."""
    survivors, bounds = kept(edit.ids[edit.dim]), edit.fixed[edit.dim]
    start, stop = (int(np.searchsorted(survivors, b)) for b in (bounds.start, bounds.stop))
    _set_arg(node, 2, "start", start)
    _set_arg(node, 3, "length", stop - start)


def _edit_unflatten(gm, node: Node, edit, count, kept) -> None:
    """unflatten: the sizes that split a channel dim; a -1 stays, the other dims of a head split get
    their constant size."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    sizes = list(module.unflattened_size if module is not None
                 else node.args[2] if len(node.args) > 2 else node.kwargs["sizes"])
    sizes_before = list(sizes)
    for k, size in edit.fixed.items():
        sizes[k] = size
    for k, ids in edit.ids.items():
        if sizes_before[k] != -1:
            sizes[k] = count(ids)
    if module is not None:
        module.unflattened_size = tuple(sizes)
    else:
        _set_arg(node, 2, "sizes", tuple(sizes))


def _edit_groups(gm, node: Node, edit, count, kept) -> None:
    if node.op != "call_function":
        return  # a module's groups are fixed from its weights
    groups = count(edit.ids[0]) // edit.per_group
    _set_arg(node, 6, "groups", groups)


def _edit_num_groups(gm, node: Node, edit, count, kept) -> None:
    groups = count(edit.ids[1]) // edit.per_group
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        module.num_groups, module.num_channels = groups, groups * edit.per_group
    else:
        _set_arg(node, 1, "num_groups", groups)


def _edit_sdpa_scale(gm, node: Node, edit, count, kept) -> None:
    node.kwargs = {**node.kwargs, "scale": edit.value}


def _edit_normalized_shape(gm, node: Node, edit, count, kept) -> None:
    """layer_norm: the normalized sizes that carried removed channels shrink."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        module.normalized_shape = _shrunk(module.normalized_shape, edit, count)
    else:
        _set_arg(node, 1, "normalized_shape", _shrunk(node.args[1] if len(node.args) > 1
                                                      else node.kwargs["normalized_shape"], edit, count))


def _shrunk(shape, edit, count) -> tuple:
    return tuple(count(edit.ids[i]) if i in edit.ids else size for i, size in enumerate(shape))


def _set_arg(node: Node, index: int, name: str, value) -> None:
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


_EDITORS: dict[str, Callable] = {
    "sizes": _edit_sizes, "split": _edit_split, "slice": _edit_slice, "groups": _edit_groups,
    "num_groups": _edit_num_groups, "sdpa_scale": _edit_sdpa_scale, "normalized_shape": _edit_normalized_shape,
    "narrow": _edit_narrow, "unflatten": _edit_unflatten,
}
