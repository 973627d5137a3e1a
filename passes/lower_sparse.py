"""LowerToSparse: run each pruned linear / conv2d layer on the fastest of its dense and sparse forms.

Runs after InsertMasks (or LowerToEncoded: an encoded weight is decoded once, here). For every layer
with a weight chain (mask, fake-quant or encoded weight) whose weight has at least `min_sparsity`
zeros, the pass records the layer's real input on the example inputs, times the dense form and every
allowed sparse form on it (`kernels.choose_kernel`: interleaved rounds, medians; dense stays unless a
sparse form is `margin` times faster) and replaces the layer by a `SparseLayer` holding only the
chosen form. A layer with a chain but fewer zeros becomes a dense SparseLayer without timing: its
mask product would otherwise run on every call, making the lowered model slower than a dense one.
The stored float weight, its mask and its chain are removed, so the running model holds no dense
copy of a weight that runs sparse.

Speed depends on the machine and the batch size, so the choice is made on the example inputs of
this compile, recorded per layer (kernel and milliseconds of each candidate: the module's
`kernel_choice`, the pass's statistics and history, `summary`'s columns, the saved file), and can
be made again elsewhere with `fxcompress.kernels.remeasure(gm, inputs)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.config import Interval, Options, Regex, TupleOf, validate
from fxcompress.kernels.sparse import DTYPES, SPARSE_KERNELS, SparseLayer, choose_form
from fxcompress.kernels.lowering import install, layer_inputs
from fxcompress.kernels.timing import CLOCKS
from fxcompress.layers import (Layer, bias_arg, constant_value, effective_weight, layer_node, select_layers,
                               tied_readers, weight_arg)
from fxcompress.pass_base import Pass, PassContext, PassResult

_CONV_ARGS = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))  # F.conv2d's, after the bias


@dataclass(frozen=True, kw_only=True)
class LowerToSparse(Pass):
    """min_sparsity  layers with fewer zeros run dense without timing sparse forms (their chain is folded)
    kernels       the sparse kernels allowed (dense is always a candidate): "torch_csr", "scipy_csr", "scipy_csc",
                  "torch_bsr", "c_relative" / "c_relative_csc" (Deep Compression's relative indices and
                  codebook codes by rows / by columns, our C kernels: timed only where a C compiler built them)
    repeats       timed rounds per candidate (medians); margin: how much faster a sparse form must be
    select        full-match regex over layer names (None: every pruned linear / conv2d layer)
    clock         "wall" (elapsed time) or "thread" (this thread's CPU time: steadier on a shared machine,
                  where the process is preempted; every kernel here runs on the calling thread at one thread)
    """

    min_sparsity: float = 0.5
    kernels: tuple[str, ...] = SPARSE_KERNELS
    repeats: int = 7
    margin: float = 1.05
    select: str | None = None
    clock: str = "wall"

    constraints: ClassVar[dict] = {
        "min_sparsity": (Interval(float, 0.0, 1.0, hi_open=True),),
        "kernels": (TupleOf(Options(*SPARSE_KERNELS), min_len=1),),
        "repeats": (Interval(int, 1, 1000),),
        "margin": (Interval(float, 1.0, 10.0),),
        "select": (Regex(), None),
        "clock": (Options(*CLOCKS),),
    }

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        layers = select_layers(gm, "LowerToSparse", ("linear", "addmm", "conv2d"), self.select)
        skipped: dict[str, str] = {}
        eligible = []
        for layer in layers:
            reason = _refusal(gm, layer)
            if reason is None:
                eligible.append(layer)
            else:
                skipped[layer.name] = reason
        inputs = layer_inputs(gm, [layer_node(gm, layer) for layer in eligible], ctx.example_inputs)
        stats: dict[str, Any] = {}
        for layer in ctx.each(eligible, "timing kernels"):
            node = layer_node(gm, layer)
            stats[layer.name] = self._lower(gm, layer, node, inputs[node])
        if eligible:  # once for all the layers moved into place (a recompile per layer cost ResNet ~0.6 s)
            gm.recompile()
        for name in (n for n, s in stats.items() if not s["times_ms"]):
            skipped[name] = f"sparsity {stats[name]['sparsity']:.3f} below min_sparsity {self.min_sparsity}: " \
                            "folded to a dense form, not timed"
        return PassResult(changed=bool(eligible), params_touched=tuple(layer.weight for layer in eligible),
                          stats={"layers": stats, "skipped": skipped,
                                 "kernels": {k: sum(s["kernel"] == k for s in stats.values())
                                             for k in ("dense", *self.kernels)}})

    def _lower(self, gm: GraphModule, layer: Layer, node: Node, x: torch.Tensor) -> dict[str, Any]:
        weight = effective_weight(gm, layer)
        kind = layer.kind
        if kind == "addmm":  # HF's Conv1D: x @ W + b with W stored [in, out] is the linear layer of W.t()
            kind, weight = "linear", weight.t().contiguous()
        bias_node = bias_arg(node)
        # a bias stored in float16 (LowerToEncoded(bias="float16")) is computed in the weight's dtype
        bias = None if bias_node is None else constant_value(gm, bias_node).detach().to(weight.dtype)
        conv = _conv_options(node) if layer.kind == "conv2d" else None
        sparsity = 1 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
        if sparsity < self.min_sparsity:
            module = SparseLayer.from_dense(kind, weight, bias, "dense", conv, share=True)  # a fresh value
        else:
            module = choose_form(kind, weight, bias, x, self.kernels, conv=conv, repeats=self.repeats,
                                 margin=self.margin, clock=self.clock)
        path = _take_the_layers_place(gm, install(gm, layer, node, module, "sparse"))
        module._where = f"SparseLayer {path}"  # its run-time errors name the layer, as a loaded file's do
        choice = module.kernel_choice
        dense_bytes = (weight.numel() + (0 if bias is None else bias.numel())) * weight.element_size()
        times = {} if choice is None else choice.as_stats()["times_ms"]
        return {"module": path, "kernel": module.kernel, "times_ms": times,
                "speedup": None if choice is None else round(choice.speedup_over("dense"), 4),
                "sparsity": round(sparsity, 6), "input_shape": list(x.shape), "held_bytes": module.held_bytes(),
                "dense_bytes": dense_bytes}


def _take_the_layers_place(gm: GraphModule, path: str) -> str:
    """Move the SparseLayer from `<layer>.sparse` to `<layer>` where the layer's module was left an empty
    container: the graph then reaches it in one attribute look-up, as it reached the float layer, so a
    layer kept dense costs what the nn.Linear did (a nested look-up cost LeNet-300-100 about 5%)."""
    owner, _, name = path.rpartition(".")
    container = gm.get_submodule(owner) if owner else None
    if container is None or type(container) is not nn.Module or list(container._modules) != [name] \
            or container._parameters or container._buffers:
        return path
    parent, _, attr = owner.rpartition(".")
    setattr(gm.get_submodule(parent), attr, container._modules[name])
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == path:
            node.target = owner
    return owner  # the caller recompiles once, after every layer


def _refusal(gm: GraphModule, layer: Layer) -> str | None:
    """Why the layer stays as it is, or None when it can be lowered."""
    node = layer_node(gm, layer)
    weight = weight_arg(node) if node.op == "call_function" else None
    if weight is None or weight.op == "get_attr":
        return "no mask, fake-quant or encoded weight on its weight chain"
    if tied_readers(gm, node):
        return "its weight is tied to another layer's"
    if layer.kind == "addmm" and any(node.kwargs.get(k, 1) != 1 for k in ("alpha", "beta")):
        return "addmm with alpha / beta other than 1"
    if layer.kind == "conv2d":
        options = _conv_options(node)
        if options is None:
            return "groups > 1 or string padding: no sparse form (it stays a dense conv)"
    value = effective_weight(gm, layer)
    if value.dtype not in DTYPES:
        return f"weight is {value.dtype}; sparse forms take {', '.join(str(d) for d in DTYPES)}"
    return None


def _conv_options(node: Node) -> dict[str, list[int]] | None:
    """F.conv2d's stride / padding / dilation as pairs; None for grouped convs or string padding."""
    values = {name: node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(name, default)
              for i, (name, default) in enumerate(_CONV_ARGS)}
    if values.pop("groups") != 1 or isinstance(values["padding"], str):
        return None
    return {name: list(v) if isinstance(v, (tuple, list)) else [v, v] for name, v in values.items()}

