"""FoldBatchNorm: fold each inference-mode BatchNorm into the conv / linear layer that feeds it.

`bn(conv(x))` with running statistics is an affine map per output channel, so the conv's weight
and bias can absorb it (torch.nn.utils.fusion's arithmetic, a transposed weight's output channels
taken per group, see `_fused`) and the BatchNorm node disappears. A deployed model then skips one
memory-bound op per layer, and integer lowering sees conv -> activation chains with no float
BatchNorm in between.

A layer whose weight goes through masks (`mul(weight, weight_mask)`, after InsertMasks) folds too:
scaling a weight's output rows commutes with the element-wise mask, so the stored weight is scaled
and pruned weights stay exactly zero. A layer whose output is read by anything besides the
BatchNorm, whose weight or bias has any other reader (the module called twice, a weight tied under
two names, a masked weight read by two calls: folding would change what those compute), whose
weight goes through fake-quant or an encoding (scaling would move it off its grid), whose output is
unbatched or holds its channels elsewhere than dim 1 (the BatchNorm normalizes dim 1, which is then
not the layer's channels), or whose BatchNorm has no running statistics (it normalizes with each
batch's own, which no fixed weight can absorb), keeps its BatchNorm, and the reason is reported in the
pass's statistics; so is every other BatchNorm left in the graph (a subclass, a functional call).
"""
from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.analyses.ownership import ParamOwnership
from fxcompress.analyses.shapes import ShapeInfo
from fxcompress.config import validate
from fxcompress.errors import PreconditionError
from fxcompress.layers import LayerKind, bias_arg, call_input, kind_of_node, weight_arg, weight_source
from fxcompress.pass_base import Pass, PassContext, PassResult, is_unspelled_aten
from fxcompress.pruning.masks import masks_only

# matched by exact type (a subclass may override forward); SyncBatchNorm computes in eval mode what
# BatchNorm does (F.batch_norm over its running statistics), so it folds the same way
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FUNCTIONAL_NORMS = (F.batch_norm, torch.batch_norm)


@dataclass(frozen=True, kw_only=True)
class FoldBatchNorm(Pass):
    """Fold BatchNorm{1,2,3}d into the Conv / ConvTranspose / Linear module that feeds it, or into
    the stored weight and bias of a masked functional conv / linear.

    The model's BatchNorms must be in eval mode (the running statistics are what gets folded; in
    training mode a BatchNorm normalizes with the batch's statistics and updates its running ones, which
    no fixed weight reproduces); a BatchNorm still in training mode is refused by name. The layer's own
    mode does not matter: a conv or linear computes the same in both.
    """

    constraints: ClassVar[dict] = {}  # no options: every foldable BatchNorm is folded

    def __post_init__(self) -> None:
        validate(self)

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        for node in _norm_nodes(gm):
            if gm.get_submodule(node.target).training:
                raise PreconditionError(f"FoldBatchNorm folds running statistics, but {node.target} is in training "
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

        def skip(name: str, reason: str) -> None:
            # one BatchNorm module called at several places can be kept at each for a different reason
            if reason not in skipped.get(name, "").split("; "):
                skipped[name] = f"{skipped[name]}; {reason}" if name in skipped else reason

        for node, reason in _other_norms(gm):
            skip(node.target if node.op == "call_module" else node.name, reason)
        for node in list(_norm_nodes(gm)):
            producer = call_input(node)
            reason = _why_not(gm, node, producer, shapes, readers)
            if reason:
                skip(node.target, reason)
                continue
            norm = gm.get_submodule(node.target)
            if producer.op == "call_module":
                layer = gm.get_submodule(producer.target)
                weight, bias = _fused(layer.weight, layer.bias, norm, kind_of_node(gm, producer), layer.groups
                                      if kind_of_node(gm, producer).is_conv else 1)
                # the module keeps its path (names in reports stay stable), hooks and mode; it gets fresh
                # Parameters, as torch's fusion gives, since a bias-less layer has no tensor to write into
                layer.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
                layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad if layer.bias is None
                                          else layer.bias.requires_grad)
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


def _other_norms(gm: GraphModule) -> list[tuple[Node, str]]:
    """The batch norms this pass leaves alone whatever feeds them, each with the reason, so that the
    statistics account for every batch norm still in the graph."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in _NORMS:
                found.append((node, f"a {type(module).__name__}, not exactly a BatchNorm1d / 2d / 3d: its forward may "
                                    "compute something else, so it is not folded"))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_NORMS:
            found.append((node, _functional_norm_reason(node)))
    return found


def _functional_norm_reason(node: Node) -> str:
    """F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) or
    torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn)."""
    names = (["input", "running_mean", "running_var", "weight", "bias", "training"] if node.target is F.batch_norm
             else ["input", "weight", "bias", "running_mean", "running_var", "training"])
    args = dict(zip(names, node.args)) | {k: v for k, v in node.kwargs.items() if k in names}
    if args.get("training", False) is not False or args.get("running_mean") is None:
        return (f"{node.name} normalizes with each batch's own statistics (training, or no running statistics), "
                "which no fixed weight can absorb")
    return f"{node.name} is a functional batch_norm call, not a BatchNorm module: only modules are folded"


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
    # the BatchNorm normalizes dim 1: the layer's channels only where its output is batched (N, C, ...); a
    # linear's features are its last dim, dim 1 only on 2-D output; an unbatched conv's (C, L) or (C, H, W)
    # output puts a spatial dim there
    rank = len(shapes.shape(producer.name) or ())
    if linear and rank != 2:
        return f"{producer.name} writes features on its last dim, the BatchNorm normalizes dim 1"
    if not linear and rank != kind.weight_ndim:
        return (f"{producer.name} writes its channels on dim 0 of an unbatched (or unknown-rank) output, the "
                "BatchNorm normalizes dim 1")
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
    source = weight_source(producer)
    if source is not None and source.op == "get_attr" and not isinstance(_stored(gm, source.target), nn.Parameter):
        # a buffer or a plain tensor attribute: masks_only reads the weight with gm.get_parameter, and a stored
        # tensor that is no parameter may be a constant the model shares or rebuilds
        return f"{producer.name}'s weight {source.target} is held as a buffer or plain tensor, not a parameter"
    if kind_of_node(gm, producer).is_transposed and not isinstance(_groups(producer), int):
        return f"{producer.name}'s groups is computed, not a number"
    if masks_only(gm, producer) is None:
        return (f"{producer.name}'s weight is not a stored tensor through masks only (fake-quant or an "
                "encoding): fold BatchNorm before quantizing")
    bias = bias_arg(producer)
    if bias is not None and (bias.op != "get_attr" or not isinstance(_stored(gm, bias.target), torch.Tensor)):
        return f"{producer.name}'s bias is computed, not stored"
    return None


def _stored(gm: GraphModule, target: str):
    """What a get_attr reads: a parameter, a buffer or a plain tensor attribute (gm.get_parameter raises
    on the last two, and masks_only reads the weight through it)."""
    try:
        return attrgetter(target)(gm)
    except AttributeError:
        return None


def _fused(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module, kind: LayerKind,
           groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias computing `bn(layer(x))` in eval mode: each output channel's weight scaled by
    gamma / sqrt(var + eps), its bias shifted to (b - mean) * scale + beta.

    Not torch's fuse_*_bn_weights: fuse_linear_bn_weights fails on an affine=False BatchNorm (weight
    None), fuse_conv_bn_weights takes a transposed weight's dim 1 for every output channel, which a
    grouped one holds out_channels / groups of (the fused bias came out the wrong size), and both compute
    in a half-precision model's dtype; here the arithmetic runs in at least float32 and is cast back."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    mean, var = bn.running_mean.to(compute), bn.running_var.to(compute)
    gamma = bn.weight.detach().to(compute) if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().to(compute) if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * torch.rsqrt(var + bn.eps)
    w = weight.detach().to(compute)
    if kind.out_dim == 0:
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    else:  # [in, out / groups, *kernel] (a transposed conv; addmm's [in, out] with one group): per group
        per_group = w.shape[1]
        spatial = [1] * (w.dim() - 2)
        w = (w.reshape(groups, -1, per_group, *w.shape[2:]) * scale.reshape(groups, 1, per_group, *spatial)
             ).reshape(weight.shape)
    b = bias.detach().to(compute) if bias is not None else torch.zeros_like(mean)
    return w.to(weight.dtype), ((b - mean) * scale + beta).to(bias.dtype if bias is not None else weight.dtype)


def _fold_into_stored(gm: GraphModule, layer: Node, bn: nn.Module) -> tuple[str, str]:
    """Scale a functional layer's stored weight rows and shift (or create) its stored bias; the
    masks on the weight chain multiply the scaled weight as they did the original."""
    weight_name = weight_source(layer).target
    weight = _stored(gm, weight_name)
    bias_node = bias_arg(layer)
    bias = _stored(gm, bias_node.target) if bias_node is not None else None
    kind = kind_of_node(gm, layer)
    new_weight, new_bias = _fused(weight, bias, bn, kind, _groups(layer) if kind.is_transposed else 1)
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
    holder.register_parameter(attr, nn.Parameter(new_bias, requires_grad=weight.requires_grad))
    bias_name = f"{owner}.{attr}" if owner else attr
    with gm.graph.inserting_before(layer):
        fresh = gm.graph.get_attr(bias_name)
    if len(layer.args) > 2:
        layer.update_arg(2, fresh)
    else:
        layer.update_kwarg("bias", fresh)
    return weight_name, bias_name


def _groups(node: Node):
    """The groups of a functional transposed conv call: conv_transposeNd(input, weight, bias, stride, padding,
    output_padding, groups, dilation)."""
    return node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)


def _others(producer: Node, norm: Node) -> str:
    return ", ".join(u.name for u in producer.users if u is not norm)
