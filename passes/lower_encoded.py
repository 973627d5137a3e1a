"""LowerToEncoded: replace each masked / fake-quantized weight chain by an EncodedWeight module.

The pass works from values: it evaluates the chain's effective weight (exact zeros where pruned, a
few distinct values where quantized) and stores the smallest lossless encoding of it, so the
lowered model computes with bit-identical weights, in the weight's own dtype (float32, float64,
float16 or bfloat16; the header records any but float32). The encoded module is named inside the owner
(`fc1.weight_encoded`), the stored float weight and the chain's buffers and modules are removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from fxcompress.analyses.shapes import ShapeInfo
from fxcompress.config import Interval, Options, validate
from fxcompress.memory import release_freed_memory
from fxcompress.encoded.module import EncodedWeight
from fxcompress.rewire import swap_input
from fxcompress.encoded.streams import CODINGS
from fxcompress.encoded.tensor import DTYPES, LAYOUTS, GroupSteps, encode_half, encode_tensors, pattern_applies
from fxcompress.errors import PreconditionError
from fxcompress.layers import (Layer, bias_arg, chain_module_node, chain_transforms, constant_value, effective_weight,
                               layer_node, select_layers, tied_readers, weight_arg)
from fxcompress.quant.modules import GridWeight
from fxcompress.pass_base import Pass, PassContext, PassResult

_DEEP_COMPRESSION_INDEX_BITS = {"conv": 8, "fc": 5}
_BATCH_ELEMENTS = 1 << 22  # weights encoded together: enough to share the coder's loop, few enough to bound memory
_BATCH_SHARE = 16  # ... and at most this fraction of the lowered weights, so a small model's transients stay small


@dataclass(frozen=True, kw_only=True)
class LowerToEncoded(Pass):
    """coding: "auto" (smallest per stream) or one of "fixed", "huffman", "rans".
    layout: "auto", "relative" (nonzero positions as relative indices), "dense", or "pattern" (N:M sparse
            weights: one symbol per block of 4 or 8 saying which elements are stored; every layer must be N:M).
    index_bits: width of a relative index; None gives Deep Compression's 8 (conv) / 5 (fc).
    bias: "float32" keeps biases as they are; "float16" stores them rounded to half precision.
    """

    coding: str = "auto"
    layout: str = "auto"
    index_bits: int | None = None
    bias: str = "float32"

    preserves: ClassVar[tuple[type, ...]] = (ShapeInfo,)
    # it reads weights and replaces modules, never writing a tensor: compile(inplace=False) shares the
    # caller's tensors instead of copying the float weights this pass removes
    reads_tensors_only: ClassVar[bool] = True

    constraints: ClassVar[dict] = {
        "coding": (Options("auto", *CODINGS),), "layout": (Options("auto", *LAYOUTS),),
        "index_bits": (Interval(int, 1, 16), None), "bias": (Options("float32", "float16"),),
    }

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        touched, stats, batch = [], {}, []
        layers = select_layers(gm, "LowerToEncoded")
        limit = min(_BATCH_ELEMENTS, sum(_stored_numel(gm, layer) for layer in layers) // _BATCH_SHARE)
        for layer in ctx.each(layers, "encoding"):
            node = layer_node(gm, layer)
            if node.op != "call_function" or not _has_chain(gm, weight_arg(node)):
                continue  # no mask or fake-quant on this weight: it stays a float parameter
            if any(weight_arg(node) is weight_arg(layer_node(gm, queued)) for queued, *_ in batch):
                continue  # a tied reader of a weight already queued: lowered with it
            if batch and sum(item[1].numel() for item in batch) + _stored_numel(gm, layer) > limit:
                self._lower(gm, batch, touched, stats)  # full: lowered before this layer's weight is evaluated
                batch = []  # the batch's dense weights are freed before the next is evaluated
                release_freed_memory()  # ... and its transients handed back, not kept resident
            batch.append((layer, *self._prepare(gm, layer), _group_steps(gm, layer)))
        self._lower(gm, batch, touched, stats)
        return PassResult(changed=bool(touched), params_touched=tuple(touched), stats=stats)

    def _prepare(self, gm: GraphModule, layer: Layer) -> tuple[torch.Tensor, int, int | None]:
        """(effective weight, relative index width, the chain's smallest bit width) of a layer."""
        node = layer_node(gm, layer)
        weight = effective_weight(gm, layer)
        if str(weight.dtype).removeprefix("torch.") not in DTYPES:
            raise PreconditionError(f"LowerToEncoded: layer {layer.name} has a {weight.dtype} weight; "
                                    f"encoded weights are {', '.join(DTYPES)}")
        if self.layout == "pattern" and not pattern_applies(weight):
            raise PreconditionError(f"LowerToEncoded.layout='pattern': layer {layer.name} ({layer.weight}, shape "
                                    f"{list(weight.shape)}) is not N:M sparse in blocks of 4 or 8 (at most half of "
                                    f"each block nonzero); use layout='auto'")
        bits = [t.bits for t in chain_transforms(gm, node) if t.bits is not None]
        index_bits = self.index_bits or _DEEP_COMPRESSION_INDEX_BITS["conv" if layer.is_conv else "fc"]
        return weight, index_bits, min(bits) if bits else None

    def _encode_weight(self, gm: GraphModule, layer: Layer) -> EncodedWeight:
        """One layer's EncodedWeight (what `_lower` makes for each layer of a batch)."""
        weight, index_bits, bits = self._prepare(gm, layer)
        return EncodedWeight.from_encoded(self._encode([weight], [index_bits], [_group_steps(gm, layer)])[0], bits=bits)

    def _encode(self, weights: list[torch.Tensor], index_bits: list[int], groups: list) -> list:
        return encode_tensors(weights, index_bits=index_bits, threads=torch.get_num_threads(), groups=groups,
                              layouts=LAYOUTS if self.layout == "auto" else (self.layout,),
                              codings=CODINGS if self.coding == "auto" else (self.coding,))

    def _lower(self, gm: GraphModule, batch: list, touched: list, stats: dict) -> None:
        """Encode a batch of layers' weights together (their rANS streams share one coder loop), then
        feed each layer from its EncodedWeight."""
        encoded = self._encode([item[1] for item in batch], [item[2] for item in batch], [item[4] for item in batch])
        for (layer, _, _, bits, _), tensor in zip(batch, encoded):
            node = layer_node(gm, layer)
            module = EncodedWeight.from_encoded(tensor, bits=bits)
            _replace_input(gm, node, weight_arg(node), module, layer.weight)
            touched.append(layer.weight)
            bias = bias_arg(node)
            if self.bias == "float16" and bias is not None and bias.op == "get_attr":
                _replace_input(gm, node, bias, EncodedWeight.from_encoded(encode_half(_attr(gm, bias.target))),
                               bias.target)
                touched.append(bias.target)
            stats[layer.name] = {"bytes": sum(module.storage_bytes().values()), **_describe(module)}


def _group_steps(gm: GraphModule, layer: Layer) -> GroupSteps | None:
    """The steps of a group-wise linear grid on the layer's weight chain, in the weight's storage order
    (2-D weights grouped along dim 1), computed as the fake-quant layer computes them on its input; the
    encoder checks every value against them, so a later transform on the chain costs bytes, not exactness."""
    found = chain_module_node(gm, layer_node(gm, layer), GridWeight) if layer_node(gm, layer).op == "call_function" \
        else None
    module = gm.get_submodule(found.target) if found is not None else None
    if module is None or module.group_size is None or not module.enabled or module.axis != 0:
        return None
    with torch.no_grad():
        source = constant_value(gm, found.args[0])
        if source.dim() != 2 or source.dtype != torch.float32:
            return None
        steps = module.grid(source).scale
    return GroupSteps(steps.detach().float().contiguous().numpy().reshape(-1), module.group_size)


def _stored_numel(gm: GraphModule, layer: Layer) -> int:
    """Elements of the layer's stored weight (0 where it is not a plain attribute)."""
    owner, _, name = layer.weight.rpartition(".")
    value = getattr(gm.get_submodule(owner), name, None)
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _has_chain(gm: GraphModule, weight: Node | None) -> bool:
    if weight is None or weight.op == "get_attr":
        return False
    if weight.op == "call_module" and isinstance(gm.get_submodule(weight.target), EncodedWeight):
        return False  # already lowered
    return True


def _attr(gm: GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _replace_input(gm: GraphModule, node: Node, old: Node, module: EncodedWeight, stored: str) -> None:
    """Feed `node` from `module`, registered in the owner as `<name>_encoded` so names stay stable."""
    owner, _, name = stored.rpartition(".")
    gm.get_submodule(owner).add_module(f"{name}_encoded", module)
    tied = [reader for reader in tied_readers(gm, node) if weight_arg(reader) is old]  # a tied LM head: stored once
    first = next(n for n in gm.graph.nodes if n is node or n in tied)
    with gm.graph.inserting_before(first):
        new = gm.graph.call_module(f"{stored}_encoded", ())
    for reader in tied:
        reader.replace_input_with(old, new)
    swap_input(gm, node, old, new)


def _describe(module: EncodedWeight) -> dict:
    h = module.header
    return {"layout": h["layout"], "codebook": h["codebook"], "values": h["values"]["coding"],
            "positions": h["positions"]["coding"] if h["positions"] else None}
