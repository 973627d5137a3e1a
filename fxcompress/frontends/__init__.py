"""Front ends: ways other than torch.fx symbolic tracing to bring a model into a GraphModule, and
the rewrites that apply to a graph from any of them (shape specialization, linear layers written as
products)."""
from .export import export_module, from_exported, is_exported_module
from .matmul import linears_written_as_matmul
from .specialize import specialize_shapes

__all__ = ["export_module", "from_exported", "is_exported_module", "linears_written_as_matmul", "specialize_shapes"]
