"""Pruning with masks: importance and selection, mask nodes, schedules, torch.nn.utils.prune interop."""
from .interop import export_to_torch_prune, import_from_torch_prune, rewind
from .masks import get_mask, mask_name, mask_node, masked_layers, sparsity_of
from .schedule import AGP

__all__ = ["AGP", "export_to_torch_prune", "get_mask", "import_from_torch_prune", "mask_name", "mask_node",
           "masked_layers", "rewind", "sparsity_of"]
