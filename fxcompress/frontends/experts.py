"""Mixture-of-experts layers as one linear layer per expert, so every pass reads experts as it reads layers.

transformers 5 stores a layer's experts as one 3-D parameter (E, out, in) (`gate_up_proj`, `down_proj`) and
runs them as one grouped product over the routed rows sorted by expert (`grouped_mm(x,
W.transpose(-2, -1), offs)`; a model whose experts are stored transposed, (E, in, out), passes W itself).
No layer table sees such a tensor, so masks, k-means, GPTQ and the lowerings would leave most of an MoE
model's weights untouched. Here the parameter becomes an `nn.ModuleList` of bias-free `nn.Linear` under the
same path (`experts.gate_up_proj.3` is expert 3's), and the product becomes each expert's linear layer on its
rows, rows offs[e-1]:offs[e], concatenated in order: the same values (each row is the same dot products), and
each expert a layer of its own, calibrated on the tokens routed to it. transformers 4 built its experts as
modules already.

The grouped product itself is `grouped_mm`, one op graphs can hold, files can name and torch.export /
torch.compile can trace: transformers runs it on CPU at float32 through a custom op of its own
(`transformers::grouped_mm_fallback`, registered only while transformers is imported), which the export front
end spells as ours, so a graph that keeps it (a stacked tensor read elsewhere too) runs and loads without
transformers. torch's `F.grouped_mm` computes it in one call where its kernel takes the operands (strides of
16-byte multiples); otherwise one matrix product per expert.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from ..layers import stored_attr
from .matmul import swapped_last_two

_LIBRARY = torch.library.Library("fxcompress", "FRAGMENT")
_LIBRARY.define("grouped_mm(Tensor input, Tensor weight, Tensor offs) -> Tensor")


def _aligned(t: torch.Tensor) -> bool:
    """Whether torch's grouped kernel takes the operand: its strides and address multiples of 16 bytes."""
    step = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * step) % 16 == 0 for s in t.stride())


def _torch_kernel_takes(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> bool:
    """Whether F.grouped_mm computes the product: its dtypes, aligned operands and an aligned output row."""
    return (hasattr(F, "grouped_mm") and input.dtype == weight.dtype
            and input.dtype in (torch.float32, torch.bfloat16, torch.float16) and offs.dtype == torch.int32
            and _aligned(input) and _aligned(weight) and (weight.shape[2] * weight.element_size()) % 16 == 0)


def _grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _torch_kernel_takes(input, weight, offs):
        return F.grouped_mm(input, weight, offs=offs)
    output = input.new_zeros(input.shape[0], weight.shape[2])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(input[start:end], weight[expert], out=output[start:end])
        start = end
    return output


_LIBRARY.impl("grouped_mm", _grouped_mm, "CPU")


@torch.library.register_fake("fxcompress::grouped_mm")
def _(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[2])


def _save_operands(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    """d input: the same grouping through the transposed matrices; d weight[e]: expert e's rows, input^T grad."""
    input, weight, offs = ctx.saved_tensors
    grad_input = grouped_mm(grad, weight.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight, start = torch.zeros_like(weight), 0
        for expert, end in enumerate(offs.tolist()):
            grad_weight[expert] = input[start:end].T @ grad[start:end]
            start = end
    return grad_input, grad_weight, None


torch.library.register_autograd("fxcompress::grouped_mm", _backward, setup_context=_save_operands)


def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(S, in) rows sorted by expert times (E, in, out) matrices: rows offs[e-1]:offs[e] by weight[e]."""
    return torch.ops.fxcompress.grouped_mm(input, weight, offs)


_KEPT_META = ("nn_module_stack", "stack_trace")


def _stored_matrices(weight: Node) -> tuple[Node, bool] | None:
    """(the get_attr node of the stored 3-D experts tensor, whether it is stored (E, out, in)), or None where
    the product's matrices are no stored tensor (computed from inputs, or read through other ops)."""
    if weight.op == "get_attr":
        return weight, False  # the matrices as they multiply: stored (E, in, out)
    source = swapped_last_two(weight, 3)  # W.transpose(-2, -1): stored (E, out, in)
    return (source, True) if isinstance(source, Node) and source.op == "get_attr" else None


def _expert_layers(stacked: torch.Tensor, out_first: bool) -> nn.ModuleList:
    """One bias-free nn.Linear per expert holding its (out, in) matrix (a copy; the stacked tensor is dropped)."""
    layers = nn.ModuleList()
    for matrix in stacked.detach():
        weight = (matrix if out_first else matrix.t()).contiguous().clone()
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=stacked.requires_grad)
        layers.append(layer)
    return layers


def experts_as_linears(gm: GraphModule) -> list[str]:
    """Rewrite every grouped product over a stored experts tensor into one linear layer per expert; returns the
    paths of the tensors rewritten. A tensor some other node reads as well stays as it is."""
    graph, done = gm.graph, []
    for node in list(graph.find_nodes(op="call_function", target=grouped_mm)):
        rows, weight, offs = node.args
        found = _stored_matrices(weight)
        if found is None:
            continue
        source, out_first = found
        stacked = stored_attr(gm, source.target)
        readers = [user for user in (*source.users, *weight.users) if user not in (weight, node)]
        if not isinstance(stacked, torch.Tensor) or stacked.dim() != 3 or readers:
            continue
        owner_path, _, name = source.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, name)
        owner.add_module(name, _expert_layers(stacked, out_first))
        meta = {key: node.meta[key] for key in _KEPT_META if key in node.meta}
        with graph.inserting_before(node):
            bounds = graph.call_method("tolist", (offs,))
            pieces, start = [], 0
            for expert in range(stacked.shape[0]):
                end = graph.call_function(operator.getitem, (bounds, expert))
                taken = graph.call_function(operator.getitem, (rows, slice(start, end)))
                pieces.append(graph.call_module(f"{source.target}.{expert}", (taken,)))
                start = end
            joined = graph.call_function(torch.cat, (pieces,))
        for added in (bounds, *pieces, joined):
            added.meta.update(meta)
        node.replace_all_uses_with(joined)
        graph.erase_node(node)
        if weight is not source:
            graph.erase_node(weight)
        graph.erase_node(source)
        done.append(source.target)
    if done:
        gm.recompile()
    return done
