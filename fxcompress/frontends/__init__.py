"""Front ends: ways other than torch.fx symbolic tracing to bring a model into a GraphModule."""
from .export import export_module, from_exported, is_exported_module

__all__ = ["export_module", "from_exported", "is_exported_module"]
