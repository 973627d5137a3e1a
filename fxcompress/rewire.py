"""Graph edits shared by lowering and decoding: swap a layer input, drop what only fed the old one."""
from __future__ import annotations

from torch.fx import GraphModule, Node


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
