"""Pruning with masks: importance and selection, mask nodes, schedules, torch.nn.utils.prune interop."""
from .masks import get_mask, mask_name, mask_node, masked_layers, sparsity_of
from .schedule import AGP

__all__ = ["AGP", "get_mask", "mask_name", "mask_node", "masked_layers", "sparsity_of"]
