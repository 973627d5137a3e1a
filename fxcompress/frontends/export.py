"""The torch.export front end: an ExportedProgram's aten graph in the torch-level form the passes read.

`torch.export` keeps linear / conv / layer_norm / batch_norm / sdpa whole in its training IR, and
`ExportedProgram.module()` already puts every parameter back under its original module path as a
`get_attr` (`encoder.0.attention.query.weight`). What remains is spelling: each aten overload the
table below knows becomes the torch / F / operator / method call that fx tracing would have
produced, so the layer kinds, the channel op tables and the file format recognise it. An overload
the table does not know stays as it is; the passes then treat it as an unknown op (frozen channels,
refused saving, each with its reason), and a warning names each such op with its module path.
"""
from __future__ import annotations

import inspect
import operator
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import CodeGen, Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen
from torch.utils._pytree import TreeSpec, tree_unflatten

from ..errors import ConfigError, TraceError
from ..layers import stored_attr
from ..rewire import drop_unread
from ..tracing import OutputShape, RecordOutputs, record_type
from .experts import experts_as_linears, grouped_mm
from .guards import insert_input_checks, traced_shapes
from .matmul import linears_written_as_matmul

aten = torch.ops.aten
_LAST = torch.iinfo(torch.int64).max  # what aten.slice writes for "to the end"


@dataclass(frozen=True)
class Spelling:
    """How one aten overload is written at torch level: `target` called as a function or a method;
    `spread` unpacks a list argument at that position (`view(x, [2, 4])` -> `x.view(2, 4)`), as fx
    traces of `x.view(b, h, d)` read."""

    target: Callable | str
    spread: int | None = None

    @property
    def op(self) -> str:
        return "call_method" if isinstance(self.target, str) else "call_function"


# aten overload -> torch-level spelling, arguments in the same order (rearranged ones are in _ADAPTERS).
SPELLINGS: dict[Any, Spelling] = {op: Spelling(target) for op, target in {
    aten.linear.default: F.linear,
    aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d, aten.conv3d.default: F.conv3d,
    aten.conv_transpose1d.default: F.conv_transpose1d, aten.conv_transpose2d.input: F.conv_transpose2d,
    aten.conv_transpose3d.input: F.conv_transpose3d,
    aten.relu.default: F.relu, aten.relu_.default: F.relu_, aten.gelu.default: F.gelu,
    aten.silu.default: F.silu, aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh,
    aten.hardtanh.default: F.hardtanh, aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid, aten.leaky_relu.default: F.leaky_relu,
    aten.elu.default: F.elu, aten.selu.default: F.selu, aten.mish.default: F.mish,
    aten.softplus.default: F.softplus,
    aten.dropout.default: F.dropout, aten.alpha_dropout.default: F.alpha_dropout,
    aten.feature_alpha_dropout.default: F.feature_alpha_dropout,
    aten.exp.default: torch.exp, aten.sqrt.default: torch.sqrt,
    aten.rsqrt.default: torch.rsqrt, aten.neg.default: operator.neg, aten.abs.default: torch.abs,
    aten.clone.default: torch.clone, aten.detach.default: torch.detach,
    aten.add.Tensor: operator.add, aten.add.Scalar: operator.add, aten.sub.Tensor: operator.sub,
    aten.sub.Scalar: operator.sub, aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
    aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv,
    aten.pow.Tensor_Scalar: torch.pow, aten.pow.Tensor_Tensor: torch.pow, aten.pow.Scalar: torch.pow,  # Phi-MoE's rope
    aten.reciprocal.default: torch.reciprocal, aten.clamp.Tensor: torch.clamp,  # ... and its sparsemixer router
    aten.concat.default: torch.cat, aten.scatter.value: torch.scatter, aten.index_add.default: torch.index_add,
    aten.div.Tensor_mode: torch.div, aten.item.default: "item",  # JetMoE's routing
    aten.maximum.default: torch.maximum, aten.minimum.default: torch.minimum,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm,
    aten.softmax.int: torch.softmax, aten.log_softmax.int: torch.log_softmax,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.mean.dim: torch.mean, aten.sum.dim_IntList: torch.sum, aten.amax.default: torch.amax,
    aten.flatten.using_ints: torch.flatten, aten.transpose.int: torch.transpose,
    aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze,
    aten.squeeze.dims: torch.squeeze, aten.cat.default: torch.cat,
    aten.split.Tensor: torch.split, aten.split_with_sizes.default: torch.split,
    aten.chunk.default: torch.chunk, aten.unbind.int: torch.unbind,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d, aten.avg_pool2d.default: F.avg_pool2d,
    aten.addmm.default: torch.addmm, aten.t.default: torch.t, aten.rms_norm.default: F.rms_norm,
    aten.sin.default: torch.sin, aten.cos.default: torch.cos, aten.where.self: torch.where,
    aten.masked_fill.Scalar: torch.masked_fill,
    aten.eq.Scalar: operator.eq, aten.eq.Tensor: operator.eq, aten.ne.Scalar: operator.ne,
    aten.lt.Scalar: operator.lt, aten.lt.Tensor: operator.lt, aten.le.Scalar: operator.le,
    aten.gt.Scalar: operator.gt, aten.gt.Tensor: operator.gt, aten.ge.Scalar: operator.ge,
    aten.sym_size.int: "size", aten.contiguous.default: "contiguous",
    # what transformer forwards build: position ids, token-type lookups, masks, casts, rotary tables
    aten.gather.default: torch.gather, aten.cumsum.default: torch.cumsum, aten.cumprod.default: torch.cumprod,
    aten.diff.default: torch.diff,
    aten.log.default: torch.log, aten.erf.default: torch.erf,
    aten.arange.default: torch.arange, aten.arange.start: torch.arange, aten.arange.start_step: torch.arange,
    aten.full.default: torch.full, aten.zeros.default: torch.zeros, aten.ones.default: torch.ones,
    aten.full_like.default: torch.full_like, aten.zeros_like.default: torch.zeros_like,
    aten.ones_like.default: torch.ones_like, aten.new_ones.default: "new_ones",
    aten.new_zeros.default: "new_zeros", aten.new_full.default: "new_full",
    aten.to.dtype: "to", aten.to.device: "to", aten.to.dtype_layout: "to", aten.type_as.default: "type_as",
    aten.lift_fresh_copy.default: torch.clone, aten.detach_.default: "detach_",
    aten.where.ScalarOther: torch.where, aten.where.ScalarSelf: torch.where, aten.where.Scalar: torch.where,
    aten.masked_fill.Tensor: torch.masked_fill, aten.tril.default: torch.tril, aten.triu.default: torch.triu,
    aten.min.other: torch.minimum, aten.max.other: torch.maximum, aten.clamp.default: torch.clamp,
    aten.max.dim: torch.max, aten.min.dim: torch.min,  # (values, indices): GPT-OSS's router
    aten.le.Tensor: operator.le, aten.ge.Tensor: operator.ge, aten.ne.Tensor: operator.ne,
    aten.__and__.Tensor: operator.and_, aten.__or__.Tensor: operator.or_, aten.bitwise_not.default: operator.invert,
    aten.floor_divide.default: operator.floordiv, aten.remainder.Scalar: operator.mod,
    aten.remainder.Tensor: operator.mod,
    aten.mean.default: torch.mean, aten.sum.default: torch.sum, aten.squeeze.default: torch.squeeze,
    aten.stack.default: torch.stack, aten.mm.default: torch.mm, aten.baddbmm.default: torch.baddbmm,
    aten.index_select.default: torch.index_select, aten.flip.default: torch.flip, aten.roll.default: torch.roll,
    aten.narrow.default: torch.narrow, aten.unflatten.int: "unflatten", aten.expand_as.default: "expand_as",
    aten.view_as.default: "view_as", aten.repeat.default: "repeat",
    # in place, as the forward wrote it: a later reader of the input sees the update
    aten.add_.Tensor: "add_", aten.sub_.Tensor: "sub_", aten.mul_.Tensor: "mul_", aten.div_.Tensor: "div_",
    aten.masked_fill_.Scalar: "masked_fill_", aten.fill_.Scalar: "fill_", aten.fill_.Tensor: "fill_",
    aten.pad.default: F.pad,  # (input, pad, mode, value), as F.pad: swin's window padding
    aten.einsum.default: torch.einsum, aten.swapaxes.default: torch.swapaxes,  # maxvit's attention
    aten.clamp_min.default: torch.clamp, aten.zero_.default: "zero_",  # swin v2's cosine attention, masks
    aten.repeat_interleave.self_int: torch.repeat_interleave,  # GPT-J's and Cohere's interleaved rotary tables
    aten.topk.default: torch.topk, aten.sort.default: torch.sort,  # mixture-of-experts routers
    aten.histc.default: torch.histc,  # ... counting the rows each expert takes,
    aten.empty_like.default: torch.empty_like, aten.index_put_.default: "index_put_",  # ... inverting the sort
    aten.one_hot.default: F.one_hot, aten.where.default: torch.where,  # ... transformers 4's loop over experts
    aten.index_add_.default: "index_add_",
    aten.scatter_.value: "scatter_",  # GLM-4.5's router masks its expert groups in place
    aten.tensor_split.indices: torch.tensor_split, aten.eye.default: torch.eye,  # Qwen3-Next's gated delta rule
    aten.new_empty.default: "new_empty", aten.copy_.default: "copy_",  # DeepSeek-V3's values written into a
    # wider empty tensor, the heads of its queries and keys padded alike
    # shape, scan and reduction ops the channel tables follow: each aten overload takes the torch function's
    # positional arguments in its order, and its keywords by the function's names
    aten.movedim.int: torch.movedim, aten.movedim.intlist: torch.movedim,
    aten.moveaxis.int: torch.moveaxis, aten.moveaxis.intlist: torch.moveaxis,
    aten.tile.default: torch.tile,  # (x, dims): export writes the dims as given, torch.tile pads them with ones
    aten.tensor_split.sections: torch.tensor_split,  # (x, sections, dim): the int form (.indices is above)
    aten.tensor_split.tensor_indices_or_sections: torch.tensor_split,  # (x, tensor, dim): sections or indices
    # (x, ord, dim, keepdim, *, dtype): torch.norm, x.norm and F.normalize's norm are exported as this op
    aten.linalg_vector_norm.default: torch.linalg.vector_norm,
    # std / var by what export writes: .dim is (x, dim, unbiased, keepdim), .default (x, unbiased), and
    # .correction (x, dim, *, correction, keepdim): correction and keepdim stay keywords, as torch.std takes them
    aten.std.dim: torch.std, aten.std.default: torch.std, aten.std.correction: torch.std,
    aten.var.dim: torch.var, aten.var.default: torch.var, aten.var.correction: torch.var,
    aten.logsumexp.default: torch.logsumexp,  # (x, dim, keepdim)
    aten.pixel_shuffle.default: F.pixel_shuffle, aten.pixel_unshuffle.default: F.pixel_unshuffle,
}.items()} | {
    aten.view.default: Spelling("view", spread=1), aten.reshape.default: Spelling("reshape", spread=1),
    aten.permute.default: Spelling("permute", spread=1), aten.expand.default: Spelling("expand", spread=1),
}


def _embedding(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    weight, indices, padding_idx = (*args, -1)[:3]  # aten takes the table first and -1 for "no padding"
    return F.embedding, (indices, weight), {"padding_idx": None if padding_idx == -1 else padding_idx}


def _layer_norm(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    return F.layer_norm, tuple(args[:5]), {}  # the last aten argument (cudnn_enable) has no F form


def _group_norm(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, groups, weight, bias, eps = (*args, *(None, None, None, None, 1e-5)[len(args):])[:5]  # aten's defaults
    return F.group_norm, (x, groups, weight, bias, eps), {}


def _batch_norm(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, weight, bias, mean, var, training, momentum, eps = args[:8]  # aten puts the affine pair first
    return F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps), {}


def _index(node: Node, dim: int, item: Any) -> tuple:
    """An index tuple that picks `item` at `dim` (fx's spelling of x[:, a:b] / x[:, i])."""
    ndim = node.args[0].meta["val"].dim()
    return (slice(None),) * (dim % ndim) + (item,)


def _slice(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, dim, start, end, step = (*args, *(None, 0, None, None, 1)[len(args):])  # aten's defaults
    end = None if end == _LAST else end
    return operator.getitem, (x, _index(node, dim, slice(start, end, None if step == 1 else step))), {}


def _select(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, dim, position = args
    return operator.getitem, (x, _index(node, dim, position)), {}


def _advanced_index(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, indices = args  # aten writes a full slice as None: x[i, :, j] is index(x, [i, None, j])
    return operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)), {}


def _numpy_t(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, = args  # x.T: every dim reversed (Falcon's fused query-key-value weight)
    return torch.permute, (x, tuple(reversed(range(node.args[0].meta["val"].dim())))), {}


def _matrix_t(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, = args  # x.mT: the last two dims swapped
    return torch.transpose, (x, -2, -1), {}


def _conv_padding(function: Callable) -> Callable[[Node, tuple], tuple[Callable, tuple, dict]]:
    """A convolution with padding "valid" or "same" (Hugging Face's EfficientNet): as explicit zero padding where
    it is one (every padded side even: stride 1 and odd dilated kernels), so the layer lowers like any other;
    the string where "same" pads one side more."""
    def adapt(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
        x, weight, bias, stride, padding, dilation, groups = (*args, *(None, 1, "valid", 1, 1)[len(args) - 2:])[:7]
        shape = node.args[1].meta["val"].shape if "val" in node.args[1].meta else None  # the traced weight's
        if shape is not None and padding in ("valid", "same"):
            dims, sizes = len(shape) - 2, shape[2:]
            dilations = [dilation] * dims if isinstance(dilation, int) else list(dilation)
            spans = [d * (k - 1) for d, k in zip(dilations, sizes)]
            strides = [stride] * dims if isinstance(stride, int) else list(stride)
            if padding == "valid":
                padding = [0] * dims
            elif all(span % 2 == 0 for span in spans) and all(s == 1 for s in strides):
                padding = [span // 2 for span in spans]
        return function, (x, weight, bias, stride, padding, dilation, groups), {}
    return adapt


def _upsample(mode: str) -> Callable[[Node, tuple], tuple[Callable, tuple, dict]]:
    """aten's upsample_*.vec(x, output_size, [align_corners,] scale_factors) as F.interpolate (MobileViT)."""
    def adapt(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
        x, size, *rest = args
        corners = {} if mode == "nearest" else {"align_corners": rest.pop(0)}
        return F.interpolate, (x,), {"size": size, "scale_factor": rest[0] if rest else None, "mode": mode, **corners}
    return adapt


def _rsub(node: Node, args: tuple) -> tuple[Callable, tuple, dict]:
    x, other, alpha = (*args, 1)[:3]  # other - alpha * x: `1.0 - mask` (BERT's extended attention mask)
    return (operator.sub, (other, x), {}) if alpha == 1 else (torch.rsub, (x, other, alpha), {})


# aten.feature_dropout by its input's dims: the F form whose call is exactly that op (F.dropout1d and F.dropout3d
# add a batch dim to an unbatched input, which export writes as an unsqueeze before the op, so the op always sees
# the batched form; F.dropout2d warns on any other number of dims)
_FEATURE_DROPOUTS: dict[int, Callable] = {3: F.dropout1d, 4: F.dropout2d, 5: F.dropout3d}


def _feature_dropout(inplace: bool) -> Callable[[Node, tuple], tuple[Callable, tuple, dict] | None]:
    """`aten.feature_dropout(x, p, train)` (nn.Dropout1d / 2d / 3d) as the F function of its input's dims; None
    (the aten op stays) for dims no F form takes without a warning."""
    def adapt(node: Node, args: tuple) -> tuple[Callable, tuple, dict] | None:
        value = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
        function = _FEATURE_DROPOUTS.get(value.dim()) if isinstance(value, torch.Tensor) else None
        if function is None:
            return None
        return function, args, {"inplace": True} if inplace else {}
    return adapt


def _in_place(function: Callable) -> Callable[[Node, tuple], tuple[Callable, tuple, dict]]:
    """`aten.hardswish_(x)` is `F.hardswish(x, inplace=True)` (nn.Hardswish(inplace=True)): in place, so
    a later reader of x sees what the module wrote, as in the model."""
    return lambda node, args: (function, args, {"inplace": True})


# Other libraries' custom ops, by schema name (they exist only while their library is imported): a graph names
# ours instead, so the compressed model runs and loads without that library.
SPELLINGS_BY_NAME: dict[str, Spelling] = {
    "transformers::grouped_mm_fallback": Spelling(grouped_mm),  # Hugging Face's experts on CPU, float32
    "fxcompress::grouped_mm": Spelling(grouped_mm),  # ours, in a program exported from a compiled model
}


def _spelling(target: Any) -> Spelling | None:
    schema = getattr(target, "_schema", None)
    return SPELLINGS.get(target) or (SPELLINGS_BY_NAME.get(schema.name) if schema is not None else None)


# aten overloads whose torch-level form takes its arguments in another order or shape.
_ADAPTERS: dict[Any, Callable[[Node, tuple], tuple[Callable, tuple, dict] | None]] = {
    aten.embedding.default: _embedding, aten.layer_norm.default: _layer_norm,
    aten.group_norm.default: _group_norm, aten.batch_norm.default: _batch_norm,
    aten.slice.Tensor: _slice, aten.select.int: _select, aten.index.Tensor: _advanced_index,
    aten.rsub.Scalar: _rsub, aten.rsub.Tensor: _rsub, aten.numpy_T.default: _numpy_t,
    aten.mT.default: _matrix_t,
    aten.conv1d.padding: _conv_padding(F.conv1d), aten.conv2d.padding: _conv_padding(F.conv2d),
    aten.conv3d.padding: _conv_padding(F.conv3d),
    aten.upsample_nearest2d.vec: _upsample("nearest"), aten.upsample_bilinear2d.vec: _upsample("bilinear"),
    aten.hardswish_.default: _in_place(F.hardswish), aten.hardsigmoid_.default: _in_place(F.hardsigmoid),
    aten.silu_.default: _in_place(F.silu), aten.hardtanh_.default: _in_place(F.hardtanh),
    aten.leaky_relu_.default: _in_place(F.leaky_relu), aten.dropout_.default: _in_place(F.dropout),
    aten.selu_.default: _in_place(F.selu),
    aten.feature_dropout.default: _feature_dropout(inplace=False),
    aten.feature_dropout_.default: _feature_dropout(inplace=True),
    aten.alpha_dropout_.default: _in_place(F.alpha_dropout),
    aten.feature_alpha_dropout_.default: _in_place(F.feature_alpha_dropout),
}

# Keyword arguments export writes out at their defaults (every torch-level form takes them as its own
# defaults, and a layout or memory format is no value a file stores): dropped from respelled calls.
_DEFAULT_KEYWORDS: dict[str, Any] = {"layout": torch.strided, "pin_memory": False,
                                     "memory_format": torch.preserve_format}
# aten overloads whose torch-level method takes its arguments from this position on by keyword only (Tensor.to's
# memory format: Qwen3-Next's `x.transpose(1, 2).contiguous().to(torch.float32)` is one `to` with it)
_KEYWORDS_FROM = {aten.to.dtype: 4, aten.to.device: 5}
# Checks export inserts (an input's dtype / device as traced): nothing reads them; compile verifies anew.
_CHECKS = frozenset({aten._assert_tensor_metadata.default, aten._assert_scalar.default})
# Ops that return their input as it is (a view of the same data): readers read the input itself.
_IDENTITIES = frozenset({aten.alias.default})

# Graph nodes that only re-check what export already checked (input guards); compile verifies anew.
_GUARD_MODULES = frozenset({"_guards_fn"})
# Whether ExportedProgram.module takes check_guards (newer torch): unlifting without the guard module
# skips generating and compiling its code and compiling the graph once more, which the translation drops
# anyway (6-16 ms a call, 10-18% of the front end on two-layer transformers; the same graph, tested)
_UNLIFT_WITHOUT_GUARDS = "check_guards" in inspect.signature(torch.export.ExportedProgram.module).parameters
_KEPT_META = ("nn_module_stack", "stack_trace")  # where a node came from; shapes are recomputed


def where(node: Node) -> str:
    """The user's module path and source line a node came from, for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    line = next((t.strip() for t in reversed(trace) if t.strip().startswith("File ")), "")
    return f"module '{path or '<root>'}'" + (f" ({line})" if line else "")


def _plain_name(name: str) -> str:
    """A node name a file can store: export names `detach_` + `_1` as `detach__1`, and a file refuses
    names with a dunder. torch.fx renames on a clash."""
    return re.sub("_{2,}", "_", name)


def _innermost_module(node: Node) -> tuple[str, str]:
    """(module path, qualified class name) of the innermost module export recorded the node in; ("", "") if none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    return path, f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind, type) else str(kind or "")


def _node_name(node: Node, op: str, prefix: str) -> str:
    """The name fx tracing gives the node: a torch.nn module's own call is named by its module path
    (`encoder_layer_0_output_LayerNorm`, not `layer_norm_7`), so reasons and messages that name a node
    name the user's module; any other node keeps export's name."""
    path, kind = _innermost_module(node) if op == "call_function" else ("", "")
    if path and not prefix and kind.startswith("torch.nn.modules."):
        return _plain_name(path.replace(".", "_"))  # a second node of the module gets fx's numbered suffix
    return _plain_name(node.name)


def is_exported_module(gm: nn.Module) -> bool:
    """Whether `gm` is an `ExportedProgram.module()` not yet brought into torch-level form."""
    return isinstance(gm, GraphModule) and isinstance(gm.graph._codegen, _PyTreeCodeGen)


def _respell(node: Node, args: tuple, kwargs: dict) -> tuple[str, Any, tuple, dict]:
    """The torch-level (op, target, args, kwargs) of an aten call; unknown overloads unchanged."""
    adapted = _ADAPTERS[node.target](node, args) if node.target in _ADAPTERS and not kwargs else None
    if adapted is not None:  # adapters read positions only: keywords stay aten, as does a call one has no form for
        target, args, kwargs = adapted
        return "call_function", target, args, kwargs
    spelling = _spelling(node.target)
    if spelling is None:
        return node.op, node.target, args, kwargs
    position = _KEYWORDS_FROM.get(node.target)
    if position is not None and len(args) > position:
        names = [argument.name for argument in node.target._schema.arguments]
        args, kwargs = args[:position], {**dict(zip(names[position:], args[position:])), **kwargs}
    kwargs = {k: v for k, v in kwargs.items() if k not in _DEFAULT_KEYWORDS or v != _DEFAULT_KEYWORDS[k]}
    if spelling.spread is not None:
        args = (*args[:spelling.spread], *args[spelling.spread], *args[spelling.spread + 1:])
    return spelling.op, spelling.target, args, kwargs


def _input_spec_check(gm: GraphModule) -> None:
    """Positional tensors only: export specializes any other input to its example value, and the
    graph keeps no guard that would catch a different one."""
    args_spec, kwargs_spec = gm.graph._codegen.pytree_info.in_spec.children()
    if kwargs_spec.num_children or any(not child.is_leaf() for child in args_spec.children()):
        raise ConfigError("compile: an exported model must take its inputs as positional tensors "
                          f"(its input structure is {gm.graph._codegen.pytree_info.in_spec})")
    for node in gm.graph.find_nodes(op="placeholder"):
        if not isinstance(node.meta.get("val"), torch.Tensor):
            raise ConfigError(f"compile: exported input '{node.target}' is not a tensor "
                              f"({node.meta.get('val')!r}); export fixed it to this value: pass it as "
                              "concrete_args to the fx front end instead")


class _Subgraph(NamedTuple):
    """A graph export put in a submodule for a region of the forward (`with torch.no_grad():`)."""

    module: GraphModule
    path: str


def _region_no_grad(args: tuple) -> tuple[bool, Any, tuple, bool]:
    return args[0], args[1], args[2:], True  # (enabled, subgraph, inputs, detach the outputs)


def _region_autocast(args: tuple) -> tuple[bool, Any, tuple, bool]:
    return args[2], args[4], args[5:], False  # (device_type, dtype, enabled, cache_enabled, subgraph, *inputs)


# Regions export wraps in a higher-order op, by how to read its arguments. A region that switches
# gradients off is inlined with its outputs detached (the values and gradients of the model); one that
# switches autocast off (Llama's rotary embedding under transformers 4.x) is inlined as it is, exact
# unless the caller runs the model under autocast. A region that switches either on stays, warned.
_REGIONS: dict[Any, Callable[[tuple], tuple[bool, Any, tuple, bool]]] = {
    torch.ops.higher_order.wrap_with_set_grad_enabled: _region_no_grad,
    torch.ops.higher_order.wrap_with_autocast: _region_autocast,
}


@dataclass
class _Copy:
    """The graph being written, the module its get_attr paths start from, the nodes of unknown ops written."""

    graph: Graph
    root: GraphModule
    unknown: list[Node]


def _inline(copy: _Copy, target: Any, args: tuple) -> tuple | None:
    """The outputs of a region's subgraph copied in place of its higher-order op (None: it stays)."""
    enabled, subgraph, inputs, detach = _REGIONS[target](args)
    if enabled is not False or not isinstance(subgraph, _Subgraph):
        return None
    graph = subgraph.module.graph
    env = dict(zip(graph.find_nodes(op="placeholder"), inputs))
    outputs = _copy_nodes(copy, [n for n in graph.nodes if n.op != "placeholder"], env, subgraph.path + ".")
    if detach:
        outputs = [copy.graph.call_method("detach", (o,)) if isinstance(o, Node) else o for o in outputs]
    return tuple(outputs)


def _copy_node(copy: _Copy, node: Node, args: tuple, kwargs: dict, prefix: str) -> Any:
    """What `node` becomes in the copy: a respelled node, or the value its readers read instead."""
    op, target = node.op, node.target
    if op == "get_attr" and not node.users:
        return None  # a tensor the forward never reads (GoogLeNet's aux heads in eval): fx traces drop it too
    if op == "get_attr":
        target = prefix + target
        if isinstance(stored_attr(copy.root, target), GraphModule):
            return _Subgraph(stored_attr(copy.root, target), target)
    if op == "call_function":
        if target in _CHECKS and not node.users:
            return None
        if target in _IDENTITIES:
            return args[0]
        if target is operator.getitem and isinstance(args[0], tuple):  # an output of an inlined region
            return args[0][args[1]]
        inlined = _inline(copy, target, args) if target in _REGIONS else None
        if inlined is not None:
            return inlined
        args = tuple(copy.graph.get_attr(a.path) if isinstance(a, _Subgraph) else a for a in args)
        if isinstance(target, torch._ops.OpOverload):
            op, target, args, kwargs = _respell(node, args, kwargs)
    new = copy.graph.create_node(op, target, args, kwargs, name=_node_name(node, op, prefix))
    new.meta.update({k: node.meta[k] for k in _KEPT_META if k in node.meta})
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        copy.unknown.append(new)
    return new


def _copy_nodes(copy: _Copy, nodes: list[Node], env: dict, prefix: str) -> Any:
    """Copies `nodes` (their inputs already in `env`); returns what their output node returns."""
    for node in nodes:
        if node.op == "call_module" and node.target in _GUARD_MODULES:
            continue
        args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda n: env[n])
        if node.op == "output":
            return args[0]
        env[node] = _copy_node(copy, node, args, kwargs, prefix)
    raise ConfigError("compile: an exported graph has no output node")


def _shape(spec: TreeSpec) -> OutputShape | None:
    """The containers of export's output structure `spec` down to its records; None where it holds none."""
    items = tuple(_shape(child) for child in spec.children())
    if not record_type(spec.type) and (spec.type not in (dict, list, tuple) or all(i is None for i in items)):
        return None  # a leaf, a container with no record in it, or one of another type (kept as the graph has it)
    return OutputShape(spec.type, tuple(spec.context) if issubclass(spec.type, dict) else (), items)


def _translate(gm: GraphModule) -> tuple[Graph, list[Node]]:
    """A copy of `gm`'s graph with aten calls respelled, its codegen plain but for the model's output classes
    (`RecordOutputs`); the nodes of the unknown ops in it."""
    copy = _Copy(Graph(), gm, [])
    # placeholders first, as in fx traces (export puts the parameters' get_attr before them)
    outputs = _copy_nodes(copy, sorted(gm.graph.nodes, key=lambda n: n.op != "placeholder"), {}, "")
    spec = gm.graph._codegen.pytree_info.out_spec
    copy.graph.output(tree_unflatten(list(outputs), spec))
    # a ModelOutput in the structure becomes a plain dict in the output node: the codegen returns its class
    shape = _shape(spec)
    copy.graph.set_codegen(CodeGen() if shape is None else RecordOutputs(shape))
    return copy.graph, copy.unknown


def _module_path(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _read_ties_by_their_users(graph: Graph, root: nn.Module) -> None:
    """A tensor with several names (an LM head tied to its token embedding) is read by each op under
    the name of the module the op runs in, as fx traces read it: export reads every tie under one name,
    so the embedding would look like a layer of the head and keep its own name as a float table."""
    names: dict[int, list[str]] = {}
    for name, tensor in (*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    for node in list(graph.find_nodes(op="get_attr")):
        tied = names.get(id(stored_attr(root, node.target)), [])
        for user in list(node.users) if len(tied) > 1 else ():
            own = next((n for n in tied if n.rpartition(".")[0] == _module_path(user)), node.target)
            if own != node.target:
                with graph.inserting_before(user):
                    user.replace_input_with(node, graph.get_attr(own))
        if len(tied) > 1 and not node.users:
            graph.erase_node(node)


def _full_slices_dropped(graph: Graph) -> None:
    """`x[0:]` over a whole dimension is `x`: export writes it where the size is free (a free batch's
    `hidden[:, 0]` slices the batch from 0 to the end first), and fixes it away where the size is known."""
    for node in list(graph.find_nodes(op="call_function", target=operator.getitem)):
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if index and all(isinstance(i, slice) and i.start in (None, 0) and i.stop is None and i.step in (None, 1)
                         for i in index):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


# Norm modules whose call export writes as F.batch_norm over the module's own tensors: put back as the module, as
# an fx trace has it, so FoldBatchNorm folds it and train() / eval() switch it between batch and running statistics.
_BATCH_NORMS: dict[str, type[nn.Module]] = {f"torch.nn.modules.batchnorm.{m.__name__}": m
                                            for m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


def _norm_module_type(node: Node) -> type[nn.Module] | None:
    return _BATCH_NORMS.get(_innermost_module(node)[1])


def _batch_count(graph: Graph, path: str) -> Node | None:
    """The `num_batches_tracked.add_(1)` of the BatchNorm at `path` (a training-mode call's), read by nothing."""
    for node in graph.find_nodes(op="call_method", target="add_"):
        counter = node.args[0]
        if (node.args[1:] == (1,) and not node.kwargs and not node.users and counter.op == "get_attr"
                and counter.target == f"{path}.num_batches_tracked" and len(counter.users) == 1):
            return node
    return None


def _batch_norm_module(root: nn.Module, node: Node, momenta: dict[str, float | None] | None
                       ) -> tuple[str, nn.Module, Node | None] | None:
    """(path, module, its batch counter's update) for an `F.batch_norm` node over one BatchNorm's own statistics
    and affine pair, read by nothing else, in the mode it was exported in (training mode: the counter's update
    the module makes itself, None in eval mode); None for any other batch_norm (computed statistics). `momenta`
    holds the model's own momentum of each BatchNorm path, where the model is known: the call's argument is not
    it for a cumulative average (momentum None), which eval mode writes as 0.0."""
    if len(node.args) != 8 or node.kwargs:
        return None
    x, mean, var, weight, bias, training, momentum, eps = node.args
    module_type, path = _norm_module_type(node), _module_path(node)
    own = {"running_mean": mean, "running_var": var} | ({"weight": weight, "bias": bias} if weight is not None else {})
    if (not isinstance(training, bool) or module_type is None or (weight is None) != (bias is None)
            or any(not isinstance(t, Node) or t.op != "get_attr" or t.target != f"{path}.{name}" or len(t.users) != 1
                   for name, t in own.items())):
        return None  # not the module's own tensors (a shared or computed statistic)
    count = _batch_count(node.graph, path) if training else None
    if training and (count is None or not isinstance(momentum, float)):
        return None  # a momentum computed in the graph: the call stays as it is
    if momenta is not None and path in momenta:
        momentum = momenta[path]
    module = module_type(stored_attr(root, f"{path}.running_mean").numel(), eps=eps, momentum=momentum,
                         affine=weight is not None)
    for name in (*own, "num_batches_tracked"):
        if hasattr(stored_attr(root, path), name):
            setattr(module, name, stored_attr(root, f"{path}.{name}"))  # the very tensors, so ties stay ties
    return path, module.train(training), count


def _batch_norms_as_modules(gm: GraphModule, root: nn.Module, momenta: dict[str, float | None] | None
                            ) -> dict[str, nn.Module]:
    """BatchNorm calls back into modules (see `_BATCH_NORMS`), their get_attr nodes and (in training mode) the
    update of their batch counter erased; `root` is the exported module, which also holds the counters the graph
    never reads; `momenta` as `_batch_norm_module` reads it. The modules made, by path."""
    made = {}
    for node in list(gm.graph.find_nodes(op="call_function", target=F.batch_norm)):
        found = _batch_norm_module(root, node, momenta)
        if found is None:
            continue
        path, module, count = found
        made[path] = module
        gm.set_submodule(path, module)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        attrs = [a for a in node.args[1:5] if isinstance(a, Node)]
        gm.graph.erase_node(node)
        if count is not None:  # the module counts its batches itself
            attrs.append(count.args[0])
            gm.graph.erase_node(count)
        for attr in attrs:
            gm.graph.erase_node(attr)
    return made


# Each dropout function and the module whose forward is that one call: a call is put back as the module, so train()
# / eval() switch it as in the model (the exported call holds the flag fixed at its value when exported).
# nn.Dropout1d / 2d / 3d export as aten.feature_dropout, spelled as the F function of its input's dims.
_DROPOUTS: dict[Callable, type[nn.Module]] = {
    F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d, F.dropout3d: nn.Dropout3d,
    F.alpha_dropout: nn.AlphaDropout, F.feature_alpha_dropout: nn.FeatureAlphaDropout}
_DROPOUT_KINDS = frozenset(f"{cls.__module__}.{cls.__qualname__}" for cls in _DROPOUTS.values())


class _DropoutCall(NamedTuple):
    """One dropout call in the graph: the module it becomes, its arguments, the module it was exported in (`own`:
    a dropout module, whose flag is its own mode; else the flag the forward passed, `self.training` or fixed)."""

    node: Node
    module_type: type[nn.Module]
    p: float
    training: bool
    inplace: bool
    path: str
    own: bool


def _dropout_calls(gm: GraphModule) -> list[_DropoutCall]:
    """The graph's dropout calls a module can take the place of: a constant flag and a rate above 0 (a rate of 0
    drops nothing in either mode: Hugging Face's attention dropout in eval mode)."""
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _DROPOUTS:
            continue
        p, training = (*node.args[1:], *(0.5, True)[len(node.args) - 1:])[:2]
        if not isinstance(training, bool) or isinstance(p, bool) or not isinstance(p, (int, float)) or p == 0 \
                or set(node.kwargs) - {"inplace"}:
            continue
        path, kind = _innermost_module(node)
        calls.append(_DropoutCall(node, _DROPOUTS[node.target], p, training, node.kwargs.get("inplace", False),
                                  path, kind in _DROPOUT_KINDS and path != ""))
    return calls


def _exported_modes(batch_norms: dict[str, nn.Module], calls: list[_DropoutCall]) -> dict[str, bool]:
    """The training flag each module path had when a program was exported, read from its graph (the model is not
    at hand): a BatchNorm's or a dropout module's own call holds its module's, and the root ("") was in training
    mode if any of them was (model.train() then bn.eval() freezes statistics; the reverse is rare). A program with
    neither is taken to be in the mode of its dropout functions' flags (any True: training), which is all the
    graph tells; a program with no dropout or BatchNorm at all has no mode the graph shows (an empty dict)."""
    known = {path: m.training for path, m in batch_norms.items()} | {c.path: c.training for c in calls if c.own}
    flags = list(known.values()) or [c.training for c in calls]
    return known | {"": any(flags)} if flags else known


def _dropouts_as_modules(gm: GraphModule, calls: list[_DropoutCall], modes: dict[str, bool]) -> bool:
    """Each of `calls` as a call of its dropout module, in the mode it was exported in: a dropout module's own call
    as that module (the class that computes the call: nn.Dropout2d over 3-dim inputs drops as nn.Dropout1d), any
    other under the module that calls it (the usual `F.dropout(x, p, training=self.training)`). `modes` holds the
    training flag of module paths when exported (the root's under ""); a call whose fixed flag is not its module's
    (`F.dropout(x, p)` in eval mode, always dropping) stays as it is, the same in both modes, as in the model.
    Whether the graph changed."""
    changed = False
    for call in calls:
        if call.own:
            target = call.path
        elif modes.get(call.path, modes.get("", call.training)) != call.training:
            continue
        else:
            target = _free_name(gm, f"{call.path}.dropout".lstrip("."))
        gm.add_submodule(target, call.module_type(call.p, inplace=call.inplace).train(call.training))
        with gm.graph.inserting_before(call.node):
            # its input read now: an earlier call this loop made a module may be it
            module_call = gm.graph.call_module(target, call.node.args[:1])
        module_call.meta.update(call.node.meta)
        call.node.replace_all_uses_with(module_call)
        gm.graph.erase_node(call.node)
        changed = True
    return changed


def _free_name(gm: GraphModule, path: str) -> str:
    """`path`, or with a numbered suffix (`dropout_1`: names a file stores) where the graph module has an attribute
    of that name already."""
    parent, _, name = path.rpartition(".")
    taken, suffix = set(), 1
    try:
        taken = set(dir(gm.get_submodule(parent)))
    except AttributeError:  # no module there yet: add_submodule makes it
        pass
    candidate = name
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return f"{parent}.{candidate}" if parent else candidate


def _warn_fixed_training(gm: GraphModule) -> None:
    """A batch_norm left in training mode (not one BatchNorm's call) keeps using and updating batch statistics
    after eval(): say so where it is."""
    fixed = [n for n in gm.graph.find_nodes(op="call_function", target=F.batch_norm)
             if len(n.args) > 5 and n.args[5] is True and n.args[1] is not None]
    if fixed:
        warnings.warn("fxcompress: batch_norm in training mode that is not the call of one BatchNorm module stays in "
                      "training mode (batch statistics, running ones updated) whatever train() / eval() says: "
                      + "; ".join(f"{n.name} at {where(n)}" for n in fixed)
                      + ". Compile the model in eval mode, or with frontend='fx'", stacklevel=4)


def _warn_momentum_unknown(batch_norms: dict[str, nn.Module]) -> None:
    """An eval-mode program writes a BatchNorm's momentum None (a cumulative average) as 0.0, as it writes a
    momentum of 0.0: the module made keeps 0.0 (running statistics unchanged in training mode); say so."""
    unknown = [path for path, m in batch_norms.items() if not m.training and m.momentum == 0.0]
    if unknown:
        warnings.warn("fxcompress: BatchNorm " + ", ".join(f"'{p}'" for p in unknown) + " was exported in eval mode "
                      "with momentum 0.0, as torch.export writes momentum=None (a cumulative average) too: it keeps "
                      "momentum 0.0, so after train() its running statistics stay as they are. Compile the "
                      "nn.Module itself to keep a cumulative average", stacklevel=4)


def from_exported(program: torch.export.ExportedProgram | GraphModule,
                  traced_at_one: frozenset[tuple[int, int]] = frozenset(),
                  source: nn.Module | None = None) -> GraphModule:
    """A GraphModule in torch-level form from an ExportedProgram or its `.module()`.

    Parameters and buffers are attributes under their original module paths; the new module shares
    them with `program` (compile deep-copies unless `inplace=True`). The input shapes the program was traced
    for are checked at each call (`guards`; `traced_at_one`: the (input, axis) pairs a size of one must not
    take).

    BatchNorm and dropout calls (F.dropout, nn.Dropout1d / 2d / 3d, alpha and feature alpha dropout) become
    modules in the mode they were exported in, which train() / eval() then switch, as they switch the model.
    `source` is the nn.Module the program was exported from, where known: its modules' training flags say which
    dropout calls follow their module's mode and which hold a fixed flag (`F.dropout(x, p)` always drops), and its
    BatchNorms' momenta are theirs. A program given alone does not record its model's modes: they are read from
    its graph (see `_exported_modes`). A program exported in eval mode keeps its dropout calls with their flag
    False, so it comes back in eval mode (`training` False) and train() makes them drop, as the model's train()
    would; one exported in training mode comes back in training mode, and eval() stops them. What the graph
    cannot tell: a dropout function with a fixed flag in a program with no BatchNorm or dropout module is taken
    to follow the mode, and an eval-mode BatchNorm's momentum None (a cumulative average) is indistinguishable
    from 0.0 and kept as 0.0, with a warning.
    """
    if isinstance(program, torch.export.ExportedProgram):
        gm = program.module(check_guards=False) if _UNLIFT_WITHOUT_GUARDS else program.module()
    else:
        gm = program
    if not is_exported_module(gm):
        raise ConfigError(f"compile: {type(program).__name__} is not an ExportedProgram or its .module()")
    _input_spec_check(gm)
    graph, unknown = _translate(gm)
    _read_ties_by_their_users(graph, gm)
    _full_slices_dropped(graph)
    linears_written_as_matmul(graph, gm)
    insert_input_checks(graph, traced_shapes(program, traced_at_one))
    out = GraphModule(gm, graph, type(gm).__name__)
    experts_as_linears(out)
    drop_unread(out)
    # only the unknown ops still in the graph: export's own runtime assertions (dropped) read sizes and storage
    # offsets through ops of their own (aten.sym_storage_offset after a tensor_split by a tensor), then unread
    remaining = set(out.graph.nodes)
    unknown = [f"{n.target} at {where(n)}" for n in unknown if n in remaining]
    if unknown:
        warnings.warn("fxcompress: aten ops with no torch-level spelling stay as they are (passes freeze "
                      "or refuse them): " + "; ".join(unknown), stacklevel=3)
    momenta = None if source is None else {
        path: m.momentum for path, m in source.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    batch_norms = _batch_norms_as_modules(out, gm, momenta)
    calls = _dropout_calls(out)
    modes = {path: m.training for path, m in source.named_modules()} if source is not None \
        else _exported_modes(batch_norms, calls)
    if _dropouts_as_modules(out, calls, modes) or batch_norms:  # the GraphModule was compiled from this graph
        out.recompile()  # already: another pass of codegen adds nothing
    _warn_fixed_training(out)
    if source is None:
        _warn_momentum_unknown(batch_norms)
    if "" in modes:
        out.training = modes[""]  # as the model's root (an exported module is always in training mode)
    out.meta["frontend"] = "export"
    return out


# An output type torch.export cannot return, as its error names it; a cache is the usual one.
_UNKNOWN_OUTPUT = re.compile(r"Found <class '([^']+)'> in output")


def _export_failure(model: nn.Module, exc: Exception) -> str:
    """Why export refused the model, and what the user can change when it is the output's type."""
    text = str(exc).strip()
    found = _UNKNOWN_OUTPUT.search(text)
    if found is None:
        return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    reason = f"the forward returns a {found.group(1)}, which torch.export cannot output"
    if getattr(getattr(model, "config", None), "use_cache", False):
        reason += (" (the key / value cache of a model with config.use_cache=True): set model.config.use_cache "
                   "= False before compiling, as Hugging Face's own fx tracer does; the compressed model then "
                   "returns no cache")
    return reason


@contextmanager
def _cumulative_averages_exportable(model: nn.Module) -> Iterator[set[str]]:
    """While exporting, each training-mode BatchNorm with momentum None (a cumulative average) holds a momentum
    of 0.0; yields their paths. Its forward computes 1 / num_batches_tracked from the counter's value, which export
    cannot trace (strict or not); the module the front end makes in place of its call takes the model's momentum
    None back, and the graph then reads no momentum."""
    cumulative = {path: m for path, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and m.momentum is None and m.training and m.track_running_stats
                  and m.num_batches_tracked is not None}
    for m in cumulative.values():
        m.momentum = 0.0
    try:
        yield set(cumulative)
    finally:
        for m in cumulative.values():
            m.momentum = None


def export_module(model: nn.Module, example_inputs: tuple) -> GraphModule:
    """`torch.export.export(model, example_inputs)` in torch-level form; TraceError if export fails.

    Every input's first dimension is left free where export can keep it so: calibration data, training
    and later calls run other batch sizes than the example's, and a graph with the example's batch
    written into its views would reshape another batch into wrong features without an error. The length
    of (batch, length) token ids is left free too (a language model's prompts and calibration windows
    have any length), or, where export cannot keep it so, the batch alone. Where neither stays free (a size
    the forward fixes), the export is at the example's shapes, as torch.export's default.
    """
    with _cumulative_averages_exportable(model) as cumulative:
        found = None
        if any(isinstance(x, torch.Tensor) and _tokens(x) for x in example_inputs):
            found = _export_free_sizes(model, example_inputs, tokens_free=True)
        if found is None:  # no token ids, or their length could not stay free: the batch alone
            found = _export_free_sizes(model, example_inputs)
        if found is None:
            try:
                found = torch.export.export(model, example_inputs, strict=False), frozenset()
            except Exception as exc:
                raise TraceError(f"torch.export could not export {type(model).__name__}: "
                                 f"{_export_failure(model, exc)}") from exc
    gm = from_exported(*found, source=model)
    # a cumulative average's call the front end could not make its module holds the momentum it was exported with
    fixed = sorted(cumulative & {_module_path(n) for n in gm.graph.find_nodes(op="call_function", target=F.batch_norm)})
    if fixed:
        raise TraceError(f"torch.export could not export {type(model).__name__}: BatchNorm "
                         + ", ".join(f"'{p}'" for p in fixed) + " with momentum=None (a cumulative average) in "
                         "training mode: export cannot trace its 1 / num_batches_tracked, and its call is not one "
                         "BatchNorm's over its own statistics, which the front end would make the module again. "
                         "Compile the model in eval mode, or with frontend='fx'")
    return gm


def _export_free_sizes(model: nn.Module, example_inputs: tuple, tokens_free: bool = False
                       ) -> tuple[torch.export.ExportedProgram, frozenset[tuple[int, int]]] | None:
    """The program with each input's first dimension free (`Dim.AUTO`: export keeps one the forward fixes
    at its example size), and with `tokens_free` the second of token ids (`_tokens`) too, and the (input, axis)
    pairs it must not run at a size of one; None where export fails that way or no first dimension stayed free.

    export fixes a dimension of size 1 whatever it is told (its 0/1 specialization) and traces the free ones
    at sizes of 2 or more, so an example batch of 1 is exported at 2 (the example repeated). The graph is run
    against the model on the example cut to a batch of one, and to one token: a forward that branches on a
    size being 1 took the other branch, and the graph would silently compute something else there, so such
    an axis keeps the lower bound of 2 export traced (the graph's input check refuses a size of one; a size
    the model itself refuses is not checked), and where that is the example's own batch the program is not
    kept. These checks run the model, so a model in training mode (whose forward updates its batch
    statistics or drops at random) is exported at its example's batch of 1, and otherwise unchecked.
    """
    if not example_inputs or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        return None
    repeat = any(x.dim() and x.shape[0] == 1 for x in example_inputs)
    if repeat and any(m.training for m in model.modules()):
        return None
    inputs = tuple(x.repeat(2, *[1] * (x.dim() - 1)) if x.dim() and x.shape[0] == 1 else x for x in example_inputs)
    dims = tuple(({0: torch.export.Dim.AUTO} | ({1: torch.export.Dim.AUTO} if tokens_free and _tokens(x) else {}))
                 if x.dim() and x.shape[0] else None for x in inputs)
    try:
        program = torch.export.export(model, inputs, dynamic_shapes=dims, strict=False)
    except Exception:  # noqa: BLE001 - the export at the example's shapes follows, and names its failure
        return None
    firsts = [node.meta["val"].shape[0] for node in program.graph.find_nodes(op="placeholder")
              if isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].dim()]
    if not any(isinstance(size, torch.SymInt) for size in firsts):
        return None
    if any(m.training for m in model.modules()):
        return program, frozenset()
    traced_at_one = set()
    batch_of_one = tuple(x[:1] if x.dim() and x.shape[0] else x for x in example_inputs)
    if not _same_outputs(program, model, [batch_of_one]):
        if repeat:  # the example's own batch
            return None
        traced_at_one |= {(i, 0) for i, x in enumerate(example_inputs) if x.dim() and x.shape[0]}
    tokens = [i for i, x in enumerate(example_inputs) if tokens_free and _tokens(x)]
    if tokens and not _same_outputs(program, model, [tuple(x[:, :1] if i in tokens else x
                                                          for i, x in enumerate(example_inputs))]):
        traced_at_one |= {(i, 1) for i in tokens}
    return program, frozenset(traced_at_one)


def _tokens(x: torch.Tensor) -> bool:
    """Whether an input reads as (batch, sequence) integer ids, a sequence of more than one (export fixes one)."""
    return x.dim() == 2 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool \
        and x.shape[1] > 1


def _same_outputs(program: torch.export.ExportedProgram, model: nn.Module, batches: list[tuple]) -> bool:
    """Whether the program's graph computes the model's outputs on each of `batches` (floats to rounding), where
    the model runs them."""
    graph = program.module(check_guards=False) if _UNLIFT_WITHOUT_GUARDS else program.module()
    for inputs in batches:
        try:
            with torch.no_grad():
                expected = model(*inputs)
        except Exception:  # noqa: BLE001 - inputs the model itself refuses: nothing the graph must reproduce
            continue
        try:
            with torch.no_grad():
                torch.testing.assert_close(graph(*inputs), expected, rtol=1e-4, atol=1e-6, equal_nan=True)
        except Exception:  # noqa: BLE001 - a graph that cannot run them, or runs them otherwise, is not the model's
            return False
    return True


