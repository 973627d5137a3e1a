"""Weight-bearing layers of a GraphModule and the chain of nodes that produces each weight.

Passes that act on weights (masks, fake-quant, lowering) turn a `call_module` linear / conv node
into its functional form so the weight becomes a visible value in the graph:

    get_attr fc1.weight -> [mask mul] -> [fake-quant] -> F.linear(x, weight, bias)

The nodes between the stored parameter and the layer call are the layer's *weight chain*.
"""
from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from .config import Constraint, TupleOf
from .errors import ConfigError, PreconditionError, TiedLayerWarning

if TYPE_CHECKING:  # rules.py is the rule language, which layers.py need not import to run
    from .rules import RuleSet


class WeightTransform(nn.Module):
    """Base class of modules that sit on a weight chain (fake-quant, encoded weights, ...).

    `bits` is the number of bits per stored weight the transform implies (None: unchanged).
    `storage_bytes()` returns the exact stored bytes split by part ({"positions": n, "indices": n,
    "codebook": n, "header": n}) once a weight is really encoded, else None (summary estimates).
    """

    bits: int | None = None

    def storage_bytes(self) -> dict[str, int] | None:
        return None


def chain_module_node(gm: GraphModule, node: Node, types: type | tuple[type, ...]) -> Node | None:
    """The call_module node on a functional layer's weight chain whose module is of `types`, if any."""
    current = weight_arg(node) if node.op == "call_function" else None
    while isinstance(current, Node) and current.op != "get_attr":
        if current.op == "call_module" and isinstance(submodule(gm, current.target), types):
            return current
        current = current.args[0] if current.args else None
    return None


def chain_transforms(gm: GraphModule, node: Node) -> list[WeightTransform]:
    """The WeightTransform modules on the weight chain of a functional layer node, source first."""
    found = []
    current = weight_arg(node)
    while current is not None and current.op != "get_attr":
        if current.op == "call_module":
            module = submodule(gm, current.target)
            if isinstance(module, WeightTransform):
                found.append(module)
        first = current.args[0] if current.args else None
        current = first if isinstance(first, Node) else None
    return found[::-1]


def check_float_weight(gm: GraphModule, layer: Layer, owner: str, *, behind_quantizer: bool = False) -> None:
    """Refuse a layer whose stored weight a pass cannot rewrite: encoded bytes or integer codes, or, unless
    `behind_quantizer`, a float weight behind a quantizer or codebook (scales or second-order updates folded
    into it would no longer be what the layer computes, so such a pass comes before InsertFakeQuant)."""
    node = layer_node(gm, layer)
    transforms = chain_transforms(gm, node) if node.op == "call_function" else []
    stored = stored_attr(gm, layer.weight)
    encoded = not (isinstance(stored, torch.Tensor) and torch.is_floating_point(stored))
    if encoded or (transforms and not behind_quantizer):
        what = ", ".join(type(t).__name__ for t in transforms) or f"stored as {type(stored).__name__}"
        before = "LowerToEncoded / an integer lowering" if behind_quantizer else "InsertFakeQuant / LowerToEncoded"
        raise PreconditionError(f"{owner}: layer {layer.name!r} ({layer.weight}) is already quantized or encoded "
                                f"({what}); run {owner} before {before}")


@dataclass(frozen=True)
class LayerKind:
    """One kind of weight-bearing layer: the one place its module, functional form and dims are known.

    The functional form takes `(input, weight, bias, ...)` unless the positions below say otherwise
    (`torch.addmm(bias, input, weight)`); they are read by `weight_arg` / `bias_arg` / `input_arg`,
    and a keyword call names them "weight" / "bias".
    """

    name: str                  # "linear", "conv2d", "conv_transpose2d", "embedding", "addmm", ...
    module: type | None        # its nn module (matched by exact type: a subclass may override forward); None: none
    function: Callable         # its functional form (F.linear, F.conv2d, ...)
    out_dim: int               # the weight dim that indexes output channels (1 for transposed weights)
    in_dim: int | None         # the weight dim that indexes input channels (None: an embedding table has none)
    weight_pos: int = 1        # position of the weight argument in the functional call
    bias_pos: int | None = 2   # position of the bias argument (None: the kind has no bias)
    input_pos: int = 0         # position of the input
    family: str = "conv"       # "linear", "conv" or "embedding": how the weight is applied
    weight_ndim: int = 2       # dims of its weight (a conv's: 2 + its spatial dims)

    @property
    def is_conv(self) -> bool:
        return self.family == "conv"

    @property
    def is_transposed(self) -> bool:
        return self.out_dim == 1


KINDS: dict[str, LayerKind] = {kind.name: kind for kind in (
    LayerKind("linear", nn.Linear, F.linear, out_dim=0, in_dim=1, family="linear"),
    LayerKind("conv1d", nn.Conv1d, F.conv1d, out_dim=0, in_dim=1, weight_ndim=3),
    LayerKind("conv2d", nn.Conv2d, F.conv2d, out_dim=0, in_dim=1, weight_ndim=4),
    LayerKind("conv3d", nn.Conv3d, F.conv3d, out_dim=0, in_dim=1, weight_ndim=5),
    LayerKind("conv_transpose1d", nn.ConvTranspose1d, F.conv_transpose1d, out_dim=1, in_dim=0,
              weight_ndim=3),
    LayerKind("conv_transpose2d", nn.ConvTranspose2d, F.conv_transpose2d, out_dim=1, in_dim=0,
              weight_ndim=4),
    LayerKind("conv_transpose3d", nn.ConvTranspose3d, F.conv_transpose3d, out_dim=1, in_dim=0,
              weight_ndim=5),
    # a table of rows [num_embeddings, dim]: its output channels are the embedding dim
    LayerKind("embedding", nn.Embedding, F.embedding, out_dim=1, in_dim=None, bias_pos=None, family="embedding"),
    # Hugging Face's Conv1D (GPT-2): addmm(bias, x2d, weight) with the weight stored [in, out]
    LayerKind("addmm", None, torch.addmm, out_dim=1, in_dim=0, weight_pos=2, bias_pos=0, input_pos=1,
              family="linear"),
)}
_BY_MODULE: dict[type, LayerKind] = {kind.module: kind for kind in KINDS.values() if kind.module is not None}
_BY_FUNCTION: dict[Callable, LayerKind] = {kind.function: kind for kind in KINDS.values()}
FUNCTIONS: dict[Callable, str] = {fn: kind.name for fn, kind in _BY_FUNCTION.items()}  # functional op -> kind


def kind_of_type(cls: type) -> str | None:
    """The layer kind of a module class ("linear", "conv_transpose2d", ...; exact type), None if not a layer."""
    kind = _BY_MODULE.get(cls)
    return kind.name if kind is not None else None


def kind_of_node(gm: GraphModule, node: Node) -> LayerKind | None:
    """The layer kind a call_module / call_function node computes, None for any other node."""
    if node.op == "call_module":
        return _BY_MODULE.get(type(submodule(gm, node.target)))
    if node.op == "call_function":
        return _BY_FUNCTION.get(node.target)
    return None


def submodule(root: nn.Module, target: str) -> nn.Module:
    """`root.get_submodule(target)`, several times faster on the paths graphs hold (see `_walk`)."""
    found = _walk(root, target)
    return root.get_submodule(target) if found is None else found


def inverse_scale_name(weight: str) -> str:
    """The buffer a layer's input is multiplied by where `ScaleChannels(insert_scales=True)` put AWQ's scales
    into a node of their own (no producer could take them): 1 / s, the layer's columns holding s.
    "mlp.c_proj.weight" -> "mlp.c_proj.weight_inverse_scale". Exports for other code refuse it by this name."""
    return f"{weight}_inverse_scale"


def stored_attr(root: nn.Module, target: str) -> Any:
    """`operator.attrgetter(target)(root)` (what a get_attr node reads), its module steps read as `_walk` reads them."""
    owner, _, field = target.rpartition(".")
    module = _walk(root, owner) if owner else root
    return operator.attrgetter(target)(root) if module is None else getattr(module, field)


def _walk(root: nn.Module, path: str) -> nn.Module | None:
    """The module at `path`, each step read from the parent's `_modules` where attribute lookup would
    find exactly that entry: the parent's class neither defines the name nor customizes lookup, and no
    parameter, buffer or instance attribute has it. None where a step is not provably so (the callers
    then ask torch, whose answer or error stands)."""
    module = root
    for item in path.split("."):
        child = module._modules.get(item)
        cls = type(module)
        if (child is None or cls.__getattr__ is not _MODULE_GETATTR or cls.__getattribute__ is not _OBJECT_GETATTRIBUTE
                or item in module.__dict__ or item in module._parameters or item in module._buffers
                or hasattr(cls, item)):
            return None
        module = child
    return module


_MODULE_GETATTR = nn.Module.__getattr__
_OBJECT_GETATTRIBUTE = object.__getattribute__


class LayerTypes(Constraint):
    """A `types` entry of a pass: a layer kind name ("conv2d") or its module class (nn.Conv2d)."""

    def satisfied_by(self, value: Any) -> bool:
        return (isinstance(value, str) and value in KINDS) or (isinstance(value, type) and value in _BY_MODULE)

    def claims(self, value: Any) -> bool:
        return isinstance(value, (str, type))

    def describe(self) -> str:
        return f"a layer kind ({', '.join(KINDS)}) or its nn module class"

    def explain(self, name: str, value: Any) -> str:
        return (f"{name}: {value!r} is not a maskable layer type; use one of {', '.join(KINDS)} "
                f"or the nn module classes")

    def example(self) -> Any:
        return "linear"

    def invalid_values(self) -> tuple[Any, ...]:
        return ("lstm", nn.ReLU, 3)


# A pass's `types` field: one entry or a tuple of them (normalized by `kind_names`).
TYPES_FIELD = (LayerTypes(), TupleOf(LayerTypes()))


def kind_names(types: Any) -> tuple[str, ...]:
    """A validated `types` value as kind names: nn.Conv2d -> "conv2d", a single entry -> a 1-tuple."""
    entries = tuple(types) if isinstance(types, (list, tuple)) else (types,)
    return tuple(kind_of_type(entry) if isinstance(entry, type) else entry for entry in entries)


@dataclass(frozen=True)
class Layer:
    """A linear / conv layer found in the graph."""

    name: str            # the module path owning the weight ("features.0"); the parameter name if root-owned
    kind: str            # "linear", "conv2d", "conv_transpose2d", ...
    node: str            # the node that computes the layer (call_module or call_function)
    weight: str          # qualified name of the stored weight tensor ("features.0.weight")
    bias: str | None     # qualified name of the bias, if any
    tied_to: str | None = None  # the earlier layer whose very weight tensor this one uses (an LM head's)

    @property
    def spec(self) -> LayerKind:
        return KINDS[self.kind]

    @property
    def is_conv(self) -> bool:
        return self.spec.is_conv


def layer_kind(module: nn.Module) -> str | None:
    """The layer kind of a module ("linear", "conv2d", ...; exact type), None if it is not a layer."""
    return kind_of_type(type(module))


def _argument(node: Node, name: str) -> Node | None:
    kind = _BY_FUNCTION.get(node.target) or KINDS["linear"]  # a transform's chain call: the linear positions
    position, keyword = _ARGUMENTS[kind.name][name]
    if position is None:
        return None
    value = node.args[position] if len(node.args) > position else node.kwargs.get(keyword)
    return value if isinstance(value, Node) else None


# kind -> argument -> (position, keyword): the keywords are the argument names except for torch.addmm's
_KEYWORDS = {"addmm": {"weight": "mat2", "bias": "input", "input": "mat1"}}
_ARGUMENTS: dict[str, dict[str, tuple[int | None, str]]] = {
    kind.name: {name: (position, _KEYWORDS.get(kind.name, {}).get(name, name)) for name, position in
                (("weight", kind.weight_pos), ("bias", kind.bias_pos), ("input", kind.input_pos))}
    for kind in KINDS.values()}


def input_arg(node: Node) -> Node | None:
    """The node passed as the input of a functional layer call (the indices of an embedding)."""
    return _argument(node, "input")


def weight_arg(node: Node) -> Node | None:
    """The node passed as `weight` to a functional linear / conv call."""
    return _argument(node, "weight")


def bias_arg(node: Node) -> Node | None:
    """The node passed as `bias` to a functional linear / conv call (None: no bias)."""
    return _argument(node, "bias")


def weight_source(node: Node) -> Node | None:
    """Follow a weight chain from the layer call back to the stored tensor's get_attr node.

    Each transform in a chain takes the weight as its first argument (mul(w, mask), fake_quant(w)).
    The source is a get_attr of a stored tensor, or a call_module with no input that produces the
    weight itself (an encoded weight after lowering); None when the weight comes from the inputs.
    """
    current = weight_arg(node)
    while current is not None and current.op != "get_attr":
        first = current.args[0] if current.args else None
        if not isinstance(first, Node):
            return current if current.op == "call_module" and not current.args else None
        current = first
    return current


def find_layers(gm: GraphModule) -> list[Layer]:
    """Every layer of `gm`, in graph order, module or functional form. A layer whose weight is the
    very tensor of an earlier layer (a tied LM head) says so in `tied_to`."""
    return [layer for layer, _ in _layers(gm)]


def _layers(gm: GraphModule) -> Iterator[tuple[Layer, Node]]:
    """find_layers' layers with their nodes, one at a time (a lookup stops at the one it wants)."""
    owners: dict[int, Layer] = {}
    crowded = _crowded_owners(gm)
    for node in gm.graph.nodes:
        found = _untied_layer(gm, node, crowded)
        if found is None:
            continue
        layer, tensor = found
        first = owners.setdefault(id(tensor), layer) if tensor is not None else layer
        if first is not layer:
            name = layer.name if layer.name != first.name else _module_path(node, first.name) or node.name
            layer = Layer(name, layer.kind, layer.node, layer.weight, layer.bias, tied_to=first.name)
        yield layer, node


def _untied_layer(gm: GraphModule, node: Node, crowded: set[str]) -> tuple[Layer, object | None] | None:
    """The layer `node` computes as if no other layer shared its weight, and what its weight is stored
    as (`_stored_weight`); None for a node that computes no stored layer. Each module is looked up once."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        kind = _BY_MODULE.get(type(module))
        if kind is None:
            return None
        bias = f"{node.target}.bias" if getattr(module, "bias", None) is not None else None
        return Layer(node.target, kind.name, node.name, f"{node.target}.weight", bias), module.weight
    kind = _BY_FUNCTION.get(node.target) if node.op == "call_function" else None
    source = weight_source(node) if kind is not None else None
    if source is None:
        return None  # no layer, or its weight is computed from inputs: not a stored layer
    stored = _source_object(gm, source)
    if isinstance(stored, torch.Tensor) and stored.dim() != kind.weight_ndim:
        return None  # one slice of a larger tensor (an expert of a stacked experts tensor), not a stored layer
    bias_node = bias_arg(node)
    bias = bias_node.target if bias_node is not None and bias_node.op == "get_attr" else None
    owner = source.target.rpartition(".")[0]
    # named by its module, as a module layer is (it keeps its name once functionalized), unless that module
    # holds the weights of several functional layers (attention's wq, wk): then each by its weight's path,
    # or their statistics would collide under one name
    name = source.target if not owner or owner in crowded else owner
    return Layer(name, kind.name, node.name, source.target, bias), stored


def _crowded_owners(gm: GraphModule) -> set[str]:
    """The module paths that hold the stored weights of two or more functional layers."""
    weights: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        source = weight_source(node) if node.op == "call_function" and node.target in _BY_FUNCTION else None
        if source is not None:
            weights.setdefault(source.target.rpartition(".")[0], set()).add(source.target)
    return {owner for owner, targets in weights.items() if len(targets) > 1}


def _module_path(node: Node, taken: str) -> str | None:
    """The module path a layer node was traced or exported in (fx and export record it), unless it is
    `taken`: the name of a tied layer whose weight chain starts at another layer's tensor (an LM head
    reading its token table's masked weight is still `lm_head`)."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else None
    return path if path and path != taken else None


def _stored_weight(gm: GraphModule, node: Node) -> object | None:
    """What a layer node's weight is stored as: the tensor, or the module that produces it (an
    encoded weight); two layers with the same one are tied."""
    if node.op == "call_module":
        return submodule(gm, node.target).weight
    source = weight_source(node)
    return None if source is None else _source_object(gm, source)


def _source_object(gm: GraphModule, source: Node) -> object:
    """What a weight chain's source node reads: the stored tensor, or the module producing the weight."""
    return stored_attr(gm, source.target) if source.op == "get_attr" else submodule(gm, source.target)


def tied_readers(gm: GraphModule, node: Node) -> list[Node]:
    """The other layer nodes that compute with the very weight tensor of layer node `node`."""
    tensor = _stored_weight(gm, node)
    if tensor is None:
        return []
    return [other for other in gm.graph.nodes if other is not node and _reads_stored(gm, other, tensor)]


def _reads_stored(gm: GraphModule, node: Node, stored: object) -> bool:
    """Whether `node` is a layer whose weight is stored as `stored` (`_stored_weight(gm, node) is stored`)."""
    if node.op == "call_module":
        module = submodule(gm, node.target)
        return type(module) in _BY_MODULE and module.weight is stored
    if node.op == "call_function" and node.target in _BY_FUNCTION:
        source = weight_source(node)
        return source is not None and _source_object(gm, source) is stored
    return False


def select_layers(gm: GraphModule, owner: str, types: tuple[str, ...] = (), select: str | None = None, *,
                  required: bool = False, warn_tied: bool = False) -> list[Layer]:
    """The layers of `gm` whose kind is in `types` (kind names, see `kind_names`; any if empty) and
    whose name fully matches `select` (any if None), in graph order. Every pass selects its layers
    here. Selecting nothing is a ConfigError naming the layers there are, when a filter was given or
    the pass `required` a layer. A tied layer is left to the layer it is tied to; with `warn_tied` (a
    pass that compresses weights) a TiedLayerWarning names each tied layer selected whose first layer
    is not, since its weight then stays as it is though the selection named it."""
    every = find_layers(gm)
    patterns = () if select is None else (select,)
    chosen = [layer for layer in every
              if (not types or layer.kind in types) and (not patterns or name_matches(gm, layer.name, patterns))]
    layers = [layer for layer in chosen if layer.tied_to is None]  # a tied weight is handled once, by its first layer
    if not layers and (required or types or select is not None):
        tied = [layer for layer in chosen if layer.tied_to is not None]
        if tied:  # the selection matched, but only layers whose weight is another layer's tensor
            names = ", ".join(f"{layer.name!r} (tied to {layer.tied_to!r})" for layer in tied)
            raise ConfigError(f"{owner} (select={select!r}, types={types!r}) selects only tied layers: {names}; a "
                              "tied layer's weight is the very tensor of the layer it is tied to and is compressed "
                              f"once, through that layer: select {tied[0].tied_to!r} instead")
        raise ConfigError(f"{owner} selects no layer (select={select!r}, types={types!r}); "
                          f"the layers are {[layer.name for layer in every]}")
    if warn_tied:
        kept = {layer.name for layer in layers}
        for layer in chosen:
            if layer.tied_to is not None and layer.tied_to not in kept:
                warnings.warn(f"{owner} (select={select!r}, types={types!r}) leaves out {layer.name!r}: its weight is "
                              f"the very tensor of {layer.tied_to!r}, which the selection does not hold, and a tied "
                              f"weight is compressed once, through that layer (select {layer.tied_to!r} too to "
                              "compress it)", TiedLayerWarning, stacklevel=3)
    return layers


def name_matches(gm: GraphModule, name: str, patterns: tuple) -> bool:
    """Whether the layer (module path) `name` is selected by any of `patterns`: a regex that fully matches
    the name, or an nn.Module class the module at that path is an instance of. The one matching rule
    of every pass's `select=` / `keep=` (PruneChannels picks channel groups by their producers' names)."""
    for pattern in patterns:
        if isinstance(pattern, str) and re.fullmatch(pattern, name):
            return True
        if isinstance(pattern, type) and issubclass(pattern, nn.Module):
            try:
                if isinstance(submodule(gm, name), pattern):
                    return True
            except AttributeError:  # a functional layer: no module at that path
                continue
    return False


def layer_node(gm: GraphModule, layer: Layer) -> Node:
    """The node computing `layer`, found by its node name or, once rewritten, by its weight."""
    for node in gm.graph.nodes:
        if node.name == layer.node:
            return node
    for found, node in _layers(gm):  # the node was replaced (e.g. functionalized) since `layer` was found
        if found.weight == layer.weight or found.name == layer.name:
            return node  # the first layer that matches: the graph is read no further
    raise KeyError(f"layer {layer.name!r} (node {layer.node!r}) is not in the graph")


def functionalize(gm: GraphModule, node: Node) -> Node:
    """Replace a call_module layer by get_attr weight (and bias) + its functional form.

    The parameters stay in their module (state_dict keys are unchanged); returns the new node.
    Layers are named by module path, so the layer keeps its name even though the node's changes.
    """
    if node.op == "call_function":
        return node
    module = submodule(gm, node.target)
    kind = _BY_MODULE[type(module)]
    graph: Graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{node.target}.weight")
        bias = graph.get_attr(f"{node.target}.bias") if getattr(module, "bias", None) is not None else None
        args = _functional_args(graph, node, module, kind, weight, bias)
        new = graph.create_node("call_function", kind.function, args, {}, name=node.name)  # fx adds a suffix
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _functional_args(graph: Graph, node: Node, module: nn.Module, kind: LayerKind, weight: Node,
                     bias: Node | None) -> tuple:
    """The arguments of the functional call that computes what `module` computes at `node`."""
    x = call_input(node)
    if kind.family == "linear":
        return (x, weight, bias)
    if kind.family == "embedding":
        if module.max_norm is not None:  # F.embedding would renormalize the stored rows in place
            raise PreconditionError(f"embedding '{node.target}' has max_norm={module.max_norm}: its rows are "
                                    "rewritten in place on each call, so no mask or quantizer can sit on them")
        return (x, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq, module.sparse)
    if kind.is_transposed:
        if len(node.args) > 1 or set(node.kwargs) - {"input"}:  # forward(input, output_size=None)
            raise PreconditionError(f"{type(module).__name__} '{node.target}' is called with output_size: the "
                                    "output padding it implies depends on the input's run-time size, so the layer "
                                    "cannot be rewritten into its functional form (to mask or quantize its weight); "
                                    "give the module output_padding instead, or leave it out of the selection")
        return (x, weight, bias, module.stride, module.padding, module.output_padding, module.groups,
                module.dilation)
    if module.padding_mode != "zeros":
        pad = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        return (pad, weight, bias, module.stride, 0, module.dilation, module.groups)
    return (x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def call_input(node: Node) -> Node:
    """The input of a call_module node, passed by position or as `input=` (`bn(input=y)`)."""
    if node.args:
        return node.args[0]
    if "input" in node.kwargs:
        return node.kwargs["input"]
    raise PreconditionError(f"module '{node.target}' is called with no input argument ({node.format_node()})")


def insert_on_weight(gm: GraphModule, layer: Layer,
                     build: Callable[[Graph, Node], Node], *, node: Node | None = None) -> Node:
    """Put `build(graph, weight)` between the layer's current weight value and the layer call.

    Returns the node `build` created; the layer is functionalized first when needed. Layers tied to
    it (the same weight tensor) read the same chain, so the weight stays one tensor with one mask
    and one quantizer; a tied module left without use is removed (its weight lives on in the first).
    `node` is `layer_node(gm, layer)` where the caller has just looked it up (the graph unchanged since).
    """
    node = functionalize(gm, layer_node(gm, layer) if node is None else node)
    readers = tied_readers(gm, node)  # functionalizing one reader leaves the others as they are
    tied_modules = [reader.target for reader in readers if reader.op == "call_module"]
    tied = [functionalize(gm, reader) for reader in readers]
    current = weight_arg(node)
    first = next(n for n in gm.graph.nodes if n is node or n in tied)
    with gm.graph.inserting_before(first):
        if current.op == "get_attr" and first is not node:  # the chain must precede its first reader
            current = gm.graph.get_attr(current.target)
        new = build(gm.graph, current)
    replaced = {weight_arg(reader) for reader in (node, *tied)} - {current}
    for reader in (node, *tied):
        reader.replace_input_with(weight_arg(reader), new)
    _drop_unused(gm, replaced, tied_modules)
    return new


def _drop_unused(gm: GraphModule, weights: set[Node], modules: list[str]) -> None:
    """Erase the weight reads the tie left without users, then the tied modules nothing reads."""
    for dead in [n for n in weights if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(dead)
    read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for path in modules:
        if not any(t == path or t.startswith(path + ".") for t in read):
            parent, _, name = path.rpartition(".")
            delattr(gm.get_submodule(parent), name)


def constant_value(gm: GraphModule, node: Node) -> torch.Tensor:
    """Evaluate a node that depends on no placeholder (e.g. a weight chain), without grad."""
    env: dict[Node, object] = {}

    def value(n: Node):
        if n in env:
            return env[n]
        if n.op == "placeholder":
            raise ValueError(f"{n.format_node()} depends on a graph input")
        args = torch.fx.node.map_arg(n.args, value)
        kwargs = torch.fx.node.map_arg(n.kwargs, value)
        if n.op == "get_attr":
            out = stored_attr(gm, n.target)
        elif n.op == "call_function":
            out = n.target(*args, **kwargs)
        elif n.op == "call_method":
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            out = submodule(gm, n.target)(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.format_node()}")
        env[n] = out
        return out

    with torch.no_grad():
        try:
            return value(node)
        finally:  # `value` refers to itself, a cycle only the garbage collector frees: drop what it holds now
            env.clear()


def effective_weight(gm: GraphModule, layer: Layer) -> torch.Tensor:
    """The weight the layer really computes with (after masks, fake-quant, decoding)."""
    node = layer_node(gm, layer)
    if node.op == "call_module":
        return submodule(gm, node.target).weight.detach()
    return constant_value(gm, weight_arg(node)).detach()


def check_tied_rules(gm: GraphModule, rules: RuleSet, layers: Sequence[Layer]) -> None:
    """Before `rules.assign` over `layers` (a pass's selection): a rule that names only a tied layer's
    weight (an LM head's, which is its token table) would be reported as matching no name at all, though
    the name is in the model: say that the layer is tied."""
    candidates = [layer.weight for layer in layers]
    every = find_layers(gm)
    weight_of = {layer.name: layer.weight for layer in every if layer.tied_to is None}
    tied = [layer for layer in every if layer.tied_to is not None]
    for rule in rules.rules:
        hit = next((layer for layer in tied if rule.matches(layer.weight)), None)
        if hit is not None and not any(rule.matches(weight) for weight in candidates):
            first = weight_of.get(hit.tied_to, hit.tied_to)
            raise ConfigError(f"{rule.origin}: {rules.owner} pattern {rule.pattern!r} matches {hit.weight!r} only, "
                              f"the weight of layer {hit.name!r}, which is tied to {hit.tied_to!r} (the same tensor, "
                              f"compressed once through that layer): write the rule for {first!r} instead")
