"""What every lowering pass does around its kernel: record each layer's real input from the example
inputs (kernels are timed on it), choose which layers to lower with the reason for the others, read a
layer's fake-quant module and float bias, and put a run-time module in the layer's place with its
weight chain erased. LowerToSparse, LowerWeightOnly and LowerDynamicInt8 share these.

`MeasuredLowering` is the one configuration (fields and their constraints, `MEASURED_FIELDS`) and the
one `run` of the passes that replace linear layers by a `timing.MeasuredLayer`: a subclass says which
kernels it allows, how it reads a layer (`read`), what module it builds (`build`) and what statistics
it adds (`layer_stats`). A subclass that sets `tied_module` also lowers a linear layer whose weight
is tied to token embeddings (GPT-2's LM head and `wte`): the head runs on its measured kernel and each
embedding becomes `tied_module(head)`, a lookup reading the head's own tensors (one copy of the weight).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from ..config import Boolean, Interval, Options, Regex, TupleOf, validate
from ..rewire import erase_unused
from ..errors import ConfigError, PreconditionError
from ..execution import evaluating
from ..layers import (KINDS, Layer, bias_arg, constant_value, find_layers, functionalize, input_arg, kind_of_node,
                      layer_node, name_matches, select_layers, tied_readers, weight_arg, weight_source)
from ..pass_base import Pass, PassContext, PassResult
from ..quant import GridWeight, KMeansWeight
from .timing import MeasuredLayer

LINEAR_KINDS = ("linear", "addmm")
# the fields every measured lowering shares, with what each accepts (the kernels field: `measured_constraints`)
MEASURED_FIELDS: dict[str, tuple] = {
    "repeats": (Interval(int, 1, 1000),),
    "margin": (Interval(float, 1.0, 10.0),),
    "cold": (Boolean(),),
    "select": (Regex(), None),
}


def measured_constraints(kernels: Sequence[str]) -> dict[str, tuple]:
    """A measured lowering's constraints: a non-empty tuple of `kernels`, and MEASURED_FIELDS."""
    return {"kernels": (TupleOf(Options(*kernels), min_len=1),), **MEASURED_FIELDS}


@dataclass(frozen=True, kw_only=True)
class MeasuredLowering(Pass):
    """Linear layers replaced by a MeasuredLayer whose kernel is timed on each layer's real input.

    kernels  the kernels allowed (the float kernel is always measured, and the float layer beside it
             as the reference of the speed-ups; the float kernel stays unless beaten by `margin`)
    repeats  timed rounds per candidate (medians); margin: how much faster a kernel must be
    cold     time each call after writing more than the caches hold (as between a decoder's layers,
             whose weights then come from memory): picks kernels that read fewer bytes; False: warm caches
    select   full-match regex over layer names (None: every layer the pass can read)
    """

    kernels: tuple[str, ...] = ()
    repeats: int = 7
    margin: float = 1.05
    cold: bool = False
    select: str | None = None

    suffix: ClassVar[str] = "lowered"  # the module's name beside the layer's other children
    hint: ClassVar[str] = ""           # appended to the error when no layer can be lowered

    def __post_init__(self) -> None:
        validate(self)

    def read(self, gm: GraphModule, layer: Layer, node: Node) -> Any:  # pragma: no cover - interface
        """What the layer's module is built from, or why the layer cannot be lowered (a string)."""
        raise NotImplementedError

    def build(self, gm: GraphModule, node: Node, found: Any) -> MeasuredLayer:  # pragma: no cover - interface
        raise NotImplementedError

    def layer_stats(self, module: MeasuredLayer, found: Any) -> dict[str, Any]:
        return {}

    # builds the module a token embedding tied to a lowered layer becomes, from that layer's module (a
    # lookup reading its tensors); None (the default): the pass leaves layers with tied weights alone
    tied_module: ClassVar[Callable[[MeasuredLayer], nn.Module] | None] = None

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        name = type(self).__name__
        ties = self.tied_module is not None
        planned, skipped = plan_layers(gm, measured_layers(gm, name, self.select, ties), self.read, ties)
        if not planned:
            raise PreconditionError(f"{name}: no layer to lower: {skipped or 'no linear layer'}{self.hint}")
        inputs = layer_inputs(gm, [layer_node(gm, layer) for layer, _ in planned], ctx.example_inputs)
        stats: dict[str, Any] = {}
        for layer, found in ctx.each(planned, "timing kernels", lambda item: item[0].name):
            node = layer_node(gm, layer)
            module = self.build(gm, node, found)
            module.choose(inputs[node], self.kernels, repeats=self.repeats, margin=self.margin, cold=self.cold)
            # token embeddings only (plan_layers refused any other tie), as calls reading the weight value
            readers = [functionalize(gm, reader) for reader in tied_readers(gm, node)]
            path = install(gm, layer, node, module, self.suffix)
            module._where = f"{type(module).__name__} {path}"  # its run-time errors name the layer
            tied = [install_tied(gm, reader, self.tied_module(module), self.suffix) for reader in readers]
            stats[layer.name] = {"module": path, **module.choice_stats(self.kernels),
                                 "input_shape": list(inputs[node].shape), "held_bytes": module.held_bytes(),
                                 **self.layer_stats(module, found),
                                 **({"tied_embeddings": tied, "shared_weight": f"{path} (one copy of the weight, its "
                                     f"rows read by {', '.join(tied)})"} if tied else {})}
        kernels = ("float", *self.kernels)
        return PassResult(changed=True, params_touched=tuple(layer.weight for layer, _ in planned),
                          stats={"layers": stats, "skipped": skipped,
                                 "kernels": {k: sum(s["kernel"] == k for s in stats.values()) for k in kernels}})


class _Recorder(Interpreter):
    """Runs the graph once and keeps the input each watched layer node receives."""

    def __init__(self, gm: GraphModule, watched: list[Node]) -> None:
        super().__init__(gm)
        self.watched, self.seen = set(watched), {}

    def run_node(self, n: Node) -> Any:
        if n in self.watched:
            self.seen[n] = self.env[input_arg(n)]
        return super().run_node(n)


def layer_inputs(gm: GraphModule, nodes: list[Node], example_inputs: tuple) -> dict[Node, torch.Tensor]:
    """The input each of `nodes` receives when the graph runs on `example_inputs` (one run)."""
    if not nodes:
        return {}
    recorder = _Recorder(gm, nodes)
    with evaluating(gm):
        recorder.run(*example_inputs)
    return recorder.seen


def measured_layers(gm: GraphModule, owner: str, select: str | None, ties: bool) -> list[Layer]:
    """The linear layers a measured lowering considers, in graph order: `select_layers`' and, with `ties`,
    the linear layers whose weight an earlier layer owns (an LM head tied to its token embedding), which
    `select_layers` leaves to that first layer."""
    every = find_layers(gm)
    heads = [layer for layer in every if ties and layer.tied_to is not None and layer.kind in LINEAR_KINDS
             and (select is None or name_matches(gm, layer.name, (select,)))]
    try:
        layers = select_layers(gm, owner, LINEAR_KINDS, select)
    except ConfigError:
        if not heads:
            raise
        layers = []  # `select` names only tied heads
    chosen = {layer.node for layer in (*layers, *heads)}
    return [layer for layer in every if layer.node in chosen]


def plan_layers(gm: GraphModule, layers: list[Layer], read, ties: bool = False
                ) -> tuple[list[tuple[Layer, Any]], dict[str, str]]:
    """(layer, what `read` made of it) for the layers `read` accepts; the others with the reason it gave.
    A layer with a tied weight is refused, unless `ties` and its other readers are token embeddings it
    can serve (`tie_refusal`)."""
    planned, skipped = [], {}
    for layer in layers:
        node = layer_node(gm, layer)
        readers = tied_readers(gm, node)
        refusal = (None if not readers else tie_refusal(gm, layer, node, readers) if ties
                   else "its weight is tied to another layer's")
        found = refusal if refusal is not None else read(gm, layer, node)
        if isinstance(found, str):
            skipped[layer.name] = found
        else:
            planned.append((layer, found))
    return planned, skipped


def tie_refusal(gm: GraphModule, layer: Layer, node: Node, readers: list[Node]) -> str | None:
    """Why the tied layer `node` cannot be lowered with its other readers as lookups into its lowered
    weight: each must be a token embedding reading the very weight value the layer reads (the same chain
    of masks and fake-quant), and the layer's weight rows must be its output channels (the table's rows)."""
    if KINDS[layer.kind].out_dim != 0:
        return "its weight is tied to another layer's and stored [in, out]: its rows are not a table's rows"
    ours = weight_arg(node) if node.op == "call_function" else None  # None: a module reading its own tensor
    for reader in readers:
        kind = kind_of_node(gm, reader)
        if kind.family != "embedding":
            return f"its weight is tied to another layer's ({reader.name}, {kind.name}), not only to token embeddings"
        # the same value: the same chain of masks and fake-quant, or both the stored tensor itself
        theirs = weight_arg(reader) if reader.op == "call_function" else None
        if theirs is not ours and not all(n is None or n.op == "get_attr" for n in (ours, theirs)):
            return f"its tied embedding {reader.name} does not read the weight value the layer reads"
        max_norm = (gm.get_submodule(reader.target).max_norm if reader.op == "call_module" else
                    reader.args[3] if len(reader.args) > 3 else reader.kwargs.get("max_norm"))
        if max_norm is not None:
            return f"its tied embedding {reader.name} has max_norm (it rewrites the table's rows)"
    return None


def fake_quant_module(gm: GraphModule, node: Node) -> tuple[torch.nn.Module, Node] | str:
    """The fake-quant module that produces the layer's weight (last on its chain), or why there is none."""
    quant = weight_arg(node) if node.op == "call_function" else None
    if quant is None or quant.op != "call_module":
        return "no fake-quant module produces its weight"
    module = gm.get_submodule(quant.target)
    if not isinstance(module, (GridWeight, KMeansWeight)):
        return f"its weight comes from {type(module).__name__}, not a fake-quant module"
    if not module.enabled:
        return "its fake-quant module is switched off (set_quantization(gm, False))"
    return module, quant


def layer_bias(gm: GraphModule, node: Node) -> torch.Tensor | None:
    """The layer's float bias, from its functional node's argument or its module (a layer nothing rewrote)."""
    if node.op == "call_module":
        bias = gm.get_submodule(node.target).bias
        return None if bias is None else bias.detach().float()
    bias = bias_arg(node)
    return None if bias is None else constant_value(gm, bias).detach().float()


def install(gm: GraphModule, layer: Layer, node: Node, module: torch.nn.Module, suffix: str) -> str:
    """Put `module` in the graph in place of the layer node (at `<owner>.<suffix>`); erase the weight
    chain and its tensors. Returns the module's path."""
    owner, _, name = layer.weight.rpartition(".")
    path = f"{owner}.{suffix}" if owner else f"{name}_{suffix}"
    (gm.get_submodule(owner) if owner else gm).add_module(path.rpartition(".")[2], module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (input_arg(node),))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    for dead in erase_unused(gm, node):
        if dead.op == "get_attr" and not any(n.op == "get_attr" and n.target == dead.target for n in gm.graph.nodes):
            parent, _, attr = dead.target.rpartition(".")
            delattr(gm.get_submodule(parent), attr)
    gm.delete_all_unused_submodules()
    if owner:
        _empty_husk(gm, owner)
    return path


def install_tied(gm: GraphModule, reader: Node, module: torch.nn.Module, suffix: str) -> str:
    """Put `module` in place of the token embedding node `reader` (at `<table owner>.<suffix>_embedding`);
    erase its weight chain. Returns the module's path."""
    layer = Layer(reader.name, "embedding", reader.name, weight_source(reader).target, None)
    return install(gm, layer, reader, module, f"{suffix}_embedding")


def _empty_husk(gm: GraphModule, owner: str) -> None:
    """Replace the float layer module, left without its weight, by a plain container of its children
    (an nn.Linear without `weight` cannot even print itself), unless its own tensors are still read."""
    module = gm.get_submodule(owner)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    if type(module) is nn.Module or any(f"{owner}.{name}" in read for name, _ in
                                        (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))):
        return
    container = nn.Module()
    for child_name, child in module.named_children():
        container.add_module(child_name, child)
    parent, _, attr = owner.rpartition(".")
    setattr(gm.get_submodule(parent), attr, container)
