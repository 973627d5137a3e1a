"""Calls the TorchScript ONNX exporter cannot write, or writes wrongly, each with an equal spelling in ops it
handles: a table from the torch function (or method name) to its twin, applied to the copy of the graph being
exported. Each twin is tested equal to torch's op."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node


def diff_as_slices(input: torch.Tensor, n: int = 1, dim: int = -1, prepend: torch.Tensor | None = None,
                   append: torch.Tensor | None = None) -> torch.Tensor:
    """torch.diff written with ops the exporter has: `n` times each element minus the one before it along `dim`,
    after joining `prepend` and `append`."""
    parts = [t for t in (prepend, input, append) if t is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else input
    for _ in range(n):
        x = x.narrow(dim, 1, x.shape[dim] - 1) - x.narrow(dim, 0, x.shape[dim] - 1)
    return x


def cumsum_counting(input: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.cumsum with a bool input counted as int64, torch's own result type (ONNX's CumSum takes no bool)."""
    if dtype is None and input.dtype == torch.bool:
        dtype = torch.int64
    return torch.cumsum(input, dim, dtype=dtype)


def repeat_interleave_as_expand(input: torch.Tensor, repeats: int | torch.Tensor, dim: int | None = None, *,
                                output_size: int | None = None) -> torch.Tensor:
    """torch.repeat_interleave of a whole number of repeats along `dim` as a broadcast and a flatten: the exporter's
    own translation lost the rank of what followed (transformers 5's Cohere rotary embedding: the file failed in
    ONNX Runtime at every batch size). Repeats per element, or no dim, stay torch's op."""
    if not isinstance(repeats, int) or dim is None or input.dim() == 0:
        return torch.repeat_interleave(input, repeats, dim, output_size=output_size)
    dim %= input.dim()
    broadcast = [-1] * (input.dim() + 1)
    broadcast[dim + 1] = repeats
    return input.unsqueeze(dim + 1).expand(*broadcast).flatten(dim, dim + 1)


def histc_counting(input: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:
    """torch.histc over a given range as a count of each element's bin (ONNX has no histogram): the bin is the
    truncated (x - min) / (max - min) * bins as torch's CPU kernel computes it, max itself in the last bin, elements
    outside the range not counted. A range of zero width (torch then takes the data's) stays torch's op."""
    if min == max:
        return torch.histc(input, bins, min, max)
    values = input.flatten()
    inside = (values >= min) & (values <= max)
    position = ((values - min) / (max - min) * bins).clamp(0, bins - 1).to(torch.int64)
    one_hot = (position.unsqueeze(1) == torch.arange(bins, device=input.device)) & inside.unsqueeze(1)
    return one_hot.sum(0).to(input.dtype)


def _index_as_source(index: torch.Tensor, source: torch.Tensor, dim: int) -> torch.Tensor:
    """A 1-D `index` along `dim` broadcast to `source`'s shape, as scatter_add takes its positions."""
    shape = [1] * source.dim()
    shape[dim % source.dim()] = -1
    return index.reshape(shape).expand_as(source)


def index_add_scattering(input: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *,
                         alpha: float = 1) -> torch.Tensor:
    """torch.index_add as scatter_add, which ONNX (opset 16 on) writes with reduction="add": the exporter's own
    index_add assigns, so of rows sent to one index all but one were lost (JetMoE's tokens, each summed from two
    experts, left the model's logits at every input). Opsets before 16 cannot add duplicates either way: the file
    check refuses what they write."""
    if source.dim() == 0:
        return torch.index_add(input, dim, index, source, alpha=alpha)
    return torch.scatter_add(input, dim, _index_as_source(index, source, dim), source if alpha == 1 else source * alpha)


def index_add_scattering_(input: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor, *,
                          alpha: float = 1) -> torch.Tensor:
    """Tensor.index_add_ (in place) as Tensor.scatter_add_: see `index_add_scattering`."""
    if source.dim() == 0:
        return input.index_add_(dim, index, source, alpha=alpha)
    return input.scatter_add_(dim, _index_as_source(index, source, dim), source if alpha == 1 else source * alpha)


def tensor_split_as_slices(input: torch.Tensor, indices_or_sections, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """torch.tensor_split at given indices as slices between them: the exporter built its own translation's
    repeats two-dimensional where an index is a size computed in the forward (Qwen3-Next's gated delta rule), and
    ONNX Runtime refused the file. A number of sections stays torch's op."""
    if not isinstance(indices_or_sections, (list, tuple)):
        return torch.tensor_split(input, indices_or_sections, dim)
    before = (slice(None),) * (dim % input.dim())
    bounds = [None, *indices_or_sections, None]
    return tuple(input[(*before, slice(start, end))] for start, end in zip(bounds, bounds[1:]))


def _conv_same_padded(conv, dims: int):
    """torch's convolution `conv` (of `dims` spatial dims) with padding="same" written with explicit padding where a
    dilation is above 1: the exporter writes "same" as auto_pad=SAME_UPPER, and ONNX Runtime refuses a dilated
    convolution with auto_pad (its Conv and QLinearConv alike), at every input. Torch pads d * (k - 1) per dim, half
    (rounded down) before and the rest after: equal halves become the convolution's own padding, unequal ones a
    zero F.pad of the input first, as torch's own kernel pads it (correct, though in an int8 file that Pad between
    DequantizeLinear and Conv keeps ONNX Runtime from fusing the convolution: it runs in float). Any other padding
    stays torch's op."""
    def padded(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
               padding=0, dilation=1, groups: int = 1) -> torch.Tensor:  # torch's defaults
        dilations = tuple(dilation) if isinstance(dilation, (list, tuple)) else (dilation,) * dims
        if not (isinstance(padding, str) and padding == "same") or all(d == 1 for d in dilations):
            return conv(input, weight, bias, stride, padding, dilation, groups)
        totals = [d * (k - 1) for d, k in zip(dilations, weight.shape[2:])]
        if all(t % 2 == 0 for t in totals):
            return conv(input, weight, bias, stride, [t // 2 for t in totals], dilation, groups)
        pads = [p for t in reversed(totals) for p in (t // 2, t - t // 2)]  # F.pad: the last dim first
        return conv(F.pad(input, pads), weight, bias, stride, 0, dilation, groups)
    padded.__name__ = f"{conv.__name__}_same_padded"
    return padded


conv1d_same_padded = _conv_same_padded(torch.conv1d, 1)
conv2d_same_padded = _conv_same_padded(torch.conv2d, 2)
conv3d_same_padded = _conv_same_padded(torch.conv3d, 3)
_SAME_PADDED = {nn.Conv1d: conv1d_same_padded, nn.Conv2d: conv2d_same_padded, nn.Conv3d: conv3d_same_padded}


# torch function (or tensor method name) -> its twin. Hugging Face's attention masks (transformers 5) take the diff of
# position ids and the cumsum of a bool tensor; rotary embeddings (Cohere, GPT-J) repeat elements in place; mixtures
# of experts count tokens per expert with histc and sum each token's experts with index_add; Qwen3-Next splits its
# chunks with tensor_split. Dilated convolutions with padding="same" (WaveNet / TCN-style stacks) take explicit pads.
ONNX_RESPELLINGS = {torch.diff: diff_as_slices, torch.cumsum: cumsum_counting,
                    torch.repeat_interleave: repeat_interleave_as_expand, torch.histc: histc_counting,
                    torch.index_add: index_add_scattering, torch.tensor_split: tensor_split_as_slices,
                    torch.conv1d: conv1d_same_padded, torch.conv2d: conv2d_same_padded,
                    torch.conv3d: conv3d_same_padded}
ONNX_METHOD_RESPELLINGS = {"diff": diff_as_slices, "cumsum": cumsum_counting,
                           "repeat_interleave": repeat_interleave_as_expand, "histc": histc_counting,
                           "index_add": index_add_scattering, "index_add_": index_add_scattering_}


def respell(module: GraphModule) -> None:
    """Rewrite, in `module` (the exported copy), the calls of ONNX_RESPELLINGS into their exportable twins, writes
    into views as item assignments (`writes_into_views_as_setitem`) and convolution modules with padding="same" and
    a dilation into calls of their twins (`same_padded_modules_as_calls`)."""
    changed = writes_into_views_as_setitem(module)
    changed = same_padded_modules_as_calls(module) or changed
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in ONNX_RESPELLINGS:
            node.target = ONNX_RESPELLINGS[node.target]
        elif node.op == "call_method" and node.target in ONNX_METHOD_RESPELLINGS:
            node.op, node.target = "call_function", ONNX_METHOD_RESPELLINGS[node.target]
        else:
            continue
        changed = True
    if changed:
        module.recompile()


def writes_into_views_as_setitem(module: GraphModule) -> bool:
    """`view = base[index]; view.copy_(source)`, torch.export's form of `base[index] = source`, as that item
    assignment: the exporter wrote the copy into a slice it had made of `base` and the write never reached `base`
    (DeepSeek-V3 assembles its keys so: the file's attention read the empty tensor). Returns whether any."""
    changed = False
    for node in list(module.graph.nodes):
        if not (node.op == "call_method" and node.target == "copy_" and len(node.args) == 2 and not node.kwargs
                and not node.users):
            continue
        view, source = node.args
        if not (isinstance(view, Node) and view.op == "call_function" and view.target is operator.getitem
                and len(view.users) == 1 and _indexes_a_tensor(view.args[1])):
            continue
        with module.graph.inserting_before(node):
            module.graph.call_function(operator.setitem, (view.args[0], view.args[1], source))
        module.graph.erase_node(node)
        module.graph.erase_node(view)
        changed = True
    return changed


def _indexes_a_tensor(index: object) -> bool:
    """Whether `index` is a tensor's basic index (slices, with ints, None or ...), not an element of a tuple."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, slice) for part in parts) and all(
        isinstance(part, (slice, int, type(None), type(Ellipsis))) for part in parts)


def same_padded_modules_as_calls(module: GraphModule) -> bool:
    """Each call of an nn.Conv1d / 2d / 3d module with padding="same" (zeros) and a dilation above 1 as a call of
    its `_conv_same_padded` twin on the module's weight and bias: the module itself would run torch's "same",
    which the exporter writes as auto_pad (see `_conv_same_padded`). The node's module is left as it is (another
    graph may share it). Returns whether any."""
    changed = False
    for node in list(module.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = module.get_submodule(node.target)
        twin = _SAME_PADDED.get(type(conv))
        if twin is None or conv.padding != "same" or conv.padding_mode != "zeros" \
                or all(d == 1 for d in conv.dilation):
            continue
        with module.graph.inserting_before(node):
            weight = module.graph.get_attr(f"{node.target}.weight")
            bias = module.graph.get_attr(f"{node.target}.bias") if conv.bias is not None else None
        node.op, node.target = "call_function", twin
        node.args = (node.args[0], weight, bias, conv.stride, "same", conv.dilation, conv.groups)
        changed = True
    return changed
