"""FoldBatchNorm: fold each inference-mode BatchNorm into the conv / linear layer that feeds it.

`bn(conv(x))` with running statistics is an affine map per output channel, so the conv's weight
rows and bias can absorb it (torch.nn.utils.fusion does the arithmetic) and the BatchNorm node
disappears. A deployed model then skips one memory-bound op per layer, and integer lowering sees
conv -> activation chains with no float BatchNorm in between.

Only a module-form layer whose output feeds the BatchNorm alone can absorb it: if anything else
reads the un-normalized output, or the weight already flows through masks / fake-quant, the pair
is left as it is and the reason is reported in the pass's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from fxcompress.analyses.shapes import ShapeInfo
from fxcompress.errors import PreconditionError
from fxcompress.pass_base import Pass, PassContext, PassResult

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True, kw_only=True)
class FoldBatchNorm(Pass):
    """Fold BatchNorm{1,2,3}d into the preceding Conv / ConvTranspose / Linear module.

    The model must be in eval mode (the running statistics are what gets folded, as torch.ao's
    fusion requires); a BatchNorm still in training mode is refused by name.
    """

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        for node in _norm_nodes(gm):
            producer = node.args[0]
            paths = [node.target] + ([producer.target] if isinstance(producer, Node) and producer.op == "call_module" else [])
            for path in paths:
                if gm.get_submodule(path).training:
                    raise PreconditionError(f"FoldBatchNorm folds running statistics, but {path} is in training "
                                            "mode: call model.eval() before compiling")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        shapes = ctx.get(ShapeInfo)
        folded, skipped, touched = {}, {}, []
        for node in list(_norm_nodes(gm)):
            producer = node.args[0]
            reason = _why_not(gm, node, producer, shapes)
            if reason:
                skipped[node.target] = reason
                continue
            layer, norm = gm.get_submodule(producer.target), gm.get_submodule(node.target)
            fused = (fuse_linear_bn_eval(layer, norm) if isinstance(layer, nn.Linear)
                     else fuse_conv_bn_eval(layer, norm, transpose=isinstance(layer, _TRANSPOSED)))
            _set_submodule(gm, producer.target, fused)  # same path, so names in reports stay stable
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            folded[producer.target] = node.target
            touched += [f"{producer.target}.weight", f"{producer.target}.bias"]
        gm.delete_all_unused_submodules()
        return PassResult(changed=bool(folded), params_touched=tuple(touched),
                          stats={"folded": folded, "skipped": skipped})


def _norm_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) in _NORMS]


def _why_not(gm: GraphModule, norm: Node, producer, shapes: ShapeInfo) -> str | None:
    """Why this BatchNorm cannot be folded into what feeds it (None: it can)."""
    bn = gm.get_submodule(norm.target)
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics to fold (track_running_stats=False)"
    if not isinstance(producer, Node) or producer.op != "call_module":
        return "not fed by a conv / linear module (functional layers keep their BatchNorm)"
    layer = gm.get_submodule(producer.target)
    if type(layer) not in (*_CONVS, *_TRANSPOSED, nn.Linear):
        return f"fed by {type(layer).__name__}, which cannot absorb a per-channel affine map"
    if len(producer.users) > 1:
        return f"{producer.target}'s un-normalized output is also read by {_others(producer, norm)}"
    if isinstance(layer, nn.Linear) and len(shapes.shape(producer.name) or ()) != 2:
        return f"{producer.target} writes features on its last dim, the BatchNorm normalizes dim 1"
    return None


def _others(producer: Node, norm: Node) -> str:
    return ", ".join(u.name for u in producer.users if u is not norm)


def _set_submodule(gm: GraphModule, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner), name, module)
