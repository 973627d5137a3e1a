"""ParamOwnership: which module owns each parameter / buffer, and which nodes read it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch.fx import GraphModule

from ..analysis import Analysis


@dataclass(frozen=True)
class ParamOwnership(Analysis):
    """`owner[param]` is the owning module's path; `readers[param]` the nodes that use the tensor.

    A tensor tied under several names (an LM head's weight that is its token table) has an entry under
    each name, and its readers are those of every name: a node reading `b.weight` reads `a.weight` too.
    """

    owner: Mapping[str, str]
    readers: Mapping[str, tuple[str, ...]]

    @classmethod
    def compute(cls, gm: GraphModule, ctx) -> ParamOwnership:
        # remove_duplicate=False: by default torch lists a tied tensor under its first name only, and
        # the readers of its other names would then be missed
        tensors = dict([*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)])
        owner = {name: name.rpartition(".")[0] for name in tensors}
        owned: dict[str, list[str]] = {}
        for name, module_path in owner.items():
            owned.setdefault(module_path, []).append(name)
        read_by: dict[int, list[str]] = {id(tensor): [] for tensor in tensors.values()}  # one list per tensor
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in tensors:
                read_by[id(tensors[node.target])].append(node.name)
            elif node.op == "call_module":
                # a module reading a tied tensor under two of its names is still one reader
                for tensor_id in dict.fromkeys(id(tensors[name]) for name in owned.get(node.target, ())):
                    read_by[tensor_id].append(node.name)
        readers = {name: tuple(read_by[id(tensor)]) for name, tensor in tensors.items()}
        return cls(MappingProxyType(owner), MappingProxyType(readers))
