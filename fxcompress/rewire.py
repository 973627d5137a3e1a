"""Graph edits shared by the front ends, lowering and decoding: swap a layer input, drop what only fed the old
one, drop the computations nothing reads."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

# Calls that draw random numbers: dropping an unread one would shift every later draw of the generator.
RANDOM_FUNCTIONS = frozenset({
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like, torch.randperm,
    torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.rrelu, F.gumbel_softmax})
RANDOM_METHODS = frozenset({"bernoulli", "multinomial"})  # the in-place ones end in "_"


def writes_in_place(op: str, target: Any, kwargs: dict) -> bool:
    """Whether a call may change a tensor it is given: an in-place function or method (its name ends in `_`),
    item assignment, `inplace=True`, or an `out=` tensor."""
    name = target if op == "call_method" else getattr(target, "__name__", "")
    return (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) \
        or target is operator.setitem or kwargs.get("inplace") is True or kwargs.get("out") is not None


def _has_effect(node: Node, module_calls: bool = True) -> bool:
    """Whether a call does more than compute its value: fx's own rule (outputs, side-effectful and mutating
    aten ops), plus what it does not see: in-place torch functions and tensor methods, random draws, and
    (with `module_calls`) any module call (a module may update its state, as BatchNorm's statistics in training)."""
    if node.is_impure() or (module_calls and node.op == "call_module") \
            or writes_in_place(node.op, node.target, node.kwargs):
        return True
    return node.target in RANDOM_FUNCTIONS if node.op == "call_function" else node.target in RANDOM_METHODS


def drop_unread(gm: GraphModule, module_calls_have_effects: bool = True) -> int:
    """Erase every computation whose value nothing reads and which has no other effect; returns how many.
    (torch.export keeps unread views: BERT's attention mask construction leaves three.) A lowered inference graph
    passes `module_calls_have_effects=False`: a layer whose output nothing reads goes too. fx's own
    `eliminate_dead_code` is no substitute: it drops in-place writes nothing reads (`keys[..., :8] = k`, which
    export writes as a view and a `copy_`)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: _has_effect(node, module_calls_have_effects))
    dropped = before - len(gm.graph.nodes)
    if dropped:  # the module's code is generated from the graph: without this it still computed them
        gm.recompile()
    return dropped


def swap_input(gm: GraphModule, node: Node, old: Node, new: Node) -> None:
    """Make `node` read `new` instead of `old`, then erase the nodes and tensors only `old` needed."""
    node.replace_input_with(old, new)
    for dead in erase_unused(gm, old):
        if dead.op == "get_attr" and not any(n.op == "get_attr" and n.target == dead.target
                                             for n in gm.graph.nodes):
            parent, _, attr = dead.target.rpartition(".")
            delattr(gm.get_submodule(parent), attr)
    gm.delete_all_unused_submodules()


def erase_unused(gm: GraphModule, start: Node) -> list[Node]:
    """Erase `start` and, transitively, its inputs that are left without users."""
    erased, pending = [], [start]
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op in ("placeholder", "output"):
            continue
        inputs = list(node.all_input_nodes)
        gm.graph.erase_node(node)
        erased.append(node)
        pending.extend(inputs)
    return erased
