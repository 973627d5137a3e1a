"""Pruning with masks: importance and selection, mask nodes, schedules.

`fxcompress.pruning.interop` (torch.nn.utils.prune both ways, lottery-ticket rewinding) compiles
models, so it stands above the passes and is imported by name, not from here.
"""
from .masks import get_mask, mask_name, mask_node, masked_layers, sparsity_of
from .schedule import AGP

__all__ = ["AGP", "get_mask", "mask_name", "mask_node", "masked_layers", "sparsity_of"]
