"""The op tables of the channel dependency analysis: each op the analysis understands, mapped to
the rule function that handles it (`tensor_rules`, `layer_rules`).

Dispatch is on the actual object: the function, the module type, or the tensor method name — never
on substrings of names. An op missing from these tables freezes the channels it touches, with the
reason recorded. Linear and conv layers are the kinds of `fxcompress.layers.KINDS`, in module and
functional form; their rule follows from the kind. A rule with an option is a `functools.partial`
of it (`spatial` with the count of trailing spatial dims).

To add an op: map it here to an existing rule; if none fits, write `rule(walk, node) -> track` in
`tensor_rules` (tensor operations) or `layer_rules` (layers with parameters) and map it here.

Rules:
  same       output carries the input's channels unchanged (element-wise unary, activation, dropout, cast)
  spatial    acts on trailing spatial dims only (pooling, interpolation); `count` of them (None: ndim - 2)
  pad        F.pad: freezes a channel dimension only if it is really padded
  binary     element-wise with broadcasting: channels of aligned dimensions are coupled
  reshape    view / reshape / flatten: channels fold into blocks of features or split into heads
  unflatten  splits one dim as a view does (a head split included); the sizes written are rewritten
  expand     broadcast to a larger shape (size arguments rewritten when they name a channel dim)
  reshape_as / expand_as   view_as / reshape_as / expand_as: the sizes are the other tensor's, read at
             run time, so each output dim's channels couple with that tensor's channels of the dim
  repeat     repeat / tile: a channel dim tiled holds its channels over and over (the factors stay)
  repeat_interleave   each channel repeated in place (an int count); counts from a tensor freeze
  permute / transpose / movedim   dimensions move, channels follow them
  squeeze / unsqueeze   a dimension of size 1 appears or goes
  reduce     mean / sum / amax / logsumexp / norm (`at`: where the dims are) ... over dims (reducing a
             channel dim freezes it); variance: var / std, whose dims may be an `unbiased` flag
  softmax    normalizes along one dim (freezes it if it carries channels)
  normalize / cumulative / roll / sort / topk   act along one dim (or some): channels of the others are
             untouched, a channel dim there freezes (its positions mix, or hold ranks)
  flip       reverses dims: a channel dim's ids reversed
  cat / stack / split / chunk / unbind / getitem / narrow    index maps of concatenation and slicing
             (tensor_split is a split: its pieces are rewritten as split sizes)
  pixel_shuffle / pixel_unshuffle   channels fold into space in blocks of r²: a block goes with its
             output channel (shuffle), a channel's id repeats r² times in place (unshuffle)
  matmul, sdpa, linear, addmm, conv, conv_transpose, embedding, batch_norm, instance_norm, group_norm,
  layer_norm, prelu, mha, channel_shuffle     layers and normalizations (parameters are sliced)
  shape      reads a size (x.size(1), x.shape, x.dim()): no channels flow through it
  attribute  getattr: x.shape (shape), topk's / sort's .values / .indices, x.T / x.mT / x.data; any
             other tensor attribute freezes
"""
from __future__ import annotations

import operator
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from ...frontends.guards import check_input_shape
from ...layers import KINDS, LayerKind
from .layer_rules import (addmm, batch_norm, channel_shuffle, conv, conv_transpose, embedding, group_norm, instance_norm,
                          layer_norm, linear, mha, prelu)
from .tensor_rules import (attribute, binary, cat, chunk, cumulative, expand, expand_as, flip, getitem, matmul,
                           movedim, narrow, normalize, pad, permute, pixel_shuffle, pixel_unshuffle, reduce, repeat,
                           repeat_interleave, reshape, reshape_as, roll, same, sdpa, shape, softmax, sort, spatial,
                           split, squeeze, stack, topk, transpose, unbind, unflatten, unsqueeze, variance)
from .walk import Rule


# the rule of each layer kind that is not a conv (convs follow from the kind's channel dims)
_KIND_RULES: dict[str, Rule] = {"linear": linear, "embedding": embedding, "addmm": addmm}


def _layer_rule(kind: LayerKind) -> Rule:
    if kind.name in _KIND_RULES:
        return _KIND_RULES[kind.name]
    return conv_transpose if kind.is_transposed else conv


# weight-bearing layers, module and functional forms, come from the one vocabulary of layer kinds
_LAYER_FUNCTIONS = {kind.function: _layer_rule(kind) for kind in KINDS.values()}
_LAYER_MODULES = {kind.module: _layer_rule(kind) for kind in KINDS.values() if kind.module is not None}

# pooling, interpolation and padding modules act on this many trailing dims (None: all but batch and channel)
_SPATIAL = {count: partial(spatial, count=count) for count in (1, 2, 3, None)}

# torch.norm(x, p, dim, keepdim) / x.norm(p, dim, keepdim) / torch.linalg.vector_norm(x, ord, dim,
# keepdim): a reduction whose dims follow the order of the norm
_NORM = partial(reduce, at=2)

_UNARY_FUNCTIONS = (
    F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.mish, F.softplus, F.softsign, F.tanh, F.sigmoid, F.logsigmoid, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,  # the feature ones drop whole channels,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.abs,  # each on its own: pruning one changes no other
    torch.neg, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.square, torch.erf, torch.log,
    F.relu_, torch.sin, torch.cos,
    operator.neg, operator.pos, torch.clone, torch.detach,
)

FUNCTION_RULES: dict[object, Rule] = {fn: same for fn in _UNARY_FUNCTIONS} | _LAYER_FUNCTIONS
FUNCTION_RULES.update({
    operator.add: binary, operator.sub: binary, operator.mul: binary, operator.truediv: binary,
    operator.iadd: binary, operator.isub: binary, operator.imul: binary, operator.itruediv: binary,
    operator.floordiv: binary, operator.pow: binary,
    torch.add: binary, torch.sub: binary, torch.mul: binary, torch.div: binary,
    torch.maximum: binary, torch.minimum: binary, torch.where: binary, torch.pow: binary,
    F.max_pool1d: _SPATIAL[1], F.max_pool2d: _SPATIAL[2], F.max_pool3d: _SPATIAL[3],
    F.avg_pool1d: _SPATIAL[1], F.avg_pool2d: _SPATIAL[2], F.avg_pool3d: _SPATIAL[3],
    F.adaptive_avg_pool1d: _SPATIAL[1], F.adaptive_avg_pool2d: _SPATIAL[2],
    F.adaptive_avg_pool3d: _SPATIAL[3], F.adaptive_max_pool1d: _SPATIAL[1],
    F.adaptive_max_pool2d: _SPATIAL[2], F.adaptive_max_pool3d: _SPATIAL[3],
    F.interpolate: _SPATIAL[None], F.upsample: _SPATIAL[None], F.pad: pad,
    torch.flatten: reshape, torch.reshape: reshape,
    torch.permute: permute, torch.transpose: transpose, torch.swapaxes: transpose,
    torch.squeeze: squeeze, torch.unsqueeze: unsqueeze,
    torch.mean: reduce, torch.sum: reduce, torch.amax: reduce, torch.amin: reduce,
    torch.softmax: softmax, F.softmax: softmax, F.log_softmax: softmax, torch.log_softmax: softmax,
    torch.cat: cat, torch.concat: cat, torch.concatenate: cat, torch.stack: stack,
    torch.split: split, torch.chunk: chunk, torch.unbind: unbind, operator.getitem: getitem,
    torch.movedim: movedim, torch.moveaxis: movedim, torch.unflatten: unflatten,
    torch.narrow: narrow,  # a slice of one dim: along channels its bounds are rewritten
    torch.tensor_split: split,  # its pieces are split's: the pass writes them as split sizes
    torch.tile: repeat, torch.repeat_interleave: repeat_interleave,
    torch.flip: flip, torch.roll: roll, torch.cumsum: cumulative, torch.cumprod: cumulative,
    torch.sort: sort, torch.topk: topk, F.normalize: normalize,
    torch.logsumexp: reduce, torch.norm: _NORM, torch.linalg.vector_norm: _NORM, torch.var: variance, torch.std: variance,
    F.pixel_shuffle: pixel_shuffle, F.pixel_unshuffle: pixel_unshuffle,  # torch.pixel_shuffle is the same function
    torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul,
    F.scaled_dot_product_attention: sdpa, F.batch_norm: batch_norm,
    F.instance_norm: instance_norm, F.group_norm: group_norm, F.layer_norm: layer_norm, F.rms_norm: layer_norm,
    F.prelu: prelu, torch.channel_shuffle: channel_shuffle, F.channel_shuffle: channel_shuffle,
    getattr: attribute,
    check_input_shape: shape,   # the export front end's check of an input's sizes: reads them, no width changes
})

METHOD_RULES: dict[str, Rule] = {name: same for name in (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "neg", "sqrt", "rsqrt", "clamp", "clamp_",
    "clamp_min", "clamp_max", "square", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16",
    "to", "type", "type_as", "cpu", "cuda", "requires_grad_", "softmax_", "gelu", "silu", "erf",
    "cos", "sin",  # rotary embeddings' tables: cos / sin of the frequencies, one per head-dim position
)}
METHOD_RULES.update({
    "add": binary, "sub": binary, "mul": binary, "div": binary, "add_": binary, "sub_": binary,
    "mul_": binary, "div_": binary, "pow": binary, "maximum": binary, "minimum": binary,
    "view": reshape, "reshape": reshape, "flatten": reshape, "view_as": reshape_as,
    "reshape_as": reshape_as, "expand": expand, "expand_as": expand_as,
    "permute": permute, "transpose": transpose, "swapaxes": transpose,
    "squeeze": squeeze, "unsqueeze": unsqueeze,
    "mean": reduce, "sum": reduce, "amax": reduce, "amin": reduce,
    "softmax": softmax, "log_softmax": softmax,
    "split": split, "chunk": chunk, "unbind": unbind,
    "movedim": movedim, "moveaxis": movedim, "unflatten": unflatten, "narrow": narrow, "tensor_split": split,
    "repeat": repeat, "tile": repeat, "repeat_interleave": repeat_interleave,
    "flip": flip, "roll": roll, "cumsum": cumulative, "cumprod": cumulative, "sort": sort, "topk": topk,
    "logsumexp": reduce, "norm": _NORM, "var": variance, "std": variance,
    "matmul": matmul, "bmm": matmul,
    "size": shape, "dim": shape, "numel": shape,
})

_SAME_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)

MODULE_RULES: dict[type, Rule] = {cls: same for cls in _SAME_MODULES} | _LAYER_MODULES
MODULE_RULES.update({
    nn.MaxPool1d: _SPATIAL[1], nn.MaxPool2d: _SPATIAL[2], nn.MaxPool3d: _SPATIAL[3],
    nn.AvgPool1d: _SPATIAL[1], nn.AvgPool2d: _SPATIAL[2], nn.AvgPool3d: _SPATIAL[3],
    nn.AdaptiveAvgPool1d: _SPATIAL[1], nn.AdaptiveAvgPool2d: _SPATIAL[2],
    nn.AdaptiveAvgPool3d: _SPATIAL[3], nn.AdaptiveMaxPool1d: _SPATIAL[1],
    nn.AdaptiveMaxPool2d: _SPATIAL[2], nn.AdaptiveMaxPool3d: _SPATIAL[3],
    nn.Upsample: _SPATIAL[None], nn.UpsamplingNearest2d: _SPATIAL[2],
    nn.UpsamplingBilinear2d: _SPATIAL[2], nn.ZeroPad2d: _SPATIAL[2], nn.ReflectionPad2d: _SPATIAL[2],
    nn.ReplicationPad2d: _SPATIAL[2], nn.ConstantPad2d: _SPATIAL[2],
    nn.Flatten: reshape, nn.Softmax: softmax, nn.LogSoftmax: softmax,
    nn.BatchNorm1d: batch_norm, nn.BatchNorm2d: batch_norm, nn.BatchNorm3d: batch_norm,
    nn.SyncBatchNorm: batch_norm,
    nn.InstanceNorm1d: instance_norm, nn.InstanceNorm2d: instance_norm, nn.InstanceNorm3d: instance_norm,
    nn.GroupNorm: group_norm, nn.LayerNorm: layer_norm, nn.RMSNorm: layer_norm, nn.PReLU: prelu,
    nn.MultiheadAttention: mha, nn.ChannelShuffle: channel_shuffle,
    nn.Unflatten: unflatten, nn.PixelShuffle: pixel_shuffle, nn.PixelUnshuffle: pixel_unshuffle,
})


# Functions of optional libraries, looked up by identity once their module is loaded (never imported here).
OPTIONAL_FUNCTION_RULES: dict[tuple[str, str], Rule] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): same,  # per-sample scaling, channels unchanged
}


def function_rule(target: object) -> Rule | None:
    """The rule of a called function: the table entry for that very object, if any."""
    try:
        rule = FUNCTION_RULES.get(target)
    except TypeError:  # an unhashable callable
        return None
    if rule is None:
        for (module_name, attr), candidate in OPTIONAL_FUNCTION_RULES.items():
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, attr, None) is target:
                return candidate
    return rule


def module_rule(module: nn.Module) -> Rule | None:
    """The rule of a module: its class or a base class whose forward it does not override."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls] if type(module).forward is cls.forward else None
    return None


def rule_of(gm: GraphModule, node: Node) -> tuple[Rule | None, str]:
    """The rule of a call node (None: an op these tables do not know), and the op in words for a reason."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module_rule(module), f"module {type(module).__name__} '{node.target}'"
    if node.op == "call_function":
        return function_rule(node.target), f"function {getattr(node.target, '__name__', node.target)}"
    return METHOD_RULES.get(node.target), f"method .{node.target}()"
