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

from torch.fx import GraphModule, Node

from fxcompress.analyses.shapes import ShapeInfo
from fxcompress.config import Interval, Options, validate
from fxcompress.encoded.module import EncodedWeight
from fxcompress.encoded.rewire import swap_input
from fxcompress.encoded.streams import CODINGS
from fxcompress.encoded.tensor import DTYPES, LAYOUTS, encode_half, encode_tensor
from fxcompress.errors import PreconditionError
from fxcompress.layers import (Layer, bias_arg, chain_transforms, effective_weight, layer_node, select_layers,
                               tied_readers, weight_arg)
from fxcompress.pass_base import Pass, PassContext, PassResult

_DEEP_COMPRESSION_INDEX_BITS = {"conv": 8, "fc": 5}


@dataclass(frozen=True, kw_only=True)
class LowerToEncoded(Pass):
    """coding: "auto" (smallest per stream) or one of "fixed", "huffman", "rans".
    layout: "auto", "relative" (nonzero positions as relative indices) or "dense".
    index_bits: width of a relative index; None gives Deep Compression's 8 (conv) / 5 (fc).
    bias: "float32" keeps biases as they are; "float16" stores them rounded to half precision.
    """

    coding: str = "auto"
    layout: str = "auto"
    index_bits: int | None = None
    bias: str = "float32"

    preserves: ClassVar[tuple[type, ...]] = (ShapeInfo,)

    constraints: ClassVar[dict] = {
        "coding": (Options("auto", *CODINGS),), "layout": (Options("auto", *LAYOUTS),),
        "index_bits": (Interval(int, 1, 16), None), "bias": (Options("float32", "float16"),),
    }

    def __post_init__(self) -> None:
        validate(self)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        touched, stats = [], {}
        for layer in ctx.each(select_layers(gm, "LowerToEncoded"), "encoding"):
            node = layer_node(gm, layer)
            if node.op != "call_function" or not _has_chain(gm, weight_arg(node)):
                continue  # no mask or fake-quant on this weight: it stays a float parameter
            module = self._encode_weight(gm, layer)
            _replace_input(gm, node, weight_arg(node), module, layer.weight)
            touched.append(layer.weight)
            bias = bias_arg(node)
            if self.bias == "float16" and bias is not None and bias.op == "get_attr":
                _replace_input(gm, node, bias, EncodedWeight.from_encoded(encode_half(_attr(gm, bias.target))),
                               bias.target)
                touched.append(bias.target)
            stats[layer.name] = {"bytes": sum(module.storage_bytes().values()), **_describe(module)}
        return PassResult(changed=bool(touched), params_touched=tuple(touched), stats=stats)

    def _encode_weight(self, gm: GraphModule, layer: Layer) -> EncodedWeight:
        node = layer_node(gm, layer)
        weight = effective_weight(gm, layer)
        if str(weight.dtype).removeprefix("torch.") not in DTYPES:
            raise PreconditionError(f"LowerToEncoded: layer {layer.name} has a {weight.dtype} weight; "
                                    f"encoded weights are {', '.join(DTYPES)}")
        bits = [t.bits for t in chain_transforms(gm, node) if t.bits is not None]
        index_bits = self.index_bits or _DEEP_COMPRESSION_INDEX_BITS["conv" if layer.is_conv else "fc"]
        encoded = encode_tensor(weight, index_bits=index_bits,
                                layouts=LAYOUTS if self.layout == "auto" else (self.layout,),
                                codings=CODINGS if self.coding == "auto" else (self.coding,))
        return EncodedWeight.from_encoded(encoded, bits=min(bits) if bits else None)


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
