"""FoldBatchNorm: fold each inference-mode BatchNorm into the conv / linear layer that feeds it.

`bn(conv(x))` with running statistics is an affine map per output channel, so the conv's weight
rows and bias can absorb it (torch.nn.utils.fusion does the arithmetic) and the BatchNorm node
disappears. A deployed model then skips one memory-bound op per layer, and integer lowering sees
conv -> activation chains with no float BatchNorm in between.

A layer whose weight goes through masks (`mul(weight, weight_mask)`, after InsertMasks) folds too:
scaling a weight's output rows commutes with the element-wise mask, so the stored weight is scaled
and pruned weights stay exactly zero. A layer whose output is read by anything besides the
BatchNorm, whose weight or bias has any other reader (the module called twice, a weight tied under
two names, a masked weight read by two calls: folding would change what those compute), or whose
weight goes through fake-quant or an encoding (scaling would move it off its grid), keeps its
BatchNorm, and the reason is reported in the pass's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval, fuse_linear_bn_weights

from fxcompress.analyses.ownership import ParamOwnership
from fxcompress.analyses.shapes import ShapeInfo
from fxcompress.config import validate
from fxcompress.errors import PreconditionError
from fxcompress.layers import bias_arg, call_input, kind_of_node, weight_arg, weight_source
from fxcompress.pass_base import Pass, PassContext, PassResult, is_unspelled_aten
from fxcompress.pruning.masks import masks_only

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True, kw_only=True)
class FoldBatchNorm(Pass):
    """Fold BatchNorm{1,2,3}d into the Conv / ConvTranspose / Linear module that feeds it, or into
    the stored weight and bias of a masked functional conv / linear.

    The model must be in eval mode (the running statistics are what gets folded, as torch.ao's
    fusion requires); a BatchNorm still in training mode is refused by name.
    """

    constraints: ClassVar[dict] = {}  # no options: every foldable BatchNorm is folded

    def __post_init__(self) -> None:
        validate(self)

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        for node in _norm_nodes(gm):
            producer = call_input(node)
            module_form = isinstance(producer, Node) and producer.op == "call_module"
            for path in [node.target] + ([producer.target] if module_form else []):
                if gm.get_submodule(path).training:
                    raise PreconditionError(f"FoldBatchNorm folds running statistics, but {path} is in training "
                                            "mode: call model.eval() before compiling")

    def unknown_ops(self, gm: GraphModule) -> list[Node]:
        """Only aten ops left unspelled could hide a BatchNorm from it; other layers it never reads."""
        return [n for n in gm.graph.nodes if is_unspelled_aten(n)]

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        shapes = ctx.get(ShapeInfo)
        # every node reading each stored tensor under any of its names; folding adds no reader, and folds
        # nothing another node reads
        ownership, nodes = ctx.get(ParamOwnership), {n.name: n for n in gm.graph.nodes}
        readers = {name: [nodes[r] for r in read] for name, read in ownership.readers.items()}
        folded, skipped, touched = {}, {}, []
        for node in list(_norm_nodes(gm)):
            producer = call_input(node)
            reason = _why_not(gm, node, producer, shapes, readers)
            if reason:
                skipped[node.target] = reason
                continue
            norm = gm.get_submodule(node.target)
            if producer.op == "call_module":
                layer, kind = gm.get_submodule(producer.target), kind_of_node(gm, producer)
                fused = (fuse_conv_bn_eval(layer, norm, transpose=kind.is_transposed) if kind.is_conv
                         else fuse_linear_bn_eval(layer, norm))
                gm.set_submodule(producer.target, fused)  # same path, so names in reports stay stable
                params = (f"{producer.target}.weight", f"{producer.target}.bias")
            else:
                params = _fold_into_stored(gm, producer, norm)
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            folded[params[0].rpartition(".")[0] or params[0]] = node.target
            touched += params
        gm.delete_all_unused_submodules()
        return PassResult(changed=bool(folded), params_touched=tuple(touched),
                          stats={"folded": folded, "skipped": skipped})


def _norm_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) in _NORMS]


def _why_not(gm: GraphModule, norm: Node, producer, shapes: ShapeInfo, readers: dict[str, list[Node]]) -> str | None:
    """Why this BatchNorm cannot be folded into what feeds it (None: it can)."""
    bn = gm.get_submodule(norm.target)
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics to fold (track_running_stats=False)"
    if not isinstance(producer, Node):
        return "not fed by a layer"
    kind = kind_of_node(gm, producer)
    if kind is None and producer.op == "call_module":
        module = type(gm.get_submodule(producer.target)).__name__
        return f"fed by {module}, which cannot absorb a per-channel affine map"
    if kind is None:
        return f"fed by {producer.name}, which is not a conv / linear layer"
    if kind.family == "embedding":
        return f"fed by embedding {producer.name}, which has no bias to absorb the BatchNorm's shift"
    if producer.op == "call_function" and kind.is_transposed:  # stored rows are scaled: dim 0
        return (f"fed by {producer.name}, a transposed convolution called functionally (after masks), whose output "
                "channels are its weight's dim 1: folding scales dim 0")
    if producer.op == "call_module" and kind.is_transposed and gm.get_submodule(producer.target).groups > 1:
        # torch's fusion scales a transposed weight's dim 1 as if it held every output channel; grouped,
        # it holds out_channels / groups of them and the fused bias is sized wrong
        return f"fed by {producer.name}, a grouped ConvTranspose, whose output channels torch's fusion cannot scale"
    if producer.op == "call_function":
        reason = _functional_reason(gm, producer)
        if reason:
            return reason
    linear = not kind.is_conv
    if len(producer.users) > 1:
        return f"{producer.name}'s un-normalized output is also read by {_others(producer, norm)}"
    others = _other_readers(producer, readers)
    if others:
        return (f"{producer.name}'s weight or bias is shared with another call: also read by {', '.join(others)} "
                "(folding would change what those compute too)")
    if linear and len(shapes.shape(producer.name) or ()) != 2:
        return f"{producer.name} writes features on its last dim, the BatchNorm normalizes dim 1"
    return None



def _other_readers(producer: Node, readers: dict[str, list[Node]]) -> list[str]:
    """The nodes besides `producer` and its own weight chain that read the weight or bias folding rewrites:
    another call of its module, another name of a tied tensor, another call reading its masked weight."""
    own = {producer}
    if producer.op == "call_module":
        names = [f"{producer.target}.weight", f"{producer.target}.bias"]
    else:  # the chain from the stored weight through its masks, and the bias read
        current, source, bias = weight_arg(producer), weight_source(producer), bias_arg(producer)
        while current is not source:
            own.add(current)
            current = current.args[0]
        own |= {source} | ({bias} if bias is not None else set())
        names = [source.target] + ([bias.target] if bias is not None else [])
    others = {user for node in own - {producer} for user in node.users if user not in own}  # e.g. a 2nd call
    for name in names:
        others |= {node for node in readers.get(name, ()) if node not in own}
    # a weight read by get_attr is named by the calls that use it ("conv_3", not its bias read "conv_bias_1")
    return sorted({user.name for node in others for user in (node.users if node.op == "get_attr" and node.users
                                                               else [node])})


def _functional_reason(gm: GraphModule, producer: Node) -> str | None:
    """Why a functional layer cannot absorb a BatchNorm: its weight must be a stored tensor through
    mask multiplications only, its bias a stored tensor or absent."""
    if masks_only(gm, producer) is None:
        return (f"{producer.name}'s weight is not a stored tensor through masks only (fake-quant or an "
                "encoding): fold BatchNorm before quantizing")
    bias = bias_arg(producer)
    if bias is not None and bias.op != "get_attr":
        return f"{producer.name}'s bias is computed, not stored"
    return None


def _fold_into_stored(gm: GraphModule, layer: Node, bn: nn.Module) -> tuple[str, str]:
    """Scale a functional layer's stored weight rows and shift (or create) its stored bias; the
    masks on the weight chain multiply the scaled weight as they did the original."""
    weight_name = weight_source(layer).target
    weight = gm.get_parameter(weight_name)
    bias_node = bias_arg(layer)
    bias = gm.get_parameter(bias_node.target) if bias_node is not None else None
    fuse = fuse_conv_bn_weights if kind_of_node(gm, layer).is_conv else fuse_linear_bn_weights
    new_weight, new_bias = fuse(weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    with torch.no_grad():
        weight.copy_(new_weight)
        if bias is not None:
            bias.copy_(new_bias)
            return weight_name, bias_node.target
    owner, _, name = weight_name.rpartition(".")
    holder = gm.get_submodule(owner)
    # the layer had no bias: it gets one beside its weight (`conv.bias`, unless that name is taken)
    free = not hasattr(holder, "bias") or holder._parameters.get("bias", ...) is None  # an empty bias slot
    attr = "bias" if free else f"{name}_bias"
    holder.register_parameter(attr, nn.Parameter(new_bias.detach()))
    bias_name = f"{owner}.{attr}" if owner else attr
    with gm.graph.inserting_before(layer):
        fresh = gm.graph.get_attr(bias_name)
    if len(layer.args) > 2:
        layer.update_arg(2, fresh)
    else:
        layer.update_kwarg("bias", fresh)
    return weight_name, bias_name


def _others(producer: Node, norm: Node) -> str:
    return ", ".join(u.name for u in producer.users if u is not norm)
