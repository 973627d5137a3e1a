"""ParamOwnership: which module owns each parameter / buffer, and which nodes read it."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch.fx import GraphModule

from ..analysis import Analysis


@dataclass(frozen=True)
class ParamOwnership(Analysis):
    """`owner[param]` is the owning module's path; `readers[param]` the nodes that use the tensor."""

    owner: Mapping[str, str]
    readers: Mapping[str, tuple[str, ...]]

    @classmethod
    def compute(cls, gm: GraphModule, ctx) -> ParamOwnership:
        owner = {name: name.rpartition(".")[0] for name, _ in [*gm.named_parameters(), *gm.named_buffers()]}
        owned: dict[str, list[str]] = {}
        for name, module_path in owner.items():
            owned.setdefault(module_path, []).append(name)
        readers: dict[str, list[str]] = {name: [] for name in owner}
        for node in gm.graph.nodes:
            if node.op == "get_attr" and node.target in readers:
                readers[node.target].append(node.name)
            elif node.op == "call_module":
                for name in owned.get(node.target, ()):
                    readers[name].append(node.name)
        return cls(MappingProxyType(owner), MappingProxyType({k: tuple(v) for k, v in readers.items()}))
