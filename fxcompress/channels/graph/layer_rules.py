"""Op rules of layers and normalizations (`ops` maps each op to its rule): their parameters are
slots whose elements are coupled to the channels of the tensors they read and write. Module and
functional forms share one rule."""
from __future__ import annotations

import numpy as np
from torch.fx import Node

from .walk import NOT_CHANNEL, Edit, Walk, _arg


def _weight(w: Walk, node: Node, attr: str, index: int, name: str, dims=(0, 1)) -> dict | None:
    """A parameter's track, from the module (call_module) or from the functional call's argument."""
    if node.op == "call_module":
        return w.module_param(node, attr, dims)
    value = _arg(node, index, name)
    if value is None:
        return None
    track = dict(w.tensor_track(value))
    extra = {d: ids for d, ids in track.items() if d not in dims}
    w.freeze(extra, NOT_CHANNEL)
    return {d: ids for d, ids in track.items() if d in dims}


def _size(w: Walk, node: Node, attr: str, index: int, name: str, dim: int) -> int:
    if node.op == "call_module":
        return getattr(w.gm.get_submodule(node.target), attr).shape[dim]
    return w.shape(_arg(node, index, name))[dim]


def _present(track: dict, size: int) -> list:
    """The couple() entry of an optional parameter: none when it is absent or of size 1."""
    return [(track[0], size)] if 0 in track else []


def linear(w: Walk, node: Node) -> dict:
    x = node.args[0]
    sx = w.shape(x)
    weight = _weight(w, node, "weight", 1, "weight")
    bias = _weight(w, node, "bias", 2, "bias", dims=(0,)) or {}
    out_features = _size(w, node, "weight", 1, "weight", 0)
    reason = f"{node.name} reads channels that cannot be sliced"
    in_ids = w.couple([(w.tensor_track(x).get(len(sx) - 1), sx[-1]), (weight.get(1), sx[-1])], reason)
    out_ids = w.couple([(weight.get(0), out_features), *_present(bias, out_features)], reason)
    track = {d: ids for d, ids in w.tensor_track(x).items() if d != len(sx) - 1}
    if out_ids is not None:
        track[len(sx) - 1] = out_ids
    w.add_layer(node, "linear", out_ids, in_ids)
    return track


def addmm(w: Walk, node: Node) -> dict:
    """Hugging Face's Conv1D: addmm(bias, x [N, in], weight [in, out]), a linear layer whose weight
    holds the output channels in dim 1."""
    x, bias_node = _arg(node, 1, "mat1"), _arg(node, 0, "input")
    if len(w.shape(x)) != 2 or not isinstance(bias_node, Node) or len(w.shape(bias_node)) != 1:
        return w.unknown(node, f"{node.name} is an addmm without a 1-D bias: not a linear layer")
    in_features, out_features = w.shape(x)[1], w.shape(node)[1]
    weight = _weight(w, node, "weight", 2, "mat2")
    bias = _weight(w, node, "bias", 0, "input", dims=(0,)) or {}
    reason = f"{node.name} reads channels that cannot be sliced"
    in_ids = w.couple([(w.tensor_track(x).get(1), in_features), (weight.get(0), in_features)], reason)
    out_ids = w.couple([(weight.get(1), out_features), *_present(bias, out_features)], reason)
    track = {0: w.tensor_track(x)[0]} if 0 in w.tensor_track(x) else {}
    if out_ids is not None:
        track[1] = out_ids
    w.add_layer(node, "linear", out_ids, in_ids, out_dim=1)
    return track


def _conv(w: Walk, node: Node, transposed: bool) -> dict:
    x = node.args[0]
    sx = w.shape(x)
    weight = _weight(w, node, "weight", 1, "weight")
    bias = _weight(w, node, "bias", 2, "bias", dims=(0,)) or {}
    spatial = len(_weight_shape(w, node)) - 2
    cdim = len(sx) - spatial - 1
    track = dict(w.tensor_track(x))
    for d in [d for d in track if d > cdim]:
        w.freeze(track.pop(d), f"{node.name} convolves over a channel dimension")
    groups = w.gm.get_submodule(node.target).groups if node.op == "call_module" else _arg(node, 6, "groups", 1)
    in_ids, out_ids = _conv_groups(w, node, track.get(cdim), weight, groups, transposed)
    out_channels = w.shape(node)[cdim]
    if out_ids is not None:
        w.couple([(out_ids, out_channels), *_present(bias, out_channels)], f"{node.name} bias")
        track[cdim] = out_ids
    else:
        track.pop(cdim, None)
        w.freeze(bias, f"{node.name} output channels cannot be sliced")
    if transposed:
        w.add_layer(node, "conv_transpose", weight.get(1), in_ids, groups, out_dim=1)
    else:
        w.add_layer(node, "conv", out_ids, in_ids, groups)
    return track


def _weight_shape(w: Walk, node: Node) -> tuple:
    if node.op == "call_module":
        return tuple(w.gm.get_submodule(node.target).weight.shape)
    return w.shape(_arg(node, 1, "weight"))


def _conv_groups(w: Walk, node: Node, x_ids, weight: dict, groups: int, transposed: bool):
    """(input ids, output ids) of a conv. Depthwise-like convs (one input channel per group) prune
    whole groups; other grouped convs prune the same positions in every group."""
    shape = _weight_shape(w, node)
    reason = f"{node.name} reads channels that cannot be sliced"
    w_in, w_out = (weight.get(0), weight.get(1)) if transposed else (weight.get(1), weight.get(0))
    c_in = shape[0] if transposed else shape[1] * groups
    c_out = shape[1] * groups if transposed else shape[0]
    if groups == 1:
        return w.couple([(x_ids, c_in), (w_in, c_in)], reason), w_out
    per_in, per_out = c_in // groups, c_out // groups
    if per_in == 1:  # depthwise-like: output channels of group g follow input channel g
        if x_ids is None:
            w.freeze(weight, f"{node.name} is a depthwise conv over channels that cannot be sliced")
            return None, None
        if w_out is None:  # its weight's output channels are kept (a per-tensor grid on them): so are its groups
            w.freeze(x_ids, f"{node.name} is a depthwise conv whose weight's output channels cannot be sliced")
            w.freeze(weight, f"{node.name} is a depthwise conv whose weight's output channels cannot be sliced")
            return None, None
        if transposed:
            w.couple([(x_ids, c_in), (w_in, c_in)], reason)
            w.freeze(w_out, f"{node.name}: outputs within a depthwise group")
            return x_ids, np.repeat(x_ids, per_out)
        w.union(w_out.reshape(groups, per_out), np.repeat(x_ids, per_out).reshape(groups, per_out))
        w.edits.setdefault(node.name, Edit("groups", {0: x_ids}, per_group=1))
        return x_ids, w_out
    if x_ids is not None:
        rows = x_ids.reshape(groups, per_in)
        w.union(rows, np.broadcast_to(rows[0], rows.shape))
    in_ids = x_ids if x_ids is not None else None
    if transposed:
        w.couple([(x_ids, c_in), (w_in, c_in)], reason)
        if w_out is None:
            return in_ids, None
        return in_ids, np.tile(w_out, groups)
    if x_ids is not None and w_in is not None:
        w.union(w_in, x_ids[:per_in])
    elif w_in is not None:
        w.freeze(w_in, reason)
    if w_out is not None:
        cols = w_out.reshape(groups, per_out)
        w.union(cols, np.broadcast_to(cols[0], cols.shape))
    return in_ids, w_out


def conv(w: Walk, node: Node) -> dict:
    return _conv(w, node, transposed=False)


def conv_transpose(w: Walk, node: Node) -> dict:
    return _conv(w, node, transposed=True)


def embedding(w: Walk, node: Node) -> dict:
    """The rows are looked up by token index: never channels, and held whole in both front ends'
    spellings, so a linear head tied to the table (`lm_head.weight = wte.weight`) keeps its outputs."""
    weight = _weight(w, node, "weight", 1, "weight", dims=(0, 1))
    nd = len(w.shape(node))
    w.add_layer(node, "embedding", weight.get(1), None, out_dim=1)
    w.freeze(weight.get(0), f"{w.layers[-1].name} looks its rows up by index")
    return {nd - 1: weight[1]} if 1 in weight else {}


def _per_channel(w: Walk, node: Node, params: list[tuple[str, int, str]]) -> dict:
    """Normalizations with one statistic / affine value per channel (dim 1): parameters follow it."""
    x = node.args[0]
    sx, track = w.shape(x), dict(w.tensor_track(x))
    cdim = 1 if len(sx) > 1 else 0
    entries = [(track.get(cdim), sx[cdim])]
    for attr, index, name in params:
        p = _weight(w, node, attr, index, name, dims=(0,))
        if p is not None:
            entries.append((p.get(0), sx[cdim]))
    w.couple(entries, f"{node.name} normalizes channels that cannot be sliced")
    return track


def batch_norm(w: Walk, node: Node) -> dict:
    return _per_channel(w, node, [("weight", 3, "weight"), ("bias", 4, "bias"),
                                  ("running_mean", 1, "running_mean"), ("running_var", 2, "running_var")])


instance_norm = batch_norm


def prelu(w: Walk, node: Node) -> dict:
    return _per_channel(w, node, [("weight", 1, "weight")])


def group_norm(w: Walk, node: Node) -> dict:
    x = node.args[0]
    sx, track = w.shape(x), w.tensor_track(x)
    groups = w.gm.get_submodule(node.target).num_groups if node.op == "call_module" else _arg(node, 1, "num_groups")
    per_group = sx[1] // groups
    if groups == 1:
        w.freeze(track.get(1), f"{node.name} normalizes over every channel (one group)")
    elif 1 in track:  # whole groups go, so the statistics of the others stay exact
        w.union(track[1], np.repeat(track[1][::per_group], per_group))
        # recorded with one channel per group too: F.group_norm(x, C) spells the count in the graph
        w.edits[node.name] = Edit("num_groups", {1: track[1]}, per_group=per_group)
    return _per_channel(w, node, [("weight", 2, "weight"), ("bias", 3, "bias")])


def layer_norm(w: Walk, node: Node) -> dict:
    """Layer norm (and F.rms_norm / nn.RMSNorm, whose third argument is eps, not a bias): its affine
    parameters follow the normalized channels. Removing any of them changes
    the statistics, so they are frozen as inexact only (PruneChannels(prune_normalized=True))."""
    x = node.args[0]
    sx, track = w.shape(x), w.tensor_track(x)
    if node.op == "call_module":
        count = len(w.gm.get_submodule(node.target).normalized_shape)
    else:
        count = len(_arg(node, 1, "normalized_shape"))
    reason = f"{node.name} normalizes over these channels (layer norm statistics would change)"
    first = len(sx) - count
    for attr, index in (("weight", 2), ("bias", 3)):
        param = _weight(w, node, attr, index, attr, dims=tuple(range(count))) or {}
        for d, ids in param.items():
            w.couple([(track.get(first + d), sx[first + d]), (ids, sx[first + d])], reason)
    normalized = {d - first: track[d] for d in range(first, len(sx)) if d in track}
    w.freeze(normalized, reason, inexact_only=True)
    if normalized:
        w.edits[node.name] = Edit("normalized_shape", normalized)
    return dict(track)


def channel_shuffle(w: Walk, node: Node) -> dict:
    x = node.args[0]
    track = dict(w.tensor_track(x))
    groups = w.gm.get_submodule(node.target).groups if node.op == "call_module" else _arg(node, 1, "groups")
    if 1 in track:
        rows = track[1].reshape(groups, -1)
        w.union(rows, np.broadcast_to(rows[0], rows.shape))  # same positions in every group
        track[1] = rows.T.reshape(-1)
    return track


def mha(w: Walk, node: Node) -> tuple:
    """nn.MultiheadAttention: whole heads are pruned (exact: the other heads' scale is unchanged)."""
    m = w.gm.get_submodule(node.target)
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    inputs = [w.tensor_track(t).get(len(w.shape(t)) - 1) for t in (q, k, v)]
    e, heads = m.embed_dim, m.num_heads
    if not m._qkv_same_embed_dim or m.bias_k is not None or any(ids is None for ids in inputs):
        w.freeze([*inputs, *_mha_params(w, node, m)], f"{node.name}: attention over channels that cannot be sliced")
        return ({}, {})
    head = w.fresh(heads)  # one element per head
    per_embed = np.repeat(head, e // heads)
    for ids in inputs:
        w.union(ids, per_embed)
    for ids, size in _mha_params(w, node, m, with_size=True):
        w.union(ids, np.tile(per_embed, size // e))
    out = inputs[0]
    nd = len(w.shape(q))
    w.add_layer(node, "mha", w.slots.get((f"{node.target}.in_proj_weight", 0)), inputs[0])
    return ({nd - 1: out}, {})


def _mha_params(w: Walk, node: Node, m, with_size: bool = False) -> list:
    found = []
    for attr, dims in (("in_proj_weight", (0, 1)), ("in_proj_bias", (0,)), ("out_proj.weight", (0, 1)),
                       ("out_proj.bias", (0,))):
        tensor = w.gm.get_submodule(node.target).get_parameter(attr) if _has(m, attr) else None
        if tensor is None:
            continue
        track = w.param_track(f"{node.target}.{attr}", dims)
        for d, ids in track.items():
            found.append((ids, tensor.shape[d]) if with_size else ids)
    return found


def _has(m, attr: str) -> bool:
    try:
        return m.get_parameter(attr) is not None
    except AttributeError:
        return False
